"""An FLM decoder for transformers (`trust_remote_code=True`), written by `flm export hf`.

Self-contained (torch and transformers only) and the same math as flm's own model, step by step, so logits agree
to float rounding: pre-LayerNorm blocks with biases, fused QKV with rows [q heads | k heads | v heads], rotary
pairs (i, i + head_dim/2) with xPos decay centred at max_position_embeddings // 2, a GeLU(tanh) MLP, a final
LayerNorm, and the μP readout multiplier on the logits.

Decoding uses transformers' `Cache` objects (a `DynamicCache` by default). A token's position is the number of
tokens before it in the cache, exactly as in flm, so cached decoding equals full recomputation. xPos depends only
on the distance between query and key, so left padding (which shifts absolute positions) leaves the attention
scores unchanged up to rounding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_flm import FLMConfig

# transformers 5 declares tied weights as {target: source}; 4.x as a list of targets.
_TIED_WEIGHTS = ({"lm_head.weight": "model.embed.weight"} if int(transformers.__version__.split(".")[0]) >= 5
                 else ["lm_head.weight"])


def xpos_tables(config: FLMConfig) -> Tuple[torch.Tensor, ...]:
    """(cos_q, sin_q, cos_k, sin_k), each [max_position_embeddings, head_dim], with the xPos scales folded in.

    θ_i = rope_theta^(-2i/d), ζ_i = (2i + 0.4d) / (1.4d); a query at n is scaled by ζ^((n-c)/B) and a key at m by
    ζ^(-(m-c)/B) with c = max_position_embeddings // 2, so q·k carries ζ^((n-m)/B). Computed in float64 on the
    CPU, then rounded to float32, like flm's tables.
    """
    d, n = config.head_dim, config.max_position_embeddings
    i = torch.arange(d // 2, dtype=torch.float64)
    inv_freq = config.rope_theta ** (-2.0 * i / d)
    zeta = (2.0 * i + 0.4 * d) / (1.4 * d)
    pos = torch.arange(n, dtype=torch.float64)
    angle = pos[:, None] * inv_freq[None, :]
    scale = zeta[None, :] ** ((pos[:, None] - n // 2) / config.xpos_scale_base)
    cos, sin = torch.cos(angle), torch.sin(angle)
    tables = (cos * scale, sin * scale, cos / scale, sin / scale)
    return tuple(torch.cat([t, t], dim=-1).float() for t in tables)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of x [B, H, T, d] by cos/sin [T, d] (xPos scales included)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def attention_mask_for(attention_mask: Optional[torch.Tensor], past: int, length: int,
                       device: torch.device) -> Optional[torch.Tensor]:
    """A boolean [B|1, 1, T, past+T] mask (True = may attend), or None where plain causal attention is exact.

    `attention_mask` is the usual [B, past+T] padding mask (1 = token) or an already built 4-D mask. A padded
    query may always see its own key, so no row is fully masked (that would give NaNs that leak into real tokens).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    padded = attention_mask is not None and not bool(attention_mask.all())
    if past == 0 and not padded:
        return None
    keys = torch.arange(past + length, device=device)
    queries = torch.arange(past, past + length, device=device)
    mask = (keys[None, :] <= queries[:, None])[None, None]
    if padded:
        mask = (mask & attention_mask[:, None, None, :].bool()) | (keys[None, :] == queries[:, None])
    return mask


class FLMAttention(nn.Module):
    def __init__(self, config: FLMConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.head_dim, self.layer_idx = config.num_attention_heads, config.head_dim, layer_idx
        inner = config.num_attention_heads * config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * inner)
        self.proj = nn.Linear(inner, config.hidden_size)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, ...], mask: Optional[torch.Tensor],
                cache: Optional[Cache]) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, self.n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)  # rows per head: q, k, v
        cos_q, sin_q, cos_k, sin_k = rope
        q, k = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FLMMLP(nn.Module):
    def __init__(self, config: FLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class FLMBlock(nn.Module):
    """Pre-LN: x += Attn(LN1(x)); x += MLP(LN2(x))."""

    def __init__(self, config: FLMConfig, layer_idx: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = FLMAttention(config, layer_idx)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FLMMLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, ...], mask: Optional[torch.Tensor],
                cache: Optional[Cache]) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), rope, mask, cache))
        return x + self.drop(self.mlp(self.ln2(x)))


class FLMPreTrainedModel(PreTrainedModel):
    config_class = FLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["FLMBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_cache_class = True  # transformers 4.x: hand us Cache objects, not tuples
    _supports_sdpa = True


class FLMModel(FLMPreTrainedModel):
    """Embedding, blocks and final LayerNorm: returns the normalised hidden states."""

    def __init__(self, config: FLMConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(FLMBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Plain attributes, not buffers: from_pretrained may build modules on the meta device and only fills
        # what the checkpoint holds. Made on first use and kept per device.
        self._rope_tables = {}
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def _rope(self, device: torch.device) -> Tuple[torch.Tensor, ...]:
        if device not in self._rope_tables:
            self._rope_tables[device] = tuple(t.to(device) for t in xpos_tables(self.config))
        return self._rope_tables[device]

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[Cache] = None, inputs_embeds: Optional[torch.Tensor] = None,
                use_cache: Optional[bool] = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        T = x.shape[1]
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        rope = tuple(t[past:past + T] for t in self._rope(x.device))
        mask = attention_mask_for(attention_mask, past, T, x.device)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, mask, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x),
                                       past_key_values=past_key_values if use_cache else None)


class FLMForCausalLM(FLMPreTrainedModel, GenerationMixin):
    """FLMModel + LM head (tied to the embedding when `tie_word_embeddings`) + the readout multiplier."""

    _tied_weights_keys = _TIED_WEIGHTS

    def __init__(self, config: FLMConfig):
        super().__init__(config)
        self.model = FLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[Cache] = None, inputs_embeds: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                logits_to_keep: int = 0, return_dict: Optional[bool] = None, **kwargs):
        """Logits [B, T, V] (the last `logits_to_keep` positions when > 0); with `labels`, the mean next-token
        cross-entropy (labels are shifted here, -100 is ignored), as in other transformers causal LMs."""
        out = self.model(input_ids, attention_mask, past_key_values, inputs_embeds, use_cache)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        mult = self.config.readout_multiplier
        if mult != 1.0:
            logits = logits * mult
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
        return result if return_dict is not False else result.to_tuple()
