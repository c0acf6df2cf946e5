"""Late one-hop growth under a warmup-stable-decay (WSD) schedule against the best-tuned scratch run at 20 tokens
per parameter: does it save 2x compute or more?

REFERENCE.md §9: the one route reported above 2x at >= 20 tokens per parameter expands once, late (~0.8 of the
tokens), from a much smaller source, under WSD with the LR carried through the growth. A schedule cannot save more
than its bound, 1 / (1 - f(1 - r)) for one growth after a fraction f of the tokens from a source with r times the
final model's FLOPs per token: 2x needs f(1 - r) >= 1/2.

Design (the final model, corpus, accounting and caching are benchmarks/growth_horizon.py's, imported from it):
- Horizon H = 20 tokens per non-embedding parameter N of the final model (`--horizon`): the CPU preset's 4 x 64
  (N = 0.2M), `--preset gpu` its 12 x 512. Scratch trains the final model on H x N tokens; its training FLOPs
  (flm.model.flops_per_token, LM head included) are the budget B of every run.
- Scratch: the best of a cosine schedule and WSD, each with its peak rate bracketed. μP with the final width as
  base width throughout (scratch is standard parametrization), min_lr a tenth of the peak, the same warmup in every run (5% of
  scratch's steps; of half of them in a B/2 run).
- Growth arms, all under WSD (train.decay_fraction 0.2, `--decay-fraction`; shape `--decay-shape`), one growth
  after a fraction f in {1/2, 2/3, 4/5} (`--fractions`) of the arm's tokens, the grown stage starting its LR as
  `--lr-at-growth` says ("continue": on the run's schedule, no re-warm):
    stack-half     depth L/2 -> L, copied layers (operator stack, new_layers stack: whole-model stacking, G_stack)
    stack-quarter  depth L/4 -> L, likewise
    width-depth    d/2, heads/2, FFN/2, L/2 -> the final model in one event (operator msg, `--width-depth-operator`)
    msg-width      d/2, heads/2, FFN/2 -> the final model (operator msg, depth unchanged)
  Masks (msg; zero growing d_model) ramp in over 10% of the grown stage's steps; `--new-layers insert` interleaves
  the copies instead, `--copy-noise` perturbs them (G_stack: ~0.2 slightly better).
- Equal FLOPs: an arm spends the same B, f of its tokens on the source (a cheaper source trains more tokens):
  T = B / (f·F_source + (1 - f)·F_final) tokens, f·T before growth, the rest counted from the FLOPs left, so every
  arm's FLOPs are B within half a step of the final model. Its bound is its tokens over scratch's.
- Every (arm, f) brackets its peak rate on a factor-2 grid (growth_horizon's widening: the best is never at an
  edge), the f values of an arm one after another, each grid centred on the previous f's best. Each arm's best
  (f, rate) by first-seed final loss, and the better scratch schedule, then run with every seed (`--seeds`, 3).
- Figures of merit, per seed s against the best scratch run of seed s (final loss L_s, FLOPs B):
    saving (curve)     B / FLOPs the arm needs to reach L_s, interpolated on its validation curve; an arm that
                       never does gets (FLOPs scratch needs to reach the arm's final loss) / B, below 1
                       (growth_horizon's figures).
    final loss at B    at equal FLOPs, directly.
    bound, measured / bound.
  A point of the curve before the end is not a finished model (under WSD, before its decay; before the growth,
  the source): when the arm gets there late, in its decay, the curve saving is squeezed towards 1; when it gets
  there early, on the source, it can exceed what a run planned for that budget would reach (a B/2 run grows after
  fewer source tokens). Hence the direct test of 2x: each arm's best setting is also run at
  half the budget (B/2, same f and rate, every seed; `--no-half`), and "saving (finished runs)" is B / the FLOPs
  where the arm's finished runs reach L_s: read off the B/2 run's curve when it gets there (>= 2x), else
  interpolated in log FLOPs between the final losses of the B/2 and B runs (1x to 2x), else the below-1 figure.
  Reported: the geometric mean over seeds with min and max, and how many seeds reach L_s at B/2.
- `--extra-horizon 60` then runs the best arm (lowest mean final loss at B) and the better scratch schedule at ~60
  tokens per parameter too (rates bracketed again around their 20-token best, every seed, B/2 runs).

Where the bound allows 2x: the FLOPs ratios r (LM head included) are, for the CPU preset (vocabulary 2048 against
d_model 64: the head is a third of the final model's FLOPs), stack-half 0.67, stack-quarter 0.50, width-depth 0.27,
msg-width 0.38, so at f = 4/5 the bounds are 1.36x, 1.67x, 2.40x and 2.00x and at f = 2/3 1.29x, 1.50x, 1.95x,
1.72x: at this scale only width-depth (f >= 2/3) and msg-width (f = 4/5) can reach 2x at all. For the GPU preset
(r = 0.57, 0.36, 0.21, 0.34) stack-quarter, width-depth and msg-width can.

Sizing (`--plan` measures a few steps of each shape and prints every run's steps and the projected time, without
training). The full grid (4 arms x 3 fractions) projects to 4.7 h on the CPU preset (5.8 h if every grid widens
once), so the default CPU run is the part that bears on 2x: scratch (cosine and WSD), width-depth at f = 4/5 and
2/3, msg-width and stack-quarter at f = 4/5, with 3 seeds and the B/2 runs: on 2 idle cores `--plan` projects 1.7 h
(2.0 h if every grid widens once) with 2 jobs; the measurement of 2026-12-07 took 116 min (three widenings:
scratch under cosine once, stack-quarter twice).
Left out by default: stack-half (its bound is at most 1.36x at this scale), f = 1/2 for
every arm and f = 2/3 for stack-quarter and msg-width (bounds below 2x); `--arms`/`--fractions` run them, reusing
every finished run (third line below, about 2 h more).

    python benchmarks/growth_recipe.py --plan     # step times, steps per run, projected hours; no training
    python benchmarks/growth_recipe.py            # CPU measurement -> docs/results/growth_recipe.{md,json,png}
    python benchmarks/growth_recipe.py --arms stack-half,stack-quarter,width-depth,msg-width \\
        --fractions 4/5,2/3,1/2                   # the full grid, reusing the default's runs
    python benchmarks/growth_recipe.py --smoke    # end to end in a few minutes (tiny horizon, one rate, one seed)
    python benchmarks/growth_recipe.py --preset gpu --corpus 'CORPUS' --out runs/growth_recipe_gpu

Finished runs are kept in OUT/runs-*.jsonl (keyed by what a run does, not by which runs are asked for), so an
interrupted benchmark continues where it stopped, and a later invocation with more arms or fractions reuses every
run it shares.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import growth_horizon as gh  # noqa: E402  (the benchmarks folder is no package)

# The arm -> (its source's shape from the final model's, the growth family). Width halves heads and FFN with
# d_model (head_dim fixed), so each matrix is a quarter.
ARMS = {
    "stack-half": (lambda m: dict(n_layers=m["n_layers"] // 2), "stack"),
    "stack-quarter": (lambda m: dict(n_layers=m["n_layers"] // 4), "stack"),
    "width-depth": (lambda m: dict(n_layers=m["n_layers"] // 2, d_model=m["d_model"] // 2, n_heads=m["n_heads"] // 2,
                                   d_ff=m["d_ff"] // 2), "msg"),
    "msg-width": (lambda m: dict(d_model=m["d_model"] // 2, n_heads=m["n_heads"] // 2, d_ff=m["d_ff"] // 2), "msg"),
}
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "d_ff")
SCHEDULES = ("cosine", "wsd")
FRACTIONS = (Fraction(4, 5), Fraction(2, 3), Fraction(1, 2))  # tried in this order, each centred on the last's best
SEEDS = (*gh.SEEDS, 4242, 7, 99)
HORIZON, SMOKE_HORIZON, SMOKE_EXTRA = 20.0, 0.2, 0.6
HALF = 0.5  # the direct test's budget, of B
# First grids' centres: the CPU preset's best rates at 20 tokens per parameter in docs/results/growth_horizon.md
# (scratch 0.004, stack 0.016, msg 0.008); the bracketing moves off them where WSD wants otherwise.
CENTERS = {"cpu": {"scratch": 4e-3, "stack-half": 1.6e-2, "stack-quarter": 1.6e-2, "width-depth": 8e-3,
                   "msg-width": 8e-3}}
# The default CPU run (sized by --plan to about 3 hours on 2 cores; the module docstring says what it leaves out):
# f = 4/5 and 2/3 for the one arm whose bound reaches 2x, the literature's late point for the others.
DEFAULT_FRACTIONS = {"stack-quarter": FRACTIONS[:1], "width-depth": FRACTIONS[:2], "msg-width": FRACTIONS[:1]}


# ---- what a run is ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    """One setting a sweep brackets: scratch under a schedule, or an arm growing at fraction f; `budget` of B."""

    arm: str  # "scratch" or an ARMS key
    schedule: str = "wsd"
    f: Fraction | None = None
    budget: float = 1.0

    @property
    def name(self) -> str:
        """The key's string (cache and run folder): scratch-cosine, width-depth@4/5, width-depth@4/5:0.5."""
        base = f"scratch-{self.schedule}" if self.arm == "scratch" else f"{self.arm}@{self.f}"
        return base if self.budget == 1.0 else f"{base}:{self.budget:g}"

    @classmethod
    def parse(cls, name: str) -> "Variant":
        base, _, budget = name.partition(":")
        budget = float(budget) if budget else 1.0
        if base.startswith("scratch-"):
            return cls("scratch", base.removeprefix("scratch-"), None, budget)
        arm, _, f = base.partition("@")
        return cls(arm, "wsd", Fraction(f), budget)

    def at(self, budget: float) -> "Variant":
        return dataclasses.replace(self, budget=budget)


