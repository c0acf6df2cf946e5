"""Growth vs training from scratch at horizons of about 1, 5 and 20 tokens per parameter, for every growth family.

Question: does growth still save compute at a compute-optimal horizon (~20 tokens per parameter, where published
gains shrink), and which family grows best: MSG's masks (`msg`), zero-initialised writers (`zero`), exact cloning
(`clone`) or plain layer copies (`stack`)? docs/growth.md describes the families.

Design (each arm ends in the same final model, reads the same data in the same order for a given seed):
- Horizon H: scratch trains the final model on H x N tokens, N = its non-embedding parameters (Kaplan's N: at
  this size the vocabulary matrices would dominate a total count). That run's training FLOPs are the budget B.
- A growth arm spends the same B in three stages, 2x non-embedding parameters per growth event, two events, with
  30% / 30% / 40% of B (flm.model.flops_per_token of each stage's own shape). Width arms (msg, zero, clone):
  d_model/2, heads/2, FFN/2 -> d_model x2 -> heads x2 and FFN x2. Depth arms (stack and msg-depth by
  default, zero-depth on request): L/4 -> L/2 -> L, new layers copying the top ones (G_stack), so that stack
  meets MSG on the same shapes. Re-warmup over 5% and mask ramp (msg; zero growing d_model) over 10% of each new
  stage's steps; one cosine to lr/10 over the run. μP with the final width as base width: scratch is standard
  parametrization, smaller widths get μP's init and learning rates.
- Every arm sweeps its peak learning rate on a grid of factor 2 around the best rate of its previous horizon;
  when the best is at an edge the grid is widened there, until the best is inside. The best rate then runs with a
  second seed (other init, data order and new entries).
- Figures of merit per horizon and seed s: the target is scratch's final validation loss (seed s, best rate);
  saving = B / (FLOPs the family needs to reach it, linearly interpolated between evaluations). A family that
  does not reach it gets (FLOPs scratch needs to reach the family's final loss) / B, below 1. Reported: the
  geometric mean over seeds with min and max, and the final losses at equal FLOPs.

Sizing: `--plan` measures a few steps of every shape and prints the runs' step counts and the projected time
without training. The CPU preset (final model 4 x 64, 0.2M non-embedding parameters) is sized to take about
2 hours with 2 jobs on 2 otherwise idle cores; `--preset gpu` (12 x 512, 38M non-embedding, 55M in all, vocabulary
16384, context 1024) is the same experiment for one GPU, which needs a corpus of about 1.5B tokens for its longest
run to read each token once (`--corpus`; the report states the epochs read).

    python benchmarks/growth_horizon.py --plan               # step times and projected total, no training
    python benchmarks/growth_horizon.py --last-horizon msg-depth=5  # CPU measurement -> docs/results/growth_horizon.*
    python benchmarks/growth_horizon.py --smoke              # end to end in a few minutes (tiny horizons, one rate)
    python benchmarks/growth_horizon.py --preset gpu --corpus 'CORPUS' --out runs/growth_horizon_gpu

The corpus defaults to the Python sources of the installed packages, present on any machine that can run flm:
every UTF-8 `.py` file under site-packages becomes one JSONL record of OUT/python_sources.jsonl (a plain glob would
do, but one file that is not UTF-8 — joblib ships a test in Latin-1 — stops `flm prepare`, as a damaged corpus
should). Finished runs are kept in OUT/runs-*.jsonl, so an interrupted benchmark continues where it stopped when
started again with the same settings.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

FAMILY_ARMS = {"msg": ("msg", "width"), "zero": ("zero", "width"), "clone": ("clone", "width"),
               "stack": ("stack", "depth"), "msg-depth": ("msg", "depth"), "zero-depth": ("zero", "depth")}
SHARES = (0.3, 0.3, 0.4)  # of the FLOPs budget, by stage
RAMP_FRAC, WARMUP_FRAC = 0.10, 0.05  # of a stage's steps
GRID_FACTOR, MAX_WIDENINGS = 2.0, 4
SEEDS = (1337, 2024)


@dataclasses.dataclass(frozen=True)
class Preset:
    final: dict  # the final model's shape
    vocab: int  # BPE vocabulary trained on the corpus
    seq_len: int
    batch: int  # sequences per step
    horizons: tuple[float, ...]  # tokens per non-embedding parameter
    lr_center: float  # the first horizon's grid is centred here
    eval_batches: int
    evals: int  # validation evaluations per run (the curves the FLOPs to target are read from)
    device: str
    jobs: int  # runs at a time
    bpe_sample_chars: int


PRESETS = {
    "cpu": Preset(dict(n_layers=4, d_model=64, n_heads=4, head_dim=16, d_ff=256), 2048, 128, 8, (1, 5, 20), 8e-3,
                  16, 30, "cpu", 2, 20_000_000),
    "gpu": Preset(dict(n_layers=12, d_model=512, n_heads=8, head_dim=64, d_ff=2048), 16384, 1024, 32, (1, 5, 20),
                  2e-3, 32, 40, "cuda", 1, 100_000_000),
}


def stage_shapes(final: dict, kind: str) -> list[dict]:
    """The three stage shapes of a schedule, each growth event doubling the non-embedding matrices."""
    L, d, h, f = final["n_layers"], final["d_model"], final["n_heads"], final["d_ff"]
    if kind == "width":  # matrices scale with d x (4·attn + 2·ffn): halving d, then halving attn and ffn
        return [dict(final, d_model=d // 2, n_heads=h // 2, d_ff=f // 2), dict(final, n_heads=h // 2, d_ff=f // 2),
                dict(final)]
    return [dict(final, n_layers=L // 4), dict(final, n_layers=L // 2), dict(final)]


def shape_names(setup: dict, arm: str) -> list[tuple[str, dict]]:
    """(name, shape) of every stage `arm` trains, the final one named "final"."""
    if arm == "scratch":
        return [("final", setup["final"])]
    shapes = stage_shapes(setup["final"], FAMILY_ARMS[arm][1])
    return [("{n_layers}x{d_model}/{n_heads}h/{d_ff}".format(**c), c) for c in shapes[:-1]] + [("final", shapes[-1])]


def installed_sources(path: Path) -> tuple[int, int]:
    """Write every UTF-8 `.py` file under site-packages, sorted by path, as a JSONL record {"text": ...} to `path`
    (kept if it exists); returns (files written, files skipped as not UTF-8)."""
    root = Path(sysconfig.get_paths()["purelib"])
    written = skipped = 0
    if path.exists():
        return sum(1 for _ in path.open()), 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as out:
        for file in sorted(root.rglob("*.py")):
            try:
                text = file.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            if text.strip():
                out.write(json.dumps({"text": text}) + "\n")
                written += 1
    tmp.rename(path)
    return written, skipped


def corpus_of(corpus: str | None, out: Path) -> tuple[str, str]:
    """The corpus to prepare and how the report names it: `corpus`, or (None) the installed packages' Python
    sources written to OUT/python_sources.jsonl."""
    if corpus is not None:
        return corpus, f"`{corpus}`"
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = installed_sources(out / "python_sources.jsonl")
    corpus = str(out / "python_sources.jsonl")
    note = (f"the Python sources of the installed packages: {written:,} UTF-8 `.py` files under "
            f"`{sysconfig.get_paths()['purelib']}`, one JSONL record each (`{corpus}`, written by the "
            "benchmark" + (f"; {skipped} file(s) not UTF-8 left out" if skipped else "") + ")")
    print(f"corpus: {note}")
    return corpus, note


def prepare_data(corpus: str, data_dir: Path, preset: Preset, small: bool, jobs: int):
    """`flm prepare` of the corpus into `data_dir` with the preset's BPE vocabulary (kept when already there);
    `small`: the first 5 MB of the corpus only (the pipeline, not the measurement)."""
    from flm.config import load_config
    from flm.data import prepare

    data_cfg = load_config(None, [f"data.corpus='{corpus}'", f"data.dir='{data_dir}'",
                                  f"data.vocab_size={preset.vocab}", f"data.bpe_sample_chars={preset.bpe_sample_chars}",
                                  "data.val_fraction=0.005", "data.shard_tokens=50000000"]).data
    if small:
        data_cfg.max_chars, data_cfg.bpe_sample_chars = 5_000_000, 2_000_000
    return prepare(data_cfg, log=print, workers=jobs)


# ---- one run (in a worker process) ------------------------------------------------------------------------------
def run_overrides(setup: dict, run_dir: Path, lr: float, seed: int, shape) -> list[str]:
    """The `--set` overrides every run shares: data, run folder, seed, peak rate (min_lr a tenth), batch, quiet
    logging, the stop-on-non-finite policy, μP with the final width as base width, and the first stage's shape."""
    p = setup["preset"]
    return [f"data.dir='{setup['data_dir']}'", f"train.run_dir='{run_dir}'", f"train.seed={seed}",
            f"train.lr={lr}", f"train.min_lr={lr / 10}", f"train.batch_size={p.batch}",
            f"train.seq_len={p.seq_len}", f"train.device='{p.device}'",
            f"train.eval_batches={setup['eval_batches']}", "train.ckpt_every=1000000000", "train.keep_last=1",
            "train.progress=false", "train.tensorboard=false", "train.sample_tokens=0",
            # a non-finite loss stops the run (its rate is too high); no spike test: the loss of a growth that
            # does not preserve the function jumps, and that is part of what is measured
            "train.on_bad_step='stop'", "train.spike_factor=0", f"model.max_seq_len={p.seq_len}", "model.mup=true",
            f"model.base_width={setup['final']['d_model']}", f"model.vocab_size={setup['final_model'].vocab_size}",
            *[f"model.{k}={getattr(shape, k)}" for k in ("n_layers", "d_model", "n_heads", "head_dim", "d_ff")]]


