"""Adam state through growth: the parameter index mapping applied to the moments and step counts."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from flm.config import ModelConfig
from flm.growth.operators import LayerSource, check_growable, grow_tensor, source_name


def grow_adam_state(old_cfg: ModelConfig, old_state: Mapping[str, Mapping[str, torch.Tensor]],
                    new_cfg: ModelConfig, new_params: Mapping[str, torch.Tensor], sources: list[LayerSource]
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """Adam state by parameter name for the grown model (all of it; `iter_grown_adam_state` one at a time)."""
    return dict(iter_grown_adam_state(old_cfg, old_state, new_cfg, new_params, sources))


def iter_grown_adam_state(old_cfg: ModelConfig, old_state: Mapping[str, Mapping[str, torch.Tensor]],
                          new_cfg: ModelConfig, new_params: Mapping[str, torch.Tensor], sources: list[LayerSource]
                          ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield (parameter name, Adam state) of the grown model, one parameter at a time.

    Old moments land in the same block as the old weights, new entries are zero. A tensor that grew
    gets a per-element step count (old entries keep theirs, new entries start at 0) so bias correction
    is right for both; a tensor that did not grow keeps its scalar count. Parameters of new layers get
    no state at all: the optimizer starts them fresh, like any new parameter. `new_params` only lends
    shapes, dtypes and devices.
    """
    check_growable(old_cfg, new_cfg)
    for name, param in new_params.items():
        src, in_new_layer = source_name(name, sources)
        if src is None or in_new_layer or src not in old_state:
            continue
        old = old_state[src]
        zeros = torch.zeros_like(param)
        state = {"exp_avg": grow_tensor(name, old["exp_avg"], zeros, old_cfg, new_cfg, readout_power=-1),
                 "exp_avg_sq": grow_tensor(name, old["exp_avg_sq"], zeros, old_cfg, new_cfg, readout_power=-2)}
        step = old["step"]
        if param.shape == old["exp_avg"].shape:  # did not grow: scalar (or still per-element) count as is
            state["step"] = step.clone()
        else:
            per_element = step.to(zeros.device).expand_as(old["exp_avg"]) if step.dim() == 0 else step
            state["step"] = grow_tensor(name, per_element, zeros, old_cfg, new_cfg, readout_power=0)
        yield name, state
