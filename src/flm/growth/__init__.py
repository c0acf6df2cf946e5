"""Growth: the families' tensor behaviour (flm.growth.families: MSG, zero-initialised writers, cloning, stacking, each
keeping the promises of its declaration in flm.config.growth), the masks that keep growth exact, and the one
routine that grows a model and its Adam state one tensor at a time."""

from flm.config.growth import ramp_length
from flm.growth.families import behaviour
from flm.growth.fresh import fresh_parameter
from flm.growth.masks import Ramp, apply_masks
from flm.growth.operators import LayerSource, check_growable, grow_tensor, layer_sources
from flm.growth.optimizer import grow_adam_state
from flm.growth.routine import Grown, grow_model, grow_tensors, grow_training

__all__ = ["Grown", "LayerSource", "Ramp", "apply_masks", "behaviour", "check_growable", "fresh_parameter",
           "grow_adam_state", "grow_model", "grow_tensor", "grow_tensors", "grow_training", "layer_sources",
           "ramp_length"]
