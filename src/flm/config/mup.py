"""Settings of the μP tools: `flm mup coord-check`, `flm sweep` and `flm predict` (flm.mup, docs/mup.md).

The model shape, data, batch, steps and LR schedule of every run come from [model], [data] and
[train]; a width here replaces model.d_model, with n_heads = width / head_dim (the head dim stays
fixed, as in growth) and the FFN at 4 x width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flm.config.checks import require as _require
from flm.config.growth import OPERATORS

PARAMETRIZATIONS = ("mup", "sp")
SEARCHES = ("grid", "random")
LAW_FORMS = ("chinchilla", "interaction", "kaplan", "compute", "n_only")  # flm.mup.laws.FORMS


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
    # Loss prediction (`flm predict`, docs/mup.md): every `ladder` width is trained and evaluated at each of
    # `branch_steps` run lengths (under train.schedule = "wsd" one run per width, short decays branched off its
    # stable phase); L(N, D) is fitted in each of `forms` on all but the `holdout` widest widths, the best form
    # chosen by leave-one-width-out cross-validation.
    ladder: list[int] = field(default_factory=lambda: [32, 64, 96, 128, 192, 256])
    holdout: int = 0  # the widest ladder widths left out of the fit (reported like the --holdout runs)
    extrapolate: list[int] = field(default_factory=lambda: [512, 1024])  # wider models to predict (not trained)
    branch_steps: list[int] = field(default_factory=list)  # run lengths in optimizer steps; empty: the config's
    seeds: int = 2  # runs with train.seed, train.seed + 1, ... at the `seed_widths` smallest ladder widths
    seed_widths: int = 2
    forms: list[str] = field(default_factory=lambda: list(LAW_FORMS))  # candidate laws (flm.mup.laws)
    huber_delta: float = 1e-3  # Huber threshold on log-loss residuals (Besiroglu et al. 2024)
    bootstrap: int = 200  # bootstrap replicates (widths, then seed-runs, drawn with replacement), seeded by train.seed
    interval: float = 0.8  # central interval of the bootstrap printed for every prediction
    # `flm predict --holdout` also trains, to check the predictions: widths whose N is about each factor x the
    # widest fitted N, evaluated at `holdout_steps` (empty: the longest branch), and `longer_steps` (empty: twice the
    # longest branch) branched off the widest fitted width's first run (D beyond the fit at a fitted N).
    holdout_factors: list[float] = field(default_factory=lambda: [4.0, 8.0])
    holdout_steps: list[int] = field(default_factory=list)
    longer_steps: list[int] = field(default_factory=list)
    # Growth model: runs that grow width `w // growth_ratio` -> `w` (heads and FFN with it, `growth_operator`,
    # masks ramped over `growth_ramp` of the grown stage, LR carried on: lr_at_growth "continue") after each of
    # `growth_fractions` of `growth_steps` steps (0: the longest branch), for each w of `growth_widths`; eta of
    # D_eff = D_after + eta * D_before is fitted on them. --holdout adds the same runs at `growth_holdout` widths
    # (empty: the widest fitted width) and the config's own [[stages]], predicted and compared.
    growth_widths: list[int] = field(default_factory=list)
    growth_fractions: list[float] = field(default_factory=lambda: [0.5, 0.75])
    growth_ratio: int = 2
    growth_steps: int = 0
    growth_holdout: list[int] = field(default_factory=list)
    growth_operator: str = "msg"
    growth_ramp: float = 0.1
    keep_checkpoints: bool = False  # keep every trunk checkpoint of a finished run (default: only the newest)

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
        _require(self.holdout >= 0, f"mup.holdout must be >= 0, got {self.holdout}")
        _require(len(self.ladder) - self.holdout >= 3,
                 f"mup.ladder needs at least 3 widths left for the fit after holding out {self.holdout}")
        _require(all(t > 0 for t in self.branch_steps + self.holdout_steps + self.longer_steps),
                 "mup.branch_steps, holdout_steps and longer_steps must hold positive step counts")
        _require(self.seeds >= 1 and self.seed_widths >= 0, "mup.seeds must be >= 1 and mup.seed_widths >= 0")
        _require(bool(self.forms) and all(f in LAW_FORMS for f in self.forms),
                 f"mup.forms must be a non-empty list of {LAW_FORMS}, got {self.forms}")
        _require(self.huber_delta > 0, f"mup.huber_delta must be positive, got {self.huber_delta}")
        _require(self.bootstrap >= 2, f"mup.bootstrap must be at least 2, got {self.bootstrap}")
        _require(0 < self.interval < 1, f"mup.interval must be in (0, 1), got {self.interval}")
        _require(all(f > 1 for f in self.holdout_factors), "mup.holdout_factors must be > 1")
        _require(all(0 < f < 1 for f in self.growth_fractions), "mup.growth_fractions must be in (0, 1)")
        _require(all(w > 0 for w in self.growth_widths + self.growth_holdout), "mup.growth widths must be positive")
        _require(self.growth_ratio >= 2, f"mup.growth_ratio must be >= 2, got {self.growth_ratio}")
        _require(self.growth_steps >= 0, f"mup.growth_steps must be >= 0, got {self.growth_steps}")
        _require(self.growth_operator in OPERATORS,
                 f"mup.growth_operator must be one of {OPERATORS}, got {self.growth_operator!r}")
        _require(0 < self.growth_ramp <= 1, f"mup.growth_ramp must be in (0, 1], got {self.growth_ramp}")
