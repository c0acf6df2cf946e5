"""The optimizer set-up: AdamW with weight decay on matrices only, and its growth with the model."""

from __future__ import annotations

import torch
from torch import nn

from flm.config import ModelConfig, TrainConfig
from flm.growth import LayerSource, grow_adam_state
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



def adam_state_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {name: optimizer.state[p] for group in optimizer.param_groups
            for name, p in zip(group["names"], group["params"]) if p in optimizer.state}


def grow_optimizer(old: torch.optim.Optimizer, old_cfg: ModelConfig, model: nn.Module, sources: list[LayerSource],
                   cfg: TrainConfig) -> AdamW:
    """An optimizer over the grown `model` holding `old`'s Adam state mapped into the new shapes."""
    new = build_optimizer(model, cfg)
    named = {name: p for group in new.param_groups for name, p in zip(group["names"], group["params"])}
    for name, state in grow_adam_state(old_cfg, adam_state_by_name(old), model.cfg, named, sources).items():
        new.state[named[name]] = state
    return new
