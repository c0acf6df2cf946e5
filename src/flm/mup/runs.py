"""Short training runs for the μP tools: a config moved to one width, trained by the Trainer's own step.

Every run of a tool reads the same data in the same order (same loader seed) for the same number of
steps, so the runs differ only in what the tool varies. No checkpoints or metrics files are written:
the tools keep what they measure and write their own reports.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from flm.config import Config
from flm.errors import FlmError
from flm.train import Trainer


def at_width(cfg: Config, width: int, parametrization: str) -> Config:
    """`cfg` as a single-stage run at hidden width `width` under "mup" or "sp".

    Heads = width / head_dim (the head dim stays fixed, as in growth) and the FFN is 4 x width, so
    every hidden matrix scales with the width; base_width, init_std and output_mult are kept.
    """
    model = cfg.model
    if width % model.head_dim:
        raise FlmError(f"width {width} is not a multiple of model.head_dim ({model.head_dim}): heads keep their size")
    model = dataclasses.replace(model, d_model=width, n_heads=width // model.head_dim, d_ff=None,
                                mup=parametrization == "mup")
    out = dataclasses.replace(cfg, model=model, stages=[])
    out.validate()
    return out


def with_hyperparameters(cfg: Config, lr: float, init_std: float, output_mult: float) -> Config:
    """`cfg` with peak LR `lr` (min_lr keeps its ratio to train.lr), init std and output multiplier."""
    train = dataclasses.replace(cfg.train, lr=lr, min_lr=lr * cfg.train.min_lr / cfg.train.lr)
    model = dataclasses.replace(cfg.model, init_std=init_std, output_mult=output_mult)
    return dataclasses.replace(cfg, train=train, model=model)


def quiet(*_: object) -> None:
    pass


@dataclass
class RunResult:
    val_loss: float  # mean validation loss after the last step; inf if the run diverged
    train_loss: float  # mean training loss over the last tenth of the steps
    steps: int
    seconds: float

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.val_loss)


def train_and_evaluate(cfg: Config) -> RunResult:
    """Train a single-stage config for train.max_steps steps (stopping early if the loss is not finite)."""
    t0 = time.perf_counter()
    with Trainer(cfg, log=quiet, guard=False) as trainer:  # a diverging rate must show: no step is cancelled
        tail = max(1, trainer.max_steps // 10)
        losses = []
        while trainer.step < trainer.max_steps:
            loss, _ = trainer.train_step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                return RunResult(math.inf, math.inf, trainer.step, time.perf_counter() - t0)
        val = trainer.evaluate()
    return RunResult(val if math.isfinite(val) else math.inf, sum(losses[-tail:]) / tail, trainer.step,
                     time.perf_counter() - t0)
