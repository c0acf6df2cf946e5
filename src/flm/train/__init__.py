"""Training: the loop, AdamW and its schedule, the step guard and metrics (checkpoints: flm.checkpoint)."""

from flm.train.optim import build_optimizer
from flm.train.schedule import lr_at, plan_stages
from flm.train.trainer import Trainer

__all__ = ["Trainer", "build_optimizer", "lr_at", "plan_stages"]
