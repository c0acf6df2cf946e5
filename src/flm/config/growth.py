"""The growth families, declared: what each can grow, whether it keeps the function, where its new layers come from,
what becomes of Adam state, and when it ramps masks.

A rule of the configuration rather than of flm.growth, so that a stage asking its family for a growth it cannot
do is a one-line error when the config is loaded, not hours later at the stage boundary; flm.growth asks the
same function before growing (`flm grow`, direct callers), and the checkpoint metadata asks which families ramp.
The declarations are stdlib-only data because flm.config may import nothing of flm.growth; each family's tensor
behaviour is the module flm/growth/families/<name>.py, and tests/test_growth_families.py checks that both sides
name the same families and that every family does what it declares here. docs/growth.md describes them.

A declaration holds for every model architecture (flm.config.schema.ARCHS): what a family grows and which of it
exactly is the same for "flm" and "llama" (RMSNorm, SwiGLU, grouped-query attention; tests/test_llama_growth.py
checks each declaration on llama models against transformers), and the one difference is spelled as a field
(`tied_d_model_archs`). `n_kv_heads` is the llama arch's to grow on its own (an FLM model's key/value heads are
its heads); new key/value heads come with their query heads, so the query heads per key/value head never shrink.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from flm.config.shape import SHAPE_FIELDS, SHAPE_KEYS, WIDTH_FIELDS
from flm.errors import FlmError

NEW_LAYER_MODES = ("stack", "insert", "random")  # where new layers come from (flm.growth.layer_sources)
_WIDTH_KEYS = tuple(f.key for f in WIDTH_FIELDS)


@dataclass(frozen=True)
class Family:
    """One growth family's promises, which its behaviour module must keep (tested)."""

    name: str
    grows: tuple[str, ...]  # the shape keys (flm.config.shape) it can grow; growing another is a config error
    exact: tuple[str, ...]  # of those, the ones whose growth keeps the function (the logits right after growth)
    whole_factors: bool = False  # widths only by whole factors (every new index copies an old one)
    copies_layers: bool = False  # new layers are always copies of old ones: new_layers = "random" is refused
    # Grown Adam state: "block" (old moments top-left, new entries fresh with a step count of their own:
    # flm.growth.optimizer) or "tiled" (every copy inherits its source's moments, scaled, and its history).
    adam: str = "block"
    ramps: bool = False  # leaves masks that ramp 0 -> 1 over the stage's ramp_steps (a checkpoint's ramp names it)
    ramps_only_for: tuple[str, ...] = ()  # ramps only when one of these shape keys grows (empty: every growth)
    tied_d_model: str | None = None  # why it cannot grow d_model of a tied model (None: it can) ...
    tied_d_model_archs: tuple[str, ...] = ()  # ... except in these archs (flm.config.schema.ARCHS), which can

    @property
    def new_layers(self) -> tuple[str, ...]:
        """The new_layers modes it accepts."""
        return tuple(m for m in NEW_LAYER_MODES if not (self.copies_layers and m == "random"))


FAMILIES = {f.name: f for f in (
    # Masked Structural Growth (REFERENCE.md §2): every new structure held at zero by masks that ramp in (llama:
    # RMSNorm's mean of squares mask-weighted, new query heads masked within their key/value group).
    Family("msg", grows=SHAPE_KEYS, exact=SHAPE_KEYS, ramps=True),
    # Zero-initialised residual writers; only the norms' statistics ramp, and only when d_model grows (llama: the
    # writers are o_proj, down_proj and the embedding; RMSNorm gains keep their new entries, which read zeros).
    Family("zero", grows=SHAPE_KEYS, exact=SHAPE_KEYS, ramps=True, ramps_only_for=("d_model",)),
    # HyperCloning: widths tiled by whole factors (exact), depth by copied layers (not exact). A tied llama model's
    # d_model grows exactly too: its final RMSNorm's gain, which feeds only the head, takes the 1/k the head (the
    # embedding, copied) cannot; FLM's final LayerNorm could do the same with γ and β, which is not implemented.
    Family("clone", grows=SHAPE_KEYS, exact=_WIDTH_KEYS, whole_factors=True, copies_layers=True, adam="tiled",
           tied_d_model="the embedding copies its columns where the head must divide them",
           tied_d_model_archs=("llama",)),
    # G_stack (MIDAS-style with new_layers = "insert"): depth only, copied layers without a gate.
    Family("stack", grows=("n_layers",), exact=(), copies_layers=True),
)}
OPERATORS = tuple(FAMILIES)
RAMPING = tuple(name for name, f in FAMILIES.items() if f.ramps)


