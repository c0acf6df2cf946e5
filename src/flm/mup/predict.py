"""Loss prediction (μScaling, REFERENCE.md §3, §9): fit L(N, D) on a ladder of widths x token counts, with
bootstrap intervals, checked on held-out runs; and a model of what growth buys (docs/mup.md).

The plan of runs (all with the config's transferred hyperparameters, the same data in the same order):
- the ladder: every width of mup.ladder, each evaluated at every length of mup.branch_steps (WSD: one run per
  width, decays branched off its stable phase, flm.mup.ladder), mup.seeds seeds at the mup.seed_widths smallest;
- growth runs (mup.growth_widths): one growth w / growth_ratio -> w after each of mup.growth_fractions;
- with --holdout: widths at mup.holdout_factors x the widest fitted N (evaluated at mup.holdout_steps), longer
  D than any fitted (mup.longer_steps, branched off the widest fitted width's run), the growth recipe at
  mup.growth_holdout widths and the config's [[stages]].

Then every form of mup.forms is fitted (flm.mup.laws: Huber on log-loss residuals, a grid of starts) on the
fitted widths' points and scored by leave-one-width-out cross-validation; the best (lowest root mean square
relative error on the left-out widths, among the forms that predict at every D) is bootstrapped (widths, then
seed-runs, drawn with replacement; B = mup.bootstrap) and eta is fitted on the growth runs (in every replicate
too). Every prediction is printed with its central mup.interval interval for one run (the replicates times one
run's own scatter, measured on the seed-runs: laws.run_noise), and so is the gain over the widest fitted point
(its predicted loss minus the point's, per replicate). The JSON's "law" section is what `flm plan --predict`
reads (flm.plan.predict evaluates it without numpy). `--from` refits a finished measurement's runs (its JSON)
without training.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.optimize import least_squares

from flm.config import Config, StageConfig
from flm.data import load_prepared
from flm.errors import FlmError
from flm.files import read_json_report
from flm.model import flops_per_token, non_embedding_params
from flm.mup import laws
from flm.mup.ladder import branch_plan, branch_results, run_folder, whole_run
from flm.mup.report import NAMES, figure, markdown_table, write_outputs
from flm.mup.runs import at_width, quiet
from flm.train import Trainer
from flm.train.schedule import plan_stages
from flm.train.trainer import resolve_model_config

LAW_VERSION = 1


# ---- the old single-variable law (kept: the n_only form is the same law) ----------------------------------
@dataclass(frozen=True)
class PowerLaw:
    """L(x) = a·(x / x0)^b + c; x0 (the smallest fitted x) only keeps the fit well conditioned."""

    a: float
    b: float
    c: float
    x0: float

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.a * (np.asarray(x, dtype=float) / self.x0) ** self.b + self.c

    def formula(self) -> str:
        return f"L(N) = {self.a:.4g}·(N / {self.x0:.4g})^{self.b:.4g} + {self.c:.4g}"


def fit_power_law(x: list[float], y: list[float]) -> PowerLaw:
    """Least squares with a >= 0, -3 <= b <= 0, 0 <= c <= min(y) (scipy's trust-region reflective solver)."""
    if len(x) < 3:
        raise FlmError(f"a power law with an offset needs at least 3 points, got {len(x)}")
    x0 = min(x)
    xs, ys = np.asarray(x, dtype=float) / x0, np.asarray(y, dtype=float)
    c0 = 0.9 * ys.min()
    p0 = (max(ys.max() - c0, 1e-3), -0.5, c0)
    fit = least_squares(lambda q: q[0] * xs ** q[1] + q[2] - ys, p0,
                        bounds=([0.0, -3.0, 0.0], [np.inf, 0.0, ys.min()]), xtol=1e-15, ftol=1e-15, gtol=1e-15)
    a, b, c = fit.x
    return PowerLaw(float(a), float(b), float(c), x0)


# ---- the plan of runs --------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    name: str
    kind: str  # "ladder", "holdout" (a held-out width), "growth" (fits eta), "growth_holdout", "staged"
    cfg: Config
    width: int  # the (final) width
    seed: int
    lengths: list[int] | None = None  # single-stage runs: evaluated after each of these many steps
    fraction: float | None = None  # growth runs: share of the steps before the growth


def width_counts(cfg: Config, width: int, data) -> tuple[int, float]:
    """(N, training FLOPs per token) of the config's family at `width`: what the laws are fitted in."""
    model = resolve_model_config(at_width(cfg, width, "mup" if cfg.model.mup else "sp").model, data)
    return non_embedding_params(model), flops_per_token(model, cfg.train.seq_len)


def width_for(cfg: Config, target: float, data, widest: int) -> int:
    """The multiple of head_dim whose N is nearest `target` (in log)."""
    step = cfg.model.head_dim
    best = min(range(step, 64 * widest + step, step), key=lambda w: abs(math.log(width_counts(cfg, w, data)[0] / target)))
    return best


def growth_config(cfg: Config, width: int, fraction: float, steps: int, p: str) -> Config:
    """Grow width // growth_ratio -> width after `fraction` of `steps` steps (heads and FFN with the width)."""
    m, tc = cfg.mup, cfg.train
    head = cfg.model.head_dim
    source = max(head, (width // m.growth_ratio) // head * head)
    if source >= width:
        raise FlmError(f"mup.growth_widths: width {width} has no narrower source at head dim {head}")
    before = max(1, round(fraction * steps))
    after = steps - before
    if after < 1:
        raise FlmError(f"a growth after {fraction} of {steps} steps leaves no steps for the grown model")
    base = at_width(cfg, source, p)
    layers = cfg.model.n_layers
    stages = [StageConfig(name=f"{layers}x{source}", tokens=before * tc.tokens_per_step),
              StageConfig(name=f"{layers}x{width}", d_model=width, n_heads=width // head,
                          tokens=after * tc.tokens_per_step, operator=m.growth_operator, warmup_steps=0,
                          lr_at_growth="continue", ramp_steps=max(1, round(m.growth_ramp * after)))]
    out = dataclasses.replace(base, stages=stages)
    out.validate()
    return out


def run_plan(cfg: Config, holdout: bool, data) -> tuple[list[RunSpec], dict[str, Any]]:
    """Every run `flm predict` needs (checked before any training), and what they were planned from."""
    m, tc = cfg.mup, cfg.train
    p = "mup" if cfg.model.mup else "sp"
    ladder = sorted(m.ladder)
    fitted = ladder[:len(ladder) - m.holdout]
    total = plan_stages(cfg, resolve_model_config(cfg.model, data))[-1].end if cfg.stages else tc.max_steps
    base = sorted(set(m.branch_steps)) or [total]
    longest = max(base)
    hold_steps = sorted(set(m.holdout_steps)) or [longest]
    longer = [t for t in sorted(set(m.longer_steps)) or [2 * longest] if t not in base]
    specs: list[RunSpec] = []
    for i, width in enumerate(ladder):
        for k in range(m.seeds if i < m.seed_widths else 1):
            run = at_width(cfg, width, p)
            run = dataclasses.replace(run, train=dataclasses.replace(run.train, seed=tc.seed + k))
            lengths = base + (longer if holdout and width == fitted[-1] and k == 0 else [])
            specs.append(RunSpec(f"w{width}-s{k}", "ladder", run, width, k, lengths))
    info: dict[str, Any] = {"branch_steps": base, "fitted_widths": fitted, "ladder_holdout_widths": ladder[len(fitted):],
                            "holdout_steps": hold_steps if holdout else [], "longer_steps": longer if holdout else [],
                            "holdout_widths": []}
    if holdout:
        n_max = width_counts(cfg, fitted[-1], data)[0]
        for factor in m.holdout_factors:
            width = width_for(cfg, factor * n_max, data, fitted[-1])
            if width in ladder or width in info["holdout_widths"]:
                continue
            info["holdout_widths"].append(width)
            specs.append(RunSpec(f"w{width}-s0", "holdout", at_width(cfg, width, p), width, 0, hold_steps))
    if m.growth_widths:
        g_steps = m.growth_steps or longest
        info["growth_steps"] = g_steps
        kinds = [("growth", m.growth_widths)]
        if holdout:
            kinds.append(("growth_holdout", [w for w in (m.growth_holdout or [fitted[-1]]) if w not in m.growth_widths]))
        for kind, widths in kinds:
            for width in sorted(widths):
                for f in m.growth_fractions:
                    specs.append(RunSpec(f"grow-w{width}-f{f:g}", kind, growth_config(cfg, width, f, g_steps, p),
                                         width, 0, fraction=f))
    if holdout and cfg.stages:
        specs.append(RunSpec("staged", "staged", cfg, cfg.stage_models()[-1].d_model, 0))
    return specs, info


# ---- projecting the time --------------------------------------------------------------------------------------
def run_steps(spec: RunSpec, data) -> tuple[dict[tuple, int], int]:
    """Optimizer steps a run trains at each shape (n_layers, d_model, n_heads), and its evaluations. A WSD run:
    its trunk to the last branch start, then every branch's decay; cosine: every length; a staged run: its stages."""
    tc = spec.cfg.train
    if spec.lengths is not None:
        shape = (spec.cfg.model.n_layers, spec.cfg.model.d_model, spec.cfg.model.n_heads)
        plan = branch_plan(spec.cfg, spec.lengths)
        steps = (max(b.start for b in plan) + sum(b.decay_steps for b in plan) if tc.schedule == "wsd"
                 else sum(b.steps for b in plan))
        return {shape: steps}, len(plan)
    out: dict[tuple, int] = {}
    for st in plan_stages(spec.cfg, resolve_model_config(spec.cfg.model, data)):
        key = (st.model.n_layers, st.model.d_model, st.model.n_heads)
        out[key] = out.get(key, 0) + st.steps * st.grad_accum
    return out, 1


def measure_shape(cfg: Config, shape: tuple, folder: Path) -> tuple[float, float, float]:
    """Seconds per optimizer step (the mean of 3 after one untimed, and the fastest of the 3: what an unshared
    machine gives) and per evaluation, at this shape."""
    layers, width, heads = shape
    model = dataclasses.replace(cfg.model, n_layers=layers, d_model=width, n_heads=heads, d_ff=None)
    run = dataclasses.replace(cfg, model=model, stages=[],
                              train=dataclasses.replace(cfg.train, run_dir=str(folder), max_steps=8, warmup_steps=1,
                                                        schedule="cosine"))
    with Trainer(run, log=quiet, guard=False) as trainer:
        trainer.train_step()[0].item()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            trainer.train_step()[0].item()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.evaluate()
        return sum(times) / 3, min(times), time.perf_counter() - t0


def projection(cfg: Config, holdout: bool, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The runs `flm predict` would train, their steps, and the time projected from measured step times (no
    training beyond 4 steps per shape; finished runs in the output folder are not subtracted)."""
    data = load_prepared(Path(cfg.data.dir))
    specs, info = run_plan(cfg, holdout, data)
    counted = [(spec, *run_steps(spec, data)) for spec in specs]
    shapes = sorted({k for _, steps, _ in counted for k in steps})
    timing = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, shape in enumerate(shapes):
            timing[shape] = measure_shape(cfg, shape, Path(tmp) / f"m{i}")
            log(f"{shape[0]} x {shape[1]}: {timing[shape][0]:.3f} s per step (fastest {timing[shape][1]:.3f}), "
                f"{timing[shape][2]:.3f} s per evaluation")
    rows, total, fastest = [], 0.0, 0.0
    for spec, steps, evals in counted:
        last = max(steps, key=lambda k: k[1])
        seconds = sum(n * timing[k][0] for k, n in steps.items()) + evals * timing[last][2]
        quick = sum(n * timing[k][1] for k, n in steps.items()) + evals * timing[last][2]
        total, fastest = total + seconds, fastest + quick
        rows.append({"name": spec.name, "kind": spec.kind, "steps": sum(steps.values()), "evaluations": evals,
                     "lengths": spec.lengths, "seconds": seconds, "seconds_fastest": quick})
        log(f"  {spec.name:<22} {spec.kind:<15} {sum(steps.values()):>7,} steps, {evals} evaluation(s): "
            f"{seconds / 60:7.1f} min ({quick / 60:.1f} at the fastest steps)")
    log(f"projected: {total / 3600:.2f} h for {len(specs)} runs at the mean step times, {fastest / 3600:.2f} h at the "
        f"fastest ({torch.get_num_threads()} torch threads; the fits and the bootstrap add a minute or two)")
    return {"plan": info, "runs": rows, "seconds": total, "seconds_fastest": fastest,
            "step_seconds": {f"{k[0]}x{k[1]}": v[0] for k, v in timing.items()}}


# ---- running ------------------------------------------------------------------------------------------------
def _stage_tokens(cfg: Config, data) -> tuple[Any, int, int]:
    """The final stage's model and the tokens trained before its growth and in it."""
    stages = plan_stages(cfg, resolve_model_config(cfg.model, data))
    per_step = cfg.train.batch_size * cfg.train.seq_len
    before = sum(s.steps * s.grad_accum for s in stages[:-1]) * per_step
    return stages[-1].model, before, stages[-1].steps * stages[-1].grad_accum * per_step


def train_plan(cfg: Config, specs: list[RunSpec], info: dict[str, Any], data, root: Path,
               log: Callable[[str], None]) -> tuple[list[dict], list[dict], list[dict]]:
    """Train (or read back) every run; returns the ladder points, the growth runs and the run list. A point is
    fitted if it is a ladder run's at a fitted width and one of the branch lengths; all others are held out."""
    m, tc = cfg.mup, cfg.train
    points, growth, runs = [], [], []
    for spec in specs:
        folder = run_folder(root, spec.name, spec.cfg)
        if spec.lengths is not None:
            model = resolve_model_config(spec.cfg.model, data)
            n, fpt = non_embedding_params(model), flops_per_token(model, tc.seq_len)
            results = branch_results(spec.cfg, folder, spec.lengths, log, m.keep_checkpoints)
            runs.append({"name": spec.name, "kind": spec.kind, "width": spec.width, "seed": spec.seed,
                         "folder": str(folder), "seconds": sum(r["seconds"] for r in results.values()),
                         "cached": all(r["cached"] for r in results.values())})
            for steps in sorted(results):
                r = results[steps]
                if not math.isfinite(r["val_loss"]):
                    raise FlmError(f"the {spec.name} run diverged (by {steps} steps): lower train.lr")
                fitted = spec.kind == "ladder" and spec.width in info["fitted_widths"] and steps in info["branch_steps"]
                role = "fit" if fitted else "held out"
                points.append({"width": spec.width, "seed": spec.seed, "run": spec.name, "kind": spec.kind,
                               "steps": steps, "tokens": r["tokens"], "params": n, "flops": fpt * r["tokens"],
                               "val_loss": r["val_loss"], "role": role})
        else:
            result = whole_run(spec.cfg, folder, log)
            if not math.isfinite(result["val_loss"]):
                raise FlmError(f"the {spec.name} run diverged: lower train.lr")
            final, before, last = _stage_tokens(spec.cfg, data)
            growth.append({"name": spec.name, "run": spec.name, "kind": spec.kind, "width": spec.width,
                           "fraction": spec.fraction if spec.fraction is not None else before / (before + last),
                           "stages": [f"{s.n_layers}x{s.d_model}" for s in spec.cfg.stage_models()],
                           "params": non_embedding_params(final), "flops_per_token": flops_per_token(final, tc.seq_len),
                           "tokens_before": before, "tokens_last": last, "tokens": before + last,
                           "val_loss": result["val_loss"]})
            runs.append({"name": spec.name, "kind": spec.kind, "width": spec.width, "seed": spec.seed,
                         "folder": str(folder), "seconds": result["seconds"], "cached": result["cached"]})
    return points, growth, runs


# ---- predictions with intervals -----------------------------------------------------------------------------
class Predictor:
    """The best fit, its bootstrap replicates and eta: every prediction as (point, low, high).

    The intervals are for what is measured: each replicate's expected loss times exp(eps), eps ~ Normal(0,
    noise / sqrt(runs)) (laws.run_noise, the seed-to-seed scatter; `runs` seed-runs averaged, one by default),
    drawn once per replicate from `seed`; a gain's reference is the mean of `ref_runs` runs. With noise 0 they
    are the intervals of the expected loss."""

    def __init__(self, fit: laws.Fit, boot: laws.Bootstrap, eta: float | None, level: float, noise: float = 0.0,
                 seed: int = 0, ref_runs: int = 1):
        self.fit, self.eta, self.level, self.noise, self.ref_runs = fit, eta, level, noise, ref_runs
        self.reps = [laws.Fit(fit.form, theta, fit.scales, 0.0, fit.at_d) for theta in boot.thetas]
        self.rep_etas = boot.etas
        rng = np.random.default_rng(seed)
        self.z, self.z_ref = rng.standard_normal(len(self.reps)), rng.standard_normal(len(self.reps))

    def scatter(self, runs: int, z: np.ndarray | None = None) -> np.ndarray:
        """exp(eps) per replicate for the mean of `runs` runs."""
        return np.exp(self.noise / math.sqrt(runs) * (self.z if z is None else z))

    def samples(self, n: float, d: float, c: float) -> np.ndarray:
        return np.array([float(r.predict(n, d, c)[0]) for r in self.reps])

    def loss(self, n: float, d: float, c: float, runs: int = 1) -> dict[str, float]:
        point = float(self.fit.predict(n, d, c)[0])
        lo, hi = laws.interval((self.samples(n, d, c) * self.scatter(runs)).tolist(), self.level)
        return {"predicted": point, "low": lo, "high": hi}

    def gain(self, ref: tuple[float, float, float], n: float, d: float, c: float, runs: int = 1) -> dict[str, float]:
        point = float(self.fit.predict(*ref)[0] - self.fit.predict(n, d, c)[0])
        values = (self.samples(*ref) * self.scatter(self.ref_runs, self.z_ref)
                  - self.samples(n, d, c) * self.scatter(runs))
        lo, hi = laws.interval(values.tolist(), self.level)
        return {"predicted_gain": point, "gain_low": lo, "gain_high": hi}

    def growth(self, row: dict) -> dict[str, float]:
        g = laws.GrowthPoints.of([row])
        point = float(laws.growth_predict(self.fit, self.eta, g)[0])
        etas = self.rep_etas or [self.eta] * len(self.reps)
        values = [float(laws.growth_predict(r, e, g)[0] * s) for r, e, s in zip(self.reps, etas, self.scatter(1))]
        lo, hi = laws.interval(values, self.level)
        return {"predicted": point, "low": lo, "high": hi}


def _check(row: dict, pred: dict) -> dict:
    """Errors and coverage of a measured point against its prediction."""
    out = {**pred, "rel_error": (pred["predicted"] - row["val_loss"]) / row["val_loss"],
           "covered": pred["low"] <= row["val_loss"] <= pred["high"]}
    if "measured_gain" in row:
        out["gain_error"] = pred["predicted_gain"] - row["measured_gain"]
        out["gain_covered"] = pred["gain_low"] <= row["measured_gain"] <= pred["gain_high"]
    return out


def law_document(cfg: Config, fit: laws.Fit, pred: Predictor, ref: dict, fit_pts: laws.Points,
                 growth_recipe: dict | None, data) -> dict[str, Any]:
    """What `flm plan --predict` reads: the best law, its replicates, eta, and what N, D and C mean."""
    reps = [{"params": r.params, **({"eta": e} if e is not None else {})}
            for r, e in zip(pred.reps, pred.rep_etas or [None] * len(pred.reps))]
    return {"version": LAW_VERSION, "form": fit.form.name, "formula": fit.form.formula, "params": fit.params,
            "scales": dataclasses.asdict(fit.scales), "at_tokens": fit.at_d, "interval": pred.level,
            "replicates": reps,
            "growth": None if pred.eta is None else {"eta": pred.eta, "definition": "D_eff = D_last + eta * D_before",
                                                     "recipe": growth_recipe},
            "reference": ref,
            "fitted": {"params": [float(fit_pts.n.min()), float(fit_pts.n.max())],
                       "tokens": [float(fit_pts.d.min()), float(fit_pts.d.max())]},
            "n": "non-embedding parameters (flm.model.non_embedding_params)",
            "c": "training FLOPs: flm.model.flops_per_token(shape, seq_len) x tokens",
            "seq_len": cfg.train.seq_len,
            "run_noise": pred.noise, "family": family(cfg, data)}


def settings(cfg: Config) -> dict[str, Any]:
    """What every run of a measurement was trained with (the JSON's first keys; a refit checks them)."""
    tc = cfg.train
    return {"parametrization": "mup" if cfg.model.mup else "sp", "lr": tc.lr, "init_std": cfg.model.init_std,
            "output_mult": cfg.model.output_mult,
            "schedule": {"name": tc.schedule, "decay_fraction": tc.decay_fraction, "decay_shape": tc.decay_shape,
                         "warmup_steps": tc.warmup_steps, "tokens_per_step": tc.tokens_per_step}}


# What a report adds to a measured point or growth run (_check, the gains, the scratch bounds): dropped on a refit.
PREDICTED_KEYS = frozenset({"predicted", "low", "high", "predicted_gain", "gain_low", "gain_high", "rel_error",
                            "covered", "measured_gain", "gain_error", "gain_covered", "as_scratch_all_tokens",
                            "as_scratch_final_tokens"})


def measured(path: Path, cfg: Config, data) -> tuple[list[dict], list[dict], list[dict], dict, bool]:
    """The runs an earlier `flm predict` measured (its predict.json: points, growth runs, runs, plan, held out or
    not), without what was predicted of them: a refit tries other forms, bootstrap or interval on a finished
    measurement. Refused when this config would have trained other runs (hyperparameters, schedule, shapes)."""
    doc = read_json_report(path)
    keys = ("points", "growth_runs", "runs", "plan", "holdout", "law")
    if (not isinstance(doc, dict) or any(k not in doc for k in keys) or not isinstance(doc["points"], list)
            or not isinstance(doc["law"], dict)):
        raise FlmError(f"{path} is not the predict.json of `flm predict`")
    mine = {**settings(cfg), "family": family(cfg, data), "seq_len": cfg.train.seq_len}
    theirs = {**doc, "family": doc["law"].get("family"), "seq_len": doc["law"].get("seq_len")}
    for key, value in mine.items():
        if theirs.get(key) != value:
            raise FlmError(f"{path} was measured with {key} {theirs.get(key)}, this config has {value}: refit it with "
                           "the config it was measured with")

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in PREDICTED_KEYS} for r in rows]

    return strip(doc["points"]), strip(doc["growth_runs"]), doc["runs"], doc["plan"], bool(doc["holdout"])


def family(cfg: Config, data) -> dict[str, Any]:
    """The shape family the ladder's widths share (what `flm plan --predict` warns about when it differs)."""
    model = resolve_model_config(cfg.model, data)
    return {"n_layers": model.n_layers, "head_dim": model.head_dim, "vocab_size": model.vocab_size,
            "arch": getattr(model, "arch", "flm"), "mup": model.mup}


def predict(cfg: Config, holdout: bool = False, log: Callable[[str], None] = print,
            source: Path | None = None) -> dict[str, Any]:
    """Train the plan's runs (reusing finished ones) and fit; or, with `source` (an earlier predict.json), refit
    that measurement's runs without training."""
    m, tc = cfg.mup, cfg.train
    data = load_prepared(Path(cfg.data.dir))
    if source is None:
        specs, info = run_plan(cfg, holdout, data)
        n_branches = sum(len(s.lengths) for s in specs if s.lengths is not None)
        log(f"{len(specs)} runs ({n_branches} evaluation points from {sum(s.lengths is not None for s in specs)} "
            f"single-stage runs, {sum(s.lengths is None for s in specs)} growth runs) in {Path(m.out_dir) / 'runs'}")
        points, growth_rows, runs = train_plan(cfg, specs, info, data, Path(m.out_dir) / "runs", log)
    else:
        points, growth_rows, runs, info, measured_holdout = measured(source, cfg, data)
        if holdout and not measured_holdout:
            raise FlmError(f"{source} was measured without --holdout: it has no held-out runs to check")
        holdout = measured_holdout
        log(f"refitting the {len(points)} points and {len(growth_rows)} growth runs measured in {source} (no training)")
    notes = []
    fit_rows = [r for r in points if r["role"] == "fit"]
    fit_pts = laws.Points.of(fit_rows)
    n_widths = len(set(fit_pts.width.tolist()))
    span = float(fit_pts.n.max() / fit_pts.n.min())
    if n_widths < 5 or span < 8:
        notes.append(f"the fit has {n_widths} widths spanning {span:.1f}x in N (a budget wants >= 5 widths over >= 8x)")
    single_d = len(set(fit_pts.d.tolist())) == 1

    forms: dict[str, Any] = {}
    fits: dict[str, laws.Fit] = {}
    for name in m.forms:
        form = laws.FORMS[name]
        problem = laws.can_fit(form, fit_pts)
        if problem:
            forms[name] = {"formula": form.formula, "skipped": problem}
            continue
        fit = laws.fit_form(form, fit_pts, delta=m.huber_delta)
        cv = laws.cross_validate(form, fit_pts, m.huber_delta, starts=fit.optima)
        fits[name] = fit
        forms[name] = {"formula": form.formula, "params": fit.params, "scales": dataclasses.asdict(fit.scales),
                       "at_tokens": fit.at_d, "cv": cv, "eligible": name != "n_only" or single_d}
    eligible = [k for k in fits if forms[k]["eligible"]]
    if not eligible:
        raise FlmError("no law could be fitted: " + "; ".join(f["skipped"] for f in forms.values() if "skipped" in f))
    scored = [k for k in eligible if math.isfinite(forms[k]["cv"]["rms_rel"])]
    if scored:
        best = min(scored, key=lambda k: forms[k]["cv"]["rms_rel"])
        log(f"best form by leave-one-width-out cross-validation: {best} ({laws.FORMS[best].formula}; "
            f"RMS relative error {100 * forms[best]['cv']['rms_rel']:.2f}%)")
    else:
        best = eligible[0]
        notes.append(f"no fold of the cross-validation could be fitted (too few widths): {best} is the first "
                     "fitted form of mup.forms, not the best by held-out error")
        log(f"form: {best} (first of mup.forms; too few widths to cross-validate)")
    fit = fits[best]

    growth_fit = [g for g in growth_rows if g["kind"] == "growth"]
    g_pts = laws.GrowthPoints.of(growth_fit) if growth_fit else None
    eta = None
    if g_pts is not None:
        if fit.at_d is not None:
            notes.append("the growth model needs a law in D (the best form holds at one D only): eta not fitted")
            g_pts = None
        else:
            eta = laws.fit_eta(fit, g_pts, m.huber_delta)
            if eta <= laws.ETA_BOUNDS[0] + 1e-6 or eta >= laws.ETA_BOUNDS[1] - 1e-6:
                notes.append(f"eta = {eta:g} sits at a bound of its range {laws.ETA_BOUNDS}: the growth model does not "
                             "describe these growth runs")
    boot = laws.bootstrap(fit, fit_pts, m.bootstrap, tc.seed, m.huber_delta, growth=g_pts)
    noise, noise_df = laws.run_noise(fit_pts)
    if noise_df == 0:
        notes.append("no width was trained with several seeds: the intervals hold the law's uncertainty only, not "
                     "a run's own scatter (mup.seeds >= 2 measures it)")

    # The reference: the widest fitted width at the longest fitted D (measured: the mean over its seed-runs).
    d_ref = float(fit_pts.d.max())
    n_ref = float(fit_pts.n.max())
    ref_rows = [r for r in fit_rows if r["params"] == n_ref and r["tokens"] == d_ref]
    ref = {"width": ref_rows[0]["width"], "params": n_ref, "tokens": d_ref, "flops": ref_rows[0]["flops"],
           "val_loss": float(np.mean([r["val_loss"] for r in ref_rows])), "runs": len(ref_rows),
           "predicted": float(fit.predict(n_ref, d_ref, ref_rows[0]["flops"])[0])}
    pred = Predictor(fit, boot, eta, m.interval, noise, tc.seed, len(ref_rows))
    ref_x = (n_ref, d_ref, ref["flops"])
    for r in points:
        if r["role"] != "fit":
            r["measured_gain"] = ref["val_loss"] - r["val_loss"]
        prediction = {**pred.loss(r["params"], r["tokens"], r["flops"]), **pred.gain(ref_x, r["params"], r["tokens"], r["flops"])}
        if math.isfinite(prediction["predicted"]):
            r.update(_check(r, prediction))
    for g in growth_rows:
        if eta is not None:
            g.update(_check(g, pred.growth(g)))
        # without eta: the two bounds, as if scratch on the final stage's tokens only (eta 0) or on all (eta 1)
        for name, e in (("as_scratch_all_tokens", 1.0), ("as_scratch_final_tokens", 0.0)):
            value = laws.growth_predict(fit, e, laws.GrowthPoints.of([g]))[0] if fit.at_d is None else math.nan
            g[name] = float(value)

    extrapolated = []
    for width in m.extrapolate:
        n, fpt = width_counts(cfg, width, data)
        c = fpt * d_ref
        extrapolated.append({"width": width, "params": n, "tokens": d_ref, "flops": c, **pred.loss(n, d_ref, c),
                             **pred.gain(ref_x, n, d_ref, c)})

    at_d = fixed_d_gains(fit_pts, points, pred, m.bootstrap, m.huber_delta, tc.seed,
                         [(r["width"], r["params"], r["flops"] / d_ref) for r in extrapolated])

    recipe = None
    if m.growth_widths:
        recipe = {"ratio": m.growth_ratio, "operator": m.growth_operator, "ramp": m.growth_ramp,
                  "lr_at_growth": "continue", "schedule": tc.schedule, "fractions": m.growth_fractions,
                  "widths": m.growth_widths}
    held = [r for r in points if r["role"] != "fit"] + [g for g in growth_rows if g["kind"] != "growth" and "rel_error" in g]
    out = {**settings(cfg), "plan": info, "holdout": holdout, "runs": runs, "points": points,
           "growth_runs": growth_rows, "forms": forms, "best": best, "eta": eta,
           "eta_interval": list(laws.interval(boot.etas, m.interval)) if boot.etas else None,
           "bootstrap": {"replicates": m.bootstrap, "redraws": boot.redraws, "seed": tc.seed, "interval": m.interval},
           "run_noise": {"sigma": noise, "df": noise_df},
           "reference": ref, "extrapolated": extrapolated, "fixed_d": at_d, "notes": notes,
           "summary": summarize(held, m.interval),
           "law": law_document(cfg, fit, pred, ref, fit_pts, recipe, data)}
    return out


def fixed_d_gains(fit_pts: laws.Points, points: list[dict], joint: Predictor, replicates: int, delta: float,
                  seed: int, extrapolate: list[tuple[int, float, float]]) -> list[dict[str, Any]]:
    """The gain of width at a D the ladder measured, read from that D's points alone.

    At each fitted D: L = E + A·(N/n0)^-alpha (n_only) fitted on the points at that D (Huber `delta`), its
    bootstrap (`replicates`: widths, then seed-runs) and one run's scatter as in the joint law; the gain is over the widest fitted width at the same D
    (the mean of its seed-runs). Why: a joint L(N, D) ties the N-slope at one D to the slopes at the others, and on
    this ladder the slope in N steepens with D, which the joint forms bend too little; a question asked at a
    measured D ("is 4x the width worth it at my token count?") needs no D term. Every held-out point at that D
    and every `extrapolate` width (width, N, FLOPs per token) is predicted by both laws, the joint law against the
    same reference."""
    form = laws.FORMS["n_only"]
    scales = fit_pts.scales()
    out = []
    for d in sorted(set(fit_pts.d.tolist())):
        sub = fit_pts.take(np.isclose(fit_pts.d, d, rtol=1e-9))
        if laws.can_fit(form, sub):
            continue
        fit = laws.fit_form(form, sub, scales, delta)
        boot = laws.bootstrap(fit, sub, replicates, seed, delta)
        n_ref = float(sub.n.max())
        ref_loss = sub.loss[sub.n == n_ref]
        ref_x = (n_ref, d, float(sub.c[sub.n == n_ref][0]))
        pred = Predictor(fit, boot, None, joint.level, joint.noise, seed, len(ref_loss))
        joint_at = copy.copy(joint)
        joint_at.ref_runs = len(ref_loss)
        rows = []
        held = [(r["width"], r["seed"], r["params"], r["flops"], r["val_loss"]) for r in points
                if r["role"] != "fit" and math.isclose(r["tokens"], d, rel_tol=1e-9)]
        held += [(w, None, n, fpt * d, None) for w, n, fpt in extrapolate if w not in {h[0] for h in held}]
        for width, seed_k, n, c, loss in held:
            row = {"width": width, "seed": seed_k, "params": n, "val_loss": loss,
                   "measured_gain": None if loss is None else float(ref_loss.mean()) - loss,
                   **pred.loss(n, d, c), **pred.gain(ref_x, n, d, c),
                   "joint": {**joint_at.loss(n, d, c), **joint_at.gain(ref_x, n, d, c)}}
            if loss is not None:
                row.update(_check(row, {k: row[k] for k in ("predicted", "low", "high", "predicted_gain", "gain_low",
                                                             "gain_high")}))
                row["joint"].update(_check(row, row["joint"]))
            rows.append(row)
        out.append({"tokens": d, "formula": form.formula, "params": fit.params, "scales": dataclasses.asdict(scales),
                    "reference": {"width": int(sub.width[sub.n == n_ref][0]), "params": n_ref,
                                  "val_loss": float(ref_loss.mean()), "runs": len(ref_loss)},
                    "replicates": [{"params": r.params} for r in pred.reps], "redraws": boot.redraws, "points": rows})
    return out


def summarize(held: list[dict], level: float) -> dict[str, Any]:
    """Over the held-out checks: the largest loss error, the coverage of the intervals."""
    if not held:
        return {}
    covered = [r["covered"] for r in held]
    out = {"points": len(held), "max_abs_rel_error": max(abs(r["rel_error"]) for r in held),
           "covered": sum(covered), "interval": level}
    gains = [r for r in held if "gain_error" in r]
    if gains:
        out["max_abs_gain_error"] = max(abs(r["gain_error"]) for r in gains)
        out["gain_covered"] = sum(r["gain_covered"] for r in gains)
        out["gain_points"] = len(gains)
    return out


# ---- the report ----------------------------------------------------------------------------------------------
def _f(x: float | None, spec: str = ".4f") -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _pct(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else f"{100 * x:+.2f}%"


def _interval(r: dict, lo: str = "low", hi: str = "high") -> str:
    return f"[{r[lo]:.4f}, {r[hi]:.4f}]" if lo in r else ""


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What the command prints: the forms, the best law, the held-out checks, eta, the extrapolations."""
    level = round(100 * result["bootstrap"]["interval"])
    lines = ["form         CV RMS rel. error  widest left out  parameters"]
    for name, f in result["forms"].items():
        if "skipped" in f:
            lines.append(f"{name:<12} skipped: {f['skipped']}")
            continue
        cv = f["cv"]
        params = ", ".join(f"{k} {v:.4g}" for k, v in f["params"].items())
        mark = " <- best" if name == result["best"] else ("" if f["eligible"] else " (one D only)")
        lines.append(f"{name:<12} {100 * cv['rms_rel']:>16.2f}%  {_pct(cv['widest_left_out']):>15}  {params}{mark}")
    ref = result["reference"]
    lines.append(f"reference (widest fitted point): width {ref['width']}, N {ref['params']:,.0f}, D {ref['tokens']:,.0f}: "
                 f"measured {ref['val_loss']:.4f}, fitted {ref['predicted']:.4f}")
    held = [r for r in result["points"] if r["role"] != "fit" and "predicted" in r]
    if held:
        lines.append(f"held out: width  N  D  measured  predicted [{level}%]  error  covered  gain measured  "
                     f"gain predicted [{level}%]  gain error")
        for r in held:
            lines.append(f"  w{r['width']} N {r['params']:,} D {r['tokens']:,}: {r['val_loss']:.4f}  {r['predicted']:.4f} "
                         f"{_interval(r)}  {_pct(r['rel_error'])}  {'yes' if r['covered'] else 'NO'}  "
                         f"{r['measured_gain']:+.4f}  {r['predicted_gain']:+.4f} {_interval(r, 'gain_low', 'gain_high')}"
                         f"  {r['gain_error']:+.4f}")
    if result["eta"] is not None:
        lo, hi = result["eta_interval"]
        lines.append(f"growth model: D_eff = D_last + eta·D_before, eta = {result['eta']:.3f} [{level}%: {lo:.3f}, {hi:.3f}] "
                     f"fitted on {sum(g['kind'] == 'growth' for g in result['growth_runs'])} growth runs")
    for g in result["growth_runs"]:
        if "predicted" in g:
            lines.append(f"  {g['kind']} {' -> '.join(g['stages'])} f {g['fraction']:.2f}: measured {g['val_loss']:.4f}, "
                         f"predicted {g['predicted']:.4f} {_interval(g)} ({_pct(g['rel_error'])}, "
                         f"{'covered' if g['covered'] else 'NOT covered'})")
    for r in result["extrapolated"]:
        lines.append(f"width {r['width']} (N {r['params']:,}) at D {r['tokens']:,.0f}: predicted {r['predicted']:.4f} "
                     f"{_interval(r)}, gain over the reference {r['predicted_gain']:+.4f} "
                     f"{_interval(r, 'gain_low', 'gain_high')}")
    return lines + fixed_d_lines(result) + summary_tail(result)


def fixed_d_lines(result: dict[str, Any]) -> list[str]:
    """The gains of width at each measured D, by that D's own law and by the joint law (fixed_d_gains)."""
    level = round(100 * result["bootstrap"]["interval"])
    lines = []
    for g in result.get("fixed_d", []):
        ref = g["reference"]
        params = ", ".join(f"{k} {v:.4g}" for k, v in g["params"].items())
        lines.append(f"gain of width at D {g['tokens']:,.0f} over width {ref['width']} ({ref['val_loss']:.4f}, "
                     f"{ref['runs']} run{'s' * (ref['runs'] > 1)}), this D's law ({params}) and the joint law "
                     f"[{level}%]:")
        for r in g["points"]:
            measured = "" if r["measured_gain"] is None else f"measured {r['measured_gain']:+.4f}, "
            seed = "" if r["seed"] is None else f" seed {r['seed']}"
            lines.append(f"  w{r['width']}{seed}: {measured}this D {r['predicted_gain']:+.4f} "
                         f"{_interval(r, 'gain_low', 'gain_high')}, joint {r['joint']['predicted_gain']:+.4f} "
                         f"{_interval(r['joint'], 'gain_low', 'gain_high')}")
    return lines


def summary_tail(result: dict[str, Any]) -> list[str]:
    """The held-out checks in one line (with --holdout), then the notes."""
    level = round(100 * result["bootstrap"]["interval"])
    lines = []
    noise, ref = result.get("run_noise", {}), result["reference"]
    if noise.get("df"):
        spread = ref["val_loss"] * noise["sigma"] * math.sqrt(1 + 1 / ref.get("runs", 1))
        lines.append(f"one run's own scatter (seed to seed, pooled over {noise['df']} repeated points): "
                     f"{100 * noise['sigma']:.2f}% of its loss, in every interval; a measured gain over the "
                     f"reference scatters by {spread:.4f} (1 sd)")
    s = result["summary"]
    if s:
        lines.append(f"held-out checks: largest loss error {100 * s['max_abs_rel_error']:.2f}% (goal <= 2%), "
                     f"{s['covered']}/{s['points']} inside their {level}% interval"
                     + (f"; gains: largest error {s['max_abs_gain_error']:.4f}, {s['gain_covered']}/{s['gain_points']} "
                        "covered" if "gain_points" in s else ""))
    lines += [f"note: {n}" for n in result["notes"]]
    return lines


def write_report(result: dict[str, Any], out_dir: Path) -> list[Path]:
    level = round(100 * result["bootstrap"]["interval"])
    law = result["law"]
    rows = []
    for r in result["points"]:
        rows.append([str(r["width"]), str(r["seed"]), f"{r['params']:,}", f"{r['tokens']:,}", f"{r['val_loss']:.4f}",
                     _f(r.get("predicted")), _interval(r) if "predicted" in r else "", _pct(r.get("rel_error")),
                     {True: "yes", False: "no"}.get(r.get("covered"), "") if r["role"] != "fit" else "",
                     _f(r.get("measured_gain"), "+.4f"), _f(r.get("predicted_gain"), "+.4f") if r["role"] != "fit" else "",
                     r["role"]])
    form_rows = []
    for name, f in result["forms"].items():
        if "skipped" in f:
            form_rows.append([name, f["formula"], "", "", f["skipped"]])
        else:
            form_rows.append([name + (" (best)" if name == result["best"] else ""), f["formula"],
                              f"{100 * f['cv']['rms_rel']:.2f}%", _pct(f["cv"]["widest_left_out"]),
                              ", ".join(f"{k} {v:.4g}" for k, v in f["params"].items())])
    lines = [f"# Loss prediction L(N, D)\n\n{NAMES[result['parametrization']]}, lr {result['lr']:g}, init_std "
             f"{result['init_std']:g}, output_mult {result['output_mult']:g}; schedule {result['schedule']['name']} "
             f"(decay {result['schedule']['decay_fraction']:g}, {result['schedule']['decay_shape']}), "
             f"{result['schedule']['tokens_per_step']:,} tokens per step. N = non-embedding parameters, D = tokens.\n",
             "## Forms (Huber on log loss, δ as configured; best by leave-one-width-out cross-validation)\n",
             markdown_table(["form", "law", "CV RMS rel. error", "widest left out", "parameters"], form_rows), "",
             f"Best: **{result['best']}**, `{law['formula']}` with n0 = {law['scales']['n0']:,.0f}, "
             f"d0 = {law['scales']['d0']:,.0f}, c0 = {law['scales']['c0']:.4g}. Intervals: {level}% of "
             f"{result['bootstrap']['replicates']} bootstrap replicates (widths, then seed-runs, with replacement; "
             f"seed {result['bootstrap']['seed']}, {result['bootstrap']['redraws']} draws with too few widths "
             "redrawn), "
             "each times one run's own scatter (below), so that an interval is where one measured run should land.\n",
             "## Points\n",
             f"Gain = the reference's loss (width {result['reference']['width']} at D {result['reference']['tokens']:,.0f}) "
             "minus the point's.\n",
             markdown_table(["width", "seed", "N", "D", "val loss", "predicted", f"{level}% interval", "rel. error",
                             "covered", "gain measured", "gain predicted", "role"], rows), ""]
    if result["growth_runs"]:
        g_rows = [[g["kind"], " -> ".join(g["stages"]), f"{g['fraction']:.2f}", f"{g['tokens']:,}", f"{g['val_loss']:.4f}",
                   _f(g.get("predicted")), _interval(g) if "predicted" in g else "", _pct(g.get("rel_error")),
                   _f(g["as_scratch_all_tokens"]), _f(g["as_scratch_final_tokens"])] for g in result["growth_runs"]]
        lines += ["## Growth runs\n",
                  (f"eta = {result['eta']:.3f} ({level}% interval {result['eta_interval'][0]:.3f} - "
                   f"{result['eta_interval'][1]:.3f}) in D_eff = D_last + eta·D_before.\n" if result["eta"] is not None
                   else "eta not fitted.\n"),
                  markdown_table(["kind", "stages", "f", "D", "val loss", "predicted", f"{level}% interval", "rel. error",
                                  "as scratch, all tokens", "as scratch, final-stage tokens"], g_rows), ""]
    if result["extrapolated"]:
        lines += ["## Predicted only\n", markdown_table(
            ["width", "N", "D", "predicted", f"{level}% interval", "gain", f"gain {level}%"],
            [[str(r["width"]), f"{r['params']:,}", f"{r['tokens']:,.0f}", f"{r['predicted']:.4f}", _interval(r),
              f"{r['predicted_gain']:+.4f}", _interval(r, "gain_low", "gain_high")] for r in result["extrapolated"]]), ""]
    if result.get("fixed_d"):
        lines += ["## The gain of width at a measured D\n",
                  "Each D's own law, L = E + A·(N/n0)^-alpha fitted on that D's points alone (its own bootstrap and "
                  "the same run scatter), against the joint law; gain = the widest fitted width's loss at that D "
                  "(mean of its runs) minus the point's.\n"]
        for g in result["fixed_d"]:
            ref = g["reference"]
            params = ", ".join(f"{k} {v:.4g}" for k, v in g["params"].items())
            lines += [f"D {g['tokens']:,.0f}: {params}; reference width {ref['width']} ({ref['val_loss']:.4f}, "
                      f"{ref['runs']} run(s)).\n", markdown_table(
                          ["width", "seed", "N", "gain measured", "this D's law", f"{level}%", "error",
                           "joint law", f"{level}%", "error"],
                          [[str(r["width"]), "" if r["seed"] is None else str(r["seed"]), f"{r['params']:,}",
                            _f(r["measured_gain"], "+.4f"), f"{r['predicted_gain']:+.4f}",
                            _interval(r, "gain_low", "gain_high"), _f(r.get("gain_error"), "+.4f"),
                            f"{r['joint']['predicted_gain']:+.4f}", _interval(r["joint"], "gain_low", "gain_high"),
                            _f(r["joint"].get("gain_error"), "+.4f")] for r in g["points"]]), ""]
    tail = summary_tail(result)
    if tail:
        lines += ["## Summary\n"] + [f"- {line}" for line in tail]
    fig = plot(result)
    return write_outputs(out_dir, "predict", result, "\n".join(lines) + "\n", fig)


def law_fit(law: dict, params: dict | None = None) -> laws.Fit:
    """The fit a JSON law section describes (its own parameters, or a replicate's)."""
    form = laws.FORMS[law["form"]]
    theta = form.from_params(params or law["params"])
    return laws.Fit(form, theta, laws.Scales(**law["scales"]), 0.0, law["at_tokens"])


def plot(result: dict[str, Any]) -> Any:
    """Left: loss against N, one curve per fitted D with the longest D's interval band; measured points filled
    (fit) or open (held out), predictions of the held-out points with their intervals. Right: predicted against
    measured for every held-out point and growth run."""
    plt = figure()
    law = result["law"]
    fit = law_fit(law)
    reps = [law_fit(law, r["params"]) for r in law["replicates"]]
    level = result["bootstrap"]["interval"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    pts = result["points"]
    ns = [r["params"] for r in pts] + [r["params"] for r in result["extrapolated"]]
    grid = np.geomspace(min(ns), max(ns), 120)
    ds = sorted({r["tokens"] for r in pts})
    fpt = {r["params"]: r["flops"] / r["tokens"] for r in pts}
    fpt_grid = np.interp(np.log(grid), np.log(sorted(fpt)), [fpt[k] for k in sorted(fpt)])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(ds)))
    for d, color in zip(ds, colors):
        ys = fit.predict(grid, np.full_like(grid, d), fpt_grid * d)
        if np.all(np.isnan(ys)):
            continue
        ax.plot(grid, ys, "-", color=color, lw=1, label=f"fit, D = {d:,.0f}")
        if d == max(ds) or d == law["reference"]["tokens"]:
            band = np.array([r.predict(grid, np.full_like(grid, d), fpt_grid * d) for r in reps])
            tail = (1 - level) / 2
            ax.fill_between(grid, np.nanquantile(band, tail, axis=0), np.nanquantile(band, 1 - tail, axis=0),
                            color=color, alpha=0.15)
        for r in pts:
            if r["tokens"] != d:
                continue
            if r["role"] == "fit":
                ax.plot(r["params"], r["val_loss"], "o", color=color, ms=4)
            else:
                ax.plot(r["params"], r["val_loss"], "o", mfc="none", color=color, ms=8)
                if "predicted" in r:
                    ax.errorbar(r["params"] * 1.04, r["predicted"], yerr=[[r["predicted"] - r["low"]],
                                [r["high"] - r["predicted"]]], fmt="x", color=color, capsize=3)
    for r in result["extrapolated"]:
        ax.errorbar(r["params"], r["predicted"], yerr=[[r["predicted"] - r["low"]], [r["high"] - r["predicted"]]],
                    fmt="x", color="grey", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{result['best']}: {law['formula']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    checks = [(r, "held-out run") for r in pts if r["role"] != "fit" and "predicted" in r]
    checks += [(g, g["kind"]) for g in result["growth_runs"] if "predicted" in g]
    if checks:
        style = {"held-out run": ("o", "C0", "held-out run"), "growth": ("s", "C2", "growth run (in eta's fit)"),
                 "growth_holdout": ("D", "C3", "held-out growth run"), "staged": ("^", "C3", "config's [[stages]]")}
        seen = set()
        for r, kind in checks:
            marker, color, label = style.get(kind, ("o", "C0", kind))
            bx.errorbar(r["val_loss"], r["predicted"], yerr=[[r["predicted"] - r["low"]], [r["high"] - r["predicted"]]],
                        fmt=marker, capsize=3, color=color, label=None if kind in seen else label)
            seen.add(kind)
        lo = min(min(r["val_loss"], r["low"]) for r, _ in checks)
        hi = max(max(r["val_loss"], r["high"]) for r, _ in checks)
        line = np.array([lo, hi])
        bx.plot(line, line, "-", color="grey", lw=1)
        bx.fill_between(line, line * 0.98, line * 1.02, color="grey", alpha=0.12, label="±2%")
        bx.legend(fontsize=7)
    bx.set_xlabel("measured validation loss")
    bx.set_ylabel(f"predicted ({round(100 * level)}% interval)")
    held_any = any(kind != "growth" for _, kind in checks)
    bx.set_title("predicted against measured" + ("" if held_any else " (no held-out runs: --holdout trains them)"),
                 fontsize=9)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    return fig