def fraction(text: str) -> Fraction:
    """'2/3', '0.8' -> a Fraction in (0, 1) (decimals to the nearest ratio of small integers)."""
    f = Fraction(text).limit_denominator(1000)
    if not 0 < f < 1:
        raise ValueError(f"a growth fraction is in (0, 1), got {text}")
    return f


def source_shape(arm: str, final: dict) -> dict:
    """The shape fields (n_layers, d_model, n_heads, d_ff) of `arm`'s source model, from the final model's."""
    return {k: final[k] for k in SHAPE_KEYS} | ARMS[arm][0](final)


def saving_bound(f: float, r: float) -> float:
    """The most compute one growth can save against training the final model from scratch: 1 / (1 - f(1 - r)).

    f: the fraction of the run's tokens before the growth; r: the source's training FLOPs per token over the final
    model's (flm.model.flops_per_token, LM head included). It is the FLOPs ratio at equal tokens, reached only if
    the grown model matches scratch's loss after as many tokens as scratch (flm.plan's saving_bound, one growth).
    f = 2/3, r = 1/4 -> 2; r = 1/2 stays below 2 for every f < 1.
    """
    return 1.0 / (1.0 - f * (1.0 - r))


def flops_ratio(arm: str, setup: dict) -> float:
    """r of `arm`: its source's FLOPs per token over the final model's, at the preset's context."""
    from flm.model import flops_per_token

    final, seq = setup["final_model"], setup["preset"].seq_len
    source = dataclasses.replace(final, **source_shape(arm, setup["final"]))
    return flops_per_token(source, seq) / flops_per_token(final, seq)