def horizon_steps(horizon: float, setup: dict) -> int:
    """Scratch's steps at `horizon` tokens per non-embedding parameter of the final model (at least 2); its
    training FLOPs are every arm's budget."""
    from flm.model import non_embedding_params

    p = setup["preset"]
    return max(2, round(horizon * non_embedding_params(setup["final_model"]) / (p.batch * p.seq_len)))


def build_config(arm: str, horizon: float, lr: float, seed: int, setup: dict):
    """The run's Config and its steps per stage."""
    from flm.config import StageConfig, load_config
    from flm.model import flops_per_token

    p = setup["preset"]
    final = setup["final_model"]
    tps = p.batch * p.seq_len
    scratch_steps = horizon_steps(horizon, setup)
    budget = scratch_steps * tps * flops_per_token(final, p.seq_len)
    run_dir = Path(setup["out"]) / "runs" / f"h{horizon:g}_{arm}_lr{lr:.4g}_s{seed}"
    shape = final if arm == "scratch" else dataclasses.replace(final, **shape_names(setup, arm)[0][1])
    cfg = load_config(None, run_overrides(setup, run_dir, lr, seed, shape))
    if arm == "scratch":
        steps = [scratch_steps]
        cfg.train.max_steps, cfg.train.warmup_steps = scratch_steps, max(1, round(WARMUP_FRAC * scratch_steps))
    else:
        steps, stages = [], []
        for i, ((_, changes), share) in enumerate(zip(shape_names(setup, arm), SHARES)):
            model = dataclasses.replace(final, **changes)
            n = max(2, round(share * budget / (flops_per_token(model, p.seq_len) * tps)))
            steps.append(n)
            stages.append(StageConfig(name=f"{model.n_layers}x{model.d_model}", tokens=n * tps,
                                      **{k: changes[k] for k in ("n_layers", "d_model", "n_heads", "d_ff")},
                                      operator=FAMILY_ARMS[arm][0], warmup_steps=max(1, round(WARMUP_FRAC * n)),
                                      ramp_steps=max(1, round(RAMP_FRAC * n)) if i else 0))
        cfg.stages = stages
    every = max(1, sum(steps) // setup["evals"])
    cfg.train.eval_every, cfg.train.log_every = every, every
    cfg.validate()
    return cfg, steps


def run_one(arm: str, horizon: float, lr: float, seed: int, setup: dict) -> dict:
    """Train one arm at one rate and seed; its validation curve (FLOPs, loss), final loss, steps and wall time."""
    cfg, steps = build_config(arm, horizon, lr, seed, setup)
    r = train_run(cfg, setup["threads"])
    return {"arm": arm, "horizon": horizon, "lr": lr, "seed": seed, "final_val_loss": r["final_val_loss"],
            "diverged": r["diverged"], "curve": r["curve"], "steps": steps,
            "tokens": sum(steps) * cfg.train.tokens_per_step, "wall_s": r["wall_s"], "growths": r["growths"]}


def train_run(cfg, threads: int) -> dict:
    """Train `cfg` from scratch in its run folder on `threads` threads: its validation curve (FLOPs, loss), final
    loss (inf when a non-finite loss stopped it: diverged), growth records and wall time; checkpoints deleted."""
    import torch

    from flm.errors import TrainingHalted
    from flm.train import Trainer
    from flm.train.metrics import read_metrics

    torch.set_num_threads(threads)
    run_dir = Path(cfg.train.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    diverged = False
    with Trainer(cfg, log=lambda *_: None) as trainer:
        try:
            trainer.train()
        except TrainingHalted:  # a non-finite loss: this rate is too high
            diverged = True
    wall = time.perf_counter() - t0
    records = read_metrics(run_dir)
    curve = [(r["flops"], r["val_loss"]) for r in records if r["kind"] == "eval" and r["val_loss"] is not None]
    growths = [{k: r[k] for k in ("step", "operator", "loss_before", "loss_after")}
               for r in records if r["kind"] == "growth"]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the metrics are the result; keep the disk free
    final = curve[-1][1] if curve and not diverged else math.inf
    return {"final_val_loss": final, "diverged": diverged, "curve": curve, "wall_s": wall, "growths": growths}


# ---- the sweep -------------------------------------------------------------------------------------------------
class Sweeps:
    """The runs in flight and done, and what each (arm, horizon) needs next: a wider grid, a second seed, the next
    horizon's grid around its best rate."""

    def __init__(self, arms: list[str], horizons: tuple[float, ...], center: float, grid: int, seeds: tuple[int, ...],
                 last: dict[str, float] | None = None):
        self.arms, self.horizons, self.grid, self.seeds = arms, horizons, grid, seeds
        self.last = last or {}  # arm -> the last horizon it runs (all of them when absent)
        self.centers = {arm: center for arm in arms}
        self.results: dict[tuple, dict] = {}  # (arm, horizon, lr, seed) -> result
        self.widened: dict[tuple, int] = {}
        self.best: dict[tuple, float] = {}  # (arm, horizon) -> best lr

    def first_grid(self, arm: str, horizon: float) -> list[tuple]:
        c = self.centers[arm]
        lrs = [c * GRID_FACTOR ** (k - (self.grid - 1) / 2) for k in range(self.grid)]
        return [(arm, horizon, round_lr(lr), self.seeds[0]) for lr in lrs]

    def finals(self, arm: str, horizon: float) -> dict[float, float]:
        return {k[2]: r["final_val_loss"] for k, r in self.results.items()
                if k[0] == arm and k[1] == horizon and k[3] == self.seeds[0]}

    def start(self) -> list[tuple]:
        """The runs to start with."""
        return [k for arm in self.arms for k in self.first_grid(arm, self.horizons[0])]

    def bracket(self, arm: str, horizon: float) -> list[tuple]:
        """Once the first seed's grid of (arm, horizon) has finished: the run that widens it when its best rate is
        at an edge (at most MAX_WIDENINGS times), else [] with the best rate recorded in self.best."""
        finals = self.finals(arm, horizon)
        lrs = sorted(finals)
        finite = [lr for lr in lrs if math.isfinite(finals[lr])]
        best = min(finite, key=finals.get) if finite else lrs[0]
        n = self.widened.get((arm, horizon), 0)
        if len(lrs) > 1 and best in (lrs[0], lrs[-1]) and n < MAX_WIDENINGS:
            new = round_lr(best / GRID_FACTOR if best == lrs[0] else best * GRID_FACTOR)
            if new <= 1.0:
                self.widened[(arm, horizon)] = n + 1
                return [(arm, horizon, new, self.seeds[0])]
        self.best[(arm, horizon)] = best
        return []

    def after(self, key: tuple, pending: set[tuple]) -> list[tuple]:
        """The runs to start once run `key` has finished."""
        arm, horizon, _, seed = key
        if seed != self.seeds[0] or any(k[:2] == (arm, horizon) and k[3] == seed for k in pending):
            return []
        wider = self.bracket(arm, horizon)
        if wider:
            return wider
        best = self.best[(arm, horizon)]
        self.centers[arm] = best
        nxt = [(arm, horizon, best, s) for s in self.seeds[1:]]
        later = [h for h in self.horizons if horizon < h <= self.last.get(arm, math.inf)]
        return nxt + (self.first_grid(arm, later[0]) if later else [])


def round_lr(lr: float) -> float:
    return float(f"{lr:.4g}")


KEY = ("arm", "horizon", "lr", "seed")  # what names a run in the cache: what it does, not who asked for it


def run_all(sweeps, setup: dict, cache: Path, jobs: int, run=None, key=KEY, describe=None) -> None:
    """Run every sweep to its end on `jobs` worker processes, reusing results already in `cache` (one JSON record
    a line, named by its `key` fields); `run(*key, setup)` (a module-level function, default run_one) trains one
    run and returns its record, `describe(key, record)` the line printed when it ends. `sweeps` has start(),
    after(key, pending) -> the keys it unlocks, and a results dict (growth_horizon.Sweeps, objective_ablation.Sweep)."""
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[tuple(r[k] for k in key)] = r
    run, describe = run or run_one, describe or _describe
    ready = sweeps.start()
    pending: dict[cf.Future, tuple] = {}
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool, cache.open("a") as log:
        while ready or pending:
            while ready:
                k = ready.pop(0)
                if k in done:
                    sweeps.results[k] = done[k]
                    ready += sweeps.after(k, set(pending.values()) | set(ready))
                else:
                    pending[pool.submit(run, *k, setup)] = k
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                k = pending.pop(future)
                result = future.result()
                sweeps.results[k] = result
                log.write(json.dumps(result) + "\n")
                log.flush()
                print(describe(k, result), flush=True)
                ready += sweeps.after(k, set(pending.values()) | set(ready))


def _describe(key: tuple, result: dict) -> str:
    return (f"H {key[1]:g} {key[0]:>10} lr {key[2]:.3g} seed {key[3]}: final {result['final_val_loss']:.4f} "
            f"({sum(result['steps'])} steps, {result['wall_s']:.0f} s)")


# ---- figures of merit ------------------------------------------------------------------------------------------
def flops_to(curve: list, target: float) -> float | None:
    """FLOPs where a validation curve first reaches `target`, linearly interpolated between evaluations."""
    prev = None
    for flops, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return flops
            return prev[0] + (prev[1] - target) / (prev[1] - loss) * (flops - prev[0])
        prev = (flops, loss)
    return None


def saving(scratch: dict, family: dict) -> float | None:
    """Compute saving of `family` against `scratch` (same seed): > 1 when it reaches scratch's final loss early."""
    budget = scratch["curve"][-1][0]
    if family["diverged"] or not family["curve"]:
        return None
    at = flops_to(family["curve"], scratch["final_val_loss"])
    if at is not None:
        return budget / at
    at = flops_to(scratch["curve"], family["final_val_loss"])
    return at / budget if at is not None else None


def summarize(sweeps: Sweeps, setup: dict) -> dict:
    from flm.model import non_embedding_params, param_count

    final = setup["final_model"]
    out = {"horizons": []}
    for h in sweeps.horizons:
        arms = {}
        for arm in sweeps.arms:
            best = sweeps.best.get((arm, h))
            finals = sweeps.finals(arm, h)
            runs = {s: sweeps.results.get((arm, h, best, s)) for s in sweeps.seeds}
            arms[arm] = {"grid": dict(sorted(finals.items())), "best_lr": best,
                         "final_val_loss": {s: r["final_val_loss"] for s, r in runs.items() if r},
                         "steps": next(iter(runs.values()))["steps"] if runs[sweeps.seeds[0]] else None,
                         "tokens": runs[sweeps.seeds[0]]["tokens"] if runs[sweeps.seeds[0]] else None,
                         "wall_s": {s: r["wall_s"] for s, r in runs.items() if r},
                         "flops": runs[sweeps.seeds[0]]["curve"][-1][0] if runs[sweeps.seeds[0]] else None,
                         "growths": runs[sweeps.seeds[0]]["growths"] if runs[sweeps.seeds[0]] else []}
            if arm != "scratch":
                ratios = [saving(sweeps.results[("scratch", h, sweeps.best[("scratch", h)], s)], r)
                          for s, r in runs.items() if r]
                ratios = [r for r in ratios if r]
                arms[arm]["saving"] = {"per_seed": ratios, "geomean": math.exp(statistics.fmean(map(math.log, ratios)))
                                       if ratios else None, "min": min(ratios, default=None),
                                       "max": max(ratios, default=None)}
        out["horizons"].append({"tokens_per_param": h, "arms": arms})
    out["final_model"] = {"non_embedding_params": non_embedding_params(final), "params": param_count(final),
                          **setup["final"], "vocab_size": final.vocab_size}
    return out


# ---- sizing ----------------------------------------------------------------------------------------------------
def measure(setup: dict, steps: int = 20, shapes: dict[str, dict] | None = None) -> dict[str, dict[str, float]]:
    """Seconds per optimizer step and per evaluation of every shape the arms train (or of `shapes`, name -> shape
    changes to the final model), measured on this machine."""
    import torch

    from flm.train import Trainer

    torch.set_num_threads(setup["threads"])
    if shapes is None:
        shapes = dict(pair for arm in setup["arms"] for pair in shape_names(setup, arm))
    out = {}
    for name, changes in shapes.items():
        cfg, _ = build_config("scratch", 1.0, 1e-3, SEEDS[0], {**setup, "out": str(Path(setup["out"]) / "measure")})
        for k, v in changes.items():
            setattr(cfg.model, k, v)
        with Trainer(cfg, log=lambda *_: None) as trainer:
            for _ in range(3):
                trainer.train_step()
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            step_s = (time.perf_counter() - t0) / steps
            t0 = time.perf_counter()
            trainer.evaluate()
            out[name] = {"step_s": step_s, "eval_s": time.perf_counter() - t0}
    shutil.rmtree(Path(setup["out"]) / "measure", ignore_errors=True)
    return out


def projection(setup: dict, timing: dict, grid: int, seeds: int) -> dict:
    """Step counts of every arm at every horizon and the projected wall time of the whole benchmark."""
    rows, total = [], 0.0
    for h in setup["preset"].horizons if not setup.get("horizons") else setup["horizons"]:
        for arm in setup["arms"]:
            _, steps = build_config(arm, h, 1e-3, SEEDS[0], setup)
            names = [name for name, _ in shape_names(setup, arm)]
            run_s = sum(n * timing[name]["step_s"] for n, name in zip(steps, names))
            run_s += setup["evals"] * timing["final"]["eval_s"]
            rows.append({"tokens_per_param": h, "arm": arm, "steps": steps, "run_s": run_s})
            total += run_s * (grid + seeds - 1)
    return {"runs": rows, "runs_per_sweep": grid + seeds - 1, "total_s": total / setup["jobs"],
            "total_s_one_widening_each": total * (grid + seeds) / (grid + seeds - 1) / setup["jobs"]}


# ---- report ----------------------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    mem = None
    if Path("/proc/meminfo").exists():
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None,
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    hs = [h["tokens_per_param"] for h in summary["horizons"]]
    for arm in [a for a in summary["arms"] if a != "scratch"]:
        points = [(h["tokens_per_param"], h["arms"][arm]["saving"]) for h in summary["horizons"]]
        points = [(x, s) for x, s in points if s["geomean"]]
        if not points:
            continue
        xs, ss = zip(*points)
        ys = [s["geomean"] for s in ss]
        err = [[y - s["min"] for y, s in zip(ys, ss)], [s["max"] - y for y, s in zip(ys, ss)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{arm} ({FAMILY_ARMS[arm][1]} schedule)")
    ax.axhline(1.0, color="black", lw=0.8, ls=":", label="scratch")
    ax.axhline(2.0, color="grey", lw=0.8, ls="--", label="goal 2x")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(hs, [f"{h:g}" for h in hs])
    ax.set_xlabel("training tokens per non-embedding parameter of the final model (scratch)")
    ax.set_ylabel("compute saving vs scratch (x)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(summary: dict, path: Path) -> None:
    """The results as Markdown: command, machine, set-up, the savings table, per-horizon sweeps."""
    m, fm, s = summary["machine"], summary["final_model"], summary["setup"]
    lines = [f"# Growth vs scratch across horizons ({s['preset']} preset)", "",
             f"Command (from the repository root): `{summary['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB" + (f", {m['gpu']}" if "gpu" in m else "")
             + f"; Python {m['python']}, torch {m['torch']}. Date {summary['date']}. Wall time "
             f"{summary['run_s'] / 60:.0f} min of runs with {s['jobs']} jobs x {s['threads']} thread(s) (the runs' "
             f"times over the jobs; this invocation {summary['wall_s'] / 60:.0f} min, reusing finished runs); "
             "load average before "
             f"{summary['load_before']}, after {summary['load_after']}. Raw results: "
             f"[{path.stem}.json]({path.stem}.json), plot: [{path.stem}.png]({path.stem}.png).",
             "", "## Set-up", "",
             f"- Final model (every arm): {fm['n_layers']} layers, d_model {fm['d_model']}, {fm['n_heads']} heads x "
             f"{fm['head_dim']}, FFN {fm['d_ff']}, vocabulary {fm['vocab_size']}: {fm['non_embedding_params']:,} "
             f"non-embedding parameters (N), {fm['params']:,} in all. Context {s['seq_len']}, batch {s['batch']} "
             f"sequences ({s['seq_len'] * s['batch']:,} tokens per step).",
             f"- Corpus: {s['corpus']}; BPE trained on it; {s['train_tokens']:,} training and "
             f"{s['val_tokens']:,} validation tokens. The longest run reads {s['max_tokens']:,} tokens = "
             f"{s['max_tokens'] / s['train_tokens']:.3f} epochs (windows drawn without replacement from a shuffled "
             "epoch), so no run sees a token twice." if s["max_tokens"] <= s["train_tokens"] else
             f"- Corpus: {s['corpus']}; {s['train_tokens']:,} training tokens. The longest run reads "
             f"{s['max_tokens']:,} tokens = {s['max_tokens'] / s['train_tokens']:.2f} epochs: it sees tokens again.",
             f"- Validation: the first {s['eval_batches']} batches of the held-out documents, {s['evals']} evaluations "
             "per run.",
             "- Arms and figures of merit: the benchmark's docstring (`benchmarks/growth_horizon.py`). Stage FLOPs "
             f"shares {', '.join(f'{x:.0%}' for x in SHARES)}; width schedule d/2, heads/2, FFN/2 -> d -> heads, FFN; "
             "depth schedule L/4 -> L/2 -> L. Savings: geometric mean over seeds [min, max].", "",
             "## Compute saving against scratch", "",
             "| tokens / N | " + " | ".join(a for a in summary["arms"] if a != "scratch") + " |",
             "|---|" + "---|" * (len(summary["arms"]) - 1)]
    for h in summary["horizons"]:
        cells = []
        for arm in summary["arms"]:
            if arm == "scratch":
                continue
            sv = h["arms"][arm]["saving"]
            cells.append(f"**{sv['geomean']:.2f}x** [{sv['min']:.2f}, {sv['max']:.2f}]" if sv["geomean"] else "n/a")
        lines.append(f"| {h['tokens_per_param']:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Final validation loss at equal FLOPs (best rate; mean over seeds)", "",
              "| tokens / N | " + " | ".join(summary["arms"]) + " |", "|---|" + "---|" * len(summary["arms"])]
    for h in summary["horizons"]:
        cells = []
        for arm in summary["arms"]:
            finals = list(h["arms"][arm]["final_val_loss"].values())
            cells.append(f"{statistics.fmean(finals):.4f} (lr {h['arms'][arm]['best_lr']:.3g})" if finals else "n/a")
        lines.append(f"| {h['tokens_per_param']:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Sweeps (final validation loss by peak learning rate, first seed)", ""]
    for h in summary["horizons"]:
        lines.append(f"Horizon {h['tokens_per_param']:g} tokens per parameter:")
        lines.append("")
        for arm in summary["arms"]:
            a = h["arms"][arm]
            if not a["grid"]:
                lines.append(f"- {arm}: not run at this horizon (`--last-horizon`)")
                continue
            grid = ", ".join(f"{lr:.3g}: {loss:.4f}" for lr, loss in a["grid"].items())
            lines.append(f"- {arm}: {grid}; steps per stage {a['steps']}, {a['tokens']:,} tokens, "
                         f"{a['flops'] / 1e12:.2f} TFLOPs, {statistics.fmean(a['wall_s'].values()):.0f} s per run")
        lines.append("")
    lines += ["## Read with care", "",
              "- FLOPs to a loss are read off the curve of a run planned for the whole budget (its cosine has not "
              "decayed at that point); a run planned for the shorter budget would get there sooner, so savings below "
              "the budget are understated for growth and scratch alike.",
              "- Arms that share their first stage (msg, zero and clone: the half-width model; stack and msg-depth: "
              "the quarter-depth one) train identically until their first growth: where they reach scratch's final "
              "loss before it, their savings are the same number.",
              "- Two seeds give a spread, not a confidence interval.",
              "- Tokens per parameter count non-embedding parameters; per parameter in all, divide by "
              f"{fm['params'] / fm['non_embedding_params']:.2f}.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--arms", default="scratch,msg,zero,clone,stack,msg-depth",
                   help=f"scratch and families among {', '.join(FAMILY_ARMS)}")
    p.add_argument("--horizons", default=None, help="tokens per non-embedding parameter, e.g. 1,5,20 (preset's)")
    p.add_argument("--grid", type=int, default=3, help="rates in each first grid (1: no sweep, no widening)")
    p.add_argument("--seeds", type=int, default=2, choices=[1, 2])
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (preset's)")
    p.add_argument("--corpus", default=None, help="default: the Python sources of the installed packages")
    p.add_argument("--out", default=None, help="run folders and cache (default runs/growth_horizon[_smoke])")
    p.add_argument("--report", default=None, help="Markdown report (default docs/results/growth_horizon.md; "
                                                   "with --smoke, OUT/growth_horizon.md)")
    p.add_argument("--last-horizon", action="append", default=[], metavar="ARM=H",
                   help="the last horizon ARM runs (repeatable), to leave a secondary arm out of the longest runs")
    p.add_argument("--plan", action="store_true", help="measure step times and print the projection only")
    p.add_argument("--smoke", action="store_true", help="horizons 0.05,0.2, one rate, small evaluations")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    arms = args.arms.split(",")
    unknown = [a for a in arms if a != "scratch" and a not in FAMILY_ARMS]
    try:
        last = {a: float(h) for a, h in (item.split("=", 1) for item in args.last_horizon)}
    except ValueError:
        p.error("--last-horizon takes ARM=H, e.g. msg-depth=5")
    if "scratch" in last or not set(last) <= set(arms):
        p.error(f"--last-horizon names a family arm among {', '.join(arms[1:])}; scratch runs every horizon")
    if unknown or "scratch" not in arms:
        p.error(f"--arms needs scratch and families among {', '.join(FAMILY_ARMS)}; unknown: {unknown}")
    horizons = (0.05, 0.2) if args.smoke else preset.horizons
    if args.horizons:
        horizons = tuple(float(v) for v in args.horizons.split(","))
    grid = 1 if args.smoke else args.grid
    jobs = args.jobs or preset.jobs
    out = Path(args.out or ("runs/growth_horizon_smoke" if args.smoke else f"runs/growth_horizon_{args.preset}"))
    corpus, corpus_note = corpus_of(args.corpus, out)
    report_path = Path(args.report) if args.report else (out / "growth_horizon.md" if args.smoke
                                                         else Path("docs/results/growth_horizon.md"))

    from flm.config import ModelConfig
    from flm.files import write_json_report

    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    t_start = time.perf_counter()
    data_dir = out / "data"
    data = prepare_data(corpus, data_dir, preset, args.smoke, jobs)
    vocab = 128 * math.ceil(data.vocab_size / 128)
    setup = {"preset": preset, "final": preset.final, "final_model": ModelConfig(**preset.final, vocab_size=vocab,
                                                                                 max_seq_len=preset.seq_len),
             "data_dir": str(data_dir), "out": str(out), "arms": arms, "horizons": horizons, "jobs": jobs,
             "threads": max(1, (os.cpu_count() or 1) // jobs) if preset.device == "cpu" else 1,
             "eval_batches": 4 if args.smoke else preset.eval_batches, "evals": 10 if args.smoke else preset.evals}
    if args.plan:
        timing = measure(setup)
        plan = projection(setup, timing, grid, args.seeds)
        for name, t in timing.items():
            print(f"{name}: {1000 * t['step_s']:.1f} ms per step, {t['eval_s']:.2f} s per evaluation")
        for row in plan["runs"]:
            print(f"H {row['tokens_per_param']:g} {row['arm']:>10}: steps {row['steps']}, {row['run_s']:.0f} s per run")
        print(f"projected: {plan['total_s'] / 60:.0f} min with {plan['runs_per_sweep']} runs per sweep "
              f"({plan['total_s_one_widening_each'] / 60:.0f} min if every sweep widens once), {jobs} jobs")
        return
    settings = [args.preset, arms, horizons, grid, args.seeds, setup["eval_batches"], setup["evals"], corpus, SHARES,
                RAMP_FRAC, WARMUP_FRAC]  # not `last`: it chooses which runs to do, not what a run does
    fingerprint = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
    sweeps = Sweeps(arms, horizons, preset.lr_center, grid, SEEDS[:args.seeds], last)
    run_all(sweeps, setup, out / f"runs-{fingerprint}.jsonl", jobs)
    summary = summarize(sweeps, setup)
    summary["arms"] = arms
    summary["machine"] = machine()
    summary["command"] = " ".join(["python benchmarks/growth_horizon.py", *sys.argv[1:]])
    summary["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    summary["wall_s"] = time.perf_counter() - t_start
    summary["run_s"] = sum(r["wall_s"] for r in sweeps.results.values()) / jobs
    summary["load_before"], summary["load_after"] = load_before, ", ".join(f"{v:.2f}" for v in os.getloadavg())
    summary["setup"] = {"preset": args.preset, "corpus": corpus_note, "train_tokens": data.train_tokens,
                        "val_tokens": data.val_tokens, "max_tokens": max(r["tokens"] for r in sweeps.results.values()),
                        "seq_len": preset.seq_len, "batch": preset.batch, "jobs": jobs, "threads": setup["threads"],
                        "eval_batches": setup["eval_batches"], "evals": setup["evals"], "grid": grid,
                        "seeds": list(SEEDS[:args.seeds])}
    summary["runs"] = list(sweeps.results.values())
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_report(report_path.with_suffix(".json"), summary)
    plot(summary, report_path.with_suffix(".png"))
    report(summary, report_path)
    print(f"wrote {report_path} (+ .json, .png) in {summary['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
