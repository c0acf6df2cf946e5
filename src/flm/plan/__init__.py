"""Budget planner: FLOPs, time, GPU-hours and dollars of growth schedules, memory per GPU of a parallel
layout, and a search for schedules that fit a budget. Reads only configs and the model's counting
functions; needs no GPU (docs/plan.md).

Names are loaded on first use, so `flm --help` (which registers the `plan` command) does not import torch.
"""

import importlib

_HOME = {
    "FLOPS_PER_TOKEN": "cost", "PlanResult": "cost", "StageCost": "cost", "plan_costs": "cost",
    "recompute_flops_per_token": "cost", "GPU": "hardware", "GPUS": "hardware", "get_gpu": "hardware",
    "Layout": "memory", "MemoryEstimate": "memory", "estimate_memory": "memory", "stage_memory": "memory",
    "SearchResult": "search", "budget_gpu_hours": "search", "search_schedule": "search",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"flm.plan.{_HOME[name]}"), name)
    raise AttributeError(f"module 'flm.plan' has no attribute {name!r}")
