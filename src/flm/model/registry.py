"""The one seam through which a model is built: `model.arch` (flm.config.schema.ARCHS) -> its class.

Growth, inference and the trainers build models here rather than naming FLM, so that a second architecture is
one class plus one entry below; every class registered offers FLM's interface (blocks, mask buffers,
`init_rotary`), which growth and the trainers rely on.
"""

from __future__ import annotations

from flm.config import ModelConfig
from flm.model.flm import FLM

MODELS: dict[str, type[FLM]] = {"flm": FLM}


def build_model(cfg: ModelConfig) -> FLM:
    """A freshly initialised model of `cfg`'s architecture and shape (on the current default device)."""
    return MODELS[cfg.arch](cfg)
