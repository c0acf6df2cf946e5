"""Run metrics: JSONL (the source of truth), TensorBoard, the loss-curve PNG, and MFU on CUDA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flm.errors import FlmError
from flm.plan.hardware import gpu_of_device


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s (the planner's table), or None on CPU and unknown GPUs."""
    if device.type != "cuda":
        return None
    gpu = gpu_of_device(torch.cuda.get_device_name(device))
    return gpu.peak_tflops * 1e12 if gpu else None


# Records written at a checkpoint's step after the checkpoint itself: the growth at a stage boundary (the
# checkpoint at that step holds the model before growing) and a rollback to that step. Resuming from the
# checkpoint writes them again, so they are dropped with everything later.
AFTER_CHECKPOINT = ("growth", "rollback")


def history_until(lines: list[str], step: int, path: Path, note=print) -> list[str]:
    """The records of `lines` that precede the checkpoint at `step`. A torn last line (a run killed while
    writing it) is dropped with a note; a malformed line elsewhere is an error."""
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                note(f"{path}: dropped a torn last line (the run was stopped while writing it)")
                continue
            raise FlmError(f"{path}: line {i + 1} is not JSON; fix or remove it to resume") from None
        at = record.get("step", 0)
        if at < step or (at == step and record.get("kind") not in AFTER_CHECKPOINT):
            kept.append(line)
    return kept


class MetricsLogger:
    """Appends one JSON object per event to `metrics.jsonl` and mirrors scalars to TensorBoard.

    On resume (and on a rollback) the records after the checkpoint's step, written by the run that was
    stopped, are dropped, so the file always describes exactly one history: after any sequence of kills and
    resumes it holds the records an uninterrupted run writes. A disabled logger (processes other than the
    first one of a distributed run) writes nothing.
    """

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None = None, enabled: bool = True,
                 note=print):
        self.run_dir, self.path, self.note = run_dir, run_dir / "metrics.jsonl", note
        self._file, self._tb = None, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._open(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when asked for

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def _open(self, resume_step: int | None) -> None:
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = history_until(self.path.read_text().split("\n"), resume_step, self.path, self.note)
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def rewind(self, step: int) -> None:
        """Forget the records after the checkpoint at `step` (a rollback returned there)."""
        if self._file is None:
            return
        self._file.close()
        self._open(step)

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    return [json.loads(line) for line in history_until(lines, 1 << 62, path, note=lambda _: None)]


def plot_losses(run_dir: Path) -> Path:
    """Write `loss.png`: training and validation loss against step, growth events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5, ms=4)
    for i, r in enumerate(r for r in records if r.get("kind") == "growth"):
        ax.axvline(r["step"], color="grey", ls="--", lw=1, label="growth" if i == 0 else None)
        ax.annotate(f"{r['params_after'] / 1e6:.1f}M", (r["step"], 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
