"""The Llama-family decoder (Llama, Mistral, Qwen2), for one device, readable top to bottom (REFERENCE.md §10).

Block: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x)), a final RMSNorm, then the LM head (tied or untied) times flm's
μP readout multiplier (1 without μP, so an imported model computes exactly what transformers computes).
- RMSNorm normalises in float32 whatever the input's precision and multiplies its gain afterwards, in the same
  order of operations as transformers' LlamaRMSNorm (an fp64 model therefore normalises in fp32 too, as there).
  Its eps is `model.ln_eps` (the one norm epsilon of every arch; config.json's rms_norm_eps).
- Attention: q/k/v projections (biases only with `qkv_bias`, Qwen2), plain RoPE on q and k (flm.model.xpos's
  `rope_tables`, θ = `model.rope_theta`; no xPos decay), grouped-query attention with `n_kv_heads` key/value heads
  (query head h reads key/value head h // (n_heads / n_kv_heads), as transformers' repeat_kv), softmax scale
  head_dim^-0.5, and an output projection without bias.
- MLP (SwiGLU): down(silu(gate(x)) * up(x)), no biases, d_ff units.

It offers what growth, parallelism and the trainers use of FLM (flm.model.flm): `blocks` with the same forward
signature, the pipeline pieces `rope`/`embed_tokens`/`logits`, `init_rotary`, `init_weights`, the module-level
`init_order` / `init_parameter` (asked through flm.model.registry), flm.model.flm's KV cache, and the growth mask
buffers, which are None in an ordinary model. Where set, they act as in FLM (flm.growth, docs/growth.md): `hidden_mask`
multiplies every write to the residual stream (the embedding's too) and makes the norms' statistics mask-weighted,
RMS_m(x) = sqrt(Σ m·x² / Σ m), with their output masked (at c = 0 the old RMSNorm on the old coordinates, at c = 1
the ordinary one); a `norm_mask` (the `zero` family's width growth) weights the statistics alone; a new block's
`gate` blends it with its input, c·Block(x) + (1 − c)·x; `head_mask` scales each query head's output (query heads
ordered [key/value heads, heads per group]) and `unit_mask` the FFN units' gate pre-activation (silu(0) = 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flm.config import ModelConfig
from flm.model.decoder import Decoder, KVCache, attend
from flm.model.mup_rules import init_std
from flm.model.xpos import apply_rotary, rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                stats_mask: torch.Tensor | None = None) -> torch.Tensor:
        """weight · x / sqrt(mean(x²) + eps), the statistics in float32. With a hidden-width mask (growth), the mean
        of squares is Σ m·x² / Σ m and the output is masked; with `stats_mask` only the statistics are weighted."""
        dtype = x.dtype
        h = x.to(torch.float32)
        m = mask if mask is not None else stats_mask
        if m is None:
            var = h.pow(2).mean(-1, keepdim=True)
        else:
            var = (h.pow(2) * m).sum(-1, keepdim=True) / m.sum()
        h = h * torch.rsqrt(var + self.eps)
        out = self.weight * h.to(dtype)
        return out * mask if mask is not None else out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.attn_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.attn_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.register_buffer("head_mask", None, persistent=False)  # [n_heads] while new heads ramp in

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...], cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism this module holds a slice of the query and of the key/value heads.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]  # key/value head j serves query heads j·g .. j·g + g - 1
        scale = self.head_dim ** -0.5
        y = attend(q, k, v, cache, layer, dropout, scale, gqa)
        if self.head_mask is not None:
            y = y * self.head_mask.view(1, -1, 1, 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        self.register_buffer("unit_mask", None, persistent=False)  # [ffn_dim] while new units ramp in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        if self.unit_mask is not None:
            g = g * self.unit_mask  # silu(0) = 0: masked units output nothing
        return self.down_proj(F.silu(g) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm: x += Attn(RMSNorm1(x)); x += MLP(RMSNorm2(x)). The norms are named ln1/ln2 as FLM's, so that
    tensor and pipeline parallelism address both architectures' blocks alike."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = RMSNorm(cfg.d_model, cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ln2 = RMSNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("gate", None, persistent=False)  # scalar c for a newly added block
        self.register_buffer("norm_mask", None, persistent=False)  # [d_model]: norm statistics only

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...], hidden_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x_in = x
        a = self.drop(self.attn(self.ln1(x, hidden_mask, self.norm_mask), rope, cache, layer))
        x = x + (a if hidden_mask is None else a * hidden_mask)
        m = self.drop(self.mlp(self.ln2(x, hidden_mask, self.norm_mask)))
        x = x + (m if hidden_mask is None else m * hidden_mask)
        if self.gate is not None:
            x = x_in + self.gate * (x - x_in)
        return x


def block_params(cfg: ModelConfig) -> tuple[str, ...]:
    """A block's parameter names (inside the block), in initialisation order."""
    attn = [f"attn.{p}_proj.{w}" for p in "qkv" for w in (("weight", "bias") if cfg.qkv_bias else ("weight",))]
    return ("ln1.weight", *attn, "attn.o_proj.weight", "ln2.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight")


def init_order(cfg: ModelConfig) -> list[str]:
    """Every parameter's name, in the order initialisation draws their random numbers (as flm.model.flm's)."""
    head = [] if cfg.tie_embeddings else ["lm_head.weight"]
    blocks = [f"blocks.{i}.{p}" for i in range(cfg.n_layers) for p in block_params(cfg)]
    return ["embed.weight", *head, *blocks, "ln_f.weight"]


@torch.no_grad()
def init_parameter(cfg: ModelConfig, name: str, t: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Initialise parameter `name` in place and return it: matrices ~ N(0, σ) with σ from
    flm.model.mup_rules.init_std (the residual writers o_proj and down_proj also divided by sqrt(2L)), biases 0,
    RMSNorm gains 1; with `zero_query`, q_proj is 0."""
    local = name.split(".", 2)[2] if name.startswith("blocks.") else name
    if local.endswith("bias"):
        return t.zero_()
    if local.startswith("ln"):  # ln1, ln2, ln_f: gain 1
        return t.fill_(1.0)
    t.normal_(0.0, init_std(cfg, local), generator=generator)
    if cfg.zero_query and local == "attn.q_proj.weight":
        t.zero_()
    return t


class Llama(Decoder):
    """Decoder-only Llama-family language model. `forward(tokens, targets)` -> (logits, loss or None)."""

    arch = "llama"
    rotary_names = ("cos", "sin")
    init_order = staticmethod(init_order)
    init_parameter = staticmethod(init_parameter)

    def new_block(self, cfg: ModelConfig) -> Block:
        return Block(cfg)

    def new_norm(self, cfg: ModelConfig) -> RMSNorm:
        return RMSNorm(cfg.d_model, cfg.ln_eps)

    def rotary_tables(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm (with growth's masks); then the LM head gives exactly transformers' logits."""
        return self.ln_f(x, self.hidden_mask, self.norm_mask)
