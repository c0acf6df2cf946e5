"""Which torch device a command runs on."""

from __future__ import annotations

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
