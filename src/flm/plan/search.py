"""Schedule search: for a budget, hardware and a final shape, which growth schedule sees the most tokens.

The premise is the paper's: with function-preserving growth the final model inherits everything the
smaller stages learned, so every token trained at any stage counts as seen by the final model, and a
small stage buys tokens cheaply. Without limits that would put everything into the smallest model, so
the search works under these assumptions (all settings in [plan], documented in docs/plan.md):

- Shapes: width growth at the final depth and head dim (FLM-101B's recipe; heads and FFN scale with the
  width), each event multiplying the parameter count by about `growth_factor` (2: the most reliable
  step, REFERENCE.md §2). The search tries every number of stages; one stage is training from scratch.
- Saturation: a non-final stage trains at most until the tokens seen so far reach `tokens_per_param_cap`
  times its parameters (20: Chinchilla's compute-optimal ratio; past it a bigger model learns more per
  FLOP, so a smaller one should have been grown already).
- Every stage trains at least `stage_token_fraction` of all tokens (the paper's least: 8.5%, its 101B
  stage): enough for the growth masks to ramp in and the new capacity to be used, and no stage is
  skipped, which would make one event a jump of factor² (large jumps lose to training from scratch).
- Throughput is the same at every size (FLM-101B measured 162/160/165 TFLOP/s from 16B to 101B with a
  layout chosen per stage), so a token's cost is proportional to its FLOPs.
- Each growth event idles the cluster for `growth_overhead_hours` (0 when growing inside the run; the
  mask ramp itself is ordinary training at the new size and is already counted).

With these, for a fixed set of shapes the tokens are placed cheapest-first (smallest stage first, up to
its cap), the final stage takes its share, and the largest total that fits the budget is found by
bisection, since the cost of a total is increasing in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import mean

from flm.config import ModelConfig, PlanConfig
from flm.errors import FlmError
from flm.model.counting import param_count
from flm.plan.cost import FLOPS_PER_TOKEN, ScheduleTotals, StageCost, stage_cost
from flm.plan.hardware import GPU


@dataclass(frozen=True)
class Schedule(ScheduleTotals):
    stages: list[StageCost]
    growth_days: float
    n_gpus: int
    price_per_gpu_hour: float


@dataclass(frozen=True)
class SearchResult:
    options: list[Schedule]  # the best schedule for each number of stages that has distinct shapes
    scratch: StageCost  # the final shape alone, on the whole budget
    budget_gpu_hours: float

    @property
    def best(self) -> Schedule:
        return max(self.options, key=lambda s: s.total_tokens)

    @property
    def token_gain(self) -> float:
        """Tokens the best schedule's final model has seen, relative to training it from scratch."""
        return self.best.total_tokens / self.scratch.tokens


def budget_gpu_hours(plan: PlanConfig, dollars: float | None, gpu_days: float | None) -> float:
    """Turn a budget in dollars or GPU-days (exactly one) into GPU-hours."""
    if (dollars is None) == (gpu_days is None):
        raise FlmError("give exactly one budget: --budget-dollars or --budget-gpu-days")
    if gpu_days is not None:
        if gpu_days <= 0:
            raise FlmError(f"the budget must be positive, got {gpu_days:g} GPU-days")
        return gpu_days * 24.0
    if dollars <= 0:
        raise FlmError(f"the budget must be positive, got ${dollars:g}")
    if plan.price_per_gpu_hour <= 0:
        raise FlmError("a budget in dollars needs plan.price_per_gpu_hour > 0")
    return dollars / plan.price_per_gpu_hour


def search_tflops(plan: PlanConfig, gpu: GPU) -> float:
    """One throughput for every size: the mean of plan.tflops_per_gpu if given, else utilisation × peak."""
    return mean(plan.tflops_per_gpu) if plan.tflops_per_gpu else plan.utilization * gpu.peak_tflops


def size_label(params: int) -> str:
    return f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.3g}M"


def at_width(final: ModelConfig, d_model: int) -> ModelConfig:
    """The final shape at another width: same depth and head dim, heads and FFN scaled with the width."""
    scale = d_model / final.d_model
    d_ff = None if final.d_ff is None else max(1, round(final.d_ff * scale))
    return replace(final, d_model=d_model, n_heads=max(1, round(final.n_heads * scale)), d_ff=d_ff)


