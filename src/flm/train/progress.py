"""What a training run reports as it goes: records into metrics.jsonl (and TensorBoard), and a line per event, or a
tqdm bar when stderr is a terminal (a log file gets lines, not a redrawn bar).

A `train` record describes the interval since the previous one: the mean loss over the steps the step guard kept
(summed on the device, so the loop never waits for it between records) and the tokens per second. Time spent
growing or writing checkpoints is not training throughput, so it is left out of the interval.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from flm.config import TrainConfig
from flm.train.metrics import MetricsLogger


class Progress:
    """The reporting of one `Trainer.train` call, from step `step` to step `end`; `main`: this process writes."""

    def __init__(self, run_dir: Path, tc: TrainConfig, step: int, end: int, main: bool,
                 log: Callable[[str], None], device: torch.device):
        self.end = end
        self.metrics = MetricsLogger(run_dir, tc.tensorboard and main, resume_step=step if step else None,
                                     enabled=main, note=log)
        self.bar = None
        if tc.progress and main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=end, initial=step, unit="step", dynamic_ncols=True)
        self.say = self.bar.write if self.bar is not None else log
        self._loss_sum, self._loss_n = torch.zeros((), device=device), torch.zeros((), device=device)
        self.restart(step)

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.log(record)

    def restart(self, step: int) -> None:
        """A new interval from `step` (after a `train` record, or a rollback)."""
        self._t, self._step = time.perf_counter(), step
        self._loss_sum.zero_(), self._loss_n.zero_()

    def pause(self) -> None:
        """Leave the time since the last step out of the interval (growth, checkpoints)."""
        self._t = time.perf_counter()

    def stepped(self, loss: torch.Tensor, bad: torch.Tensor | None) -> None:
        """One optimizer step done; `bad`: the guard's flag (a cancelled step's loss is not averaged)."""
        kept = ~bad if bad is not None else torch.ones((), dtype=torch.bool, device=loss.device)
        self._loss_sum += torch.where(kept, loss, 0.0)
        self._loss_n += kept
        if self.bar is not None:
            self.bar.update(1)

    def interval(self, step: int, tokens_per_step: int) -> tuple[float | None, float]:
        """(mean loss of the kept steps since the interval began, None if every one was cancelled; tokens/s)."""
        tok_s = (step - self._step) * tokens_per_step / (time.perf_counter() - self._t)
        n = self._loss_n.item()
        return ((self._loss_sum / n).item() if n else None), tok_s

    def trained(self, record: dict[str, Any]) -> None:
        """A `train` record (from `interval`), then a new interval."""
        self.metrics.log(record)
        loss, norm = record["loss"], record["grad_norm"]
        shown = f"{loss:.4f}" if loss is not None else "n/a (every step cancelled)"
        if self.bar is not None:
            self.bar.set_postfix(loss=shown, lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}")
        else:
            self.say(f"step {record['step']}/{self.end} loss {shown} lr {record['lr']:.2e} "
                     f"grad_norm {'n/a' if norm is None else f'{norm:.3f}'} tok/s {record['tokens_per_s']:,.0f}")
        self.restart(record["step"])

    def grown(self, record: dict[str, Any]) -> None:
        self.metrics.log(record)
        self.say(f"step {record['step']}: grew to stage {record['stage']} ({record['params_before'] / 1e6:.2f}M -> "
                 f"{record['params_after'] / 1e6:.2f}M parameters): loss {record['loss_before']:.4f} -> "
                 f"{record['loss_after']:.4f}, grad norm {record['grad_norm_before']:.3f} -> "
                 f"{record['grad_norm_after']:.3f}")
        self.pause()

    def evaluated(self, record: dict[str, Any], val_loss: float, teacher: dict[str, float]) -> None:
        """An `eval` record; `val_loss` as measured (the record holds None for a value that is not finite)."""
        self.metrics.log(record)
        self.say(f"step {record['step']}: validation loss {val_loss:.4f} (perplexity {perplexity(val_loss)})"
                 + "".join(f", {k.replace('_', ' ')} {100 * v:.1f}%" for k, v in teacher.items()))

    def rewind(self, step: int) -> None:
        """Back to the checkpoint at `step`: its later records go, and the bar and the interval start there."""
        self.metrics.rewind(step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()
        self.restart(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()


def perplexity(loss: float) -> str:
    """exp(loss) for printing, without overflowing for a diverged loss."""
    return f"{math.exp(loss):.1f}" if loss < 700 else ("nan" if math.isnan(loss) else "inf")


def finite(value: float) -> float | None:
    """A metric for metrics.jsonl: None instead of NaN or infinity, which JSON does not have."""
    return value if math.isfinite(value) else None
