"""Budget planner: FLOPs, time, GPU-hours and dollars of growth schedules, memory per GPU of a parallel
layout, and a search for schedules that fit a budget. Reads only configs and the model's counting
functions; needs no GPU (docs/plan.md)."""

from flm.plan.cost import FLOPS_PER_TOKEN, PlanResult, StageCost, plan_costs, recompute_flops_per_token
from flm.plan.hardware import GPU, GPUS, get_gpu
from flm.plan.memory import Layout, MemoryEstimate, estimate_memory, stage_memory
from flm.plan.search import SearchResult, budget_gpu_hours, search_schedule

__all__ = [
    "FLOPS_PER_TOKEN", "GPU", "GPUS", "Layout", "MemoryEstimate", "PlanResult", "SearchResult", "StageCost",
    "budget_gpu_hours", "estimate_memory", "get_gpu", "plan_costs", "recompute_flops_per_token",
    "search_schedule", "stage_memory",
]
