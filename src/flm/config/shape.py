"""The growable shape of a model, declared once.

A growth stage, `flm grow`'s shape argument, the no-shrink rule and the families' width rules all walk the same
fields; spelling them in one tuple means a new growable dimension is this declaration plus its tensor operators.
Each field has a config key (what a stage or `flm grow` sets) and a ModelConfig attribute (the effective value:
`d_ff` may be None, meaning 4 * d_model, and is read as `ffn_dim`; `n_kv_heads` may be None, meaning n_heads, and is
read as `kv_heads`, so an FLM model's key/value heads grow with its heads).
"""

from __future__ import annotations

from typing import NamedTuple


class ShapeField(NamedTuple):
    key: str  # the config key ([model], [[stages]], `flm grow`)
    attr: str  # the ModelConfig attribute holding the effective size

    @property
    def is_width(self) -> bool:
        """Widths grow tensors along a dimension; depth adds layers."""
        return self.key != "n_layers"


SHAPE_FIELDS = (ShapeField("n_layers", "n_layers"), ShapeField("d_model", "d_model"),
                ShapeField("n_heads", "n_heads"), ShapeField("d_ff", "ffn_dim"), ShapeField("n_kv_heads", "kv_heads"))
SHAPE_KEYS = tuple(f.key for f in SHAPE_FIELDS)
WIDTH_FIELDS = tuple(f for f in SHAPE_FIELDS if f.is_width)
