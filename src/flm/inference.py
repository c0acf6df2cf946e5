"""A checkpoint as a model to run: the weights, the tokenizer saved beside them, and the growth masks of a
checkpoint written in the middle of a ramp (used by `flm generate`, `flm eval`, the lm-eval model and export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flm.checkpoint import find_checkpoint, load_model, persistent_tensors, read_meta
from flm.config import model_config_from_dict
from flm.data.tokenizer import Tokenizer, load_tokenizer_dir
from flm.growth import Ramp, apply_masks
from flm.model import FLM, build_model


def load_for_inference(path: str | Path, device: torch.device | str = "cpu") -> tuple[FLM, Tokenizer, dict[str, Any]]:
    """(model in eval mode, tokenizer, meta) from a checkpoint or run folder; needs nothing else. A checkpoint
    in the middle of a growth ramp comes with its masks set, so it computes exactly what training computed."""
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    model = build_model(model_config_from_dict(meta["model"]))
    load_model(ckpt, persistent_tensors(model))
    model = model.to(device).eval()
    if meta["ramp"]:  # in the middle of a growth ramp: the masks are part of the function
        apply_masks(model, Ramp.from_dict(meta["ramp"]))
    return model, load_tokenizer_dir(ckpt), meta
