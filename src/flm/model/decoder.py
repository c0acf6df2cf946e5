"""What the FLM and the Llama-family decoders share, written once: the KV cache, the next-token loss, and the
skeleton of the model — token embedding, blocks on the residual stream, a final norm, an LM head (tied or untied)
times the μP readout multiplier, rotary tables as buffers, and growth's mask buffers (None in an ordinary model).

An architecture's module (flm.model.flm, flm.model.llama) subclasses `Decoder` with its name, its block, its final
norm, its rotary tables and its `init_order` / `init_parameter`; its blocks take (x, rope, hidden_mask, cache, i).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flm.config import ModelConfig
from flm.errors import FlmError
from flm.model.mup_rules import readout_multiplier


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int, dropout: float,
           scale: float | None = None, gqa: bool = False) -> torch.Tensor:
    """Causal attention of q [B, H, T, hd] over k, v; with a cache, k and v are appended to layer `layer`'s keys and
    values at position cache.length and the queries see every cached position up to their own."""
    if cache is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale,
                                              enable_gqa=gqa)
    T, start = q.shape[2], cache.length
    cache.k[layer, :, :, start:start + T] = k
    cache.v[layer, :, :, start:start + T] = v
    k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]
    # Query i sits at absolute position start+i and may see keys 0..start+i.
    mask = None
    if T > 1:
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token logits [B, T, V] against targets [B, T], skipping targets == -100."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)


class Decoder(nn.Module):
    """A decoder-only language model. `forward(tokens, targets)` -> (logits, loss or None)."""

    arch: str  # model.arch of this class
    rotary_names: tuple[str, ...]  # the buffers `rotary_tables` fills, in its order
    init_order: Callable[[ModelConfig], list[str]]  # the arch module's functions (staticmethods)
    init_parameter: Callable[..., torch.Tensor]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise FlmError("model.vocab_size is not set: take it from the prepared data or a preset")
        cfg.validate()
        if cfg.arch != self.arch:
            raise FlmError(f"model.arch {cfg.arch!r} is not {self.arch!r}; build models with flm.model.build_model")
        self.cfg = cfg
        device = torch.empty(0).device  # where the model was asked for (honours `with torch.device(...)`)
        with torch.device("meta"):  # shapes first: every value is drawn once, by init_weights
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(self.new_block(cfg) for _ in range(cfg.n_layers))
            self.ln_f = self.new_norm(cfg)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            self.add_heads(cfg)
            for name, table in zip(self.rotary_names, self.rotary_tables()):
                self.register_buffer(name, table, persistent=False)
        self.register_buffer("hidden_mask", None, persistent=False)  # [d_model] while new width ramps in
        self.register_buffer("norm_mask", None, persistent=False)  # [d_model]: norm statistics only ("zero")
        if device.type != "meta":
            self.to_empty(device=device)
        if cfg.tie_embeddings:  # after to_empty, which gives every module a tensor of its own
            self.lm_head.weight = self.embed.weight
        if device.type != "meta":
            self.init_weights()

    # What an architecture supplies.
    def new_block(self, cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def new_norm(self, cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm of the residual stream, with growth's masks."""
        raise NotImplementedError

    def rotary_tables(self, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def add_heads(self, cfg: ModelConfig) -> None:
        """Modules beside the LM head that read the final hidden state (none by default)."""

    # Initialisation.
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise parameters (`init_parameter`, in `init_order`) and the rotary tables (also after `to_empty`)."""
        self.init_rotary()
        params = dict(self.named_parameters())
        for name in self.init_order(self.cfg):
            self.init_parameter(self.cfg, name, params[name])

    @torch.no_grad()
    def init_rotary(self) -> None:
        device = getattr(self, self.rotary_names[0]).device
        for name, table in zip(self.rotary_names, self.rotary_tables(device)):
            getattr(self, name).copy_(table)

    # The forward pass.
    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [B, T] -> logits [B, T, V]. With targets, also the loss (`loss`: the mean cross-entropy over
        targets != -100). With a cache, `tokens` continue the cached sequence at position `cache.length`."""
        h = self.final_norm(self.trunk(tokens, cache))
        logits = self.readout(h)
        return logits, (self.loss(h, logits, targets) if targets is not None else None)

    def loss(self, h: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, targets)

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

    # The pieces of `forward`, also run separately by pipeline stages (flm.parallel.pipeline).
    def rope(self, start: int, length: int) -> tuple[torch.Tensor, ...]:
        """The rotary tables for positions start..start+length-1."""
        return tuple(getattr(self, name)[start:start + length] for name in self.rotary_names)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(tokens))
        return x if self.hidden_mask is None else x * self.hidden_mask

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and the readout multiplier."""
        return self.readout(self.final_norm(x))

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """LM head and the readout multiplier on the final-normed hidden state (1 without μP)."""
        logits = self.lm_head(h)
        mult = readout_multiplier(self.cfg)
        if mult != 1.0:  # skip a pass over the [B, T, V] logits when it would change nothing
            logits = logits * mult
        return logits


def held_blocks(model: Decoder) -> dict[int, nn.Module]:
    """The blocks this process holds, by global index: all of them, or a pipeline stage's (a ModuleDict keyed by
    index, flm.parallel.pipeline)."""
    if isinstance(model.blocks, nn.ModuleDict):
        return {int(k): b for k, b in model.blocks.items()}
    return dict(enumerate(model.blocks))
