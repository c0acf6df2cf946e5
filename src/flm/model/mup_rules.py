"""The μP rules (REFERENCE.md §3), as functions of the model config and a parameter's name only.

With `width_mult = d_model / base_width` under μP (1 under standard parametrization):
- hidden matrices (attn.qkv, attn.proj, mlp.fc1, mlp.fc2; the llama arch's q/k/v/o and gate/up/down projections)
  are initialised with variance init_std² / width_mult and trained with Adam LR lr / width_mult; their weight
  decay is multiplied by width_mult so that the per-step decay lr·wd does not depend on the width;
- vector-like parameters (embedding, LM head, biases, LayerNorm and RMSNorm gains) keep a width-independent init
  and LR: the readout multiplier output_mult / width_mult is what makes the head vector-like under Adam.

Nothing is stored on tensors: model init, optimizer groups and growth all ask these functions, so
the numbers stay plain floats that FSDP and torch.compile never see, and a grown model gets its new
width's values simply by asking again with the new config. Under standard parametrization every
multiplier is exactly 1.0, so init and LRs are bit-identical to a model without μP.
"""

from __future__ import annotations

import math

from flm.config import ModelConfig

# By name, for both architectures: FLM's (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) and the llama arch's.
HIDDEN_MATRICES = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight",
                   "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
                   "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
# GPT-2/3: init scaled by 1/sqrt(2L)
RESIDUAL_WRITERS = ("attn.proj.weight", "mlp.fc2.weight", "attn.o_proj.weight", "mlp.down_proj.weight")
VECTOR_MATRICES = ("embed.weight", "lm_head.weight", "cls_head.weight")  # cls_head: the teacher head, a readout


def width_mult(cfg: ModelConfig) -> float:
    """d_model / base_width under μP, exactly 1.0 otherwise."""
    return cfg.d_model / cfg.base_width if cfg.mup else 1.0


def readout_multiplier(cfg: ModelConfig) -> float:
    """The factor on the logits: `output_mult / width_mult`, i.e. output_mult · base_width / d_model under μP.

    Written as the exported Hugging Face config computes it, so both give the same float.
    """
    return cfg.output_mult * (cfg.base_width / cfg.d_model if cfg.mup else 1.0)


def is_hidden_matrix(name: str) -> bool:
    return name.endswith(HIDDEN_MATRICES)


def is_matrix(name: str) -> bool:
    """Matrices get weight decay; biases and LayerNorm parameters do not (decay would pull γ from 1)."""
    return is_hidden_matrix(name) or name in VECTOR_MATRICES


def init_std(cfg: ModelConfig, name: str) -> float:
    """Standard deviation of the normal init of matrix `name` (biases and LayerNorm are not drawn)."""
    if name in VECTOR_MATRICES:
        return cfg.init_std
    if not is_hidden_matrix(name):
        raise ValueError(f"{name} is not a matrix with a random init")
    std = cfg.init_std / math.sqrt(width_mult(cfg))
    return std / math.sqrt(2 * cfg.n_layers) if name.endswith(RESIDUAL_WRITERS) else std


def lr_mult(cfg: ModelConfig, name: str) -> float:
    """The factor on the schedule's LR for parameter `name`: 1 / width_mult for hidden matrices, else 1."""
    return 1.0 / width_mult(cfg) if is_hidden_matrix(name) else 1.0


def weight_decay(cfg: ModelConfig, name: str, base: float) -> float:
    """Decoupled weight decay of `name`: `base` on matrices (× width_mult on hidden ones), 0 on vectors."""
    if not is_matrix(name):
        return 0.0
    return base * width_mult(cfg) if is_hidden_matrix(name) else base
