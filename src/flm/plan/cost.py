"""FLOPs, days, GPU-hours and dollars for a growth schedule, and for training its final model from scratch.

Time comes from compute and throughput only: days = FLOPs / (n_gpus · achieved FLOP/s · goodput) / 86400.
A throughput figure means something only together with the formula that counted its FLOPs, so the formula
is a setting (`plan.flops_formula`), and the same formula gives both the compute column and the days.
The full-recompute count is always shown beside it as the FLOPs the GPUs execute when every layer is
recomputed. docs/plan.md says which formula reproduces which of the paper's figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from flm.config import Config, ModelConfig, PlanConfig, StageConfig
from flm.errors import FlmError
from flm.model.counting import flops_per_token, param_count
from flm.plan.hardware import GPU, get_gpu

SECONDS_PER_DAY = 86400.0


def _head_flops(cfg: ModelConfig, seq_len: int) -> float:
    """The LM head's share of `flops_per_token` (6·d·V): it runs once after the last layer, never recomputed."""
    return flops_per_token(cfg, seq_len) - flops_per_token(replace(cfg, vocab_size=None), seq_len)


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token when every block's forward pass is run again in the backward pass.

    For a 4·d FFN and n_heads·head_dim = d this is Narayanan et al. 2021 eq. 3,
    96·B·s·L·d²·(1 + s/(6d) + V/(16·L·d)) per iteration; it is what Megatron logs as TFLOP/s with
    activation checkpointing on.
    """
    blocks = flops_per_token(cfg, seq_len) - _head_flops(cfg, seq_len)
    return flops_per_token(cfg, seq_len) + blocks / 3.0


def paper_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Megatron-DeepSpeed's 24·f·B·s·L·d²·(1 + s/(6d) + V/(16·L·d)) with f = 3.5: 7/8 of the full-recompute count.

    This variant reproduces the FLM-101B paper's comparison column (GPT-3 376.41, Llama-7B 49.54,
    Llama-2-13B 201.37 zettaFLOPs) to four digits, so it is the formula the paper used there.
    """
    return 0.875 * recompute_flops_per_token(cfg, seq_len)


FLOPS_PER_TOKEN: dict[str, Callable[[ModelConfig, int], float]] = {
    "6nd": lambda cfg, seq_len: 6.0 * param_count(cfg),  # Kaplan's C = 6·N·D, every parameter counted
    "model": flops_per_token,  # 6·N_matmul + 12·L·attn_dim·s = Narayanan's 72·(...) without recomputation
    "recompute": recompute_flops_per_token,
    "paper": paper_flops_per_token,
}


@dataclass(frozen=True)
class StageCost:
    """One stage's bill. `flops` is counted by the plan's formula (the one the throughput is quoted in)."""

    name: str
    model: ModelConfig
    params: int
    tokens: float
    tflops_per_gpu: float
    flops: float
    recompute_flops: float
    days: float
    gpu_hours: float
    cost: float


class ScheduleTotals:
    """Totals over the stages of a schedule (needs `stages`, `growth_days`, `n_gpus`, `price_per_gpu_hour`)."""

    stages: list[StageCost]
    growth_days: float
    n_gpus: int
    price_per_gpu_hour: float

    @property
    def total_tokens(self) -> float:
        return sum(s.tokens for s in self.stages)

    @property
    def total_days(self) -> float:
        return sum(s.days for s in self.stages) + self.growth_days

    @property
    def total_gpu_hours(self) -> float:
        return self.total_days * 24.0 * self.n_gpus

    @property
    def total_cost(self) -> float:
        return self.total_gpu_hours * self.price_per_gpu_hour


@dataclass(frozen=True)
class PlanResult(ScheduleTotals):
    """A growth schedule's cost, and the final model trained from scratch on the same tokens."""

    gpu: GPU
    n_gpus: int
    price_per_gpu_hour: float
    flops_formula: str
    goodput: float
    seq_len: int
    stages: list[StageCost]
    growth_days: float  # cluster downtime for the growth events
    scratch: StageCost
    target_saving: float | None = None  # plan.target_saving

    @property
    def total_flops(self) -> float:
        return sum(s.flops for s in self.stages)

    @property
    def total_recompute_flops(self) -> float:
        return sum(s.recompute_flops for s in self.stages)

    @property
    def speedup(self) -> float:
        return self.scratch.days / self.total_days

    @property
    def saving(self) -> float:
        return 1.0 - self.total_days / self.scratch.days

    @property
    def growths(self) -> list[tuple[float, float]]:
        """(f, r) of each growth: the share of all tokens trained before it, and the FLOPs per token of the model
        it grows from relative to the final model's (by the plan's formula, LM head included)."""
        total, final = self.total_tokens, self.stages[-1].flops / self.stages[-1].tokens
        out, seen = [], 0.0
        for before in self.stages[:-1]:
            seen += before.tokens
            out.append((seen / total, before.flops / before.tokens / final))
        return out

    @property
    def saving_bound(self) -> float:
        """The most compute the schedule can save against the final model trained from scratch: the FLOPs ratio at
        equal tokens, 1 / sum_i(token share_i x FLOPs-per-token ratio_i) (1 / (1 - f(1 - r)) for one growth).
        Reached only if the grown model matches scratch's loss after the same tokens (docs/growth.md)."""
        final = self.stages[-1].flops / self.stages[-1].tokens
        return final * self.total_tokens / self.total_flops


