"""Checkpoints: the one package that writes and reads them, for training, resume, generation, growth,
evaluation and export (docs/architecture.md).

A checkpoint is a folder (flm.checkpoint.folders) in one of two formats, chosen here and nowhere else: the
whole format written by one process (flm.checkpoint.whole) or the sharded format written by all processes of a
torchrun job (flm.checkpoint.sharded). Both name tensors the same way (flm.checkpoint.state), both load into a
model on any layout, and both carry a validated meta.json (flm.checkpoint.meta). One writer per run folder
(flm.checkpoint.lock).

Every write of a checkpoint, whoever makes it (safetensors, DCP, the `write_extra` callback with its tokenizers
library), fails the same way: the staging folder is removed, the older checkpoints are untouched, and a write
error of the file system (flm.checkpoint.folders.is_write_error) becomes one line naming the last good checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from flm.checkpoint.folders import (copy_extra_files, find_checkpoint, is_sharded, is_write_error, list_checkpoints,
                                    publish, read_meta, resolve_checkpoint, staging_dir, staging_path, step_of,
                                    write_failure)
from flm.checkpoint.lock import RunLock
from flm.checkpoint.meta import INFERENCE_KEYS
from flm.checkpoint.reader import CheckpointReader
from flm.checkpoint.state import persistent_tensors
from flm.checkpoint.whole import WholeWriter, load_whole_model, load_whole_train_state, save_whole

__all__ = ["CheckpointReader", "RunLock", "WholeWriter", "copy_extra_files", "find_checkpoint", "is_sharded",
           "list_checkpoints", "load_model", "load_train_state", "persistent_tensors", "read_meta",
           "resolve_checkpoint", "save_checkpoint", "save_streamed", "step_of"]

WriteExtra = Callable[[Path], None]


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict[str, Any], keep_last: int, write_extra: WriteExtra | None = None,
                    distributed: bool = False) -> Path:
    """Write `root/step_<step>/` atomically, then delete all but the newest `keep_last` checkpoints.

    `meta` must hold what inference reads (`model`, `ramp`); without `optimizer` the Adam state is fresh;
    `write_extra(folder)` adds files (the tokenizer, the step guard's window) so that a checkpoint folder stands
    on its own. `distributed`: every process of the job calls this (collective) and the sharded format is
    written. A write error (disk full, ...) on any process, in any file, removes the partial checkpoint and
    raises a one-line FlmError on all; the older ones are intact.
    """
    _check_meta(meta)
    if distributed:
        return _save_distributed(root, step, optimizer, meta, keep_last, write_extra)
    return _save_staged(root, step, lambda tmp: save_whole(tmp, model, optimizer), meta, keep_last, write_extra)


def save_streamed(root: Path, step: int, write_tensors: Callable[[WholeWriter], None], meta: dict[str, Any],
                  keep_last: int, write_extra: WriteExtra | None = None) -> Path:
    """`save_checkpoint` for a model larger than memory: `write_tensors(writer)` adds the tensors one at a time
    (weights, Adam fields, generators) and the whole format is streamed to disk as they come (`flm grow`)."""
    _check_meta(meta)

    def write(tmp: Path) -> None:
        writer = WholeWriter(tmp)
        try:
            write_tensors(writer)
            writer.close()
        except BaseException:
            writer.discard()
            raise

    return _save_staged(root, step, write, meta, keep_last, write_extra)


def _check_meta(meta: dict[str, Any]) -> None:
    missing = [k for k in INFERENCE_KEYS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")


def _save_staged(root: Path, step: int, write_tensors: Callable[[Path], None], meta: dict[str, Any],
                 keep_last: int, write_extra: WriteExtra | None) -> Path:
    """One process writes checkpoint `step`: tensors, extra files and meta.json into a staging folder, then
    published; on any error the staging folder goes, and a write error becomes the one-line FlmError."""
    tmp = staging_path(root, step)
    try:
        staging_dir(root, step)
        write_tensors(tmp)
        if write_extra is not None:
            write_extra(tmp)
        return publish(tmp, step, meta, keep_last)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e):
            raise write_failure(root, step, e) from None
        raise


def _save_distributed(root: Path, step: int, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                      keep_last: int, write_extra: WriteExtra | None) -> Path:
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    from flm.checkpoint.sharded import save_sharded

    main = dist.get_rank() == 0
    tmp, error = staging_path(root, step), None

    def attempt(action: Callable[[], object]) -> None:  # an error is kept, not raised, so all reach all_ok
        nonlocal error
        try:
            action()
        except Exception as e:
            error = e

    def all_ok() -> bool:  # every process learns whether any could not write, so that all stop alike
        failed = torch.tensor(int(error is not None))
        dist.all_reduce(failed)
        return not failed

    def finish() -> None:
        if write_extra is not None:
            write_extra(tmp)
        publish(tmp, step, meta, keep_last)

    if main:
        attempt(lambda: staging_dir(root, step))
    if all_ok():  # also keeps the others from writing before the staging folder exists
        attempt(lambda: save_sharded(tmp, optimizer))
    if all_ok() and main:
        attempt(finish)
    if not all_ok():
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None and not (is_write_error(error) or isinstance(error, CheckpointException)):
            raise error
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
