"""The `stack` family: depth only, new layers copied from old ones where `new_layers` says (G_stack; MIDAS-style
with "insert"), with no gate, so the function changes at growth. Widths stay, so every tensor keeps its values and
Adam state; copied layers start their state fresh (the growth routine's rule for every new layer)."""

from flm.growth.families.base import Behaviour, place_top_left
from flm.growth.optimizer import grow_adam_state

BEHAVIOUR = Behaviour(place_top_left, grow_adam_state)