def training_days(flops: float, n_gpus: int, tflops_per_gpu: float, goodput: float) -> float:
    """Wall-clock days to execute `flops` on `n_gpus` GPUs that each sustain `tflops_per_gpu` in training steps."""
    return flops / (n_gpus * tflops_per_gpu * 1e12 * goodput) / SECONDS_PER_DAY


def stage_cost(name: str, model: ModelConfig, tokens: float, tflops_per_gpu: float, plan: PlanConfig,
               seq_len: int) -> StageCost:
    flops = FLOPS_PER_TOKEN[plan.flops_formula](model, seq_len) * tokens
    days = training_days(flops, plan.n_gpus, tflops_per_gpu, plan.goodput)
    gpu_hours = days * 24.0 * plan.n_gpus
    return StageCost(name=name, model=model, params=param_count(model), tokens=tokens,
                     tflops_per_gpu=tflops_per_gpu, flops=flops,
                     recompute_flops=recompute_flops_per_token(model, seq_len) * tokens,
                     days=days, gpu_hours=gpu_hours, cost=gpu_hours * plan.price_per_gpu_hour)


def resolve_tflops(plan: PlanConfig, gpu: GPU, n_stages: int) -> list[float]:
    """Achieved TFLOP/s per GPU for each stage: the given list (one value for all, or one per stage),
    else utilisation × the GPU's dense bf16 peak."""
    given = plan.tflops_per_gpu
    if not given:
        return [plan.utilization * gpu.peak_tflops] * n_stages
    if len(given) not in (1, n_stages):
        raise FlmError(f"plan.tflops_per_gpu has {len(given)} values for {n_stages} stages; "
                       "give one value, or one per stage")
    too_fast = [t for t in given if t > gpu.peak_tflops]
    if too_fast:
        raise FlmError(f"{too_fast[0]:g} TFLOP/s per GPU exceeds the {gpu.name}'s bf16 peak of {gpu.peak_tflops:g}")
    return list(given) * n_stages if len(given) == 1 else list(given)


def planned_stages(cfg: Config) -> list[tuple[StageConfig, ModelConfig]]:
    """The stages with their shapes; a config without [[stages]] is one stage of train.max_steps steps
    on all GPUs, data parallel over what [parallel]'s tensor and pipeline degrees leave."""
    if cfg.stages:
        stages, models = cfg.stages, cfg.stage_models()
    else:
        model_parallel = cfg.parallel.tp * cfg.parallel.pp
        if cfg.plan.n_gpus % model_parallel:
            raise FlmError(f"plan.n_gpus ({cfg.plan.n_gpus}) is not a multiple of parallel.tp x parallel.pp "
                           f"({model_parallel})")
        stages = [StageConfig(name="model", tokens=cfg.train.max_steps * cfg.train.tokens_per_step,
                              dp=cfg.plan.n_gpus // model_parallel)]
        models = [cfg.model]
    if cfg.model.vocab_size is None:
        raise FlmError("planning needs model.vocab_size (it otherwise comes from the prepared data); set it")
    names = [s.name or f"stage{i + 1}" for i, s in enumerate(stages)]
    return [(replace(s, name=n), m) for s, n, m in zip(stages, names, models)]


def plan_costs(cfg: Config) -> PlanResult:
    """Cost every stage of `cfg`, and the final shape trained from scratch on all the stages' tokens at
    the final stage's throughput (how the paper estimated its 76.74 days)."""
    plan, seq_len = cfg.plan, cfg.train.seq_len
    gpu = get_gpu(plan.gpu)
    stages = planned_stages(cfg)
    tflops = resolve_tflops(plan, gpu, len(stages))
    costs = [stage_cost(s.name, m, s.tokens, t, plan, seq_len) for (s, m), t in zip(stages, tflops)]
    scratch = stage_cost("from scratch", stages[-1][1], sum(c.tokens for c in costs), tflops[-1], plan, seq_len)
    return PlanResult(gpu=gpu, n_gpus=plan.n_gpus, price_per_gpu_hour=plan.price_per_gpu_hour,
                      flops_formula=plan.flops_formula, goodput=plan.goodput, seq_len=seq_len, stages=costs,
                      growth_days=(len(costs) - 1) * plan.growth_overhead_hours / 24.0, scratch=scratch,
                      target_saving=plan.target_saving)
