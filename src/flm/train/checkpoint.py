"""Checkpoints as plain files: safetensors for tensors, JSON for the rest (nothing is ever unpickled).

A checkpoint is a folder `step_NNNNNNNN/` holding `model.safetensors`, `train_state.safetensors`
(Adam moments and step counts by parameter name, RNG states) and `meta.json` (step, config, data
position, ...). It is written in a hidden temporary folder and renamed into place in one step, so a
crash at any moment leaves the previous checkpoints intact and never a half-written one that looks
complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from flm.errors import FlmError
from flm.train.checkpoint_meta import FORMAT_VERSION, INFERENCE_KEYS, validate_meta

_NAME = re.compile(r"^step_(\d{8})$")
SHARDED = "sharded"  # the folder of a checkpoint written by several processes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent state, each shared tensor once (a tied head is saved as the embedding)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape) if t.device.type != "meta" else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam state keyed `opt.<param name>.<exp_avg|exp_avg_sq|step>` (needs groups with 'names')."""
    out = {}
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                out[f"opt.{name}.{key}"] = value.detach().contiguous().cpu()
    return out


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = state
    return out


def staging_path(root: Path, step: int) -> Path:
    return root / f".step_{step:08d}.tmp"


def staging_dir(root: Path, step: int) -> Path:
    """A fresh hidden folder to write checkpoint `step` into; `publish` moves it into place.

    Only this writer's own staging folder is cleared here; those of writers that died are cleared when the
    run lock is taken (flm.train.runlock), when no other writer can be alive.
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
            _fsync_file(f)
    for d in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
        _fsync_dir(d)
    if final.exists():  # re-saving a step: move the old one aside first, so one of them always exists
        old = root / f".{final.name}.old"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], keep_last: int, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write `root/step_<step>/` atomically, then delete all but the newest `keep_last` checkpoints.

    `meta` must hold what inference reads (`model`, `ramp`); `write_extra(folder)` adds files (the tokenizer) so
    that a checkpoint folder stands on its own (the tokenizer, the step guard's window). A write error
    (disk full, ...) removes the partial checkpoint and raises a one-line FlmError; the older ones are intact.
    """
    missing = [k for k in INFERENCE_KEYS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    tmp = staging_dir(root, step)
    try:
        save_file(model_tensors(model), str(tmp / "model.safetensors"))
        save_file({**optimizer_tensors(optimizer), **rng_tensors()}, str(tmp / "train_state.safetensors"))
        if write_extra is not None:
            write_extra(tmp)
        return publish(tmp, step, meta, keep_last)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(root, step, e) from None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def read_meta(path: Path, resume: bool = False) -> dict[str, Any]:
    """A checkpoint's meta.json, validated for inference (or for `resume`): flm.train.checkpoint_meta."""
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


GUARD_FILE = "guard.safetensors"


def save_guard(folder: Path, history: torch.Tensor) -> None:
    """The step guard's window of recent losses (flm.train.guard), beside the weights, in either format."""
    save_file({"history": history.detach().cpu()}, str(folder / GUARD_FILE))


def saved_guard(folder: Path) -> torch.Tensor | None:
    """The window saved with a checkpoint; None in checkpoints written without one (`flm import hf`)."""
    path = Path(folder) / GUARD_FILE
    return _load_tensors(path)["history"] if path.is_file() else None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise FlmError(f"cannot read {path}: {e}") from None


def load_model_state(path: Path, model: nn.Module) -> None:
    """Copy a checkpoint's weights into `model` (shapes must match); also from a sharded checkpoint."""
    if is_sharded(path):
        from flm.parallel.checkpoint import load_sharded

        load_sharded(Path(path), None, _named_tensors(model), distributed=False)
        return
    tensors = _load_tensors(Path(path) / "model.safetensors")
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FlmError(f"checkpoint {path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise FlmError(f"checkpoint {path}: {name} has shape {tuple(t.shape)}, model expects {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False)


def load_train_state(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore Adam moments by parameter name, and the RNG states (of the first process, for a sharded
    checkpoint written by several)."""
    if is_sharded(path):
        from flm.parallel.checkpoint import load_sharded, named_params

        load_sharded(Path(path), optimizer, named_params(optimizer), distributed=False, rng_rank=0)
        return
    tensors = _load_tensors(Path(path) / "train_state.safetensors")
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            name, field = key[len("opt."):].rsplit(".", 1)
            by_param.setdefault(name, {})[field] = value
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            if name in by_param:
                # Every field follows its parameter, step counts too (the fused AdamW kernel reads them there).
                optimizer.state[p] = {k: v.to(p.device) for k, v in by_param[name].items()}
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def is_sharded(path: Path) -> bool:
    """Written under torchrun (flm.parallel.checkpoint): tensors in `sharded/`, not `model.safetensors`."""
    return (Path(path) / SHARDED).is_dir()


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent tensors by name, in place (each shared tensor once, as `model_tensors`)."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t.detach()
    return out


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


def load_for_inference(path: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode, tokenizer, meta) from a checkpoint or run folder; needs nothing else. A checkpoint
    in the middle of a growth ramp comes with its masks set, so it computes exactly what training computed."""
    from flm.config import model_config_from_dict
    from flm.data.tokenizer import load_tokenizer_dir
    from flm.growth import Ramp, apply_masks
    from flm.model import FLM

    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    model = FLM(model_config_from_dict(meta["model"]))
    load_model_state(ckpt, model)
    model = model.to(device).eval()
    if meta["ramp"]:  # in the middle of a growth ramp: the masks are part of the function
        apply_masks(model, Ramp.from_dict(meta["ramp"]))
    return model, load_tokenizer_dir(ckpt), meta
