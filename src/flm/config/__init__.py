"""Typed, validated configuration loaded from TOML (stdlib only)."""

from flm.config.load import config_from_dict, config_to_dict, config_toml, load_config, model_config_from_dict
from flm.config.mup import MupConfig
from flm.config.presets import PRESETS
from flm.config.plan import PlanConfig
from flm.config.schema import Config, DataConfig, ModelConfig, ParallelConfig, StageConfig, TrainConfig

__all__ = [
    "Config", "DataConfig", "ModelConfig", "MupConfig", "ParallelConfig", "PlanConfig", "StageConfig", "TrainConfig",
    "PRESETS",
    "config_from_dict", "config_to_dict", "config_toml", "load_config", "model_config_from_dict",
]
