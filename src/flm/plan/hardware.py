"""Accelerators the planner knows: dense bf16 tensor-core peak and memory, from the vendors' data sheets.

Peaks are *dense* (no 2:4 sparsity): utilisation and MFU are quoted against them, and quoting against the
sparse figure halves every MFU (REFERENCE.md §8). Memory is the nominal HBM size; the driver and CUDA
context take 1-2 GiB of it, which `plan.memory_margin` covers.
"""

from __future__ import annotations

from dataclasses import dataclass

from flm.errors import FlmError


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16 TFLOP/s
    memory_gib: float


_TABLE = (
    GPU("A100-40G", 312.0, 40.0),
    GPU("A100-80G", 312.0, 80.0),
    GPU("A800-80G", 312.0, 80.0),  # A100 with a slower NVLink for the Chinese market; FLM-101B's GPU
    GPU("H100-SXM", 989.0, 80.0),
    GPU("H100-PCIe", 756.0, 80.0),
    GPU("H800", 989.0, 80.0),
    GPU("H200", 989.0, 141.0),
    GPU("H20", 148.0, 96.0),
    GPU("B200", 2250.0, 180.0),
    GPU("L40S", 362.0, 48.0),
    GPU("L4", 121.0, 24.0),
    GPU("A10", 125.0, 24.0),
    GPU("MI300X", 1307.0, 192.0),
)
GPUS: dict[str, GPU] = {g.name.lower(): g for g in _TABLE}


def get_gpu(name: str) -> GPU:
    """Look a GPU up by name, case-insensitively; an unknown name is a user error listing the choices."""
    gpu = GPUS.get(name.strip().lower())
    if gpu is None:
        raise FlmError(f"unknown GPU {name!r}; choose from {', '.join(g.name for g in _TABLE)}")
    return gpu
