"""The FLM decoder, for one device, readable top to bottom (REFERENCE.md §1).

GPT-3-style block kept on purpose: pre-LayerNorm with bias, fused QKV and every linear with bias,
GeLU(tanh) MLP, a final LayerNorm, untied or tied LM head with a μP readout multiplier, and rotary
positions with xPos decay instead of learned position embeddings.

Parallelism, growth and training live elsewhere and act on this module from outside. Growth
(flm.growth) leaves optional mask buffers here while a freshly grown structure ramps in: they are
None in an ordinary model, so a model without growth in progress runs the plain code path.

With `model.teacher_head` (train.teacher_objective = "separate", docs/data.md) the model has a second readout,
`cls_head` (d_model -> 2: false, true), on the same final-normed hidden state as the LM head. Targets that are a
label token then train the head instead of the LM head (`SeparateTeacher`); without it, nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flm.config import ModelConfig
from flm.errors import FlmError
from flm.model.decoder import Decoder, KVCache, attend, lm_loss
from flm.model.xpos import apply_rotary, xpos_tables
from flm.model.mup_rules import init_std, readout_multiplier


def rotary_tables(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """(cos_q, sin_q, cos_k, sin_k) for `cfg`'s head size, context length, θ and xPos scale base (flm.model.xpos)."""
    return xpos_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.xpos_scale_base, device)


def layer_norm(ln: nn.LayerNorm, x: torch.Tensor, mask: torch.Tensor | None,
               stats_mask: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm; with a hidden-width mask (MSG), statistics are mask-weighted and the output is masked.

    μ = Σ m·x / Σ m, σ² = Σ m·(x-μ)² / Σ m, out = (γ·(x-μ)/sqrt(σ²+eps) + β)·m. At mask 0 on the new
    coordinates this is exactly the old LayerNorm on the old ones; at mask 1 the ordinary LayerNorm.
    With `stats_mask` instead (zero-initialised width growth), the statistics are weighted by it and the output
    is not masked: the new coordinates there are held at zero by their zero writers and LayerNorm entries, and
    only the mean and variance would otherwise see them.
    """
    m = mask if mask is not None else stats_mask
    if m is None:
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    total = m.sum()
    mu = (x * m).sum(-1, keepdim=True) / total
    var = (m * (x - mu) ** 2).sum(-1, keepdim=True) / total
    out = (x - mu) * torch.rsqrt(var + ln.eps) * ln.weight + ln.bias
    return out * mask if mask is not None else out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        # Rows head by head, each head's [q | k | v] (Megatron's layout): a contiguous slice of rows is a
        # set of whole heads, so tensor parallelism splits it without reordering anything.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.attn_dim)
        self.proj = nn.Linear(cfg.attn_dim, cfg.d_model)
        self.dropout = cfg.dropout
        self.register_buffer("head_mask", None, persistent=False)  # [n_heads] while new heads ramp in

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...], cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism this module holds a slice of the heads.
        q, k, v = self.qkv(x).view(B, T, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        cos_q, sin_q, cos_k, sin_k = rope
        q, k = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)
        dropout = self.dropout if self.training else 0.0
        y = attend(q, k, v, cache, layer, dropout)
        if self.head_mask is not None:
            y = y * self.head_mask.view(1, -1, 1, 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.register_buffer("unit_mask", None, persistent=False)  # [ffn_dim] while new units ramp in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.unit_mask is not None:
            h = h * self.unit_mask  # gelu(0) = 0: masked units output nothing
        return self.fc2(F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    """Pre-LN: x += Attn(LN1(x)); x += MLP(LN2(x)).

    While growth ramps in: writes to the residual stream are multiplied by the hidden mask, and a new
    block is blended with its input, out = c·Block(x) + (1-c)·x, through its `gate` buffer (MSG); or, after
    zero-initialised width growth, only the LayerNorm statistics are weighted, by its `norm_mask` buffer.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("gate", None, persistent=False)  # scalar c for a newly added block
        self.register_buffer("norm_mask", None, persistent=False)  # [d_model]: LayerNorm statistics only ("zero")

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...], hidden_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x_in = x
        a = self.drop(self.attn(layer_norm(self.ln1, x, hidden_mask, self.norm_mask), rope, cache, layer))
        x = x + (a if hidden_mask is None else a * hidden_mask)
        m = self.drop(self.mlp(layer_norm(self.ln2, x, hidden_mask, self.norm_mask)))
        x = x + (m if hidden_mask is None else m * hidden_mask)
        if self.gate is not None:
            x = x_in + self.gate * (x - x_in)
        return x


