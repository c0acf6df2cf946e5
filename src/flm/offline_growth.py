"""Offline growth of a saved checkpoint (`flm grow`): the growth routine the trainer runs at a stage boundary
(flm.growth.routine), applied to weights and Adam state on disk and written as a new checkpoint to resume from.
It trains nothing, so it sits beside the packages it joins (checkpoint, growth, config), not in flm.train.

It streams: each tensor is read from the checkpoint, grown and written into the new one before the next is
read, so the memory it needs is about the largest tensor, not the model (docs/growth.md has the measurement).
The new entries get the values a run's own growth at that boundary gives them (same seed, growth index and
names), and the run's random generators are carried over, so `flm grow` + resume continues as the trainer would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flm.checkpoint import (CheckpointReader, RunLock, WholeWriter, copy_extra_files, find_checkpoint, read_meta,
                            save_streamed)
from flm.config import PRESETS, StageConfig, config_from_dict, config_to_dict, model_config_from_dict
from flm.config.shape import SHAPE_KEYS
from flm.errors import FlmError
from flm.growth import Ramp, check_growable, grow_tensors, layer_sources, ramp_length


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
                    ramp_steps: int | None = None, operator: str | None = None, noise: float | None = None,
                    copy_noise: float | None = None) -> Path:
    """Grow a checkpoint (weights and Adam state) and save it under `out_run_dir/checkpoints/`.

    When the checkpoint's run config has a next stage of exactly this shape, the grown checkpoint continues that
    schedule (stage + 1, that stage's ramp, operator family and clone noise unless given); otherwise the run
    config's model becomes the grown shape, grown by `operator` (default msg) with a ramp of `ramp_steps` (default
    100) steps where that family ramps.
    """
    ckpt = find_checkpoint(source)
    meta = read_meta(ckpt, resume=True)
    if meta["ramp"]:
        raise FlmError(f"{ckpt} is in the middle of a growth ramp; train until the masks reach 1 before growing again")
    if ramp_steps is not None and ramp_steps < 0:
        raise FlmError(f"--ramp-steps must be >= 0, got {ramp_steps}")
    cfg = config_from_dict(meta["config"])
    old_cfg = model_config_from_dict(meta["model"])
    new_cfg = dataclasses.replace(old_cfg, **parse_shape(shape))
    new_cfg.validate()
    stage = meta["stage"]
    shapes = [dataclasses.replace(m, vocab_size=old_cfg.vocab_size, teacher_head=old_cfg.teacher_head)
              for m in cfg.stage_models()]
    if stage + 1 < len(shapes) and shapes[stage + 1] == new_cfg:  # the run's own next growth, done offline
        new_stage, planned = stage + 1, cfg.stages[stage + 1]
    else:
        new_stage, planned = stage, StageConfig()
        cfg.model = dataclasses.replace(cfg.model, **{k: getattr(new_cfg, k) for k in SHAPE_KEYS})
    ramp = planned.ramp_steps if ramp_steps is None else ramp_steps
    operator = planned.operator if operator is None else operator
    noise = planned.clone_noise if noise is None else noise
    copy_noise = planned.copy_noise if copy_noise is None else copy_noise
    check_growable(old_cfg, new_cfg, operator, new_layers)
    ramp = ramp_length(operator, old_cfg, new_cfg, ramp)
    sources = layer_sources(old_cfg.n_layers, new_cfg.n_layers, new_layers)
    new_meta = {**{k: v for k, v in meta.items() if k not in ("format", "step", "layout")},
                "config": config_to_dict(cfg), "model": config_to_dict(new_cfg), "stage": new_stage,
                "ramp": Ramp(old_cfg, sources, ramp, operator=operator).to_dict() if ramp else None}
    reader = CheckpointReader(ckpt)

    def write_tensors(out: WholeWriter) -> None:
        for grown in grow_tensors(old_cfg, new_cfg, sources, reader.weights, reader.adam,
                                  seed=cfg.train.seed, index=stage + 1, operator=operator, noise=noise,
                                  copy_noise=copy_noise):
            out.weight(grown.name, grown.weight)
            for field, value in (grown.adam or {}).items():
                out.adam(grown.name, field, value)
            del grown  # written: dropped before the next tensor is grown
        out.rng(reader.rng())

    lock = RunLock(Path(out_run_dir)).acquire()  # the output run folder has one writer, like any run
    try:
        return save_streamed(Path(out_run_dir) / "checkpoints", meta["step"], write_tensors, new_meta,
                             keep_last=1 << 30, write_extra=lambda folder: copy_extra_files(ckpt, folder))
    finally:
        lock.release()
