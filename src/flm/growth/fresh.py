"""New values at growth, drawn on the host from a generator of each tensor's own, seeded from the run's seed, the
growth's index and the tensor's name: the same numbers whatever the device, the layout, the order in which tensors
are grown or the entry point, and the run's own random stream is left alone."""

from __future__ import annotations

import hashlib

import torch

from flm.config import ModelConfig
from flm.model.registry import init_parameter


def growth_seed(seed: int, index: int, name: str) -> int:
    """The seed of tensor `name`'s new entries at growth `index` of a run seeded `seed` (63 bits of SHA-256)."""
    digest = hashlib.sha256(f"flm-growth/{seed}/{index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def tensor_generator(seed: int, index: int, name: str) -> torch.Generator:
    """The host generator of tensor `name`'s new values at growth `index` of a run seeded `seed`."""
    return torch.Generator().manual_seed(growth_seed(seed, index, name))


def perturbed_copy(old: torch.Tensor, noise: float, seed: int, index: int, name: str) -> torch.Tensor:
    """A copied layer's weight matrix `old` plus Gaussian noise of std `noise` x its RMS, to break the symmetry
    between a layer and its copy (G_stack found ~20% slightly better than exact copies). Vectors (biases,
    LayerNorm) stay exact copies. The noise has a generator of its own, apart from the tensor's fresh values."""
    if noise == 0 or old.dim() < 2:
        return old
    scale = noise * old.float().pow(2).mean().sqrt()
    draw = torch.randn(old.shape, generator=tensor_generator(seed, index, name + "/copy-noise"))
    return old + (scale * draw).to(old.dtype)


def fresh_parameter(cfg: ModelConfig, name: str, shape: torch.Size, seed: int, index: int) -> torch.Tensor:
    """Freshly initialised values of parameter `name` (of `shape`) of a model of shape `cfg`, for growth `index`
    of a run seeded `seed` (host, float32)."""
    return init_parameter(cfg, name, torch.empty(shape), generator=tensor_generator(seed, index, name))
