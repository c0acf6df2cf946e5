"""Activation checkpointing: keep each block's input, recompute its activations during backward."""

from __future__ import annotations

from torch.utils.checkpoint import checkpoint

from flm.model import FLM
from flm.parallel.pipeline import held_blocks


def apply_activation_checkpointing(model: FLM) -> None:
    """Recompute each block's forward during backward instead of storing its activations.

    The block's own `forward` is replaced on the instance (parameter names and hooks stay as they
    are); dropout masks are replayed from the saved RNG state, so the result is exactly the same.
    """
    for block in held_blocks(model).values():
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run
