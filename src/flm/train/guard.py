"""The step guard: catches a non-finite loss or gradient norm, or a loss spike, at the step it happens.

Everything is decided on the device: the guard turns the step's loss and gradient norm into a boolean
flag that the optimizer obeys (flm.train.adamw: the step is cancelled, NaN gradients never touch the
weights or the Adam moments), and counts flagged steps in device tensors. The host reads the counts only
where it synchronises anyway (logging, evaluation, checkpoints), then applies the run's policy
(`train.on_bad_step`): count and go on (`skip`), return to the newest checkpoint and continue with the
data after the bad batches (`rollback`, as PaLM did), or stop with a distinct exit status (`stop`).

A spike is a loss above `spike_factor` x the median of the last `spike_window` accepted losses; the test
is armed once that window has filled, so the steep fall of the first steps never looks like one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flm.errors import FlmError

GUARD_FILE = "guard.safetensors"  # the window, saved in every checkpoint folder beside the weights


@dataclass
class GuardReport:
    """What the guard saw since the last report (read on the host)."""

    bad: int  # flagged steps
    nonfinite: int  # of which with a non-finite loss or gradient norm
    first: int  # the number of the first flagged step (0: none)
    longest_run: int  # the most flagged steps in a row


class StepGuard:
    def __init__(self, spike_factor: float, window: int, device: torch.device):
        self.factor, self.window = spike_factor, window
        self.history = torch.full((window,), float("nan"), device=device)  # accepted losses, a ring
        self.seen = 0  # steps looked at, on the host: arms the spike test and indexes the ring
        self._counts = torch.zeros(5, dtype=torch.int64, device=device)  # bad, nonfinite, first, run, longest

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """The flag for optimizer step number `step` (1-based; a boolean device scalar); updates the window and
        the counts."""
        loss, grad_norm = loss.detach().float(), grad_norm.detach().float()
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        bad = nonfinite
        if self.factor > 0 and self.seen >= self.window:
            bad = bad | (loss > self.factor * torch.nanmedian(self.history))
        self.history[self.seen % self.window] = torch.where(bad, float("nan"), loss)
        self.seen += 1
        c = self._counts
        run = torch.where(bad, c[3] + 1, 0)
        first = torch.where(bad & (c[2] == 0), step, c[2])
        self._counts = torch.stack([c[0] + bad, c[1] + nonfinite, first, run, torch.maximum(c[4], run)])
        return bad

    def report(self) -> GuardReport:
        """The counts since the last report, then reset them (one small read from the device)."""
        bad, nonfinite, first, run, longest = self._counts.tolist()
        self._counts = torch.tensor([0, 0, 0, run, run], dtype=torch.int64, device=self._counts.device)
        return GuardReport(bad, nonfinite, first, longest)

    def reset(self) -> None:
        """Forget the window and the counts (after a rollback: the losses ahead come from an earlier model)."""
        self.history.fill_(float("nan"))
        self.seen = 0
        self._counts.zero_()

    def save(self, folder: Path) -> None:
        """The window into a checkpoint folder; the number of steps seen goes into its meta.json."""
        save_file({"history": self.history.detach().cpu()}, str(folder / GUARD_FILE))

    def load(self, folder: Path, seen: int | None) -> None:
        """Continue with a checkpoint's window, so a resumed run flags exactly the steps the whole run would.
        A checkpoint without one (`flm import hf`), or with a window of another length, starts an empty one:
        the spike test re-arms after spike_window steps."""
        self.reset()
        path = Path(folder) / GUARD_FILE
        if not path.is_file() or seen is None:
            return
        try:
            history = load_file(str(path))["history"]
        except (SafetensorError, OSError, KeyError) as e:
            raise FlmError(f"cannot read {path}: {e}") from None
        if history.shape == self.history.shape:
            self.history.copy_(history)
            self.seen = seen
