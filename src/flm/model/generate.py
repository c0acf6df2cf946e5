"""Sampling from a model (either architecture) with a KV cache: greedy, temperature, top-k and top-p."""

from __future__ import annotations

import torch

from flm.errors import FlmError
from flm.model.decoder import Decoder, KVCache


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (logits: [B, V])."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the most likely one always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(model: Decoder, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eot_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             vocab_limit: int | None = None) -> list[int]:
    """Continue `prompt` by up to `max_new_tokens` tokens; temperature 0 means greedy.

    Stops early at `eot_id`. Ids >= `vocab_limit` (embedding rows padded past the tokenizer's
    vocabulary) are never produced. The prompt is cut from the left so that prompt + new tokens fit in the
    model's context. Without the cache every step recomputes the whole sequence (for checking).
    """
    cfg = model.cfg
    if not prompt:
        raise FlmError("the prompt is empty: give at least one token")
    if max_new_tokens < 0 or max_new_tokens >= cfg.max_seq_len:
        raise FlmError(f"max_new_tokens must be in [0, {cfg.max_seq_len - 1}] for this model, got {max_new_tokens}")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise FlmError("sampling needs temperature >= 0, top_k >= 1 and 0 < top_p <= 1")
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    tokens = list(prompt[-(cfg.max_seq_len - max_new_tokens):])
    # As long as this generation needs: imported models' contexts reach 128k positions.
    cache = KVCache(cfg, 1, device, model.embed.weight.dtype, len(tokens) + max_new_tokens) if use_cache else None
    pending = tokens
    out: list[int] = []
    for _ in range(max_new_tokens):
        inp = torch.tensor([pending if use_cache else tokens], device=device)
        logits = model(inp, cache=cache)[0][0, -1].float()
        if vocab_limit is not None:
            logits[vocab_limit:] = float("-inf")
        if temperature == 0:
            nxt = int(torch.argmax(logits))
        else:
            probs = torch.softmax(filter_logits(logits[None] / temperature, top_k, top_p), dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        out.append(nxt)
        tokens.append(nxt)
        pending = [nxt]
        if nxt == eot_id:
            break
    model.train(was_training)
    return out
