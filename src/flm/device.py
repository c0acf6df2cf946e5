"""Which torch device a command runs on, and whether it runs as one of several torchrun processes."""

from __future__ import annotations

import os

import torch

from flm.errors import FlmError


def resolve_device(spec: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; an explicit device must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise FlmError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlmError(f"device {spec!r} asked for, but CUDA is not available on this machine (use cpu or auto)")
    return device


def torchrun_world() -> int | None:
    """The number of processes torchrun started, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["WORLD_SIZE"])


def process_device(spec: str) -> torch.device:
    """This process's device: `resolve_device(spec)`, except that under torchrun each process takes the GPU of its
    LOCAL_RANK (a fixed `cuda:N` would put every rank on GPU N, so it is refused there)."""
    device = resolve_device(spec)
    if device.type != "cuda" or torchrun_world() is None:
        return device
    if device.index is not None:
        raise FlmError(f"train.device = {spec!r} under torchrun would put every process on GPU {device.index}; "
                       "use 'cuda' or 'auto' (each process takes the GPU of its LOCAL_RANK)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
