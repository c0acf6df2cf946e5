"""Growth: operator families on tensors (MSG, zero-initialised writers, cloning, stacking), the masks that keep
growth exact, and the one routine that grows a model and its Adam state one tensor at a time."""

from flm.growth.masks import Ramp, apply_masks, ramp_length
from flm.growth.operators import LayerSource, check_growable, grow_tensor, layer_sources
from flm.growth.optimizer import grow_adam_state
from flm.growth.routine import Grown, fresh_parameter, grow_model, grow_tensors, grow_training

__all__ = ["Grown", "LayerSource", "Ramp", "apply_masks", "check_growable", "fresh_parameter", "grow_adam_state",
           "grow_model", "grow_tensor", "grow_tensors", "grow_training", "layer_sources", "ramp_length"]
