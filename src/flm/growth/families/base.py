"""What every family's behaviour module is made of: the tensor it is asked to grow, the form of its answer, and
the top-left placement most families share.

A family module (flm/growth/families/<name>.py) defines `BEHAVIOUR`, a `Behaviour` keeping the promises of the
declaration of the same name in flm.config.growth.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from flm.config import ModelConfig
from flm.growth.fresh import fresh_parameter, tensor_generator
from flm.growth.operators import grow_tensor

# The mask buffers a ramp can set (flm.growth.masks): "hidden" (writers' new residual coordinates and mask-weighted
# LayerNorm), "norm" (LayerNorm statistics only), "gate" (new layers), "heads" (new heads), "units" (new FFN units).
MASK_KINDS = frozenset({"hidden", "norm", "gate", "heads", "units"})


@dataclass(frozen=True)
class TensorGrowth:
    """One parameter of the grown model to make, with everything a family may need for it."""

    name: str
    old: torch.Tensor | None  # its source in the old model, whole, on the host (None: a fresh new layer)
    shape: torch.Size  # the grown tensor's
    old_cfg: ModelConfig
    new_cfg: ModelConfig
    new_layer: bool  # whether it sits in a layer new in the grown model
    seed: int  # the run's seed and the growth's index, which seed every new value (flm.growth.fresh)
    index: int
    noise: float  # the stage's clone_noise, for families that break the symmetry of copies

    def fresh(self) -> torch.Tensor:
        """A fresh initialisation of the grown tensor, from its own seeded generator."""
        return fresh_parameter(self.new_cfg, self.name, self.shape, self.seed, self.index)

    def generator(self) -> torch.Generator:
        """The tensor's own seeded generator, for other new values (a fresh one: the same draws at every call)."""
        return tensor_generator(self.seed, self.index, self.name)


AdamGrowth = Callable[[str, Mapping[str, torch.Tensor], torch.Size, ModelConfig, ModelConfig],
                      dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Behaviour:
    """A family's tensor behaviour: its grown parameters, their Adam state, and the masks its ramp sets."""

    weight: Callable[[TensorGrowth], torch.Tensor]
    adam_state: AdamGrowth  # (name, the source's state, grown shape, old cfg, new cfg) -> the grown state
    masks: frozenset[str] = frozenset()  # of MASK_KINDS; empty for a family that does not ramp


def place_top_left(t: TensorGrowth) -> torch.Tensor:
    """The old tensor where its shape stays; else a fresh initialisation with the old values in its top-left block
    (per head for QKV; flm.growth.operators.grow_tensor), or all fresh in a new layer that copies nothing."""
    if t.old is not None and tuple(t.old.shape) == tuple(t.shape):
        return t.old.clone()
    weight = t.fresh()
    return weight if t.old is None else grow_tensor(t.name, t.old, weight, t.old_cfg, t.new_cfg, in_place=True)
