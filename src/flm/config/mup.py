"""Settings of the μP tools: `flm mup coord-check`, `flm sweep` and `flm predict` (flm.mup, docs/mup.md).

The model shape, data, batch, steps and LR schedule of every run come from [model], [data] and
[train]; a width here replaces model.d_model, with n_heads = width / head_dim (the head dim stays
fixed, as in growth) and the FFN at 4 x width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flm.config.checks import require as _require

PARAMETRIZATIONS = ("mup", "sp")
SEARCHES = ("grid", "random")


@dataclass
class MupConfig:
    out_dir: str = "runs/mup"  # where each tool writes its PNG, markdown table and JSON
    # Coordinate check: activation scale per layer vs width, after a few steps at constant LR train.lr.
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    coord_steps: int = 4  # optimizer steps before the last measurement (scales are measured after each)
    # Sweep: lr x init_std x output_mult at each of `sweep_widths`, under each of `parametrizations`.
    sweep_widths: list[int] = field(default_factory=lambda: [256])  # FLM-101B's proxy: 256
    parametrizations: list[str] = field(default_factory=lambda: ["mup"])  # "mup" and/or "sp"
    lrs: list[float] = field(default_factory=lambda: [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])  # peak LR; min_lr keeps train's ratio
    init_stds: list[float] = field(default_factory=lambda: [0.02])  # model.init_std values
    output_mults: list[float] = field(default_factory=lambda: [1.0])  # model.output_mult values
    search: str = "grid"  # "grid": every combination; "random": `trials` points, log-uniform within each list's range
    trials: int = 8  # random search only
    # Loss prediction: train `ladder` widths, fit L(N) = a·N^b + c on all but the `holdout` largest.
    ladder: list[int] = field(default_factory=lambda: [32, 64, 96, 128, 192, 256])
    holdout: int = 2
    extrapolate: list[int] = field(default_factory=lambda: [512, 1024])  # wider models to predict (not trained)

    def validate(self) -> None:
        _require(all(w > 0 for w in self.extrapolate), "mup.extrapolate must hold positive widths")
        for name in ("widths", "sweep_widths", "ladder"):
            values = getattr(self, name)
            _require(bool(values) and all(w > 0 for w in values), f"mup.{name} must be a non-empty list of positive widths")
            _require(len(set(values)) == len(values), f"mup.{name} has a width twice: {values}")
        _require(len(self.widths) >= 2, "mup.widths needs at least two widths to measure a slope")
        _require(self.coord_steps > 0, f"mup.coord_steps must be positive, got {self.coord_steps}")
        _require(bool(self.parametrizations) and all(p in PARAMETRIZATIONS for p in self.parametrizations),
                 f"mup.parametrizations must be a non-empty list of {PARAMETRIZATIONS}, got {self.parametrizations}")
        for name in ("lrs", "init_stds", "output_mults"):
            values = getattr(self, name)
            _require(bool(values) and all(v > 0 for v in values), f"mup.{name} must be a non-empty list of positive numbers")
        _require(self.search in SEARCHES, f"mup.search must be one of {SEARCHES}, got {self.search!r}")
        _require(self.trials > 0, f"mup.trials must be positive, got {self.trials}")
        _require(self.holdout >= 1, f"mup.holdout must be at least 1, got {self.holdout}")
        _require(len(self.ladder) - self.holdout >= 3,
                 f"mup.ladder needs at least 3 widths left for the fit of a, b, c after holding out {self.holdout}")
