"""The masks that make growth function-preserving, their linear ramp, and folding them away.

After an `msg` growth from shape `old` to `new`, every new structure is multiplied by a mask value c: new
residual coordinates (hidden mask), new FFN units (unit mask), new query heads (head mask: for grouped-query
attention the new heads of each key/value group and the new groups), new layers (depth gate). c starts at 0, where the grown model computes exactly the old function whatever the
new weights are, and rises by 1/K per optimizer step; at c = 1 the masks change nothing and are
removed, leaving an ordinary model of the new shape.

Which masks a ramp sets is its family's (flm.growth.families: `msg` all of the above, `zero` only `norm_mask`, the
norm statistics (LayerNorm's, the llama arch's RMSNorm's) weighted by the same ramp while d_model grows, because
their mean over the grown width would count the new, zero coordinates); how long it ramps is its declaration's (flm.config.growth.ramp_length).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from flm.config import ModelConfig, model_config_from_dict
from flm.growth.families import behaviour
from flm.growth.operators import LayerSource
from flm.model import FLM


@dataclass
class Ramp:
    """A growth in progress: the shape grown from, which layers are new, and the ramp position."""

    old: ModelConfig
    sources: list[LayerSource]
    ramp_steps: int  # K
    steps_done: int = 0
    operator: str = "msg"  # the growth family, which says which masks ramp

    @property
    def c(self) -> float:
        return 1.0 if self.ramp_steps == 0 else min(1.0, self.steps_done / self.ramp_steps)

    def to_dict(self) -> dict:
        return {"old": asdict(self.old), "sources": [[s.old, s.new] for s in self.sources],
                "ramp_steps": self.ramp_steps, "steps_done": self.steps_done, "operator": self.operator}

    @classmethod
    def from_dict(cls, d: dict) -> "Ramp":
        """A ramp from a checkpoint; one written before growth families existed is an `msg` ramp."""
        old = {k: v for k, v in d["old"].items() if v is not None}
        return cls(model_config_from_dict(old, prefix="growth.old"), [LayerSource(o, n) for o, n in d["sources"]],
                   d["ramp_steps"], d["steps_done"], d.get("operator", "msg"))


def _mask(size: int, old_size: int, c: float, like: torch.Tensor) -> torch.Tensor | None:
    """1 on the first `old_size` entries, c on the rest; None when nothing is new."""
    if size == old_size:
        return None
    m = torch.full((size,), c, dtype=like.dtype, device=like.device)
    m[:old_size] = 1.0
    return m


def _head_mask(new: ModelConfig, old: ModelConfig, c: float, like: torch.Tensor) -> torch.Tensor | None:
    """[n_heads] query-head mask: 1 on the old heads, c on the new; None when no head is new. Query heads are laid
    out [key/value heads, heads per key/value head] (grouped-query attention; FLM: one head per group), and the old
    ones sit at the start of each old group: new query heads end each group, new groups come after the old ones."""
    if new.n_heads == old.n_heads:
        return None
    m = torch.full((new.kv_heads, new.n_heads // new.kv_heads), c, dtype=like.dtype, device=like.device)
    m[:old.kv_heads, :old.n_heads // old.kv_heads] = 1.0
    return m.flatten()


def apply_masks(model: FLM, ramp: Ramp, fold: bool = True, blocks: dict[int, nn.Module] | None = None) -> None:
    """Set the model's mask buffers for the ramp's current c; at c = 1 remove them (unless not `fold`).

    `blocks`: the blocks by global index, when the model holds only some of them (a pipeline stage).
    """
    new, old, c = model.cfg, ramp.old, ramp.c
    like = next(model.parameters())
    kinds = frozenset() if fold and c >= 1.0 else behaviour(ramp.operator).masks
    hidden = _mask(new.d_model, old.d_model, c, like) if kinds & {"hidden", "norm"} else None
    model.hidden_mask = hidden if "hidden" in kinds else None
    model.norm_mask = hidden if "norm" in kinds else None
    # One tensor of each kind, shared by every block: the masks are the same in all layers. Filled on the device:
    # a tensor copied from the host would make the host wait for the device at every step of the ramp.
    gate = torch.full((), c, dtype=like.dtype, device=like.device) if "gate" in kinds else None
    head_mask = _head_mask(new, old, c, like) if "heads" in kinds else None
    unit_mask = _mask(new.ffn_dim, old.ffn_dim, c, like) if "units" in kinds else None
    for i, block in (blocks.items() if blocks is not None else enumerate(model.blocks)):
        src = ramp.sources[i]
        block.gate = gate if src.new else None
        block.norm_mask = model.norm_mask
        block.attn.head_mask = head_mask
        block.mlp.unit_mask = unit_mask
