"""Building and growing a sharded model one tensor at a time, so no process ever holds the whole model.

A sharded model is first laid out on the meta device (tensor parallel, FSDP), then given memory for
its own pieces only. Its values come tensor by tensor: the whole tensor is made on the host (fresh
initialisation, in the order `FLM(cfg)` draws it, so the values are exactly those of a single-device
model), this process keeps its piece, and the whole tensor is dropped before the next one.

Growth at a stage boundary works the same way: for each tensor of the grown model, the source tensor
of the old model is gathered whole (all-gather over its shards), grown with the MSG operators of
flm.growth (`iter_grown`, `iter_grown_adam_state`: the same code as single-device growth), and each
process keeps its piece under the new layout, which may differ from the old one. Adam moments and
per-element step counts follow the same mapping. Peak extra memory: a few copies of the largest tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from flm.config import ModelConfig, TrainConfig
from flm.growth import LayerSource, iter_grown, iter_grown_adam_state
from flm.model import FLM
from flm.model.flm import init_order, init_parameter
from flm.checkpoint.pieces import gather, shard_like, write_pieces
from flm.checkpoint.state import named_params
from flm.train.optim import build_optimizer


def global_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every parameter's whole shape, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        return {name: p.shape for name, p in FLM(cfg).named_parameters()}




class Lazy(Mapping):
    """A read-only mapping whose values are computed when asked for, in key order, and not kept."""

    def __init__(self, keys: list[str], make: Callable[[str], torch.Tensor | Mapping]):
        self._keys, self._make = keys, make

    def __getitem__(self, key: str):
        if key not in self._keys:
            raise KeyError(key)
        return self._make(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def fresh_values(cfg: ModelConfig) -> Lazy:
    """Freshly initialised whole tensors of a model of shape `cfg`, made one at a time in init order."""
    shapes = global_shapes(cfg)
    return Lazy(init_order(cfg), lambda name: init_parameter(cfg, name, torch.empty(shapes[name])))


@torch.no_grad()
def grow_sharded(old_cfg: ModelConfig, old_weights: Mapping[str, torch.Tensor],
                 old_state: Mapping[str, Mapping[str, torch.Tensor]], new: FLM, sources: list[LayerSource],
                 copy_new_layers: bool, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Fill the sharded, empty `new` with the grown weights; returns its optimizer holding the grown Adam state.

    `old_weights` and `old_state` give the old model's whole tensors by name when asked (gathering them
    from their shards), so only one is ever whole at a time. Collective: every process runs it alike.
    """
    grown = iter_grown(old_cfg, old_weights, new.cfg, fresh_values(new.cfg), sources, copy_new_layers)
    write_pieces(dict(new.named_parameters()), grown)
    new.init_rotary()
    optimizer = build_optimizer(new, cfg)
    named = named_params(optimizer)
    shapes = global_shapes(new.cfg)
    shells = Lazy(init_order(new.cfg), lambda name: torch.empty(shapes[name]))
    for name, state in iter_grown_adam_state(old_cfg, old_state, new.cfg, shells, sources):
        if name in named:  # a pipeline stage keeps the state of its own parameters
            p = named[name]
            optimizer.state[p] = {key: value if key == "step" and value.dim() == 0 else shard_like(p, value)
                                  for key, value in state.items()}
    return optimizer


def broadcast_whole(value: torch.Tensor | None, owner: int, pp_mesh: DeviceMesh) -> torch.Tensor:
    """A tensor that pipeline stage `owner` holds (`value`, sharded over that stage's own ranks; None on
    the other stages), whole, on every stage: gathered on the owner, then broadcast along the pipeline."""
    group = pp_mesh.get_group()
    full = gather(value) if value is not None else None
    spec = [(tuple(full.shape), full.dtype) if full is not None else None]
    dist.broadcast_object_list(spec, group=group, group_src=owner)
    shape, dtype = spec[0]
    device = torch.device(pp_mesh.device_type, torch.cuda.current_device()) if pp_mesh.device_type == "cuda" else "cpu"
    buffer = full.to(device) if full is not None else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buffer, group=group, group_src=owner)
    return buffer.cpu() if buffer.dim() == 0 else buffer  # scalar step counts live on the host
