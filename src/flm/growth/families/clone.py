"""The `clone` family: HyperCloning-style width growth (Samragh et al. 2024, arXiv 2409.12903), tensor by tensor.

Widths grow by whole factors k, every new index copying old index (i mod n) — the residual vector becomes
[x; x; ...], the heads [h1..hn; h1..hn; ...], the FFN units likewise. This is the exact function of the small
model because:
- a tiled vector keeps LayerNorm's mean and variance, so LayerNorm with tiled γ, β gives the tiled output;
- every weight is tiled along all its grown dims, and divided by the factor k of the dim its consumer sums over
  (its input: the residual width for QKV, fc1 and the LM head, the heads for `attn.proj`, the units for
  `mlp.fc2`), so k copies of a summand add up to the old one;
- under μP the readout multiplier base_width/d shrinks by k when d grows; the LM head is scaled by k to match.

The llama arch likewise: a tiled vector keeps RMSNorm's mean of squares, RMS([x; x]) = RMS(x), so RMSNorm with its
gain tiled gives the tiled output; q/k/v_proj, gate_proj, up_proj and an untied head are divided along the residual
width, down_proj along the units and o_proj along the query heads, which are viewed as [key/value heads, heads
per group] (flm.growth.operators.logical_shape): a cloned query head reads its source's key/value head, or a clone
of it when the key/value heads grow. A tied head is the embedding, copied and not divided; the final RMSNorm,
which feeds only the head, takes the 1/k instead (its gain divided by the residual factor), so a tied llama model
grows its width exactly and stays a stock model (no readout multiplier; docs/llama.md).

Tiled copies receive identical gradients, so without help they would stay copies for ever (a wide model that is
a small model). `noise` adds to each divided weight a draw whose k clones sum to zero — W/k + ε_j with Σ ε_j = 0
— which keeps the function (exactly in real arithmetic) and makes the copies' gradients differ.

Adam state follows the gradients of the clones: a clone's gradient is the old entry's gradient divided by the
product of the factors of the dims it was copied along without division (its k copies share the old gradient)
and by its value scale (the μP head's k, a tied llama model's final gain's 1/k); so the moments are tiled and
divided by that product (the second by its square), and the step counts are kept — every clone has its old
entry's history. Then each clone's first update is the old entry's, as if the small model took the step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from flm.config import ModelConfig
from flm.growth.families.base import Behaviour, TensorGrowth, place_top_left
from flm.growth.operators import READOUTS, local_name, logical_shape

# The dims of each tensor's logical view (flm.growth.operators.logical_shape) that its consumer sums over: FLM's,
# then the llama arch's (o_proj sums over the key/value heads and the query heads of each).
_SUMMED_DIMS = {"attn.qkv.weight": (3,), "attn.proj.weight": (1,), "mlp.fc1.weight": (1,), "mlp.fc2.weight": (1,),
                "lm_head.weight": (1,), "cls_head.weight": (1,),
                "attn.q_proj.weight": (3,), "attn.k_proj.weight": (2,), "attn.v_proj.weight": (2,),
                "attn.o_proj.weight": (1, 2), "mlp.gate_proj.weight": (1,), "mlp.up_proj.weight": (1,),
                "mlp.down_proj.weight": (1,)}


def _factors(name: str, old_cfg: ModelConfig, new_cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the tensor's old logical shape, the whole factor each of its dims grows by)."""
    old_dims, new_dims = logical_shape(name, old_cfg), logical_shape(name, new_cfg)
    return old_dims, tuple(n // o for o, n in zip(old_dims, new_dims))


def _value_scale(name: str, old_cfg: ModelConfig, new_cfg: ModelConfig) -> float:
    """The factor on a cloned tensor beyond the division of its summed dims: the μP factor on the LM head that keeps
    the logits (old readout multiplier / new); a tied llama model's final RMSNorm gain divided by the residual
    factor (its head, the embedding, is copied, not divided); else 1."""
    if name in READOUTS and new_cfg.mup:
        return new_cfg.d_model / old_cfg.d_model
    if name == "ln_f.weight" and new_cfg.arch == "llama" and new_cfg.tie_embeddings:
        return old_cfg.d_model / new_cfg.d_model
    return 1.0


def _summed(name: str, factors: tuple[int, ...]) -> tuple[int, ...]:
    """The summed dims of tensor `name` that grow (by their factors)."""
    return tuple(d for d in _SUMMED_DIMS.get(local_name(name), ()) if factors[d] > 1)


def clone_tensor(name: str, old: torch.Tensor, shape: torch.Size, old_cfg: ModelConfig, new_cfg: ModelConfig,
                 noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Parameter `name` of the grown model (of `shape`), cloned from the old model's `old` (the old dtype). `noise`:
    the standard deviation of the zero-sum noise on the divided weights, relative to their RMS, drawn from
    `generator`."""
    old_dims, factors = _factors(name, old_cfg, new_cfg)
    out = old.detach().view(old_dims).repeat(factors)
    dims = _summed(name, factors)
    if dims:
        out = out / math.prod(factors[d] for d in dims)
        if noise > 0:
            std = noise * out.pow(2).mean().sqrt().item()
            eps = torch.randn(out.shape, generator=generator, dtype=out.dtype) * std
            # The clones of an index sit at positions i, i + n, ..., i + (k-1)n of each summed dim: split each into
            # (k, n) and centre over the k axes together.
            split, clone_axes = [], []
            for d, size in enumerate(out.shape):
                if d in dims:
                    clone_axes.append(len(split))
                    split += [factors[d], size // factors[d]]
                else:
                    split.append(size)
            groups = eps.reshape(split)
            out = out + (groups - groups.mean(clone_axes, keepdim=True)).reshape(out.shape)
    out = out * _value_scale(name, old_cfg, new_cfg)
    return out.reshape(shape)


def clone_moment(name: str, moment: torch.Tensor, shape: torch.Size, old_cfg: ModelConfig, new_cfg: ModelConfig,
                 power: int) -> torch.Tensor:
    """An Adam moment (`power` 1: exp_avg, 2: exp_avg_sq) of the cloned parameter: tiled, divided by the gradient
    scale of a clone (see the module docstring) to the `power`; `power` 0 tiles as it is (the age bytes)."""
    old_dims, factors = _factors(name, old_cfg, new_cfg)
    dims = _SUMMED_DIMS.get(local_name(name), ())
    copied = math.prod(k for i, k in enumerate(factors) if i not in dims)
    out = moment.detach().view(old_dims).repeat(factors)
    if power:
        out = out / (copied * _value_scale(name, old_cfg, new_cfg)) ** power
    return out.reshape(shape)


def clone_adam_state(name: str, old: Mapping[str, torch.Tensor], grown_shape: torch.Size, old_cfg: ModelConfig,
                     new_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The Adam state of parameter `name` grown by the `clone` family: moments tiled and scaled to the clones'
    gradients, step counts and age classes kept, since every clone inherits a whole history."""
    state = {"exp_avg": clone_moment(name, old["exp_avg"], grown_shape, old_cfg, new_cfg, 1),
             "exp_avg_sq": clone_moment(name, old["exp_avg_sq"], grown_shape, old_cfg, new_cfg, 2),
             "step": old["step"].clone()}
    if "age" in old:
        state["age"] = clone_moment(name, old["age"], grown_shape, old_cfg, new_cfg, 0)
    return state


def clone_weight(t: TensorGrowth) -> torch.Tensor:
    """The old tensor cloned (with `t.noise` drawn from the tensor's own generator); a new layer that copies
    nothing (a caller of grow_tensors may pass such sources) is freshly initialised."""
    if t.old is None:
        return place_top_left(t)
    return clone_tensor(t.name, t.old, t.shape, t.old_cfg, t.new_cfg, t.noise, t.generator())


BEHAVIOUR = Behaviour(clone_weight, clone_adam_state)
