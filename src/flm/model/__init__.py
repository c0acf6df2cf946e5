"""The FLM decoder (single device), its KV-cache sampler and its parameter/FLOP counts."""

from flm.model.counting import flops_per_token, matmul_params, non_embedding_params, param_count
from flm.model.flm import FLM, KVCache, readout_multiplier, rotary_tables
from flm.model.generate import filter_logits, generate

__all__ = ["FLM", "KVCache", "filter_logits", "flops_per_token", "generate", "matmul_params",
           "non_embedding_params", "param_count", "readout_multiplier", "rotary_tables"]
