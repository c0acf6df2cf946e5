"""Growth as pure functions on tensors (REFERENCE.md §2): where old values go, and where new layers come from.

`grow_tensor` maps one tensor of the old model into the same-named tensor of the grown model: the
old values land in the top-left block (per head for FLM's fused QKV, per key/value group for the llama arch's
query heads: `logical_shape`), every other entry keeps the value of the `template` tensor it is given (a fresh
initialisation for parameters, zeros for Adam moments). The same mapping therefore grows parameters and optimizer
state alike, and it works one tensor at a time, so growing never needs more extra memory than the largest single
tensor.

It serves the families that place old values top-left (flm.growth.families: `msg`, whose function preservation
comes from the masks in flm.growth.masks rather than from the new values, `zero`, which then zeroes the new entries
of the residual-stream writers, and `stack`); `clone` tiles instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from flm.config import ModelConfig
from flm.config.growth import NEW_LAYER_MODES, growth_problem
from flm.config.shape import SHAPE_FIELDS
from flm.errors import FlmError

_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")
# The readouts of the final-normed hidden state: the LM head and the separate teacher head (flm.model.flm), grown
# alike (top-left, and under μP scaled with the readout multiplier).
READOUTS = ("lm_head.weight", "cls_head.weight")


@dataclass(frozen=True)
class LayerSource:
    """Where layer j of the grown model comes from: an old layer (`old`), and whether it is new."""

    old: int | None  # the old layer copied (None: a new layer with fresh weights)
    new: bool  # new layers are blended in through the depth gate


def layer_sources(old_layers: int, new_layers: int, mode: str) -> list[LayerSource]:
    """Which old layer each new layer holds.

    stack: old layers keep their places, the new top layers copy the old top layers in order.
    insert: a copy of old layer i goes right after it, for the top (new - old) layers.
    random: old layers keep their places, new top layers get fresh weights.
    """
    if mode not in NEW_LAYER_MODES:
        raise FlmError(f"unknown new-layer mode {mode!r}; choose from {', '.join(NEW_LAYER_MODES)}")
    if new_layers < old_layers:
        raise FlmError(f"growth cannot remove layers ({old_layers} -> {new_layers})")
    extra = new_layers - old_layers
    kept = [LayerSource(i, False) for i in range(old_layers)]
    if mode == "random":
        return kept + [LayerSource(None, True)] * extra
    copies = [(old_layers - extra + k) % old_layers for k in range(extra)]
    if mode == "stack":
        return kept + [LayerSource(i, True) for i in copies]
    out = []
    for i in range(old_layers):
        out.append(LayerSource(i, False))
        if i in copies:
            out.extend(LayerSource(i, True) for _ in range(copies.count(i)))
    return out


def check_growable(old: ModelConfig, new: ModelConfig, operator: str = "msg", new_layers: str | None = None) -> None:
    """Refuse changes that no growth can make or that family `operator` cannot make, with the reason."""
    for name in (f.attr for f in SHAPE_FIELDS):
        if getattr(new, name) < getattr(old, name):
            raise FlmError(f"growth cannot shrink {name} ({getattr(old, name)} -> {getattr(new, name)})")
    fixed = ("arch", "head_dim", "vocab_size", "rope_theta", "xpos_scale_base", "ln_eps", "tie_embeddings", "mup",
             "base_width", "output_mult", "qkv_bias", "hf_class")
    for name in fixed:
        if getattr(new, name) != getattr(old, name):
            raise FlmError(f"growth keeps {name} fixed ({getattr(old, name)} -> {getattr(new, name)}): "
                           "changing it would change the function")
    if new.mup and new.tie_embeddings and new.d_model != old.d_model:
        raise FlmError("width growth of a tied μP model cannot compensate the readout multiplier; untie the head")
    problem = growth_problem(operator, old, new, new_layers)
    if problem:
        raise FlmError(problem)


def logical_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The 'logical' shape of a tensor, whose dims grow as units: FLM's fused QKV is viewed as
    [heads, q|k|v, head_dim, d] so heads grow whole; the llama arch's q_proj as [key/value heads, query heads per
    key/value head, head_dim, d], the layout grouped-query attention reads (query head h uses key/value head
    h // group), so a new query head goes to the end of its group and a new key/value head brings a new group;
    o_proj's input likewise, k_proj and v_proj as [key/value heads, head_dim, d]. Both archs' names are in one
    table: they do not collide, and the norms' are the same."""
    d, f, a = cfg.d_model, cfg.ffn_dim, cfg.attn_dim
    kv, hd = cfg.kv_heads, cfg.head_dim
    group = cfg.n_heads // kv
    table = {
        # FLM
        "attn.qkv.weight": (cfg.n_heads, 3, hd, d), "attn.qkv.bias": (cfg.n_heads, 3, hd),
        "attn.proj.weight": (d, a), "attn.proj.bias": (d,), "mlp.fc1.weight": (f, d), "mlp.fc1.bias": (f,),
        "mlp.fc2.weight": (d, f), "mlp.fc2.bias": (d,),
        "ln1.weight": (d,), "ln1.bias": (d,), "ln2.weight": (d,), "ln2.bias": (d,),
        # llama
        "attn.q_proj.weight": (kv, group, hd, d), "attn.q_proj.bias": (kv, group, hd),
        "attn.k_proj.weight": (kv, hd, d), "attn.k_proj.bias": (kv, hd),
        "attn.v_proj.weight": (kv, hd, d), "attn.v_proj.bias": (kv, hd),
        "attn.o_proj.weight": (d, kv, group, hd),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
    }
    m = _LAYER.match(name)
    if m:
        return table[m.group(2)]
    top = {"embed.weight": (cfg.vocab_size, d), "lm_head.weight": (cfg.vocab_size, d),
           "ln_f.weight": (d,), "ln_f.bias": (d,), "cls_head.weight": (2, d)}
    return top[name]


