"""The growth operator families and which growths each can do.

A rule of the configuration rather than of flm.growth, so that a stage asking its family for a growth it cannot
do is a one-line error when the config is loaded, not hours later at the stage boundary; flm.growth asks the
same function before growing (`flm grow`, direct callers). docs/growth.md describes the families:

- `msg`: masks ramped 0 -> 1 (Masked Structural Growth); any growth.
- `zero`: no masks, the new writers into the residual stream start at zero; any growth (growing d_model keeps
  mask-weighted LayerNorm statistics while they ramp in).
- `clone`: HyperCloning; widths (d_model, heads, FFN) by whole factors only, depth by copied layers.
- `stack`: depth only, by copied layers (G_stack; MIDAS-style with new_layers = "insert").
"""

from __future__ import annotations

from typing import Protocol

from flm.config.shape import WIDTH_FIELDS

OPERATORS = ("msg", "zero", "clone", "stack")
RAMPING = ("msg", "zero")  # the families whose growth can leave masks ramping (a checkpoint's ramp names one)
NEW_LAYER_MODES = ("stack", "insert", "random")
_COPYING = ("clone", "stack")  # families whose new layers are copies of old ones


class _Shape(Protocol):
    n_layers: int
    d_model: int
    n_heads: int
    ffn_dim: int
    tie_embeddings: bool


def growth_problem(operator: str, old: _Shape, new: _Shape, new_layers: str | None) -> str | None:
    """Why family `operator` cannot grow shape `old` into `new` (None: it can). `new_layers` None skips the rule
    on where new layers come from. Shrinking and fixed fields are flm.growth.check_growable's business."""
    if operator not in OPERATORS:
        return f"unknown growth operator {operator!r}; choose from {', '.join(OPERATORS)}"
    widths = [(key, getattr(old, attr), getattr(new, attr)) for key, attr in WIDTH_FIELDS]
    grown = [(key, a, b) for key, a, b in widths if b > a]
    if operator == "stack" and grown:
        key, a, b = grown[0]
        return f"operator 'stack' grows depth only, not {key} ({a} -> {b}); use 'msg', 'zero' or 'clone'"
    if operator == "clone":
        for key, a, b in grown:
            if b % a:
                return f"operator 'clone' grows {key} by a whole factor only ({a} -> {b} is x{b / a:.3g})"
        if new.tie_embeddings and new.d_model > old.d_model:
            return ("operator 'clone' cannot grow d_model of a tied model: the embedding copies its columns where the "
                    "head must divide them")
    if operator in _COPYING and new_layers == "random" and new.n_layers > old.n_layers:
        return f"operator {operator!r} copies layers; new_layers = 'random' needs 'msg' or 'zero'"
    return None
