"""Masked Structural Growth: operators on tensors, and the masks that keep growth exact."""

from flm.growth.masks import Ramp, apply_masks, grow_model
from flm.growth.optimizer import grow_adam_state, iter_grown_adam_state
from flm.growth.operators import (LayerSource, check_growable, grow_state, grow_tensor, iter_grown,
                                 layer_sources)

__all__ = ["LayerSource", "Ramp", "apply_masks", "check_growable", "grow_adam_state", "grow_model", "grow_state", "grow_tensor",
           "iter_grown", "iter_grown_adam_state", "layer_sources"]
