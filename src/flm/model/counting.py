"""Parameter and FLOP counts from the config alone: one definition shared by training, planning and
reporting (MFU), so the numbers can never disagree. Each architecture (model.arch) has one line per block below."""

from __future__ import annotations

from flm.config import ModelConfig


def _block_params(cfg: ModelConfig) -> int:
    """Parameters of one block."""
    d, a, f = cfg.d_model, cfg.attn_dim, cfg.ffn_dim
    if cfg.arch == "llama":
        kv = cfg.kv_dim
        return (2 * d  # two RMSNorm gains
                + d * a + 2 * d * kv + ((a + 2 * kv) if cfg.qkv_bias else 0)  # q, k, v (Qwen2: with biases)
                + a * d  # o_proj, no bias
                + 3 * d * f)  # gate, up, down
    return (2 * 2 * d  # two LayerNorms (γ, β)
            + d * 3 * a + 3 * a  # fused QKV
            + a * d + d  # attention output projection
            + d * f + f + f * d + d)  # MLP


def _final_norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model if cfg.arch == "llama" else 2 * cfg.d_model  # RMSNorm gain; LayerNorm γ, β


def _block_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one block that take part in a matrix multiply per token."""
    d, a, f = cfg.d_model, cfg.attn_dim, cfg.ffn_dim
    if cfg.arch == "llama":
        return d * a + 2 * d * cfg.kv_dim + a * d + 3 * d * f
    return d * 3 * a + a * d + 2 * d * f


def non_embedding_params(cfg: ModelConfig) -> int:
    """Parameters of the blocks and the final norm: all but the embedding and the LM head.

    This is the N of scaling laws (Kaplan et al.): at small widths the vocabulary matrices would
    otherwise dominate the count without adding much capacity.
    """
    return cfg.n_layers * _block_params(cfg) + _final_norm_params(cfg)


def param_count(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Exact number of parameters `build_model(cfg)` holds (a tied head counts once)."""
    d, v = cfg.d_model, cfg.vocab_size or 0
    n = non_embedding_params(cfg)
    if include_embedding:
        n += v * d  # embedding
    if not cfg.tie_embeddings:
        n += v * d  # LM head
    return n + _teacher_head(cfg)


def _teacher_head(cfg: ModelConfig) -> int:
    """The separate teacher head's weights (d_model x 2), which also run on every token (flm.model.flm)."""
    return 2 * cfg.d_model if cfg.teacher_head else 0


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix multiply per token (the embedding lookup does not; the head does)."""
    return cfg.n_layers * _block_matmul_params(cfg) + cfg.d_model * (cfg.vocab_size or 0) + _teacher_head(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6·N_matmul + 12·L·attn_dim·seq_len.

    The second term is attention's QKᵀ and AV (2·2·s·attn_dim forward per layer, ×3 for backward),
    counted over the full s×s square as PaLM's MFU does; biases, norms and softmax are ignored. Grouped-query
    attention shares keys and values, not this work: every query head still scores every position.
    """
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.attn_dim * seq_len
