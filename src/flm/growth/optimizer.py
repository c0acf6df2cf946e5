"""Adam state through growth: the parameter index mapping applied to the moments, and step counts that stay
right for old and new entries while using a byte per entry at most.

Old moments land in the same block as the old weights; new entries start at zero. Bias correction needs the
number of steps each entry has taken: the old entries t, the new ones 0 (one shared count would make the new
entries' first updates (1-β1)/sqrt(1-β2) times too large). A grown tensor's state therefore holds its counts
as a short list `step` (one per age class, float32) and an `age` tensor of one byte per entry saying which class
each entry is in (old entries keep theirs, new ones get a new class); flm.train.adamw reads them, and folds them
back into one scalar count once every class's bias correction is exactly 1.0. A tensor that did not grow keeps
its state as it is.

The `clone` family has no new entries: its moments are tiled instead (flm.growth.families.clone).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flm.config import ModelConfig
from flm.errors import FlmError
from flm.growth.operators import grow_tensor

MAX_AGES = 255  # a byte per entry


def grow_adam_state(name: str, old: Mapping[str, torch.Tensor], grown_shape: torch.Size, old_cfg: ModelConfig,
                    new_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The Adam state of grown parameter `name` (shape `grown_shape`) from the state `old` of its source."""
    def zeros() -> torch.Tensor:
        return torch.zeros(grown_shape, dtype=old["exp_avg"].dtype, device=old["exp_avg"].device)

    state = {"exp_avg": grow_tensor(name, old["exp_avg"], zeros(), old_cfg, new_cfg, -1, in_place=True),
             "exp_avg_sq": grow_tensor(name, old["exp_avg_sq"], zeros(), old_cfg, new_cfg, -2, in_place=True)}
    step = old["step"]
    if tuple(grown_shape) == tuple(old["exp_avg"].shape):  # did not grow: counts as they are
        state["step"] = step.clone()
        if "age" in old:
            state["age"] = old["age"].clone()
        return state
    counts = step.reshape(-1).float()  # a scalar count is one class
    if len(counts) >= MAX_AGES:
        raise FlmError(f"{name}: {MAX_AGES} growths within one settling of Adam's bias correction; "
                       "let each stage run longer")
    old_age = old["age"] if "age" in old else torch.zeros(old["exp_avg"].shape, dtype=torch.uint8,
                                                          device=counts.device)
    new_class = torch.full(grown_shape, len(counts), dtype=torch.uint8, device=old_age.device)
    state["step"] = torch.cat([counts, counts.new_zeros(1)])
    state["age"] = grow_tensor(name, old_age, new_class, old_cfg, new_cfg, readout_power=0, in_place=True)
    return state