def grown_shapes(final: ModelConfig, n_stages: int, factor: float) -> list[ModelConfig] | None:
    """Shapes whose parameter counts step by about `factor` up to `final`; None if two would coincide."""
    candidates = [at_width(final, d) for d in range(final.head_dim, final.d_model, final.head_dim)]
    shapes = []
    for k in range(n_stages - 1, 0, -1):
        target = param_count(final) / factor**k
        shapes.append(min(candidates, key=lambda m: abs(math.log(param_count(m) / target)), default=final))
    shapes.append(final)
    if any(a.d_model >= b.d_model for a, b in zip(shapes, shapes[1:])):
        return None
    return shapes


def allocate(total: float, params: list[int], plan: PlanConfig) -> list[float] | None:
    """Tokens per stage for a given total, or None if no split obeys the rules: every stage its least
    share, the rest cheapest-first (smallest stage first) up to each stage's saturation cap, the final
    stage whatever remains."""
    floor = plan.stage_token_fraction * total
    rest, seen, tokens = total - len(params) * floor, 0.0, []
    if rest < 0:
        return None
    for n in params[:-1]:
        room = plan.tokens_per_param_cap * n - seen - floor
        if room < 0:
            return None
        tokens.append(floor + min(room, rest))
        rest -= tokens[-1] - floor
        seen += tokens[-1]
    return [*tokens, floor + rest]


def _fit_budget(gpu_seconds_per_token: list[float], params: list[int], plan: PlanConfig,
                gpu_seconds: float) -> list[float]:
    """The largest allocation whose cost fits `gpu_seconds` (bisection on the total: the cost grows with it,
    and a total too large for the caps stays too large)."""
    def cost(total: float) -> float:
        tokens = allocate(total, params, plan)
        return math.inf if tokens is None else sum(c * t for c, t in zip(gpu_seconds_per_token, tokens))

    low, high = 0.0, gpu_seconds / min(gpu_seconds_per_token)
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) <= gpu_seconds else (low, mid)
    return allocate(low, params, plan)


def plan_schedule(shapes: list[ModelConfig], plan: PlanConfig, tflops: float, seq_len: int,
                  gpu_hours: float) -> Schedule | None:
    """The best token split for these shapes within `gpu_hours`, or None if there is none (too many stages
    for their least shares, or growth downtime eats the budget)."""
    growth_days = (len(shapes) - 1) * plan.growth_overhead_hours / 24.0
    train_seconds = (gpu_hours - growth_days * 24.0 * plan.n_gpus) * 3600.0
    if train_seconds <= 0:
        return None
    per_token = [FLOPS_PER_TOKEN[plan.flops_formula](m, seq_len) / (tflops * 1e12 * plan.goodput) for m in shapes]
    tokens = _fit_budget(per_token, [param_count(m) for m in shapes], plan, train_seconds)
    if sum(tokens) == 0:
        return None
    names = [size_label(param_count(m)) for m in shapes]
    return Schedule(stages=[stage_cost(n, m, t, tflops, plan, seq_len) for n, m, t in zip(names, shapes, tokens)],
                    growth_days=growth_days, n_gpus=plan.n_gpus, price_per_gpu_hour=plan.price_per_gpu_hour)


def search_schedule(final: ModelConfig, plan: PlanConfig, gpu: GPU, seq_len: int, gpu_hours: float) -> SearchResult:
    """Try every number of stages the least share allows (1 / stage_token_fraction), growing by
    `plan.growth_factor`; compare with the final shape trained from scratch on the whole budget."""
    if final.vocab_size is None:
        raise FlmError("the search needs the final shape's vocab_size; set model.vocab_size or use --final-preset")
    tflops = search_tflops(plan, gpu)
    options = []
    for n_stages in range(1, math.floor(1 / plan.stage_token_fraction) + 1):
        shapes = grown_shapes(final, n_stages, plan.growth_factor)
        schedule = plan_schedule(shapes, plan, tflops, seq_len, gpu_hours) if shapes else None
        if schedule is not None:
            options.append(schedule)
    gpu_flops = gpu_hours * 3600.0 * tflops * 1e12 * plan.goodput
    scratch_tokens = gpu_flops / FLOPS_PER_TOKEN[plan.flops_formula](final, seq_len)
    scratch = stage_cost("from scratch", final, scratch_tokens, tflops, plan, seq_len)
    return SearchResult(options=options, scratch=scratch, budget_gpu_hours=gpu_hours)
