"""Which trainer a `flm train` process runs: the one-process Trainer, or under torchrun the ParallelTrainer
(flm.parallel is imported only then, so a single-process run never loads DTensor or pipelining)."""

from __future__ import annotations

from typing import Any, Callable

from flm.config import Config
from flm.device import torchrun_world
from flm.errors import FlmError
from flm.train.trainer import Trainer


def make_trainer(cfg: Config, prepare: Callable[[Any], Any], log: Callable[[str], None] = print) -> Trainer:
    """A ParallelTrainer under torchrun, else the single-process Trainer (whose layout must be one process).

    `prepare(cfg.data)` makes sure the shards exist; under torchrun only the first process writes them.
    """
    if torchrun_world() is not None:
        from flm.parallel.trainer import start_parallel

        return start_parallel(cfg, prepare, log)
    for i, stage in enumerate(cfg.stages or [None]):
        tp, pp, dp = cfg.stage_layout(stage)
        if tp * pp * dp > 1:
            where = f"stages[{i}]" if stage is not None else "[parallel]"
            raise FlmError(f"{where} asks for {tp * pp * dp} processes (dp{dp} x tp{tp} x pp{pp}): launch with "
                           f"`torchrun --nproc-per-node {tp * pp * dp} -m flm.cli.main train ...`")
    prepare(cfg.data)
    return Trainer(cfg, log)
