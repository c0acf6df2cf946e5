"""Building and growing a sharded model one tensor at a time, so no process ever holds the whole model.

A sharded model is first laid out on the meta device (flm.parallel.parallelize), then given memory for its
own pieces only. Its values come tensor by tensor: the whole tensor is made on the host (fresh initialisation,
in the order `build_model(cfg)` draws it, so the values are exactly those of a single-device model), this process
keeps its piece, and the whole tensor is dropped before the next one.

Growth at a stage boundary runs the one growth routine (flm.growth.routine) with the old model's tensors
gathered whole when the routine asks for them (an all-gather over their shards, or a broadcast from the
pipeline stage that holds them); each process keeps its pieces of the grown tensor and of its Adam state under
the new layout, which may differ from the old one. Peak extra memory: a few copies of the largest tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from flm.checkpoint.pieces import gather, place_state, write_pieces
from flm.checkpoint.reader import Lazy
from flm.checkpoint.state import named_params
from flm.config import ModelConfig, TrainConfig
from flm.growth import LayerSource, grow_tensors
from flm.growth.routine import parameter_shapes
from flm.model import FLM
from flm.model.registry import init_order, init_parameter
from flm.parallel.pipeline import owner_stage
from flm.train.optim import build_optimizer


def fresh_values(cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Freshly initialised whole tensors of a model of shape `cfg`, made one at a time in init order from the
    global generator, exactly as `build_model(cfg)` draws them."""
    shapes = parameter_shapes(cfg)
    for name in init_order(cfg):
        yield name, init_parameter(cfg, name, torch.empty(shapes[name]))


class OldModel:
    """The old model's tensors, whole, on every process, when the growth routine asks for them (collectives:
    every process asks for the same tensors in the same order)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ModelConfig, pp: int, pp_mesh: DeviceMesh):
        self.optimizer, self.cfg, self.pp, self.pp_mesh = optimizer, cfg, pp, pp_mesh
        self.params = named_params(optimizer)
        names = init_order(cfg)
        self.weights = Lazy(names, lambda name: self._whole(name, self.params.get(name)))
        self.adam = Lazy(names, self._state)

    def _owner(self, name: str) -> int:
        return owner_stage(name, self.cfg.n_layers, self.pp)

    def _whole(self, name: str, value: torch.Tensor | None) -> torch.Tensor:
        if self.pp == 1:
            return gather(value)
        return broadcast_whole(value, self._owner(name), self.pp_mesh)

    def _state(self, name: str) -> dict[str, torch.Tensor]:
        held = self.params.get(name)
        state = self.optimizer.state.get(held, {}) if held is not None else {}
        fields = sorted(state)
        if self.pp > 1:  # the stages that do not hold the parameter learn which fields its state has
            box = [fields]
            dist.broadcast_object_list(box, group=self.pp_mesh.get_group(), group_src=self._owner(name))
            fields = box[0]
        return {field: self._whole(name, state.get(field)) for field in fields}


@torch.no_grad()
def grow_sharded(old: OldModel, new: FLM, sources: list[LayerSource], cfg: TrainConfig, seed: int,
                 index: int, operator: str = "msg", noise: float = 0.0,
                 copy_noise: float = 0.0) -> torch.optim.Optimizer:
    """Fill the sharded, empty `new` with the grown weights (family `operator`); returns its optimizer holding the
    grown Adam state. Collective: every process runs it alike."""
    params = dict(new.named_parameters())
    states = {}
    for grown in grow_tensors(old.cfg, new.cfg, sources, old.weights, old.adam, seed, index, operator, noise,
                                copy_noise):
        if grown.name not in params:  # a pipeline stage keeps its own blocks
            continue
        write_pieces(params, [(grown.name, grown.weight)])
        if grown.adam is not None:
            states[grown.name] = {k: place_state(params[grown.name], v) for k, v in grown.adam.items()}
    new.init_rotary()
    return build_optimizer(new, cfg, states)


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
    return buffer
