"""The one seam through which a model is built: `model.arch` (flm.config.schema.ARCHS) -> its class.

Growth, inference and the trainers build models here rather than naming FLM, so that a second architecture is
one module plus one entry below. Every class registered is a flm.model.decoder.Decoder (blocks, mask buffers,
`init_rotary`, which growth and the trainers rely on) with its arch's `init_order(cfg)` and
`init_parameter(cfg, name, tensor, generator)`, which code building a model one tensor at a time (sharded
construction, growth) asks through the functions of the same names here.
"""

from __future__ import annotations

import torch

from flm.config import ModelConfig
from flm.model.decoder import Decoder
from flm.model.flm import FLM
from flm.model.llama import Llama

MODELS: dict[str, type[Decoder]] = {"flm": FLM, "llama": Llama}


def build_model(cfg: ModelConfig) -> Decoder:
    """A freshly initialised model of `cfg`'s architecture and shape (on the current default device)."""
    return MODELS[cfg.arch](cfg)


def init_order(cfg: ModelConfig) -> list[str]:
    """Every parameter's name of a `cfg` model, in the order its initialisation draws random numbers."""
    return MODELS[cfg.arch].init_order(cfg)


def init_parameter(cfg: ModelConfig, name: str, t: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Initialise parameter `name` of a `cfg` model in place, as building the model would."""
    return MODELS[cfg.arch].init_parameter(cfg, name, t, generator)
