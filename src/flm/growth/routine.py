"""The one growth routine: every tensor of the grown model, one at a time, with its Adam state.

Used by the single-process trainer (`grow_training`), the torchrun trainer (flm.parallel.grow: each process
keeps its pieces under the next stage's layout) and `flm grow` (flm.train.grow: read from one checkpoint,
written into another, never more than one tensor in memory). All of them get bit-identical values:

- old values are mapped with the MSG operators (flm.growth.operators), their Adam moments with the same
  mapping and their step counts by age class (flm.growth.optimizer);
- new entries are drawn on the host from a generator of their own, seeded from the run's seed, the growth's
  index and the tensor's name: the same numbers whatever the device, the layout, the order in which tensors
  are grown or the entry point, and the run's own random stream is left alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from flm.config import ModelConfig
from flm.errors import FlmError
from flm.growth.masks import Ramp, apply_masks
from flm.growth.optimizer import grow_adam_state
from flm.growth.operators import LayerSource, check_growable, grow_tensor, layer_sources, source_name
from flm.model import FLM
from flm.model.flm import init_order, init_parameter


@dataclass
class Grown:
    """One tensor of the grown model, whole, on the host."""

    name: str
    weight: torch.Tensor
    adam: dict[str, torch.Tensor] | None  # None: the optimizer starts its state fresh (new layers, fresh runs)


def parameter_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every parameter's whole shape, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        return {name: p.shape for name, p in FLM(cfg).named_parameters()}


def growth_seed(seed: int, index: int, name: str) -> int:
    """The seed of tensor `name`'s new entries at growth `index` of a run seeded `seed` (63 bits of SHA-256)."""
    digest = hashlib.sha256(f"flm-growth/{seed}/{index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def fresh_parameter(cfg: ModelConfig, name: str, shape: torch.Size, seed: int, index: int) -> torch.Tensor:
    """Freshly initialised values of parameter `name` (of `shape`) of a model of shape `cfg`, for growth `index`
    of a run seeded `seed` (host, float32)."""
    generator = torch.Generator().manual_seed(growth_seed(seed, index, name))
    return init_parameter(cfg, name, torch.empty(shape), generator=generator)


def grow_tensors(old_cfg: ModelConfig, new_cfg: ModelConfig, sources: list[LayerSource],
                 weights: Mapping[str, torch.Tensor], adam: Mapping[str, Mapping[str, torch.Tensor]] | None,
                 seed: int, index: int) -> Iterator[Grown]:
    """The grown model's parameters in initialisation order, each with its Adam state.

    `weights` and `adam` give the old model's whole tensors by name when asked (they may gather them from
    shards or read them from disk), so only one is ever needed at a time. Layers new in the grown model copy
    the old layer `sources` names (their Adam state starts fresh) or, without one, are freshly initialised.
    """
    check_growable(old_cfg, new_cfg)
    shapes = parameter_shapes(new_cfg)
    for name in init_order(new_cfg):
        src, in_new_layer = source_name(name, sources)
        if src is not None and src not in weights:
            raise FlmError(f"cannot grow {name}: the old model has no {src}")
        old = weights[src].detach().cpu() if src is not None else None
        if old is not None and tuple(old.shape) == tuple(shapes[name]):
            template = torch.empty(shapes[name], dtype=old.dtype)  # every entry is overwritten
        else:
            template = fresh_parameter(new_cfg, name, shapes[name], seed, index)
        weight = template if old is None else grow_tensor(name, old, template, old_cfg, new_cfg, in_place=True)
        state = None
        if adam is not None and old is not None and not in_new_layer and src in adam:
            state = grow_adam_state(name, {k: v.detach().cpu() for k, v in adam[src].items()}, shapes[name],
                                    old_cfg, new_cfg)
        yield Grown(name, weight, state)
        del old, template, weight, state  # before the next tensor is read: one tensor's worth in memory


def grow_training(model: FLM, adam: Mapping[str, Mapping[str, torch.Tensor]] | None, new_cfg: ModelConfig,
                  new_layers: str = "stack", ramp_steps: int = 100, seed: int = 0, index: int = 1
                  ) -> tuple[FLM, Ramp, dict[str, dict[str, torch.Tensor]]]:
    """One process: (the grown model on `model`'s device with its masks at c = 0, the ramp, the grown Adam state
    by parameter name). Memory: the old and the new model, and one tensor more on the host."""
    check_growable(model.cfg, new_cfg)
    sources = layer_sources(model.cfg.n_layers, new_cfg.n_layers, new_layers)
    device = next(model.parameters()).device
    with torch.device("meta"):
        grown = FLM(new_cfg)
    grown.to_empty(device=device)  # memory without values: every parameter is written below
    if new_cfg.tie_embeddings:  # to_empty gives every module a tensor of its own
        grown.lm_head.weight = grown.embed.weight
    grown.init_rotary()
    params, states = dict(grown.named_parameters()), {}
    with torch.no_grad():
        for t in grow_tensors(model.cfg, new_cfg, sources, dict(model.named_parameters()), adam, seed, index):
            params[t.name].copy_(t.weight)
            if t.adam is not None:
                states[t.name] = {k: v.to(device) for k, v in t.adam.items()}
    ramp = Ramp(model.cfg, sources, ramp_steps)
    apply_masks(grown, ramp)
    return grown, ramp, states


def grow_model(model: FLM, new_cfg: ModelConfig, new_layers: str = "stack", ramp_steps: int = 100, seed: int = 0,
               index: int = 1) -> tuple[FLM, Ramp]:
    """The weights alone (`grow_training` without an optimizer): the grown model and its ramp, masks at c = 0."""
    grown, ramp, _ = grow_training(model, None, new_cfg, new_layers, ramp_steps, seed, index)
    return grown, ramp
