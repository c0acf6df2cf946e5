"""Checkpoint folders: where they live, how one is published atomically, and how one is found.

A checkpoint is a folder `RUN_DIR/checkpoints/step_NNNNNNNN/`. It is written in a hidden staging folder
and renamed into place in one step after everything in it was flushed to disk, so a crash at any moment
leaves the previous checkpoints intact and never a half-written one that looks complete. `meta.json` is
the mark of a complete checkpoint; its keys are checked by flm.checkpoint.meta before anything is read.

The names of the format's own entries are listed here, once; everything else in a checkpoint folder was added
by its writer's `write_extra` (the tokenizer, the step guard's window) and is carried over by name-blind copying.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from flm.checkpoint.meta import FORMAT_VERSION, validate_meta
from flm.errors import FlmError
from flm.files import fsync_path

_NAME = re.compile(r"^step_(\d{8})$")
_OS_ERROR = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors, tokenizers) report an OS error
META_FILE = "meta.json"
MODEL_FILE, STATE_FILE = "model.safetensors", "train_state.safetensors"  # the whole format (flm.checkpoint.whole)
SHARDED, RNG_DIR = "sharded", "rng"  # the sharded format's folders (flm.checkpoint.sharded)
FORMAT_ENTRIES = (META_FILE, MODEL_FILE, STATE_FILE, SHARDED, RNG_DIR)


def step_of(path: Path) -> int:
    """The step a checkpoint folder `step_NNNNNNNN` was written at."""
    return int(_NAME.match(Path(path).name).group(1))


def is_sharded(path: Path) -> bool:
    """Written under torchrun: tensors in `sharded/`, not in `model.safetensors`."""
    return (Path(path) / SHARDED).is_dir()


def staging_path(root: Path, step: int) -> Path:
    return root / f".step_{step:08d}.tmp"


def staging_dir(root: Path, step: int) -> Path:
    """A fresh hidden folder to write checkpoint `step` into; `publish` moves it into place.

    Only this writer's own staging folder is cleared here; those of writers that died are cleared when the
    run lock is taken (flm.checkpoint.lock), when no other writer can be alive.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def is_write_error(error: BaseException) -> bool:
    """Whether `error` is the file system refusing a write (disk full, quota, I/O error), however the library
    that wrote reported it: an OSError, a SafetensorError, or the plain Exception of a Rust library such as
    tokenizers ("No space left on device (os error 28)"). Anything else is a bug, left to show its traceback."""
    return isinstance(error, (OSError, SafetensorError)) or (
        type(error) is Exception and _OS_ERROR.search(str(error)) is not None)


def write_failure(root: Path, step: int, error: BaseException) -> FlmError:
    """The one-line error for a checkpoint that could not be written (`is_write_error`), naming the checkpoint
    that is still good; the caller has removed the partial one."""
    text = str(error).strip()
    os_error = _OS_ERROR.search(text)
    reason = (getattr(error, "strerror", None) or (os.strerror(int(os_error.group(1))) if os_error else None)
              or (text.splitlines()[-1] if text else type(error).__name__))
    found = list_checkpoints(root)
    last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint of this run was written before"
    return FlmError(f"could not write checkpoint step {step} in {root}: {reason}; {last}")


def copy_extra_files(source: Path, folder: Path) -> None:
    """Copy what `write_extra` added to checkpoint `source` (everything but FORMAT_ENTRIES) into `folder`, so a
    checkpoint rewritten from another (`flm grow`) keeps them without knowing their names."""
    for entry in sorted(Path(source).iterdir()):
        if entry.name not in FORMAT_ENTRIES:
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, folder / entry.name)


def publish(tmp: Path, step: int, meta: dict[str, Any], keep_last: int) -> Path:
    """Write meta.json into the staged folder, flush everything to disk, rename it to `step_<step>/`, and
    delete all but the newest `keep_last` checkpoints."""
    root = tmp.parent
    final = root / f"step_{step:08d}"
    (tmp / META_FILE).write_text(json.dumps({"format": FORMAT_VERSION, "step": step, **meta}, indent=1))
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_path(f)
    for d in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
        fsync_path(d)
    if final.exists():  # re-saving a step: move the old one aside first, so one of them always exists
        old = root / f".{final.name}.old"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_path(root)
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (staging folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=step_of)


def read_meta(path: Path, resume: bool = False) -> dict[str, Any]:
    """A checkpoint's meta.json, validated for inference (or for `resume`): flm.checkpoint.meta."""
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise FlmError(f"not a checkpoint (no meta.json): {path}")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlmError(f"corrupt checkpoint metadata {meta_file}: {e}") from None
    except OSError as e:
        raise FlmError(f"cannot read {meta_file}: {e.strerror or e}") from None
    return validate_meta(meta_file, meta, resume=resume, sharded=is_sharded(path))


def resolve_checkpoint(spec: str, root: Path) -> Path | None:
    """'auto' -> the newest checkpoint under root (or None); anything else must be a checkpoint folder."""
    if spec == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(spec)
    read_meta(path)
    return path


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder (-> its newest checkpoint)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise FlmError(f"no checkpoint found at {path}")
