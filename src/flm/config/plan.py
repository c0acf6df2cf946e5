"""Hardware, price and planning assumptions for `flm plan` (REFERENCE.md §5-6; docs/plan.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flm.config.checks import require as _require

# Which FLOPs a throughput figure counts (flm.plan.cost defines each): "6nd" = 6·N per token,
# "model" = 6·N_matmul + attention (MFU convention), "recompute" = Megatron with full activation
# recomputation, "paper" = Megatron-DeepSpeed's formula with factor 3.5 (the paper's comparison table).
FLOPS_FORMULAS = ("6nd", "model", "recompute", "paper")
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass
class PlanConfig:
    gpu: str = "A800-80G"  # a name from the planner's hardware table
    n_gpus: int = 8
    tflops_per_gpu: list[float] = field(default_factory=list)  # achieved, one per stage; empty: peak x utilization
    utilization: float = 0.5
    price_per_gpu_hour: float = 1.0
    flops_formula: str = "model"  # what the TFLOP/s figures count; days = FLOPs by this formula / throughput
    goodput: float = 1.0  # fraction of wall-clock spent in training steps (checkpoints, restarts lower it)
    # Memory check (Megatron-style mixed precision; see flm.plan.memory).
    micro_batch_size: int = 1
    recompute: str = "selective"  # activation recomputation: none, selective (or FlashAttention), full
    sequence_parallel: bool = True
    distributed_optimizer: bool = True  # ZeRO-1: fp32 master weights and Adam moments sharded over DP
    memory_margin: float = 0.1  # fraction of GPU memory kept free (CUDA context, NCCL, fragmentation)
    # Schedule search and growth (see flm.plan.search).
    growth_factor: float = 2.0  # parameter ratio per growth event
    # The saving the user's schedule should reach against training from scratch (FLOPs to equal loss); `flm plan`
    # warns when the schedule's bound 1 / sum(f_i r_i) cannot reach it (None: it warns below 1.5x).
    target_saving: float | None = None
    growth_overhead_hours: float = 0.0  # cluster downtime per growth event (0: grown inside the run)
    tokens_per_param_cap: float = 20.0  # a non-final stage stops once cumulative tokens reach this x its params
    stage_token_fraction: float = 0.08  # least share of all tokens every stage trains (FLM-101B's least: 8.5%)
    # A budget in training FLOPs (counted by flops_formula) for --search and --predict when no --budget-* flag is
    # given; None: --predict takes the config's own schedule's FLOPs.
    budget_flops: float | None = None

    def validate(self) -> None:
        _require(bool(self.gpu), "plan.gpu must not be empty")
        _require(self.n_gpus > 0, f"plan.n_gpus must be positive, got {self.n_gpus}")
        _require(all(t > 0 for t in self.tflops_per_gpu), "plan.tflops_per_gpu values must be positive")
        _require(0 < self.utilization <= 1, f"plan.utilization must be in (0, 1], got {self.utilization}")
        _require(self.price_per_gpu_hour >= 0, f"plan.price_per_gpu_hour must be >= 0, got {self.price_per_gpu_hour}")
        _require(self.flops_formula in FLOPS_FORMULAS,
                 f"plan.flops_formula must be one of {FLOPS_FORMULAS}, got {self.flops_formula!r}")
        _require(0 < self.goodput <= 1, f"plan.goodput must be in (0, 1], got {self.goodput}")
        _require(self.micro_batch_size > 0, f"plan.micro_batch_size must be positive, got {self.micro_batch_size}")
        _require(self.recompute in RECOMPUTE_MODES,
                 f"plan.recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")
        _require(0 <= self.memory_margin < 1, f"plan.memory_margin must be in [0, 1), got {self.memory_margin}")
        _require(self.target_saving is None or self.target_saving > 1,
                 f"plan.target_saving must be > 1 (a saving factor), got {self.target_saving}")
        _require(self.growth_factor > 1, f"plan.growth_factor must be > 1, got {self.growth_factor}")
        _require(self.growth_overhead_hours >= 0,
                 f"plan.growth_overhead_hours must be >= 0, got {self.growth_overhead_hours}")
        _require(self.tokens_per_param_cap > 0,
                 f"plan.tokens_per_param_cap must be positive, got {self.tokens_per_param_cap}")
        _require(self.budget_flops is None or self.budget_flops > 0,
                 f"plan.budget_flops must be positive, got {self.budget_flops}")
        _require(0 < self.stage_token_fraction <= 1,
                 f"plan.stage_token_fraction must be in (0, 1], got {self.stage_token_fraction}")