class _Shape(Protocol):
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    ffn_dim: int
    kv_heads: int
    tie_embeddings: bool


def _either(names: list[str]) -> str:
    """['a', 'b', 'c'] -> "'a', 'b' or 'c'"."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _unknown(name: str) -> str:
    return f"unknown growth operator {name!r}; choose from {', '.join(OPERATORS)}"


def family(name: str) -> Family:
    """The declaration of family `name`, or a one-line error listing the registered ones."""
    if name not in FAMILIES:
        raise FlmError(_unknown(name))
    return FAMILIES[name]


def growth_problem(operator: str, old: _Shape, new: _Shape, new_layers: str | None) -> str | None:
    """Why family `operator` cannot grow shape `old` into `new` (None: it can). `new_layers` None skips the rule
    on where new layers come from. Shrinking and fixed fields are flm.growth.check_growable's business."""
    if operator not in FAMILIES:
        return _unknown(operator)
    f = FAMILIES[operator]
    group, new_group = old.n_heads // old.kv_heads, new.n_heads // new.kv_heads  # query heads per key/value head
    if new.n_heads >= old.n_heads and new.kv_heads >= old.kv_heads and new_group < group:
        return (f"growth cannot shrink the query heads per key/value head ({group} -> {new_group}: n_heads "
                f"{old.n_heads} -> {new.n_heads}, n_kv_heads {old.kv_heads} -> {new.kv_heads}); new key/value heads "
                "come with as many new query heads each as the old ones serve")
    grown = [(key, getattr(old, attr), getattr(new, attr)) for key, attr in SHAPE_FIELDS
             if getattr(new, attr) > getattr(old, attr)]
    for key, a, b in grown:
        if key not in f.grows:
            what = " and ".join("depth" if k == "n_layers" else k for k in f.grows)
            able = [g.name for g in FAMILIES.values() if key in g.grows]
            return f"operator {operator!r} grows {what} only, not {key} ({a} -> {b}); use {_either(able)}"
        if f.whole_factors and key in _WIDTH_KEYS and b % a:
            return f"operator {operator!r} grows {key} by a whole factor only ({a} -> {b} is x{b / a:.3g})"
    if f.whole_factors and new_group % group:
        return (f"operator {operator!r} grows the query heads per key/value head by a whole factor only ({group} -> "
                f"{new_group}: n_heads {old.n_heads} -> {new.n_heads}, n_kv_heads {old.kv_heads} -> {new.kv_heads})")
    if (f.tied_d_model and new.arch not in f.tied_d_model_archs and new.tie_embeddings
            and new.d_model > old.d_model):
        return f"operator {operator!r} cannot grow d_model of a tied model: {f.tied_d_model}"
    if new_layers in NEW_LAYER_MODES and new_layers not in f.new_layers and new.n_layers > old.n_layers:
        able = [g.name for g in FAMILIES.values() if new_layers in g.new_layers]
        return f"operator {operator!r} copies layers; new_layers = {new_layers!r} needs {_either(able)}"
    return None


def ramp_length(operator: str, old: _Shape, new: _Shape, ramp_steps: int) -> int:
    """Steps the growth of family `operator` from `old` to `new` ramps its masks over: the stage's `ramp_steps` for
    a family that ramps (when one of its `ramps_only_for` keys grows, if it names any), 0 otherwise (no masks)."""
    f = family(operator)
    changed = {key for key, attr in SHAPE_FIELDS if getattr(new, attr) != getattr(old, attr)}
    if f.ramps and (not f.ramps_only_for or changed & set(f.ramps_only_for)):
        return ramp_steps
    return 0
