"""Gradient-norm clipping over sharded gradients (DTensors on several meshes, pipeline stages)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Clip to `max_norm` by the global L2 norm of all gradients of the model; returns that norm.

    Gradients of tensor-parallel weights live on the (dp, tp) mesh, those of replicated vectors on the
    dp mesh only: each group's norm is reduced on its own mesh (a replicated vector counts once, not
    once per tp rank), the squares are added, and pipeline stages add theirs over `pp_group`.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    square = torch.zeros((), dtype=torch.float32)
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        square = square.to(norm.device) + norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(square, group=pp_group)
    total = square.sqrt()
    for group in groups.values():  # one mesh per call: a multiplication cannot mix meshes
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
