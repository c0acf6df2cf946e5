"""The one function that spreads a model over a 3-D layout, in a fixed order (as torchtitan's `parallelize`):

1. pipeline parallelism: keep this rank's stage (its consecutive blocks, the embedding on the first stage,
   the final LayerNorm and head on the last) — everything after acts on what is kept;
2. tensor parallelism (DTensor): heads, FFN units and vocabulary split over the tp ranks;
3. activation checkpointing, per block;
4. torch.compile, per block — after TP so each block compiles with its sharded weights, before FSDP so
   FSDP's hooks stay outside the compiled graphs; under pipeline parallelism too;
5. FSDP2 (or HSDP): each block its own unit, then the root.

The model comes in on the meta device (no memory); the caller gives the pieces their memory and values.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from flm.config import ParallelConfig
from flm.config.layout import Layout
from flm.model import FLM
from flm.model.decoder import held_blocks
from flm.parallel.fsdp import apply_fsdp
from flm.parallel.mesh import dp_mesh
from flm.parallel.pipeline import StageModule, keep_stage
from flm.parallel.tensor import apply_tensor_parallel
from flm.train.transforms import apply_activation_checkpointing, compile_blocks


def parallelize(model: FLM, layout: Layout, mesh: DeviceMesh, pc: ParallelConfig, compile: bool,
                bf16: bool) -> nn.Module:
    """Shard `model` in place over `mesh`; returns the module a step runs (the pipeline stage's own module
    under pipeline parallelism, else the model itself)."""
    root: nn.Module = model
    if layout.pp > 1:
        keep_stage(model, mesh.get_local_rank("pp"), layout.pp)
        root = StageModule(model)
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], pc.sequence_parallel)
    if pc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_blocks(model)
    # A pipeline stage keeps its gathered weights between micro-batches: one all-gather per step, not per
    # micro-batch.
    apply_fsdp(root, held_blocks(model).values(), dp_mesh(mesh), bf16=bf16, reshard_after_forward=layout.pp == 1)
    return root
