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


class KVCache:
    """Preallocated keys and values for incremental decoding: [layers, batch, key/value heads, max_len, head_dim]
    (FLM: as many as its heads; the llama arch's grouped-query attention: n_kv_heads)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 max_len: int | None = None):
        """`max_len`: the positions to hold (default the model's context, model.max_seq_len)."""
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, max_len or cfg.max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already filled


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
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]
            # Query i sits at absolute position start+i and may see keys 0..start+i.
            mask = None
            if T > 1:
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
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


class FLM(nn.Module):
    """Decoder-only FLM language model. `forward(tokens, targets)` -> (logits, loss or None)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise FlmError("model.vocab_size is not set: take it from the prepared data or a preset")
        cfg.validate()
        self.cfg = cfg
        device = torch.empty(0).device  # where the model was asked for (honours `with torch.device(...)`)
        with torch.device("meta"):  # shapes first: every value is drawn once, by init_weights
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            # The separate teacher-signal head: logits (false, true), treated as a second LM head by μP and growth.
            self.cls_head = nn.Linear(cfg.d_model, 2, bias=False) if cfg.teacher_head else None
            for name, table in zip(("cos_q", "sin_q", "cos_k", "sin_k"), rotary_tables(cfg)):
                self.register_buffer(name, table, persistent=False)
        self.register_buffer("hidden_mask", None, persistent=False)  # [d_model] while new width ramps in
        self.register_buffer("norm_mask", None, persistent=False)  # [d_model]: LayerNorm statistics only ("zero")
        self.teacher: SeparateTeacher | None = None  # the label ids and weight a teacher head trains with
        if device.type != "meta":
            self.to_empty(device=device)
        if cfg.tie_embeddings:  # after to_empty, which gives every module a tensor of its own
            self.lm_head.weight = self.embed.weight
        if device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise parameters (`init_parameter`, in `init_order`) and the rotary tables (also after
        `to_empty` from meta)."""
        self.init_rotary()
        params = dict(self.named_parameters())
        for name in init_order(self.cfg):
            init_parameter(self.cfg, name, params[name])

    @torch.no_grad()
    def init_rotary(self) -> None:
        for name, table in zip(("cos_q", "sin_q", "cos_k", "sin_k"), rotary_tables(self.cfg, self.cos_q.device)):
            getattr(self, name).copy_(table)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [B, T] -> logits [B, T, V]. With targets, also the mean cross-entropy over targets != -100 (with a
        teacher head: `separate_loss`).

        With a cache, `tokens` continue the cached sequence at position `cache.length`.
        """
        h = self.final_norm(self.trunk(tokens, cache))
        logits = self.readout(h)
        if targets is None:
            return logits, None
        if self.cls_head is None:
            return logits, lm_loss(logits, targets)
        return logits, self.separate_loss(h, logits, targets)

    def trunk(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The residual stream after the last block, [B, T, d_model]."""
        T = tokens.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise FlmError(f"sequence of {start + T} tokens exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        rope = self.rope(start, T)
        x = self.embed_tokens(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, self.hidden_mask, cache, i)
        if cache is not None:
            cache.length += T
        return x

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

    # The pieces of `forward`, also run separately by pipeline stages (flm.parallel.pipeline).
    def rope(self, start: int, length: int) -> tuple[torch.Tensor, ...]:
        """The rotary tables for positions start..start+length-1."""
        return tuple(t[start:start + length] for t in (self.cos_q, self.sin_q, self.cos_k, self.sin_k))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(tokens))
        return x if self.hidden_mask is None else x * self.hidden_mask

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm, LM head and the readout multiplier."""
        return self.readout(self.final_norm(x))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(self.ln_f, x, self.hidden_mask, self.norm_mask)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """LM head and the readout multiplier on the final-normed hidden state."""
        logits = self.lm_head(h)
        mult = readout_multiplier(self.cfg)
        if mult != 1.0:  # skip a pass over the [B, T, V] logits when it would change nothing
            logits = logits * mult
        return logits

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """The teacher head and the readout multiplier (μP treats it as an LM head) on the final-normed hidden
        state: logits (false, true)."""
        return self.cls_head(h) * readout_multiplier(self.cfg)


def held_blocks(model: FLM) -> dict[int, Block]:
    """The blocks this process holds, by global index: all of them, or a pipeline stage's (a ModuleDict keyed by
    index, flm.parallel.pipeline)."""
    if isinstance(model.blocks, nn.ModuleDict):
        return {int(k): b for k, b in model.blocks.items()}
    return dict(enumerate(model.blocks))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token logits [B, T, V] against targets [B, T], skipping targets == -100."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)
