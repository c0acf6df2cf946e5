"""Whole tensors and this process's pieces of them (a DTensor's local shard, or the tensor itself)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This process's piece of `full`, placed like `param` (a DTensor), or `full` itself for a plain tensor.

    Every process holds `full`, so each takes its piece locally without communication.
    """
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return full.to(param.device)


def local_device(param: torch.Tensor) -> torch.device:
    """Where this process keeps its piece of `param`."""
    return param.to_local().device if isinstance(param, DTensor) else param.device


def place_state(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An optimizer-state field of `param` where it belongs: one shaped like the parameter (moments, per-element
    data) is sharded like it; any other (a step count, a small table) is a plain tensor on this process's device."""
    if tuple(value.shape) == tuple(param.shape) and value.dim() > 0:
        return shard_like(param, value)
    return value.to(local_device(param))


def gather(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from its shards (collective over the tensor's mesh)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def write_pieces(params: Mapping[str, torch.Tensor], values: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy this process's piece of each (name, whole tensor) into the parameter of that name."""
    for name, full in values:
        if name in params:  # a pipeline stage holds only its own blocks
            local = shard_like(params[name], full)
            (params[name].to_local() if isinstance(params[name], DTensor) else params[name]).copy_(
                local.to_local() if isinstance(local, DTensor) else local)
