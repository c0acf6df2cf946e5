"""The `zero` family: zero-initialised writers (Gesmundo & Maile 2023). Old values go top-left, as `msg`'s, and
then every new entry of a writer into the residual stream (and, for FLM, of a LayerNorm) becomes 0; no masks,
except the norms' statistics' while d_model grows (flm.growth.masks). Adam state grows as `msg`'s.

The llama arch (REFERENCE.md §10, LLaMA Pro's block expansion): its writers are the embedding, o_proj and
down_proj; its RMSNorm gains keep their new entries (fresh: 1). An RMSNorm has no shift, so a new residual
coordinate that is 0 is normalised into 0 whatever its gain, and a gain of 0 would instead cut the new coordinates
off from every gradient: RMSNorm's output there is γ·x/rms with x = 0, its gradient to x is γ times what its
readers send back, so with γ = 0 neither the writers' new rows nor γ itself would ever move."""

from __future__ import annotations

import torch

from flm.config import ModelConfig
from flm.growth.families.base import Behaviour, TensorGrowth, place_top_left
from flm.growth.operators import local_name, logical_shape
from flm.growth.optimizer import grow_adam_state

# What writes into the residual stream, as local names (FLM's, then the llama arch's).
RESIDUAL_WRITERS = ("embed.weight", "attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                    "attn.o_proj.weight", "mlp.down_proj.weight")


def zero_new_entries(name: str, grown: torch.Tensor, old_cfg: ModelConfig, new_cfg: ModelConfig,
                     new_layer: bool) -> None:
    """In place on a tensor `grow_tensor` made: every new entry of a residual-stream writer
    (embedding columns; `attn.proj` and `mlp.fc2` rows, columns and biases; llama's `o_proj` and `down_proj` rows
    and columns) and of an FLM LayerNorm (γ and β) becomes 0, and a new layer's writers become 0 entirely.

    Why this preserves the function without masks (Gesmundo & Maile 2023, for pre-norm blocks): new FFN units and
    heads are read out by zero columns, a new layer adds zero to its input, and new residual coordinates are
    written as zero and normalised into zero (γ = β = 0) — except that LayerNorm's mean and variance over the
    grown width would still count them, which the `norm_mask` of flm.growth.masks holds off while it ramps in.
    Readers' new entries (QKV, fc1, LM head) keep their fresh values: they only ever read zeros at first.
    """
    local = local_name(name)
    if new_layer and local in RESIDUAL_WRITERS:
        grown.zero_()
        return
    zeroed_norm = local.startswith("ln") and new_cfg.arch == "flm"  # RMSNorm gains stay (module docstring)
    if local not in RESIDUAL_WRITERS and not zeroed_norm:
        return
    old_dims = logical_shape(name, old_cfg)
    view = grown.view(logical_shape(name, new_cfg))
    block = tuple(slice(0, n) for n in old_dims)
    kept = view[block].clone()
    view.zero_()
    view[block] = kept


def zero_weight(t: TensorGrowth) -> torch.Tensor:
    """The top-left placement, with the new entries of writers and LayerNorms zeroed."""
    weight = place_top_left(t)
    zero_new_entries(t.name, weight, t.old_cfg, t.new_cfg, t.new_layer)
    return weight


BEHAVIOUR = Behaviour(zero_weight, grow_adam_state, masks=frozenset({"norm"}))
