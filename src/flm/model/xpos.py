"""Rotary positions with xPos decay, and plain RoPE for the Llama family (`rope_tables`): the one definition, used
by flm's models and copied verbatim into every FLM Hugging Face export (`flm export hf` writes this very file next
to `modeling_flm.py`), so the two cannot drift.

It imports only torch on purpose: an exported folder must load without flm installed.
"""

from __future__ import annotations

import torch


def xpos_tables(head_dim: int, n_positions: int, theta: float, scale_base: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """Rotary tables with the xPos decay folded in, for positions 0..n_positions-1.

    Returns (cos_q, sin_q, cos_k, sin_k), each float32 [n_positions, head_dim]. A query at position n is
    scaled by ζ^((n-c)/B) and a key at m by ζ^(-(m-c)/B), so q·k carries ζ^((n-m)/B): relative only.
    The fixed centre c = n_positions // 2 keeps the factors near 1 (uncentred, they overflow fp16 by
    position ~8k) and, being the same for queries and cached keys, keeps KV-cache logits identical.
    Rotary pairs are (i, i + head_dim/2) with θ_i = theta^(-2i/d) and ζ_i = (2i + 0.4d) / (1.4d)
    (B = scale_base). Computed on the CPU in float64, rounded once to float32, then moved to `device`: every
    device gets bit-identical tables (CUDA's pow/cos may differ from the CPU's in the last bits).
    """
    d, n = head_dim, n_positions
    i = torch.arange(d // 2, dtype=torch.float64)
    inv_freq = theta ** (-2.0 * i / d)
    zeta = (2.0 * i + 0.4 * d) / (1.4 * d)
    pos = torch.arange(n, dtype=torch.float64)
    angle = pos[:, None] * inv_freq[None, :]
    scale = zeta[None, :] ** ((pos[:, None] - n // 2) / scale_base)
    cos, sin = torch.cos(angle), torch.sin(angle)
    tables = (cos * scale, sin * scale, cos / scale, sin / scale)
    return tuple(torch.cat([t, t], dim=-1).float().to(device) for t in tables)


def rope_tables(head_dim: int, n_positions: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain rotary tables (no decay), as the Llama family computes them: (cos, sin), float32 [n_positions, head_dim].

    The same pairs (i, i + head_dim/2) and angles n·θ_i as `xpos_tables`, but computed in float32 step by step as
    transformers' LlamaRotaryEmbedding does (θ_i = 1 / theta^(2i/d) in float32, the angle a float32 product), so
    an imported model's rotations are bit for bit those of the model it came from. On the CPU, like `xpos_tables`.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angle = torch.arange(n_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos().to(device), angle.sin().to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of x [B, H, T, d] by the angles in cos/sin [T, d] (xPos scales included)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