def source_name(name: str, sources: list[LayerSource]) -> tuple[str | None, bool]:
    """(name of the old tensor that feeds `name`, whether `name` sits in a new layer)."""
    m = _LAYER.match(name)
    if not m:
        return name, False
    src = sources[int(m.group(1))]
    return (None if src.old is None else f"blocks.{src.old}.{m.group(2)}"), src.new


def grow_tensor(name: str, old: torch.Tensor, template: torch.Tensor, old_cfg: ModelConfig,
                new_cfg: ModelConfig, readout_power: int = 1, in_place: bool = False) -> torch.Tensor:
    """`template` with `old` written into its top-left block of the logical view (`logical_shape`: per head for
    FLM's QKV, per key/value group for llama's q_proj and o_proj); `in_place` writes into
    `template` itself (one copy of the grown tensor less, when the caller made it for this).

    Under μP the readout multiplier base_width/d shrinks by r = d/d' when d grows, so the LM head is
    scaled by 1/r = d'/d to keep the logits exact. Its gradient then scales by r, so Adam's first
    moment takes r¹ and the second r²: `readout_power` is 1 for parameters, -1 and -2 for moments.
    """
    old_dims, new_dims = logical_shape(name, old_cfg), logical_shape(name, new_cfg)
    out = (template.detach() if in_place else template.detach().clone()).view(new_dims)
    block = tuple(slice(0, n) for n in old_dims)
    value = old.detach().view(old_dims).to(out.dtype)
    if name in READOUTS and new_cfg.mup and new_cfg.d_model != old_cfg.d_model:
        value = value * (new_cfg.d_model / old_cfg.d_model) ** readout_power
    out[block] = value
    return out.view(template.shape)


def local_name(name: str) -> str:
    """A block parameter's name inside its block ('blocks.3.attn.proj.weight' -> 'attn.proj.weight')."""
    m = _LAYER.match(name)
    return m.group(2) if m else name
