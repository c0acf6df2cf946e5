"""An FLM decoder for transformers (`trust_remote_code=True`), written by `flm export hf`.

Self-contained (torch and transformers only) and the same math as flm's own model, step by step, so logits agree
to float rounding: pre-LayerNorm blocks with biases, fused QKV with rows laid out head by head (for each head its
q rows, then its k rows, then its v rows: `[q|k|v]` per head, Megatron's order), rotary pairs (i, i + head_dim/2)
with xPos decay centred at max_position_embeddings // 2 (`xpos.py`, a verbatim copy of flm's own definition), a
GeLU(tanh) MLP, a final LayerNorm, and the μP readout multiplier on the logits.

Decoding uses transformers' `Cache` objects (a `DynamicCache` by default), received under whichever keyword the
installed transformers uses (`cache` since 5.x, `past_key_values` before); a cache object under any other keyword
is refused rather than ignored. A token's position is the number of tokens before it in the cache (or
`cache_position` when given), exactly as in flm, so cached decoding equals full recomputation. xPos depends only on
the distance between query and key, so left padding (which shifts absolute positions) leaves the attention scores
unchanged up to rounding.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_flm import FLMConfig
from .xpos import apply_rotary, xpos_tables

# transformers 5 declares tied weights as {target: source}; 4.x as a list of targets.
_TIED_WEIGHTS = ({"lm_head.weight": "model.embed.weight"} if int(transformers.__version__.split(".")[0]) >= 5
                 else ["lm_head.weight"])
# The output field that carries the cache: `cache` in newer transformers, `past_key_values` in older ones.
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def take_cache(cache: Optional[Cache], past_key_values: Optional[Cache], kwargs: dict) -> Optional[Cache]:
    """The one cache this call was given, whatever the keyword; None when there is none.

    Two different caches, a cache that is not a `Cache` object (the legacy tuple format) or a `Cache` under an
    unknown keyword are errors: silently starting a fresh cache instead would decode every new token at position 0.
    """
    for key, value in kwargs.items():
        if isinstance(value, Cache):
            raise ValueError(f"FLM received a cache under the unknown keyword {key!r}; pass it as `cache` "
                             "(or `past_key_values` on transformers 4.x)")
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("FLM received two different caches (`cache` and `past_key_values`); pass one")
    found = cache if cache is not None else past_key_values
    if found is not None and not isinstance(found, Cache):
        raise ValueError(f"FLM needs a transformers Cache object (e.g. DynamicCache), got {type(found).__name__}")
    return found


def attention_mask_for(attention_mask: Optional[torch.Tensor], positions: torch.Tensor, n_keys: int,
                       plain_causal: bool) -> Optional[torch.Tensor]:
    """A boolean [B|1, 1, T, n_keys] mask (True = may attend), or None where plain causal attention is exact.

    Key j sits at position j; the query at `positions[i]` may see keys 0..positions[i]. `attention_mask` is the
    usual [B, n_keys] padding mask (1 = token) or an already built 4-D mask. A padded query may always see its own
    key, so no row is fully masked (that would give NaNs that leak into real tokens).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    padded = attention_mask is not None and not bool(attention_mask.all())
    if plain_causal and not padded:
        return None
    keys = torch.arange(n_keys, device=positions.device)
    mask = (keys[None, :] <= positions[:, None])[None, None]
    if padded:
        if attention_mask.shape[-1] != n_keys:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens but the cache and the input "
                             f"hold {n_keys}")
        mask = (mask & attention_mask[:, None, None, :].bool()) | (keys[None, :] == positions[:, None])
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
    _skip_keys_device_placement = ["past_key_values", "cache"]
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
            c = self.config
            self._rope_tables[device] = xpos_tables(c.head_dim, c.max_position_embeddings, c.rope_theta,
                                                    c.xpos_scale_base, device)
        return self._rope_tables[device]

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[Cache] = None, inputs_embeds: Optional[torch.Tensor] = None,
                use_cache: Optional[bool] = None, cache: Optional[Cache] = None,
                cache_position: Optional[torch.LongTensor] = None, **kwargs: Any) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cache = take_cache(cache, past_key_values, kwargs)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()  # nothing was passed: start one (generate() passes its own)
        past = cache.get_seq_length() if cache is not None else 0
        T = x.shape[1]
        if cache_position is None:
            positions = torch.arange(past, past + T, device=x.device)
        else:
            positions = cache_position.to(x.device).view(-1)
            if positions.numel() != T or (T and int(positions[0]) != past):
                raise ValueError(f"cache_position {positions.tolist()} does not continue a cache holding {past} "
                                 f"tokens with {T} new ones")
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        rope = tuple(t[past:past + T] for t in self._rope(x.device))
        mask = attention_mask_for(attention_mask, positions, past + T, plain_causal=past == 0)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), **{_CACHE_FIELD: cache if use_cache else None})


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
                logits_to_keep: int = 0, return_dict: Optional[bool] = None, cache: Optional[Cache] = None,
                **kwargs: Any):
        """Logits [B, T, V] (the last `logits_to_keep` positions when > 0); with `labels`, the mean next-token
        cross-entropy (labels are shifted here, -100 is ignored), as in other transformers causal LMs. The cache
        comes as `cache` (transformers 5) or `past_key_values` (4.x); `cache_position` is honoured when given."""
        cache = take_cache(cache, past_key_values, kwargs)
        out = self.model(input_ids, attention_mask, inputs_embeds=inputs_embeds, use_cache=use_cache, cache=cache,
                         cache_position=kwargs.get("cache_position"))
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
        result = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
        return result if return_dict is not False else result.to_tuple()
