"""Offline growth of a saved checkpoint (`flm grow`): the same operators the trainer uses at a stage
boundary, applied to weights and Adam state on disk, written as a new checkpoint to resume from."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from flm.config import PRESETS, config_from_dict, config_to_dict, model_config_from_dict
from flm.errors import FlmError
from flm.growth import grow_model
from flm.model import FLM
from flm.checkpoint import (RunLock, find_checkpoint, load_model, load_train_state, persistent_tensors, read_meta,
                            save_checkpoint)
from flm.train.optim import build_optimizer, grow_optimizer

SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "d_ff")


def parse_shape(text: str) -> dict[str, int]:
    """'flm-51b' (a preset's shape) or 'd_model=256,n_layers=8' -> the shape fields to change."""
    if text in PRESETS:
        return {k: v for k, v in PRESETS[text].items() if k in SHAPE_KEYS}
    changes = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in SHAPE_KEYS or not value.strip().isdigit():
            raise FlmError(f"bad shape {text!r}: use a preset name or KEY=INT pairs with keys {', '.join(SHAPE_KEYS)}")
        changes[key] = int(value)
    return changes


def grow_checkpoint(source: str | Path, shape: str, out_run_dir: str | Path, new_layers: str = "stack",
                    ramp_steps: int = 100) -> Path:
    """Grow a checkpoint (weights and Adam state) and save it under `out_run_dir/checkpoints/`."""
    ckpt = find_checkpoint(source)
    meta = read_meta(ckpt, resume=True)
    if meta["ramp"]:
        raise FlmError(f"{ckpt} is in the middle of a growth ramp; train until the masks reach 1 before growing again")
    if ramp_steps < 0:
        raise FlmError(f"--ramp-steps must be >= 0, got {ramp_steps}")
    cfg = config_from_dict(meta["config"])
    old_cfg = model_config_from_dict(meta["model"])
    new_cfg = dataclasses.replace(old_cfg, **parse_shape(shape))
    new_cfg.validate()
    model = FLM(old_cfg)
    load_model(ckpt, persistent_tensors(model))
    optimizer = build_optimizer(model, cfg.train)
    load_train_state(ckpt, optimizer)
    grown, ramp = grow_model(model, new_cfg, new_layers, ramp_steps)
    new_opt = grow_optimizer(optimizer, old_cfg, grown, ramp.sources, cfg.train)
    out_root = Path(out_run_dir) / "checkpoints"
    cfg.model = dataclasses.replace(cfg.model, **{k: getattr(new_cfg, k) for k in SHAPE_KEYS})
    new_meta = {**{k: v for k, v in meta.items() if k not in ("format", "step")},
                "config": config_to_dict(cfg), "model": config_to_dict(new_cfg),
                "ramp": ramp.to_dict() if ramp.c < 1 else None}

    def copy_tokenizer(folder: Path) -> None:
        for f in ckpt.iterdir():
            if f.name.startswith("tokenizer"):
                shutil.copy2(f, folder / f.name)

    lock = RunLock(Path(out_run_dir)).acquire()  # the output run folder has one writer, like any run
    try:
        return save_checkpoint(out_root, meta["step"], grown, new_opt, new_meta, keep_last=1 << 30,
                               write_extra=copy_tokenizer)
    finally:
        lock.release()
