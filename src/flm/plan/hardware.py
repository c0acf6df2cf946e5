"""Accelerators flm knows: dense bf16 tensor-core peak and memory, from the vendors' data sheets.

One table for the planner (by name) and for training's MFU (by the name CUDA reports for the device).
Peaks are *dense* (no 2:4 sparsity): utilisation and MFU are quoted against them, and quoting against the
sparse figure halves every MFU (REFERENCE.md §8). Memory is the nominal HBM size; the driver and CUDA
context take 1-2 GiB of it, which `plan.memory_margin` covers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flm.errors import FlmError


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16 TFLOP/s
    memory_gib: float
    device: tuple[str, ...]  # the words of the CUDA device name that identify it (gpu_of_device)


_TABLE = (
    GPU("A100-40G", 312.0, 40.0, ("a100",)),
    GPU("A100-80G", 312.0, 80.0, ("a100", "80gb")),
    GPU("A800-80G", 312.0, 80.0, ("a800",)),  # A100 with a slower NVLink for the Chinese market; FLM-101B's GPU
    GPU("H100-SXM", 989.0, 80.0, ("h100",)),
    GPU("H100-PCIe", 756.0, 80.0, ("h100", "pcie")),
    GPU("H100-NVL", 835.0, 94.0, ("h100", "nvl")),
    GPU("H800", 989.0, 80.0, ("h800",)),
    GPU("H200", 989.0, 141.0, ("h200",)),
    GPU("GH200", 989.0, 96.0, ("gh200",)),
    GPU("H20", 148.0, 96.0, ("h20",)),
    GPU("B200", 2250.0, 180.0, ("b200",)),
    GPU("L40S", 362.0, 48.0, ("l40s",)),
    GPU("L4", 121.0, 24.0, ("l4",)),
    GPU("A10", 125.0, 24.0, ("a10",)),
    GPU("A10G", 70.0, 24.0, ("a10g",)),
    GPU("RTX-4090", 165.0, 24.0, ("rtx", "4090")),
    GPU("RTX-3090", 71.0, 24.0, ("rtx", "3090")),
    GPU("MI300X", 1307.0, 192.0, ("mi300x",)),
)
GPUS: dict[str, GPU] = {g.name.lower(): g for g in _TABLE}


def get_gpu(name: str) -> GPU:
    """Look a GPU up by name, case-insensitively; an unknown name is a user error listing the choices."""
    gpu = GPUS.get(name.strip().lower())
    if gpu is None:
        raise FlmError(f"unknown GPU {name!r}; choose from {', '.join(g.name for g in _TABLE)}")
    return gpu


def gpu_of_device(device_name: str) -> GPU | None:
    """The entry for a CUDA device name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"), or None.

    Whole words are compared, not substrings, so that "L40" is not taken for an L4 nor "H200" for an H20;
    of the entries whose words all occur, the one with the most words wins ("H100 PCIe" over "H100").
    Unknown devices get None: no MFU is better than one against a wrong peak.
    """
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    found = [g for g in _TABLE if set(g.device) <= words]
    return max(found, key=lambda g: len(g.device), default=None)
