"""Memory per GPU for a 3D-parallel layout, and whether it fits.

Mixed-precision assumptions (Megatron-LM with bf16, as FLM-101B trained):
- weights are held in bf16 (2 bytes/parameter);
- gradients accumulate in an fp32 buffer (4 bytes/parameter, not sharded: every data-parallel rank
  reduces the full buffer);
- the optimizer keeps fp32 master weights and Adam's two moments (12 bytes/parameter); the distributed
  optimizer (ZeRO-1) shards those 12 bytes over the data-parallel ranks, giving 6 + 12/DP bytes in all.
Tensor parallelism splits every weight matrix TP ways (the replicated LayerNorm vectors and biases are
ignored); pipeline parallelism gives each stage ceil(L/PP) layers, the first stage also the embedding,
and with PP = 1 that one stage also holds the LM head.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", bytes per layer and micro-batch (s sequence, b micro-batch, h d_model, a heads, t TP):
    no recomputation:        s·b·h·(10 + 24/t + 5·a·s/(h·t)),  sequence parallel: s·b·h·(34/t + 5·a·s/(h·t))
    selective recomputation: s·b·h·(10 + 24/t),                sequence parallel: s·b·h·34/t
    full recomputation:      2·s·b·h per layer (its input; /t with sequence parallel), plus one layer
                             rebuilt without recomputation during its backward pass.
The formulas assume a 4·h FFN, a·head_dim = h and stored dropout masks (all FLM presets; an upper bound
when dropout is 0). For the llama arch the 24/t term is counted from the shapes instead (A = attention width
n_heads·head_dim, K = key/value width n_kv_heads·head_dim, f = FFN units, bytes per token): Q and K for QKᵀ
(2A + 2K), V (2K), the output projection's input (2A), and SwiGLU's gate and up outputs, silu(gate) and the down
projection's input (4·2f), i.e. (4A + 4K + 8f)/h in place of 24 (which it equals at A = K = h with a 4·h GELU
FFN's 16h: 8 + 16). FlashAttention stores no s×s matrices, which is what selective recomputation saves.
With the 1F1B pipeline schedule the first stage holds PP micro-batches of L/PP layers in flight, so it
always stores L layers' worth (their eq. 4); it is the most loaded stage, and the one reported. With
PP = 1 it also holds the fp32 logits of one micro-batch (4·s·b·V/t bytes) for the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from flm.config import Config, ModelConfig, StageConfig
from flm.config.layout import Layout
from flm.errors import FlmError
from flm.model.counting import param_count
from flm.plan.cost import planned_stages
from flm.plan.hardware import GPU

GIB = float(2**30)
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 4, 12


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded GPU (the first pipeline stage) and what the GPU offers after the margin."""

    params: float
    grads: float
    optimizer: float
    activations: float
    usable: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def layout_for(cfg: Config, stage: StageConfig) -> Layout:
    """The stage's tp/pp/dp (its own, else [parallel]'s) under the plan's precision settings."""
    tp, pp, dp = cfg.stage_layout(stage)
    plan = cfg.plan
    return Layout(tp=tp, pp=pp, dp=dp, micro_batch_size=plan.micro_batch_size,
                  sequence_parallel=plan.sequence_parallel, recompute=plan.recompute,
                  distributed_optimizer=plan.distributed_optimizer)


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """Megatron's constraints: TP splits whole heads, and every pipeline stage gets at least one layer."""
    if cfg.n_heads % layout.tp:
        raise FlmError(f"tp={layout.tp} does not divide n_heads={cfg.n_heads}")
    if cfg.kv_heads % layout.tp:
        raise FlmError(f"tp={layout.tp} does not divide n_kv_heads={cfg.kv_heads}")
    if layout.pp > cfg.n_layers:
        raise FlmError(f"pp={layout.pp} exceeds n_layers={cfg.n_layers}")


def first_stage_params(cfg: ModelConfig, layout: Layout) -> float:
    """Parameters one GPU of the first pipeline stage holds."""
    per_layer = param_count(replace(cfg, n_layers=2), False) - param_count(replace(cfg, n_layers=1), False)
    ends = param_count(cfg) - cfg.n_layers * per_layer  # embedding, LM head and final LayerNorm
    embedding = (cfg.vocab_size or 0) * cfg.d_model
    stage_ends = ends if layout.pp == 1 else embedding
    return (math.ceil(cfg.n_layers / layout.pp) * per_layer + stage_ends) / layout.tp


def activation_bytes_per_layer(cfg: ModelConfig, seq_len: int, layout: Layout, recompute: str) -> float:
    """Korthikanti et al. 2022, table 2, for one layer and one micro-batch."""
    sbh = seq_len * layout.micro_batch_size * cfg.d_model
    t, sp = layout.tp, layout.sequence_parallel
    if recompute == "full":
        return 2.0 * sbh / (t if sp else 1)
    split = 24.0 if cfg.arch == "flm" else (4.0 * cfg.attn_dim + 4.0 * cfg.kv_dim + 8.0 * cfg.ffn_dim) / cfg.d_model
    linear = (10.0 + split) / t if sp else 10.0 + split / t
    attention = 5.0 * cfg.n_heads * seq_len / (cfg.d_model * t) if recompute == "none" else 0.0
    return sbh * (linear + attention)


def activation_bytes(cfg: ModelConfig, seq_len: int, layout: Layout) -> float:
    stored = cfg.n_layers * activation_bytes_per_layer(cfg, seq_len, layout, layout.recompute)
    if layout.recompute == "full":
        stored += activation_bytes_per_layer(cfg, seq_len, layout, "none")
    if layout.pp == 1:
        stored += 4.0 * seq_len * layout.micro_batch_size * (cfg.vocab_size or 0) / layout.tp
    return stored


def estimate_memory(cfg: ModelConfig, seq_len: int, layout: Layout, gpu: GPU, margin: float) -> MemoryEstimate:
    check_layout(cfg, layout)
    n = first_stage_params(cfg, layout)
    optimizer_shards = layout.dp if layout.distributed_optimizer else 1
    return MemoryEstimate(params=WEIGHT_BYTES * n, grads=GRAD_BYTES * n,
                          optimizer=OPTIMIZER_BYTES * n / optimizer_shards,
                          activations=activation_bytes(cfg, seq_len, layout),
                          usable=(1.0 - margin) * gpu.memory_gib * GIB)


def stage_memory(cfg: Config, gpu: GPU) -> list[tuple[str, Layout, MemoryEstimate]]:
    """The memory check for every stage's own tp/pp/dp layout under the plan's precision settings."""
    rows = []
    for stage, model in planned_stages(cfg):
        layout = layout_for(cfg, stage)
        try:
            estimate = estimate_memory(model, cfg.train.seq_len, layout, gpu, cfg.plan.memory_margin)
        except FlmError as e:
            raise FlmError(f"stage {stage.name}: {e}") from None
        rows.append((stage.name, layout, estimate))
    return rows