_BLOCK_PARAMS = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "attn.qkv.weight", "attn.qkv.bias",
                 "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def init_order(cfg: ModelConfig) -> list[str]:
    """Every parameter's name, in the order initialisation draws their random numbers.

    Code that builds a model one tensor at a time (sharded models, growth) follows this order with
    `init_parameter` and gets exactly the values `FLM(cfg)` would have.
    """
    head = [] if cfg.tie_embeddings else ["lm_head.weight"]
    blocks = [f"blocks.{i}.{p}" for i in range(cfg.n_layers) for p in _BLOCK_PARAMS]
    teacher = ["cls_head.weight"] if cfg.teacher_head else []  # last: the other draws stay those of a model without
    return ["embed.weight", *head, *blocks, "ln_f.weight", "ln_f.bias", *teacher]


@torch.no_grad()
def init_parameter(cfg: ModelConfig, name: str, t: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Initialise parameter `name` in place and return it (random draws from `generator`, default the global one).

    Matrices ~ N(0, σ) with σ from flm.model.mup_rules.init_std (init_std; hidden matrices divided by
    sqrt(width_mult) under μP, residual-stream writers attn.proj and mlp.fc2 also by sqrt(2L) as in
    GPT-2/3), biases 0, LayerNorm γ = 1, β = 0; with `zero_query`, the query rows of QKV are 0.
    """
    local = name.split(".", 2)[2] if name.startswith("blocks.") else name
    if local.endswith("bias"):
        return t.zero_()
    if local.startswith("ln"):  # ln1, ln2, ln_f: γ = 1
        return t.fill_(1.0)
    t.normal_(0.0, init_std(cfg, local), generator=generator)
    if cfg.zero_query and local == "attn.qkv.weight":
        t.view(cfg.n_heads, 3, cfg.head_dim, -1)[:, 0].zero_()  # each head's q rows
    return t


@dataclass(frozen=True)
class SeparateTeacher:
    """How a model with a teacher head reads its targets (set by the trainer as `model.teacher`): a target equal to
    `true_id` or `false_id` (the label tokens, which encoding text never produces) is a label for the head at that
    position, the last token of the proposition's text, and no target of the LM head; `weight` weighs the head's
    cross-entropies against the LM's in their common mean (train.teacher_loss_weight)."""

    true_id: int
    false_id: int
    weight: float = 1.0


class FLM(Decoder):
    """Decoder-only FLM language model. `forward(tokens, targets)` -> (logits, loss or None)."""

    arch = "flm"
    rotary_names = ("cos_q", "sin_q", "cos_k", "sin_k")
    init_order = staticmethod(init_order)
    init_parameter = staticmethod(init_parameter)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.teacher: SeparateTeacher | None = None  # the label ids and weight a teacher head trains with

    def new_block(self, cfg: ModelConfig) -> Block:
        return Block(cfg)

    def new_norm(self, cfg: ModelConfig) -> nn.LayerNorm:
        return nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)

    def add_heads(self, cfg: ModelConfig) -> None:
        # The separate teacher-signal head: logits (false, true), treated as a second LM head by μP and growth.
        self.cls_head = nn.Linear(cfg.d_model, 2, bias=False) if cfg.teacher_head else None

    def rotary_tables(self, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        return rotary_tables(self.cfg, device)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(self.ln_f, x, self.hidden_mask, self.norm_mask)

    def loss(self, h: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy over targets != -100, or with a teacher head `separate_loss`."""
        return lm_loss(logits, targets) if self.cls_head is None else self.separate_loss(h, logits, targets)

    def teacher_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The teacher head's logits (false, true) at every position, [B, T, 2]: position t judges the
        proposition whose text ends with token t."""
        if self.cls_head is None:
            raise FlmError("this model has no teacher head (it was trained with train.teacher_objective = 'unified')")
        return self.classify(self.final_norm(self.trunk(tokens)))

    def separate_loss(self, h: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(Σ LM cross-entropy + w · Σ head cross-entropy) / (LM targets + labels), where a target that is a label
        token is the head's (class 1 for true, 0 for false) at its position and no target of the LM head. The
        head runs on every position (2·d_model multiply-adds per token; shapes do not depend on the data), its
        loss counts the label positions only."""
        if self.teacher is None:
            raise FlmError("a model with a teacher head needs model.teacher (the label ids and weight) to take a loss")
        t = self.teacher
        is_true, is_false = targets == t.true_id, targets == t.false_id
        labels = is_true | is_false
        lm = lm_loss(logits, targets.masked_fill(labels, -100), reduction="sum")
        classes = torch.where(labels, is_true.long(), -100)
        head = F.cross_entropy(self.classify(h).float().view(-1, 2), classes.view(-1), ignore_index=-100,
                               reduction="sum")
        return (lm + t.weight * head) / (targets != -100).sum()

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """The teacher head and the readout multiplier (μP treats it as an LM head) on the final-normed hidden
        state: logits (false, true)."""
        return self.cls_head(h) * readout_multiplier(self.cfg)
