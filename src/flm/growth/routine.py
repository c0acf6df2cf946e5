"""The one growth routine: every tensor of the grown model, one at a time, with its Adam state.

Used by the single-process trainer (`grow_training`), the torchrun trainer (flm.parallel.grow: each process
keeps its pieces under the next stage's layout) and `flm grow` (flm.offline_growth: read from one checkpoint,
written into another, never more than one tensor in memory). All of them get bit-identical values:

- old values and their Adam state are mapped by the stage's growth family, asked by name
  (flm.growth.families: placed in the top-left block with step counts by age class, or tiled with every
  clone's history), which keeps the promises its declaration makes (flm.config.growth);
- new entries (and `clone`'s symmetry-breaking noise) are drawn on the host from a generator of their own
  (flm.growth.fresh), seeded from the run's seed, the growth's index and the tensor's name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from flm.config import ModelConfig
from flm.config.growth import ramp_length
from flm.errors import FlmError
from flm.growth.families import behaviour
from flm.growth.families.base import TensorGrowth
from flm.growth.fresh import perturbed_copy
from flm.growth.masks import Ramp, apply_masks
from flm.growth.operators import LayerSource, check_growable, layer_sources, source_name
from flm.model import FLM, build_model
from flm.model.registry import init_order


@dataclass
class Grown:
    """One tensor of the grown model, whole, on the host."""

    name: str
    weight: torch.Tensor
    adam: dict[str, torch.Tensor] | None  # None: the optimizer starts its state fresh (new layers, fresh runs)


def parameter_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every parameter's whole shape, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        return {name: p.shape for name, p in build_model(cfg).named_parameters()}


def grow_tensors(old_cfg: ModelConfig, new_cfg: ModelConfig, sources: list[LayerSource],
                 weights: Mapping[str, torch.Tensor], adam: Mapping[str, Mapping[str, torch.Tensor]] | None,
                 seed: int, index: int, operator: str = "msg", noise: float = 0.0,
                 copy_noise: float = 0.0) -> Iterator[Grown]:
    """The grown model's parameters in initialisation order, each with its Adam state, grown by family
    `operator` (`noise`: the `clone` family's symmetry-breaking noise, flm.growth.families.clone; `copy_noise`:
    noise on the weight matrices of copied layers, flm.growth.fresh.perturbed_copy).

    `weights` and `adam` give the old model's whole tensors by name when asked (they may gather them from
    shards or read them from disk), so only one is ever needed at a time. Layers new in the grown model copy
    the old layer `sources` names (their Adam state starts fresh: a copy sits at another depth, where its
    gradients differ) or, without one, are freshly initialised.
    """
    check_growable(old_cfg, new_cfg, operator)
    family = behaviour(operator)
    shapes = parameter_shapes(new_cfg)
    for name in init_order(new_cfg):
        src, in_new_layer = source_name(name, sources)
        if src is not None and src not in weights:
            raise FlmError(f"cannot grow {name}: the old model has no {src}")
        old = weights[src].detach().cpu() if src is not None else None
        copied = old if old is None or not in_new_layer else perturbed_copy(old, copy_noise, seed, index, name)
        weight = family.weight(TensorGrowth(name, copied, shapes[name], old_cfg, new_cfg, in_new_layer, seed, index,
                                            noise))
        state = None
        if adam is not None and old is not None and not in_new_layer and src in adam:
            state = family.adam_state(name, {k: v.detach().cpu() for k, v in adam[src].items()}, shapes[name],
                                      old_cfg, new_cfg)
        yield Grown(name, weight, state)
        del old, copied, weight, state  # before the next tensor is read: one tensor's worth in memory


def grow_training(model: FLM, adam: Mapping[str, Mapping[str, torch.Tensor]] | None, new_cfg: ModelConfig,
                  new_layers: str = "stack", ramp_steps: int = 100, seed: int = 0, index: int = 1,
                  operator: str = "msg", noise: float = 0.0, copy_noise: float = 0.0
                  ) -> tuple[FLM, Ramp, dict[str, dict[str, torch.Tensor]]]:
    """One process: (the grown model on `model`'s device with its masks at c = 0, the ramp, the grown Adam state
    by parameter name). Memory: the old and the new model, and one tensor more on the host. The ramp lasts
    `ramp_length` steps of `ramp_steps` (0 for families without masks: the ramp is then done already)."""
    check_growable(model.cfg, new_cfg, operator, new_layers)
    sources = layer_sources(model.cfg.n_layers, new_cfg.n_layers, new_layers)
    device = next(model.parameters()).device
    with torch.device("meta"):
        grown = build_model(new_cfg)
    grown.to_empty(device=device)  # memory without values: every parameter is written below
    if new_cfg.tie_embeddings:  # to_empty gives every module a tensor of its own
        grown.lm_head.weight = grown.embed.weight
    grown.init_rotary()
    params, states = dict(grown.named_parameters()), {}
    with torch.no_grad():
        for t in grow_tensors(model.cfg, new_cfg, sources, dict(model.named_parameters()), adam, seed, index,
                              operator, noise, copy_noise):
            params[t.name].copy_(t.weight)
            if t.adam is not None:
                states[t.name] = {k: v.to(device) for k, v in t.adam.items()}
    ramp = Ramp(model.cfg, sources, ramp_length(operator, model.cfg, new_cfg, ramp_steps), operator=operator)
    apply_masks(grown, ramp)
    return grown, ramp, states


def grow_model(model: FLM, new_cfg: ModelConfig, new_layers: str = "stack", ramp_steps: int = 100, seed: int = 0,
               index: int = 1, operator: str = "msg", noise: float = 0.0, copy_noise: float = 0.0
               ) -> tuple[FLM, Ramp]:
    """The weights alone (`grow_training` without an optimizer): the grown model and its ramp, masks at c = 0."""
    grown, ramp, _ = grow_training(model, None, new_cfg, new_layers, ramp_steps, seed, index, operator, noise,
                                   copy_noise)
    return grown, ramp
