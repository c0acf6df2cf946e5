"""Checkpoints: the one package that writes and reads them, for training, resume, generation, growth,
evaluation and export (docs/architecture.md).

A checkpoint is a folder (flm.checkpoint.folders) in one of two formats, chosen here and nowhere else: the
whole format written by one process (flm.checkpoint.whole) or the sharded format written by all processes of a
torchrun job (flm.checkpoint.sharded). Both name tensors the same way (flm.checkpoint.state), both load into a
model on any layout, and both carry a validated meta.json (flm.checkpoint.meta). One writer per run folder
(flm.checkpoint.lock).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from torch import nn

from flm.checkpoint.folders import (find_checkpoint, is_sharded, list_checkpoints, publish, read_meta,
                                    resolve_checkpoint, staging_dir, staging_path, step_of, write_failure)
from flm.checkpoint.lock import RunLock
from flm.checkpoint.meta import INFERENCE_KEYS
from flm.checkpoint.state import persistent_tensors
from flm.checkpoint.whole import load_whole_model, load_whole_train_state, save_whole

__all__ = ["RunLock", "find_checkpoint", "is_sharded", "list_checkpoints", "load_model", "load_train_state",
           "persistent_tensors", "read_meta", "resolve_checkpoint", "save_checkpoint", "step_of"]


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict[str, Any], keep_last: int, write_extra: Callable[[Path], None] | None = None,
                    distributed: bool = False) -> Path:
    """Write `root/step_<step>/` atomically, then delete all but the newest `keep_last` checkpoints.

    `meta` must hold what inference reads (`model`, `ramp`); without `optimizer` the Adam state is fresh;
    `write_extra(folder)` adds files (the tokenizer,
    the step guard's window) so that a checkpoint folder stands on its own. `distributed`: every process of
    the job calls this (collective) and the sharded format is written. A write error (disk full, ...) on any
    process removes the partial checkpoint and raises a one-line FlmError on all; the older ones are intact.
    """
    missing = [k for k in INFERENCE_KEYS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    if distributed:
        return _save_distributed(root, step, optimizer, meta, keep_last, write_extra)
    tmp = staging_dir(root, step)
    try:
        save_whole(tmp, model, optimizer)
        if write_extra is not None:
            write_extra(tmp)
        return publish(tmp, step, meta, keep_last)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(root, step, e) from None


def _save_distributed(root: Path, step: int, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                      keep_last: int, write_extra: Callable[[Path], None] | None) -> Path:
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    from flm.checkpoint.sharded import save_sharded

    main = dist.get_rank() == 0
    if main:
        staging_dir(root, step)
    dist.barrier()
    tmp, error = staging_path(root, step), None

    def all_ok() -> bool:  # every process learns whether any could not write, so that all stop alike
        failed = torch.tensor(int(error is not None))
        dist.all_reduce(failed)
        return not failed

    try:
        save_sharded(tmp, optimizer)
    except (OSError, SafetensorError, CheckpointException) as e:
        error = e
    if all_ok() and main:
        try:
            if write_extra is not None:
                write_extra(tmp)
            publish(tmp, step, meta, keep_last)
        except (OSError, SafetensorError) as e:
            error = e
    if not all_ok():
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(root, step, error or OSError("another process could not write its part")) from None
    return root / f"step_{step:08d}"


def load_model(path: Path, params: dict[str, torch.Tensor], partial: bool = False) -> None:
    """Weights of checkpoint `path` into `params` (by name; plain tensors or the pieces of sharded ones), in
    either format. `partial`: the model holds only some of the checkpoint's tensors (a pipeline stage)."""
    if is_sharded(path):
        import torch.distributed as dist

        from flm.checkpoint.sharded import load_sharded

        load_sharded(Path(path), params, None, distributed=dist.is_initialized())
    else:
        load_whole_model(Path(path), params, partial)


def load_train_state(path: Path, optimizer: torch.optim.Optimizer, rank: int = 0, world: int = 1) -> None:
    """Adam state of checkpoint `path` into `optimizer`, in either format; the generators of the process with
    the same rank are restored when the checkpoint was written by as many processes as now run."""
    meta = read_meta(path)
    if is_sharded(path):
        import torch.distributed as dist

        from flm.checkpoint.sharded import load_sharded

        same = meta["layout"]["world_size"] == world
        load_sharded(Path(path), {}, optimizer, distributed=dist.is_initialized(), rng_rank=rank if same else None)
    else:
        load_whole_train_state(Path(path), optimizer, restore=world == 1)
