"""The one seam through which a model is built: `model.arch` (flm.config.schema.ARCHS) -> its class and module.

Growth, inference and the trainers build models here rather than naming FLM, so that a second architecture is
one module plus one entry below; every class registered offers FLM's interface (blocks, mask buffers,
`init_rotary`), which growth and the trainers rely on, and its module the functions `init_order(cfg)` and
`init_parameter(cfg, name, tensor, generator)`, which code building a model one tensor at a time (sharded
construction, growth) asks through `init_order` and `init_parameter` here.
"""

from __future__ import annotations

from types import ModuleType

import torch

from flm.config import ModelConfig
from flm.model import flm as _flm
from flm.model import llama as _llama
from flm.model.flm import FLM
from flm.model.llama import Llama

MODELS: dict[str, type[FLM] | type[Llama]] = {"flm": FLM, "llama": Llama}
_MODULES: dict[str, ModuleType] = {"flm": _flm, "llama": _llama}


def build_model(cfg: ModelConfig) -> FLM:
    """A freshly initialised model of `cfg`'s architecture and shape (on the current default device)."""
    return MODELS[cfg.arch](cfg)


def init_order(cfg: ModelConfig) -> list[str]:
    """Every parameter's name of a `cfg` model, in the order its initialisation draws random numbers."""
    return _MODULES[cfg.arch].init_order(cfg)


def init_parameter(cfg: ModelConfig, name: str, t: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Initialise parameter `name` of a `cfg` model in place, as building the model would."""
    return _MODULES[cfg.arch].init_parameter(cfg, name, t, generator)
