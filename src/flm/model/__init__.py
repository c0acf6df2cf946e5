"""The FLM decoder and the Llama-family decoder (single device), their KV-cache sampler, parameter/FLOP counts, and
`build_model`, the one function that makes a model of a config's architecture."""

from flm.model.counting import flops_per_token, matmul_params, non_embedding_params, param_count
from flm.model.decoder import Decoder, KVCache
from flm.model.flm import FLM, readout_multiplier, rotary_tables
from flm.model.generate import filter_logits, generate
from flm.model.llama import Llama
from flm.model.registry import MODELS, build_model, init_order, init_parameter

__all__ = ["FLM", "KVCache", "Llama", "MODELS", "build_model", "filter_logits", "flops_per_token", "generate",
           "init_order", "init_parameter", "matmul_params", "non_embedding_params", "param_count",
           "readout_multiplier", "rotary_tables"]
