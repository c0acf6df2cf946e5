"""Data parallelism with FSDP2 (`fully_shard`).

Each block is its own FSDP unit (its weights are gathered just before it runs and freed after), the
root holds the embedding, final LayerNorm and head. Weights, gradients and Adam state are sharded
over the data-parallel ranks; with a 2-D (replicate, shard) mesh this is HSDP. Gradients are
averaged over the data-parallel ranks; the trainer weights every rank's loss by its share of the
step's loss tokens, so the average is the gradient one process computes on the whole global batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard



def apply_fsdp(root: nn.Module, blocks: Iterable[nn.Module], mesh: DeviceMesh, bf16: bool,
               reshard_after_forward: bool = True) -> None:
    """Shard `root` in place over the data-parallel `mesh` (1-D FSDP or 2-D HSDP), each of `blocks` as its
    own unit, the rest (embedding, final LayerNorm, head) in the root's.

    With bf16, weights are gathered in bf16 and gradients reduced in fp32; the fp32 shards stay the
    master copy. A pipeline stage keeps gathered weights between micro-batches (reshard_after_forward
    False), trading memory for one all-gather per step instead of one per micro-batch.
    """
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
