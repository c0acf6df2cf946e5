"""Data parallelism with FSDP2 (`fully_shard`).

Each block is its own FSDP unit (its weights are gathered just before it runs and freed after), the
root holds the embedding, final LayerNorm and head. Weights, gradients and Adam state are sharded
over the data-parallel ranks; with a 2-D (replicate, shard) mesh this is HSDP. Gradients are
averaged over the data-parallel ranks, which is what one process computes on the whole global batch
because every rank's loss is a mean over the same number of tokens.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from flm.model import FLM
from flm.parallel.pipeline import held_blocks


def apply_fsdp(model: FLM, mesh: DeviceMesh, bf16: bool, reshard_after_forward: bool = True) -> None:
    """Shard `model` in place over the data-parallel `mesh` (1-D FSDP or 2-D HSDP).

    With bf16, weights are gathered in bf16 and gradients reduced in fp32; the fp32 shards stay the
    master copy. A pipeline stage keeps gathered weights between micro-batches (reshard_after_forward
    False), trading memory for one all-gather per step instead of one per micro-batch.
    """
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in held_blocks(model).values():
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)

