"""Checkpoint folders: where they live, how one is published atomically, and how one is found.

A checkpoint is a folder `RUN_DIR/checkpoints/step_NNNNNNNN/`. It is written in a hidden staging folder
and renamed into place in one step after everything in it was flushed to disk, so a crash at any moment
leaves the previous checkpoints intact and never a half-written one that looks complete. `meta.json` is
the mark of a complete checkpoint; its keys are checked by flm.checkpoint.meta before anything is read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from flm.checkpoint.meta import FORMAT_VERSION, validate_meta
from flm.errors import FlmError
from flm.files import fsync_path

_NAME = re.compile(r"^step_(\d{8})$")
SHARDED = "sharded"  # the folder of a checkpoint written by several processes (flm.checkpoint.sharded)


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


def write_failure(root: Path, step: int, error: BaseException) -> FlmError:
    """The one-line error for a checkpoint that could not be written (disk full, quota, I/O error), naming the
    checkpoint that is still good; the caller has removed the partial one."""
    text = str(error).strip()
    os_error = re.search(r"os error (\d+)", text)  # safetensors reports the OS error inside its message
    reason = (getattr(error, "strerror", None) or (os.strerror(int(os_error.group(1))) if os_error else None)
              or (text.splitlines()[-1] if text else type(error).__name__))
    found = list_checkpoints(root)
    last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint of this run was written before"
    return FlmError(f"could not write checkpoint step {step} in {root}: {reason}; {last}")


def publish(tmp: Path, step: int, meta: dict[str, Any], keep_last: int) -> Path:
    """Write meta.json into the staged folder, flush everything to disk, rename it to `step_<step>/`, and
    delete all but the newest `keep_last` checkpoints."""
    root = tmp.parent
    final = root / f"step_{step:08d}"
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, "step": step, **meta}, indent=1))
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
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=step_of)


def read_meta(path: Path, resume: bool = False) -> dict[str, Any]:
    """A checkpoint's meta.json, validated for inference (or for `resume`): flm.checkpoint.meta."""
    meta_file = Path(path) / "meta.json"
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
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise FlmError(f"no checkpoint found at {path}")
