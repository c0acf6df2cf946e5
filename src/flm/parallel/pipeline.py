"""Pipeline parallelism: which blocks each pipeline rank holds.

A pipeline stage is the single-device FLM with the blocks of other stages removed (the embedding only
on the first stage, the final LayerNorm and head only on the last). Its blocks are kept in a
ModuleDict under their global index, so parameter names (`blocks.7.attn.qkv.weight`) are the same as
in the whole model: checkpoints, growth and optimizer state are addressed by the same names on every
layout.
"""

from __future__ import annotations

from torch import nn

from flm.model import FLM
from flm.model.flm import Block


def held_blocks(model: FLM) -> dict[int, Block]:
    """The blocks this process holds, by global index (all of them without pipeline parallelism)."""
    if isinstance(model.blocks, nn.ModuleDict):
        return {int(k): b for k, b in model.blocks.items()}
    return dict(enumerate(model.blocks))
