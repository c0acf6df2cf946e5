"""Pipeline parallelism with torch.distributed.pipelining: FLM split into consecutive stages.

A pipeline stage is the single-device FLM with the blocks of other stages removed (the embedding only
on the first stage, the final LayerNorm and head only on the last). Its blocks are kept in a
ModuleDict under their global index, so parameter names (`blocks.7.attn.qkv.weight`) are the same as
in the whole model: checkpoints, growth and optimizer state are addressed by the same names on every
layout. `StageModule` runs the model's own pieces (`embed_tokens`, blocks, `logits`) for its part, and
a GPipe or 1F1B schedule of PyTorch moves activations and gradients between stages.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from flm.config import ModelConfig
from flm.errors import FlmError
from flm.model import FLM

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layers(n_layers: int, pp: int) -> list[range]:
    """Consecutive blocks of each stage; earlier stages take the remainder (the last one also runs the head)."""
    size, extra = divmod(n_layers, pp)
    bounds = [0]
    for stage in range(pp):
        bounds.append(bounds[-1] + size + (stage < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def owner_stage(name: str, n_layers: int, pp: int) -> int:
    """The pipeline stage holding parameter `name`."""
    if name.startswith("blocks."):
        index = int(name.split(".")[1])
        return next(s for s, layers in enumerate(stage_layers(n_layers, pp)) if index in layers)
    return 0 if name.startswith("embed.") else pp - 1


def check_pipeline(cfg: ModelConfig, pp: int, micro_batch: int, microbatches: int) -> None:
    if cfg.n_layers < pp:
        raise FlmError(f"pipeline parallelism pp={pp} needs at least one block per stage; model.n_layers is {cfg.n_layers}")
    if cfg.tie_embeddings:
        raise FlmError("a tied embedding and head cannot sit on different pipeline stages: set model.tie_embeddings "
                       "= false or parallel.pp = 1")
    if micro_batch % microbatches:
        raise FlmError(f"parallel.pp_microbatches ({microbatches}) must divide each data-parallel rank's micro-batch "
                       f"of {micro_batch} sequences")


def keep_stage(model: FLM, stage: int, pp: int) -> None:
    """Remove from `model` (in place) everything that stage `stage` of `pp` does not run."""
    layers = stage_layers(model.cfg.n_layers, pp)[stage]
    model.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
    if stage > 0:
        model.embed = None
    if stage < pp - 1:
        model.ln_f, model.lm_head = None, None


class StageModule(nn.Module):
    """One stage's forward: token ids or hidden states in, hidden states or logits out."""

    def __init__(self, model: FLM):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if m.embed is not None:
            x = m.embed_tokens(x)
        rope = m.rope(0, x.shape[1])
        for block in m.blocks.values():
            x = block(x, rope, m.hidden_mask)
        return m.logits(x) if m.lm_head is not None else x


def build_schedule(root: StageModule, mesh: DeviceMesh, device: torch.device, schedule: str, microbatches: int,
                   loss_fn) -> object:
    """The pipeline schedule driving this process's stage (`loss_fn(logits, targets)` on the last stage).

    Gradients are not rescaled by the number of micro-batches: `loss_fn` already weights each one.
    """
    stage = PipelineStage(root, mesh.get_local_rank(), mesh.size(), device, group=mesh.get_group())
    return SCHEDULES[schedule](stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
