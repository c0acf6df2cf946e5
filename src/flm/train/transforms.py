"""Per-block transforms applied to a model before it trains: activation checkpointing and torch.compile.

Both act on each block in place (parameter names and hooks stay as they are), so they compose with tensor
parallelism and FSDP (flm.parallel.parallelize applies them in torchtitan's order) and with a pipeline stage,
which holds some of the blocks only.
"""

from __future__ import annotations

from torch.utils.checkpoint import checkpoint

from flm.model import FLM
from flm.model.decoder import held_blocks


def apply_activation_checkpointing(model: FLM) -> None:
    """Recompute each block's forward during backward instead of storing its activations.

    The block's own `forward` is replaced on the instance; dropout masks are replayed from the saved RNG
    state, so the result is exactly the same.
    """
    for block in held_blocks(model).values():
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward):
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def compile_blocks(model: FLM) -> None:
    """torch.compile each block in place (one graph per block, reused by every layer of the same shape); the
    embedding, final LayerNorm, head and loss stay eager, so a pipeline stage compiles just what it holds."""
    for block in held_blocks(model).values():
        block.compile()
