"""The optimizer set-up: AdamW with weight decay on matrices only."""

from __future__ import annotations

from torch import nn

from flm.config import TrainConfig
from flm.train.adamw import AdamW


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (dim >= 2: linear weights, embedding, head) decay; vectors do not.

    Biases and LayerNorm parameters are vector-like: decaying them only pulls γ away from 1.
    Each group keeps its parameter names so optimizer state can be saved and grown by name.
    """
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied head/embedding: one tensor, one entry
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> AdamW:
    return AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)

