"""Which placement a `flm train` process trains with: this process alone, or under torchrun its part of the job
(flm.parallel is imported only then, so a single-process run never loads DTensor or pipelining)."""

from __future__ import annotations

from typing import Any, Callable

from flm.config import Config
from flm.device import torchrun_world
from flm.errors import FlmError
from flm.train.placement import OneProcess, Placement
from flm.train.trainer import Trainer


def make_trainer(cfg: Config, prepare: Callable[[Any], Any], log: Callable[[str], None] = print) -> Trainer:
    """The trainer of this process (use it as a context manager): over torchrun's placement under torchrun, else
    over one process, whose layout must then be one process.

    `prepare(cfg.data)` makes sure the shards exist; under torchrun only the first process writes them.
    """
    placement: Placement
    if torchrun_world() is not None:
        if cfg.train.teacher_objective == "separate":  # before joining the process group: each rank says one line
            raise FlmError("train.teacher_objective = 'separate' trains in one process (not yet under torchrun)")
        from flm.parallel.trainer import Torchrun

        placement = Torchrun(cfg)
    else:
        for i, stage in enumerate(cfg.stages or [None]):
            tp, pp, dp = cfg.stage_layout(stage)
            if tp * pp * dp > 1:
                where = f"stages[{i}]" if stage is not None else "[parallel]"
                raise FlmError(f"{where} asks for {tp * pp * dp} processes (dp{dp} x tp{tp} x pp{pp}): launch with "
                               f"`torchrun --nproc-per-node {tp * pp * dp} -m flm.cli.main train ...`")
        placement = OneProcess(cfg)
    try:
        placement.run_once(lambda: prepare(cfg.data))
    except BaseException:
        placement.close()
        raise
    return Trainer(cfg, log, placement=placement)
