"""The optimizer set-up: AdamW with weight decay on matrices only and μP learning rates, by parameter name."""

from __future__ import annotations

import torch

from flm.config import TrainConfig
from flm.model import FLM
from flm.model.mup_rules import lr_mult, weight_decay as decay_of
from flm.train.adamw import AdamW


def param_groups(model: FLM, weight_decay: float, lr: float) -> list[dict]:
    """Parameters grouped by (LR multiplier, weight decay) from flm.model.mup_rules, in order of appearance.

    Standard parametrization gives two groups (one if weight_decay is 0): matrices (linear weights, embedding, head) decay,
    vectors (biases, LayerNorm) do not. μP adds a group for the hidden matrices, whose LR is divided
    by width_mult. Each group carries its `lr_mult` (the trainer sets lr = schedule · lr_mult) and its
    parameter names, so optimizer state can be saved and grown by name.
    """
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():  # a tied head is the embedding: named_parameters gives it once
        mult, decay = lr_mult(model.cfg, name), decay_of(model.cfg, name, weight_decay)
        group = groups.setdefault((mult, decay), {"params": [], "names": [], "lr": lr * mult, "lr_mult": mult,
                                                  "weight_decay": decay})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: FLM, cfg: TrainConfig, state: dict[str, dict[str, torch.Tensor]] | None = None) -> AdamW:
    """AdamW over `model`'s parameter groups; `state` (by parameter name) gives parameters their Adam state,
    e.g. the grown state after growth (the groups come from the grown config, so under μP the hidden matrices
    take the new width's LR)."""
    optimizer = AdamW(param_groups(model, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                      eps=cfg.adam_eps)
    if state:
        for group in optimizer.param_groups:
            for name, p in zip(group["names"], group["params"]):
                if name in state:
                    optimizer.state[p] = state[name]
    return optimizer


def adam_state_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {name: optimizer.state[p] for group in optimizer.param_groups
            for name, p in zip(group["names"], group["params"]) if p in optimizer.state}
