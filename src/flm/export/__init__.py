"""Interoperability: export checkpoints to the Hugging Face format and import them back (`flm export|import hf`).

Names are loaded on first use, so `flm --help` (which registers these commands) does not import torch.
"""

import importlib

__all__ = ["export_hf", "import_hf", "parse_size"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("flm.export.hf"), name)
    raise AttributeError(f"module 'flm.export' has no attribute {name!r}")
