"""Training: the loop, AdamW and its schedule, atomic checkpoints and metrics."""

from flm.train.checkpoint import list_checkpoints, read_meta, save_checkpoint
from flm.train.optim import build_optimizer
from flm.train.schedule import lr_at, plan_stages
from flm.train.trainer import Trainer

__all__ = ["Trainer", "build_optimizer", "list_checkpoints", "lr_at", "plan_stages", "read_meta", "save_checkpoint"]
