"""Parameter and FLOP counts from the config alone: one definition shared by training, planning and
reporting (MFU), so the numbers can never disagree."""

from __future__ import annotations

from flm.config import ModelConfig


def non_embedding_params(cfg: ModelConfig) -> int:
    """Parameters of the blocks and the final LayerNorm: all but the embedding and the LM head.

    This is the N of scaling laws (Kaplan et al.): at small widths the vocabulary matrices would
    otherwise dominate the count without adding much capacity.
    """
    d, a, f = cfg.d_model, cfg.attn_dim, cfg.ffn_dim
    per_layer = (
        2 * 2 * d  # two LayerNorms (γ, β)
        + d * 3 * a + 3 * a  # fused QKV
        + a * d + d  # attention output projection
        + d * f + f + f * d + d  # MLP
    )
    return cfg.n_layers * per_layer + 2 * d  # + final LayerNorm


def param_count(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Exact number of parameters `FLM(cfg)` holds (a tied head counts once)."""
    d, v = cfg.d_model, cfg.vocab_size or 0
    n = non_embedding_params(cfg)
    if include_embedding:
        n += v * d  # embedding
    if not cfg.tie_embeddings:
        n += v * d  # LM head
    return n


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix multiply per token (the embedding lookup does not; the head does)."""
    d, a, f, v = cfg.d_model, cfg.attn_dim, cfg.ffn_dim, cfg.vocab_size or 0
    return cfg.n_layers * (d * 3 * a + a * d + 2 * d * f) + d * v


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6·N_matmul + 12·L·attn_dim·seq_len.

    The second term is attention's QKᵀ and AV (2·2·s·attn_dim forward per layer, ×3 for backward),
    counted over the full s×s square as PaLM's MFU does; biases, norms and softmax are ignored.
    """
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.attn_dim * seq_len
