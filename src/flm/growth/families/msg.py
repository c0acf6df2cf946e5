"""The `msg` family: Masked Structural Growth (REFERENCE.md §2). Old values go to the top-left block and the new
entries may be anything: every new structure (residual coordinates, heads, FFN units, layers) is multiplied by a
mask that starts at 0 and ramps to 1 (flm.growth.masks), which is what keeps the function."""

from flm.growth.families.base import Behaviour, place_top_left
from flm.growth.optimizer import grow_adam_state

BEHAVIOUR = Behaviour(place_top_left, grow_adam_state, masks=frozenset({"hidden", "gate", "heads", "units"}))
