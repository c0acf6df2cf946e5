"""Hardware and price assumptions for `flm plan` (REFERENCE.md §5-6)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flm.config.checks import require as _require


@dataclass
class PlanConfig:
    gpu: str = "A800-80G"  # a name from the planner's hardware table
    n_gpus: int = 8
    tflops_per_gpu: list[float] = field(default_factory=list)  # achieved, one per stage; empty: peak x utilization
    utilization: float = 0.5
    price_per_gpu_hour: float = 1.0

    def validate(self) -> None:
        _require(self.n_gpus > 0, f"plan.n_gpus must be positive, got {self.n_gpus}")
        _require(all(t > 0 for t in self.tflops_per_gpu), "plan.tflops_per_gpu values must be positive")
        _require(0 < self.utilization <= 1, f"plan.utilization must be in (0, 1], got {self.utilization}")
        _require(self.price_per_gpu_hour >= 0, f"plan.price_per_gpu_hour must be >= 0, got {self.price_per_gpu_hour}")