def split_steps(f: float, source_step: float, final_step: float, budget: float) -> tuple[int, int]:
    """(steps before, steps after) the growth for a run of `budget` FLOPs whose steps cost `source_step` and
    `final_step` FLOPs: f of its steps before, the FLOPs left after (so the total is within half a final step of
    the budget), each at least 2."""
    total = budget / (f * source_step + (1 - f) * final_step)
    before = max(2, round(f * total))
    return before, max(2, round((budget - before * source_step) / final_step))


def build_config(variant: str, horizon: float, lr: float, seed: int, setup: dict):
    """The run's Config and its steps per stage (one stage for scratch, two for an arm)."""
    from flm.config import StageConfig, load_config
    from flm.model import flops_per_token

    v = Variant.parse(variant)
    p, final = setup["preset"], setup["final_model"]
    tps = p.batch * p.seq_len
    n0 = gh.horizon_steps(horizon, setup)
    final_step = tps * flops_per_token(final, p.seq_len)
    budget = v.budget * n0 * final_step
    warmup = max(1, round(gh.WARMUP_FRAC * n0 * v.budget))
    slug = v.name.replace("@", "_f").replace("/", "-").replace(":", "_b")
    run_dir = Path(setup["out"]) / "runs" / f"h{horizon:g}_{slug}_lr{lr:.4g}_s{seed}"
    source = final if v.arm == "scratch" else dataclasses.replace(final, **source_shape(v.arm, setup["final"]))
    cfg = load_config(None, [*gh.run_overrides(setup, run_dir, lr, seed, source), f"train.schedule='{v.schedule}'",
                             f"train.decay_fraction={setup['decay_fraction']}",
                             f"train.decay_shape='{setup['decay_shape']}'"])
    if v.arm == "scratch":
        steps = [max(2, round(budget / final_step))]
    else:
        n1, n2 = split_steps(float(v.f), tps * flops_per_token(source, p.seq_len), final_step, budget)
        steps = [n1, n2]
        mode = setup["lr_at_growth"]
        extra = {"copy_noise": setup["copy_noise"]} if setup.get("copy_noise") else {}
        cfg.stages = [
            StageConfig(name="source", tokens=n1 * tps, **{k: getattr(source, k) for k in SHAPE_KEYS},
                        warmup_steps=min(warmup, n1)),
            StageConfig(name="final", tokens=n2 * tps, **{k: getattr(final, k) for k in SHAPE_KEYS},
                        operator=setup["operators"][v.arm], new_layers=setup["new_layers"], lr_at_growth=mode,
                        warmup_steps=max(1, round(gh.WARMUP_FRAC * n2)) if mode == "rewarm" else 0,
                        ramp_steps=max(1, round(gh.RAMP_FRAC * n2)), **extra)]
    cfg.train.max_steps, cfg.train.warmup_steps = sum(steps), min(warmup, steps[0])
    every = max(1, sum(steps) // setup["evals"])
    cfg.train.eval_every, cfg.train.log_every = every, every
    cfg.validate()
    return cfg, steps


def run_one(variant: str, horizon: float, lr: float, seed: int, setup: dict) -> dict:
    """Train one setting at one rate and seed (in a worker process); growth_horizon's result record."""
    cfg, steps = build_config(variant, horizon, lr, seed, setup)
    r = gh.train_run(cfg, setup["threads"])
    return {"arm": variant, "horizon": horizon, "lr": lr, "seed": seed, "final_val_loss": r["final_val_loss"],
            "diverged": r["diverged"], "curve": r["curve"], "steps": steps,
            "tokens": sum(steps) * cfg.train.tokens_per_step, "wall_s": r["wall_s"], "growths": r["growths"]}


# ---- the sweep -------------------------------------------------------------------------------------------------
class RecipeSweeps(gh.Sweeps):
    """growth_horizon's bracketing, over groups of settings at one horizon: scratch's schedules side by side, an
    arm's growth fractions one after another (each grid centred on the previous one's best). When a group's
    settings are all bracketed, its best (first-seed final loss) runs with the other seeds, and an arm's also at
    HALF the budget with every seed."""

    def __init__(self, groups: dict[str, list[str]], horizon: float, centers: dict[str, float], grid: int,
                 seeds: tuple[int, ...], half: bool):
        names = [n for members in groups.values() for n in members]
        super().__init__(names, (horizon,), 1.0, grid, seeds)
        self.groups, self.half = groups, half
        self.group_of = {n: g for g, members in groups.items() for n in members}
        self.centers = {n: centers[g] for g, members in groups.items() for n in members}
        self.started: set[str] = set()
        self.winner: dict[str, str] = {}  # group -> its best setting

    def start(self) -> list[tuple]:
        first = [n for g, members in self.groups.items() for n in (members if g == "scratch" else members[:1])]
        self.started.update(first)
        return [k for n in first for k in self.first_grid(n, self.horizons[0])]

    def after(self, key: tuple, pending: set[tuple]) -> list[tuple]:
        name, horizon, _, seed = key
        if Variant.parse(name).budget != 1.0 or seed != self.seeds[0] \
                or any(k[:2] == (name, horizon) and k[3] == seed for k in pending):
            return []
        wider = self.bracket(name, horizon)
        if wider:
            return wider
        group = self.group_of[name]
        members = self.groups[group]
        out = []
        following = [n for n in members if n not in self.started]
        if following:
            self.started.add(following[0])
            self.centers[following[0]] = self.best[(name, horizon)]
            out += self.first_grid(following[0], horizon)
        if all((n, horizon) in self.best for n in members):
            best = min(members, key=lambda n: self.finals(n, horizon)[self.best[(n, horizon)]])
            self.winner[group] = best
            lr = self.best[(best, horizon)]
            out += [(best, horizon, lr, s) for s in self.seeds[1:]]
            if self.half and group != "scratch":
                out += [(Variant.parse(best).at(HALF).name, horizon, lr, s) for s in self.seeds]
        return out


# ---- figures of merit ------------------------------------------------------------------------------------------
def finished_saving(scratch: dict, full: dict, half: dict | None) -> float | None:
    """B / the FLOPs where the arm's finished runs reach scratch's final loss (module docstring): off the B/2 run's
    curve when it gets there, else log-FLOPs interpolation between the B/2 and B runs' final losses when the B run
    gets there, else growth_horizon's below-1 figure."""
    target, budget = scratch["final_val_loss"], scratch["curve"][-1][0]
    if half and not half["diverged"] and half["curve"]:
        at = gh.flops_to(half["curve"], target)
        if at is not None:
            return budget / at
    if full["diverged"] or not full["curve"]:
        return None
    if full["final_val_loss"] <= target and half and not half["diverged"] and half["curve"]:
        (fh, lh), (ff, lf) = half["curve"][-1], full["curve"][-1]
        if lh > lf:
            x = math.log(fh) + (lh - target) / (lh - lf) * (math.log(ff) - math.log(fh))
            return budget / math.exp(x)
    return gh.saving(scratch, full)


def spread(values: list[float]) -> dict:
    values = [v for v in values if v]
    return {"per_seed": values, "geomean": math.exp(statistics.fmean(map(math.log, values))) if values else None,
            "min": min(values, default=None), "max": max(values, default=None)}


def summarize(sweeps: RecipeSweeps, setup: dict, horizon: float) -> dict:
    """Per horizon: scratch's schedules and its best; every arm's f x rate grid, best setting, savings, bound."""
    from flm.model import flops_per_token

    res, seeds = sweeps.results, sweeps.seeds
    final_fpt = flops_per_token(setup["final_model"], setup["preset"].seq_len)

    def setting(name: str) -> dict:
        best = sweeps.best.get((name, horizon))
        first = res.get((name, horizon, best, seeds[0]))
        out = {"grid": dict(sorted(sweeps.finals(name, horizon).items())), "best_lr": best,
               "final_val_loss": first["final_val_loss"] if first else None,
               "steps": first["steps"] if first else None, "tokens": first["tokens"] if first else None,
               "flops": first["curve"][-1][0] if first and first["curve"] else None,
               "wall_s": first["wall_s"] if first else None, "growths": first["growths"] if first else []}
        v = Variant.parse(name)
        if v.arm != "scratch" and first:
            n1, n2 = first["steps"]
            f, r = n1 / (n1 + n2), flops_ratio(v.arm, setup)
            out.update(f=f, r=r, bound=saving_bound(f, r))
        return out

    def seeded(name: str) -> dict[int, dict]:
        lr = sweeps.best.get((Variant.parse(name).at(1.0).name, horizon))
        return {s: res[(name, horizon, lr, s)] for s in seeds if (name, horizon, lr, s) in res}

    scratch_names = sweeps.groups["scratch"]
    scratch = {"schedules": {Variant.parse(n).schedule: setting(n) for n in scratch_names}}
    best_scratch = sweeps.winner.get("scratch")
    scratch_runs = seeded(best_scratch) if best_scratch else {}
    scratch.update(best=Variant.parse(best_scratch).schedule if best_scratch else None,
                   best_lr=sweeps.best.get((best_scratch, horizon)),
                   final_val_loss={s: r["final_val_loss"] for s, r in scratch_runs.items()},
                   flops=next(iter(scratch_runs.values()))["curve"][-1][0] if scratch_runs else None)
    arms = {}
    for group, members in sweeps.groups.items():
        if group == "scratch":
            continue
        a = {"variants": {str(Variant.parse(n).f): setting(n) for n in members}}
        best = sweeps.winner.get(group)
        if best:
            runs, halves = seeded(best), seeded(Variant.parse(best).at(HALF).name)
            b = a["variants"][str(Variant.parse(best).f)]
            curve = spread([gh.saving(scratch_runs[s], r) for s, r in runs.items() if s in scratch_runs])
            done = spread([finished_saving(scratch_runs[s], r, halves.get(s)) for s, r in runs.items()
                           if s in scratch_runs])
            reach = [h["final_val_loss"] <= scratch_runs[s]["final_val_loss"] for s, h in halves.items()
                     if s in scratch_runs]
            a.update(best_f=str(Variant.parse(best).f), f=b["f"], r=b["r"], bound=b["bound"], best_lr=b["best_lr"],
                     final_val_loss={s: r["final_val_loss"] for s, r in runs.items()},
                     half_final_val_loss={s: r["final_val_loss"] for s, r in halves.items()},
                     saving_curve=curve, saving_finished=done if halves else None,
                     half_reaches=[sum(reach), len(reach)] if halves else None,
                     curve_over_bound=curve["geomean"] / b["bound"] if curve["geomean"] else None,
                     finished_over_bound=done["geomean"] / b["bound"] if halves and done["geomean"] else None)
        arms[group] = a
    return {"tokens_per_param": horizon, "budget_flops": gh.horizon_steps(horizon, setup) * setup["preset"].batch
            * setup["preset"].seq_len * final_fpt, "scratch": scratch, "arms": arms}


def best_arm(h: dict) -> str | None:
    """The arm with the lowest mean final loss at equal FLOPs."""
    scored = [(statistics.fmean(a["final_val_loss"].values()), arm) for arm, a in h["arms"].items()
              if a.get("final_val_loss")]
    return min(scored)[1] if scored else None


# ---- sizing ----------------------------------------------------------------------------------------------------
def projection(setup: dict, timing: dict, horizons: list[float]) -> dict:
    """Steps and seconds of every run the sweeps start (first grids, the best settings' other seeds and B/2 runs)
    and the projected wall time, without and with one widening per grid."""
    rows, total, widen = [], 0.0, 0.0
    grid, n_seeds, half = setup["grid"], len(setup["seeds"]), setup["half"]
    for h in horizons:
        for group, members in groups_of(setup).items():
            times = []
            for name in members:
                _, steps = build_config(name, h, 1e-3, SEEDS[0], setup)
                names = ["final"] if len(steps) == 1 else [Variant.parse(name).arm, "final"]
                run_s = sum(n * timing[k]["step_s"] for n, k in zip(steps, names))
                run_s += setup["evals"] * timing["final"]["eval_s"]
                rows.append({"tokens_per_param": h, "setting": name, "steps": steps, "run_s": run_s})
                times.append(run_s)
            worst = max(times)
            total += grid * sum(times) + (n_seeds - 1) * worst + (n_seeds * HALF * worst if half and
                                                                   group != "scratch" else 0)
            widen += sum(times)
    return {"runs": rows, "total_s": total / setup["jobs"], "total_s_one_widening_each": (total + widen) / setup["jobs"]}


def groups_of(setup: dict) -> dict[str, list[str]]:
    """The settings of each group: scratch's schedules, each arm's fractions in the order they run."""
    groups = {"scratch": [Variant("scratch", s).name for s in setup["schedules"]]}
    for arm in setup["arms"]:
        groups[arm] = [Variant(arm, "wsd", f).name for f in setup["fractions"][arm]]
    return groups


# ---- report ----------------------------------------------------------------------------------------------------
def _x(v: float | None, digits: int = 2) -> str:
    return f"{v:.{digits}f}x" if v is not None else "n/a"


def _sv(s: dict | None) -> str:
    if not s or not s["geomean"]:
        return "n/a"
    return f"**{s['geomean']:.2f}x** [{s['min']:.2f}, {s['max']:.2f}]"


def _mean(d: dict) -> float | None:
    return statistics.fmean(d.values()) if d else None


def answer(h: dict) -> str:
    """One sentence: which arm saves the most, and whether 2x is reached."""
    best = max(((a["saving_finished"] or a["saving_curve"])["geomean"] or 0, arm) for arm, a in h["arms"].items()
               if a.get("saving_curve")) if any(a.get("saving_curve") for a in h["arms"].values()) else None
    if not best:
        return "No arm finished."
    value, arm = best
    a = h["arms"][arm]
    kind = "finished runs at B/2 and B" if a["saving_finished"] else "its validation curve"
    reach = (f"; at half the FLOPs it reaches scratch's final loss on {a['half_reaches'][0]} of "
             f"{a['half_reaches'][1]} seeds" if a["half_reaches"] else "")
    verdict = "reaches" if value >= 2 else "does not reach"
    return (f"At {h['tokens_per_param']:g} tokens per parameter the best arm, {arm} (f = {a['best_f']}), saves "
            f"{value:.2f}x by {kind} (bound {a['bound']:.2f}x){reach}: late one-hop growth under WSD {verdict} 2x "
            f"against the best-tuned scratch run ({h['scratch']['best']}).")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = summary["horizons"][0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for sched, s in h["scratch"]["schedules"].items():
        if s["final_val_loss"] is not None:
            left.axhline(s["final_val_loss"], ls=":" if sched == "cosine" else "--", color="black", lw=0.9,
                         label=f"scratch {sched} (lr {s['best_lr']:.3g})")
    for arm, a in h["arms"].items():
        pts = sorted((v["f"], v["final_val_loss"]) for v in a["variants"].values()
                     if v.get("f") is not None and v["final_val_loss"] is not None
                     and math.isfinite(v["final_val_loss"]))
        if pts:
            left.plot(*zip(*pts), marker="o", label=arm)
    left.set_xlabel("fraction of the arm's tokens before growth (f)")
    left.set_ylabel("final validation loss at equal FLOPs (best rate, seed 1)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    names = [arm for arm, a in h["arms"].items() if a.get("saving_curve")]
    xs = range(len(names))
    for offset, key, label in ((-0.27, "saving_curve", "saving (curve)"),
                               (0.0, "saving_finished", "saving (finished runs)")):
        vals = [h["arms"][n][key] for n in names]
        ys = [v["geomean"] if v and v["geomean"] else 0 for v in vals]
        err = [[y - (v["min"] if v and v["min"] else y) for y, v in zip(ys, vals)],
               [(v["max"] if v and v["max"] else y) - y for y, v in zip(ys, vals)]]
        right.bar([x + offset for x in xs], ys, width=0.27, yerr=err, capsize=3, label=label)
    right.bar([x + 0.27 for x in xs], [h["arms"][n]["bound"] for n in names], width=0.27, color="lightgrey",
              label="bound 1/(1-f(1-r))")
    right.axhline(1.0, color="black", lw=0.8, ls=":")
    right.axhline(2.0, color="grey", lw=0.8, ls="--", label="goal 2x")
    right.set_xticks(list(xs), [f"{n}\nf={h['arms'][n]['best_f']}" for n in names], fontsize=8)
    right.set_ylabel("compute saving vs best scratch (x)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Late one-hop growth under WSD, {h['tokens_per_param']:g} tokens per parameter", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(summary: dict, path: Path) -> None:
    m, fm, s = summary["machine"], summary["final_model"], summary["setup"]
    lines = [f"# Late one-hop growth under WSD vs the best-tuned scratch run ({s['preset']} preset)", "",
             f"Command (from the repository root): `{summary['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB" + (f", {m['gpu']}" if "gpu" in m else "")
             + f"; Python {m['python']}, torch {m['torch']}. Date {summary['date']}. Wall time "
             f"{summary['run_s'] / 60:.0f} min of runs with {s['jobs']} jobs x {s['threads']} thread(s) (the runs' "
             f"times over the jobs; this invocation {summary['wall_s'] / 60:.0f} min, reusing finished runs); load "
             f"average before {summary['load_before']}, after {summary['load_after']}. Raw results: "
             f"[{path.stem}.json]({path.stem}.json), plot: [{path.stem}.png]({path.stem}.png).", "",
             "## Answer", "", *[answer(h) for h in summary["horizons"]], "",
             "## Set-up", "",
             f"- Final model (every arm): {fm['n_layers']} layers, d_model {fm['d_model']}, {fm['n_heads']} heads x "
             f"{fm['head_dim']}, FFN {fm['d_ff']}, vocabulary {fm['vocab_size']}: {fm['non_embedding_params']:,} "
             f"non-embedding parameters (N), {fm['params']:,} in all. Context {s['seq_len']}, batch {s['batch']} "
             f"sequences ({s['seq_len'] * s['batch']:,} tokens per step).",
             f"- Corpus: {s['corpus']}; {s['train_tokens']:,} training and {s['val_tokens']:,} validation tokens. "
             f"The longest run reads {s['max_tokens']:,} tokens = {s['max_tokens'] / s['train_tokens']:.3f} epochs.",
             f"- Validation: the first {s['eval_batches']} batches of the held-out documents, {s['evals']} evaluations "
             "per run.",
             f"- Schedules: scratch {' and '.join(s['schedules'])}; arms WSD, decay over the last "
             f"{s['decay_fraction']:.0%} of the steps ({s['decay_shape']}), LR at growth `{s['lr_at_growth']}`, "
             f"new layers `{s['new_layers']}`, width-depth operator `{s['width_depth_operator']}`, copy noise "
             f"{s['copy_noise']:g}; peak rates bracketed on a factor-2 grid of {s['grid']}, seeds {s['seeds']}, "
             f"B/2 runs {'yes' if s['half'] else 'no'}.",
             "- Arms, accounting and figures of merit: the benchmark's docstring (`benchmarks/growth_recipe.py`). "
             "Savings: geometric mean over seeds [min, max].", ""]
    for h in summary["horizons"]:
        sc = h["scratch"]
        lines += [f"## {h['tokens_per_param']:g} tokens per parameter (B = {h['budget_flops'] / 1e12:.2f} TFLOPs)", "",
                  f"Best scratch: {sc['best']} at lr {sc['best_lr']:.3g}, final loss "
                  + (f"{_mean(sc['final_val_loss']):.4f} (mean over seeds {', '.join(f'{v:.4f}' for v in sc['final_val_loss'].values())})."
                     if sc["final_val_loss"] else "n/a."), "",
                  "| arm | best f | lr | final loss at B | saving (curve) | saving (finished runs) | reaches at B/2 "
                  "| bound | curve / bound | finished / bound |", "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, a in h["arms"].items():
            if not a.get("saving_curve"):
                lines.append(f"| {arm} | n/a | | | | | | | | |")
                continue
            reach = f"{a['half_reaches'][0]} of {a['half_reaches'][1]}" if a["half_reaches"] else "n/a"
            lines.append(f"| {arm} | {a['best_f']} | {a['best_lr']:.3g} | {_mean(a['final_val_loss']):.4f} | "
                         f"{_sv(a['saving_curve'])} | {_sv(a['saving_finished'])} | {reach} | {a['bound']:.2f}x | "
                         f"{a['curve_over_bound'] or 0:.2f} | "
                         + (f"{a['finished_over_bound']:.2f} |" if a["finished_over_bound"] else "n/a |"))
        lines += ["", "Sweeps (final validation loss by peak rate, first seed; steps before + after growth):", ""]
        for sched, v in sc["schedules"].items():
            grid = ", ".join(f"{lr:.3g}: {loss:.4f}" for lr, loss in v["grid"].items())
            lines.append(f"- scratch {sched}: {grid}; {v['steps']} steps, {v['tokens'] or 0:,} tokens"
                         + (f", {v['wall_s']:.0f} s per run" if v["wall_s"] else ""))
        for arm, a in h["arms"].items():
            for f, v in a["variants"].items():
                if not v["grid"]:
                    continue
                grid = ", ".join(f"{lr:.3g}: {loss:.4f}" for lr, loss in v["grid"].items())
                lines.append(f"- {arm} f = {f}: {grid}; steps {v['steps']}, {v['tokens'] or 0:,} tokens, bound "
                             f"{_x(v.get('bound'))} (r = {v.get('r', 0):.3f})"
                             + (f", {v['wall_s']:.0f} s per run" if v["wall_s"] else ""))
        lines.append("")
    lines += ["## Read with care", "",
              "- The curve saving reads FLOPs off a run planned for the whole budget, at a point that is no finished "
              "model: under WSD before its decay (squeezing the saving towards 1), or before the growth, the source "
              "(a run planned for that budget would have grown after fewer source tokens: it can overstate). The "
              "B/2 runs are the direct test of 2x; between B/2 and B the finished-run saving interpolates two "
              "finished runs in log FLOPs.",
              "- The B/2 runs keep the rate bracketed at B (a shorter run may want a slightly higher one): if "
              "anything they understate growth.",
              "- The bound counts the LM head, which at this width is a large share of the final model's FLOPs: "
              "depth-only sources are far from 2x however late they grow.",
              "- The best f and rate are chosen on the first seed; the other seeds then measure that setting, so "
              "the first seed's saving is biased up slightly. Three seeds give a spread, not a confidence interval.",
              "- Tokens per parameter count non-embedding parameters; per parameter in all, divide by "
              f"{fm['params'] / fm['non_embedding_params']:.2f}.", ""]
    path.write_text("\n".join(lines))


# ---- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(gh.PRESETS), default="cpu")
    p.add_argument("--arms", default=",".join(DEFAULT_FRACTIONS), help=f"growth arms among {', '.join(ARMS)}")
    p.add_argument("--fractions", default=None,
                   help="growth fractions f of the arm's tokens for every arm, tried in this order (e.g. 4/5,2/3,1/2 "
                        "or 0.8; default: " + "; ".join(f"{a} {','.join(map(str, fs))}"
                                                         for a, fs in DEFAULT_FRACTIONS.items())
                        + f"; {','.join(map(str, FRACTIONS))} for other arms)")
    p.add_argument("--scratch-schedules", default=",".join(SCHEDULES), help="scratch's schedules, the best kept")
    p.add_argument("--horizon", type=float, default=None, help=f"tokens per non-embedding parameter ({HORIZON:g})")
    p.add_argument("--extra-horizon", type=float, default=None,
                   help="then the best arm and scratch at this horizon too (e.g. 60; with --smoke: 0.6)")
    p.add_argument("--lr-at-growth", choices=["continue", "rewarm", "peak"], default="continue")
    p.add_argument("--width-depth-operator", choices=["msg", "zero", "clone"], default="msg")
    p.add_argument("--new-layers", choices=["stack", "insert"], default="stack")
    p.add_argument("--copy-noise", type=float, default=0.0,
                   help="std of the noise on copied layers, relative to their RMS (stage copy_noise)")
    p.add_argument("--decay-fraction", type=float, default=0.2)
    p.add_argument("--decay-shape", choices=["linear", "cosine", "1-sqrt"], default="linear")
    p.add_argument("--grid", type=int, default=3, help="rates in each first grid (1: no sweep, no widening)")
    p.add_argument("--seeds", type=int, default=3, choices=range(1, len(SEEDS) + 1))
    p.add_argument("--no-half", dest="half", action="store_false", help="no B/2 runs of the arms' best settings")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (preset's)")
    p.add_argument("--corpus", default=None, help="default: the Python sources of the installed packages")
    p.add_argument("--out", default=None, help="run folders and cache (default runs/growth_recipe_PRESET)")
    p.add_argument("--report", default=None, help="Markdown report (default docs/results/growth_recipe.md; with "
                                                   "--smoke, OUT/growth_recipe.md)")
    p.add_argument("--plan", action="store_true", help="measure step times and print the projection only")
    p.add_argument("--smoke", action="store_true", help=f"horizon {SMOKE_HORIZON:g}, one rate, one seed, small "
                                                        "evaluations, the first 5 MB of the corpus")
    args = p.parse_args()
    preset = gh.PRESETS[args.preset]
    arms = args.arms.split(",")
    schedules = args.scratch_schedules.split(",")
    if not arms or not set(arms) <= set(ARMS):
        p.error(f"--arms takes arms among {', '.join(ARMS)}")
    if not schedules or not set(schedules) <= set(SCHEDULES):
        p.error(f"--scratch-schedules takes {', '.join(SCHEDULES)}")
    try:
        given = [fraction(t) for t in args.fractions.split(",")] if args.fractions else None
    except (ValueError, ZeroDivisionError) as e:
        p.error(f"--fractions: {e}")
    fractions = {arm: given or list(DEFAULT_FRACTIONS.get(arm, FRACTIONS)) for arm in arms}
    if args.copy_noise:
        from flm.config import StageConfig

        if "copy_noise" not in {f.name for f in dataclasses.fields(StageConfig)}:
            p.error("--copy-noise needs a flm with the stage field copy_noise")
    horizon = SMOKE_HORIZON if args.smoke else (args.horizon or HORIZON)
    extra = (SMOKE_EXTRA if args.smoke else args.extra_horizon) if args.extra_horizon else None
    grid = 1 if args.smoke else args.grid
    n_seeds = 1 if args.smoke else args.seeds
    jobs = args.jobs or preset.jobs
    out = Path(args.out or ("runs/growth_recipe_smoke" if args.smoke else f"runs/growth_recipe_{args.preset}"))
    corpus, corpus_note = gh.corpus_of(args.corpus, out)
    report_path = Path(args.report) if args.report else (out / "growth_recipe.md" if args.smoke
                                                         else Path("docs/results/growth_recipe.md"))

    from flm.config import ModelConfig
    from flm.files import write_json_report

    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    t_start = time.perf_counter()
    small = args.smoke or args.plan  # --plan only times steps: the first 5 MB of the corpus do
    data_dir = out / ("data_small" if small else "data")
    data = gh.prepare_data(corpus, data_dir, preset, small, jobs)
    vocab = 128 * math.ceil(data.vocab_size / 128)
    setup = {"preset": preset, "final": preset.final, "final_model": ModelConfig(**preset.final, vocab_size=vocab,
                                                                                 max_seq_len=preset.seq_len),
             "data_dir": str(data_dir), "out": str(out), "arms": arms, "fractions": fractions,
             "schedules": schedules, "jobs": jobs, "grid": grid, "seeds": SEEDS[:n_seeds], "half": args.half,
             "threads": max(1, (os.cpu_count() or 1) // jobs) if preset.device == "cpu" else 1,
             "eval_batches": 4 if args.smoke else preset.eval_batches, "evals": 10 if args.smoke else preset.evals,
             "operators": {arm: ARMS[arm][1] for arm in ARMS} | {"width-depth": args.width_depth_operator},
             "lr_at_growth": args.lr_at_growth, "new_layers": args.new_layers, "copy_noise": args.copy_noise,
             "decay_fraction": args.decay_fraction, "decay_shape": args.decay_shape}
    centers = {g: CENTERS.get(args.preset, {}).get(g, preset.lr_center) for g in ["scratch", *arms]}
    if args.plan:
        shapes = {"final": {}} | {arm: source_shape(arm, preset.final) for arm in arms}
        timing = gh.measure(setup, shapes=shapes)
        horizons = [horizon] + ([extra] if extra else [])
        plan = projection(setup, timing, horizons)
        for name, t in timing.items():
            print(f"{name}: {1000 * t['step_s']:.1f} ms per step, {t['eval_s']:.2f} s per evaluation")
        for arm in arms:
            r = flops_ratio(arm, setup)
            print(f"{arm}: r = {r:.3f}, bound " + ", ".join(f"f = {f}: {saving_bound(float(f), r):.2f}x"
                                                            for f in FRACTIONS)
                  + f"; runs f = {', '.join(map(str, fractions[arm]))}")
        for row in plan["runs"]:
            print(f"H {row['tokens_per_param']:g} {row['setting']:>22}: steps {row['steps']}, "
                  f"{row['run_s']:.0f} s per run")
        print(f"projected: {plan['total_s'] / 3600:.2f} h ({plan['total_s_one_widening_each'] / 3600:.2f} h if every "
              f"grid widens once), {jobs} jobs, grid {grid}, {n_seeds} seed(s), B/2 runs {args.half}"
              + (f"; the extra horizon {extra:g} counted for every arm (it runs for the best one only)" if extra
                 else ""))
        return
    settings = [args.preset, setup["eval_batches"], setup["evals"], corpus, small, gh.RAMP_FRAC, gh.WARMUP_FRAC,
                setup["operators"], args.lr_at_growth, args.new_layers, args.copy_noise, args.decay_fraction,
                args.decay_shape]  # what a run does; which runs are asked for is in the keys
    fingerprint = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
    cache = out / f"runs-{fingerprint}.jsonl"
    sweeps = RecipeSweeps(groups_of(setup), horizon, centers, grid, setup["seeds"], args.half)
    gh.run_all(sweeps, setup, cache, jobs, run=run_one)
    horizons = [summarize(sweeps, setup, horizon)]
    results = dict(sweeps.results)
    if extra:
        h0 = horizons[0]
        arm = best_arm(h0)
        if arm and h0["scratch"]["best"]:
            s_name, a_name = sweeps.winner["scratch"], sweeps.winner[arm]
            more = RecipeSweeps({"scratch": [s_name], arm: [a_name]}, extra,
                                {"scratch": sweeps.best[(s_name, horizon)], arm: sweeps.best[(a_name, horizon)]},
                                grid, setup["seeds"], args.half)
            gh.run_all(more, setup, cache, jobs, run=run_one)
            horizons.append(summarize(more, setup, extra))
            results |= more.results
    summary = {"horizons": horizons}
    final = setup["final_model"]
    from flm.model import non_embedding_params, param_count

    summary["final_model"] = {"non_embedding_params": non_embedding_params(final), "params": param_count(final),
                              **preset.final, "vocab_size": final.vocab_size}
    summary["arms"] = arms
    summary["machine"] = gh.machine()
    summary["command"] = " ".join(["python benchmarks/growth_recipe.py", *sys.argv[1:]])
    summary["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    summary["wall_s"] = time.perf_counter() - t_start
    summary["run_s"] = sum(r["wall_s"] for r in results.values()) / jobs
    summary["load_before"], summary["load_after"] = load_before, ", ".join(f"{v:.2f}" for v in os.getloadavg())
    summary["setup"] = {"preset": args.preset, "corpus": corpus_note, "train_tokens": data.train_tokens,
                        "val_tokens": data.val_tokens, "max_tokens": max(r["tokens"] for r in results.values()),
                        "seq_len": preset.seq_len, "batch": preset.batch, "jobs": jobs, "threads": setup["threads"],
                        "eval_batches": setup["eval_batches"], "evals": setup["evals"], "grid": grid,
                        "seeds": list(setup["seeds"]), "half": args.half, "schedules": schedules,
                        "fractions": {a: [str(f) for f in fs] for a, fs in fractions.items()},
                        "decay_fraction": args.decay_fraction,
                        "decay_shape": args.decay_shape, "lr_at_growth": args.lr_at_growth,
                        "new_layers": args.new_layers, "width_depth_operator": args.width_depth_operator,
                        "copy_noise": args.copy_noise, "centers": centers}
    summary["runs"] = list(results.values())
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_report(report_path.with_suffix(".json"), summary)
    plot(summary, report_path.with_suffix(".png"))
    report(summary, report_path)
    print(answer(horizons[0]))
    print(f"wrote {report_path} (+ .json, .png) in {summary['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
