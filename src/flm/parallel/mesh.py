"""Processes and device meshes: the torchrun environment, the process group, and one named mesh per layout.

A layout (flm.config.layout.Layout) is tp x pp x dp processes, dp perhaps split into HSDP's replicas. The
mesh has the dimensions ("pp", "dp_replicate", "dp_shard", "tp"), tp innermost so that tensor-parallel ranks
are neighbours (one node, the fastest links), pp outermost. Dimensions of size 1 are kept, so every piece of
code can ask for the same names.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from flm.config.layout import Layout
from flm.device import process_device
from flm.errors import FlmError

DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def init_distributed(device_spec: str, timeout_s: float) -> torch.device:
    """Join the process group torchrun describes: NCCL with one GPU per process, gloo on CPU, every
    collective bounded by `timeout_s` (torch's default would wait 30 minutes on a stuck rank).

    Returns this process's device (cuda:LOCAL_RANK, or cpu).
    """
    device = process_device(device_spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return device


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh:
    """The named mesh for `layout` over all processes (an explicit CPU mesh on CPU); collective."""
    world = dist.get_world_size()
    if layout.world_size != world:
        raise FlmError(f"parallel layout {layout.describe()} needs {layout.world_size} processes, "
                       f"but torchrun started {world}")
    shape = (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp)
    return init_device_mesh(device.type, shape, mesh_dim_names=DIMS)


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: 1-D (FSDP), or 2-D (replicate, shard) for HSDP."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def dp_rank(mesh: DeviceMesh) -> int:
    """This process's index among the data-parallel ranks (which slice of each global batch it reads)."""
    return mesh.get_local_rank("dp_replicate") * mesh["dp_shard"].size() + mesh.get_local_rank("dp_shard")
