"""The ablation the FLM paper left out: the unified teacher-signal objective against a separate head, and against no
teacher signal at all.

Question: eFLM trains teacher-signal propositions as language, the label a token the LM head predicts (REFERENCE.md
§4, "unified"); FreeLM used a classification head of its own ("separate", `train.teacher_objective`, docs/data.md).
Does the unified form cost language loss, teacher accuracy or stability, or gain any, and how does each behave
across a growth event? The control ("none") trains on text alone.

Design (every arm of a size reads the same number of tokens, in runs of the same steps and shapes):
- Data: the bundled corpus (KJV + Chinese idioms) and the bundled teacher set (statements that a book belongs to the
  Old Testament and two-option questions, which the corpus never states; a quarter of the records held out: 110
  statements and 6 questions), mixed 3 : 1 in every batch. The control reads a folder of the corpus alone, prepared
  with the mixed folder's tokenizer, so every arm has the same vocabulary and the same validation tokens (checked).
- Arms: "unified" (the label token by the LM head, the default), "separate" (a d_model -> 2 head at the same
  position, the label out of the LM loss, teacher_loss_weight 1: a label weighs what it weighs in unified),
  "none" (text only: its 4 teacher sequences of a batch are text sequences).
- Each run grows once: stage 1 at half width (d_model/2, heads/2, FFN/2), MSG width growth at half of the steps, the
  masks ramping in over a tenth of them; one cosine to lr/10 after a 5% warmup. Sizes: the final shapes of
  PRESETS. The step guard is on as in a default run (`rollback`, spike factor 3; a spike window of 25 steps so that
  it is armed early in short runs; at most 3 rollbacks, then the run halts).
- Learning rates: a grid of factor 2 for the first seed, extended upwards by factors of 2 until a rate diverges
  (at most MAX_EXTENSIONS times, never above 1) and downwards while the best rate is the lowest run (at most
  MAX_EXTENSIONS times); then the second seed at each arm's best rate and at its largest stable rate.
  Diverged: the run halted (guard: too many rollbacks, or a bad step before the first checkpoint), a loss was not
  finite at the end, or the final validation loss ended above the first evaluation's.
- FLOPs: training FLOPs from flm.model.flops_per_token of each stage's shape (6 x matmul weights per token + the
  attention term), as the trainer's metrics count them. The separate head runs on every position (static shapes),
  so it adds 6 x 2 x d_model FLOPs per token, counted by flm.model.matmul_params; the report gives that share.
- Figures of merit per arm and size (mean over seeds at the best rate): final validation loss on the corpus,
  held-out teacher accuracy on statements and on two-option questions (the final model, `flm eval teacher`'s
  measure: the label tokens' probabilities, or the head's logits), stability (bad steps the guard caught, rollbacks,
  the largest rate without divergence), and across the growth event the largest validation-loss rise and teacher-
  accuracy fall between the growth and the end of the ramp (evaluations every 5% of the run).

Sizing: `--plan` measures a few steps of every shape and projects the whole run. The CPU preset (final models 2 x 64
and 4 x 128, vocabulary 2048, 400 steps of 16 x 128 tokens) is sized for about an hour with 2 jobs on 2 otherwise
idle cores; `--preset gpu` (final 6 x 384 and 12 x 768, vocabulary 8192, 3000 steps of 32 x 512 tokens) is the same
experiment for one GPU, reading the bundled corpus many times over (its report says how many epochs).

    python benchmarks/objective_ablation.py --plan      # step times and the projected total, no training
    python benchmarks/objective_ablation.py             # -> docs/results/objective_ablation.{md,json,png}
    python benchmarks/objective_ablation.py --smoke     # end to end in minutes, under runs/objective_ablation_smoke
    python benchmarks/objective_ablation.py --preset gpu --out runs/objective_ablation_gpu

Finished runs are kept in OUT/runs-<settings>.jsonl: a benchmark started again with the same settings continues
where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from growth_horizon import machine, round_lr, run_all  # noqa: E402  (the same machine, rate rounding and runner)

ARMS = ("unified", "separate", "none")
SEEDS = (1337, 2024)
GRID_FACTOR, MAX_EXTENSIONS = 2.0, 5  # 5: from the CPU grid's top up to 0.512
RAMP_FRAC, WARMUP_FRAC, EVAL_FRAC, CKPT_FRAC = 0.10, 0.05, 0.05, 0.10  # of a run's steps
SPIKE_WINDOW, MAX_ROLLBACKS = 25, 3
TEACHER_WEIGHT, TEACHER_HELDOUT = 0.25, 0.25


@dataclasses.dataclass(frozen=True)
class Preset:
    sizes: tuple[tuple[str, dict], ...]  # (name, final shape)
    vocab: int
    seq_len: int
    batch: int
    steps: int  # per run, half of them before the growth
    lrs: tuple[float, ...]  # the first grid
    eval_batches: int
    device: str
    jobs: int


PRESETS = {
    "cpu": Preset((("2x64", dict(n_layers=2, d_model=64, n_heads=4, head_dim=16)),
                   ("4x128", dict(n_layers=4, d_model=128, n_heads=8, head_dim=16))),
                  2048, 128, 16, 400, (4e-3, 8e-3, 1.6e-2, 3.2e-2), 8, "cpu", 2),
    "gpu": Preset((("6x384", dict(n_layers=6, d_model=384, n_heads=6, head_dim=64)),
                   ("12x768", dict(n_layers=12, d_model=768, n_heads=12, head_dim=64))),
                  8192, 512, 32, 3000, (5e-4, 1e-3, 2e-3, 4e-3), 16, "cuda", 1),
}


def first_shape(final: dict) -> dict:
    """Stage 1: half the width, half the heads (the FFN follows d_model: 4 x d)."""
    return dict(final, d_model=final["d_model"] // 2, n_heads=final["n_heads"] // 2)


# ---- data -------------------------------------------------------------------------------------------------------
def data_settings(setup: dict, arm: str) -> list[str]:
    """The `data.*` settings an arm trains with (the control: the corpus alone, the mixed folder's tokenizer)."""
    common = ["data.corpus='bundled'", "data.val_fraction=0.01", "data.shard_tokens=50000000", "data.workers=1"]
    if setup["max_chars"]:
        common.append(f"data.max_chars={setup['max_chars']}")
    if arm == "none":
        return [*common, f"data.dir='{setup['text_dir']}'", f"data.tokenizer='{setup['mixed_dir']}/tokenizer.json'"]
    return [*common, f"data.dir='{setup['mixed_dir']}'", f"data.vocab_size={setup['vocab']}",
            f"data.sources=[{{kind='text', weight={1 - TEACHER_WEIGHT}}}, {{kind='teacher', path='bundled', "
            f"weight={TEACHER_WEIGHT}, val_fraction={TEACHER_HELDOUT}}}]"]


def prepare_all(setup: dict) -> dict:
    """Prepare the mixed folder, then the text-only one with its tokenizer; check that both validate on the same
    tokens. Returns what the report says about the data."""
    import numpy as np

    from flm.config import load_config
    from flm.data import load_prepared, prepare, read_shard

    mixed = prepare(load_config(None, data_settings(setup, "unified")).data, log=print)
    text = prepare(load_config(None, data_settings(setup, "none")).data, log=print)
    if text.vocab_size != mixed.vocab_size:
        raise SystemExit(f"the control's vocabulary ({text.vocab_size}) is not the mixed folder's ({mixed.vocab_size})")
    val = [np.concatenate([np.asarray(read_shard(p)) for p in d.val_shards]) for d in (mixed, text)]
    if not np.array_equal(*val):
        raise SystemExit("the control's validation tokens differ from the mixed folder's")
    teacher = next(s for s in load_prepared(setup["mixed_dir"]).sources if s.kind == "teacher")
    return {"vocab": mixed.vocab_size, "val_tokens": mixed.val_tokens, "heldout": str(teacher.heldout),
            "text_train_tokens": text.train_tokens, "mixed_train_tokens": mixed.train_tokens}


# ---- one run (in a worker process) ------------------------------------------------------------------------------
def build_config(size: str, arm: str, lr: float, seed: int, setup: dict, run_dir: Path | None = None):
    """The Config of one run: the size's two stages (half width, then MSG growth to the final shape)."""
    from flm.config import StageConfig, load_config

    final = dict(setup["sizes"])[size]
    steps, tps = setup["steps"], setup["batch"] * setup["seq_len"]
    run_dir = run_dir or Path(setup["out"]) / "runs" / f"{size}_{arm}_lr{lr:.4g}_s{seed}"
    every = max(1, round(EVAL_FRAC * steps))
    first = first_shape(final)
    settings = [*data_settings(setup, arm), f"train.run_dir='{run_dir}'", f"train.seed={seed}", f"train.lr={lr}",
                f"train.min_lr={lr / 10}", f"train.batch_size={setup['batch']}", f"train.seq_len={setup['seq_len']}",
                f"train.device='{setup['device']}'", f"train.warmup_steps={max(1, round(WARMUP_FRAC * steps))}",
                f"train.eval_every={every}", f"train.log_every={every}", f"train.eval_batches={setup['eval_batches']}",
                f"train.ckpt_every={max(1, round(CKPT_FRAC * steps))}", "train.keep_last=2", "train.progress=false",
                "train.tensorboard=false", "train.sample_tokens=0", "train.on_bad_step='rollback'",
                f"train.spike_window={SPIKE_WINDOW}", f"train.max_rollbacks={MAX_ROLLBACKS}",
                f"train.teacher_objective='{'separate' if arm == 'separate' else 'unified'}'",
                f"model.max_seq_len={setup['seq_len']}", f"model.vocab_size={setup['model_vocab']}",
                *[f"model.{k}={v}" for k, v in first.items()]]
    cfg = load_config(None, settings)
    half = steps // 2
    cfg.stages = [StageConfig(name="half width", tokens=half * tps),
                  StageConfig(name="final", d_model=final["d_model"], n_heads=final["n_heads"],
                              tokens=(steps - half) * tps, operator="msg",
                              ramp_steps=max(1, round(RAMP_FRAC * steps)))]
    cfg.validate()
    return cfg


KEY = ("size", "arm", "lr", "seed")  # a run in the cache


def run_one(size: str, arm: str, lr: float, seed: int, setup: dict) -> dict:
    """Train one run; its evaluations, growth record, guard counts, final teacher accuracy and wall time."""
    import torch

    from flm.data.teacher import read_items
    from flm.errors import TrainingHalted
    from flm.eval.teacher import teacher_accuracy
    from flm.train import Trainer
    from flm.train.metrics import read_metrics

    torch.set_num_threads(setup["threads"])
    cfg = build_config(size, arm, lr, seed, setup)
    run_dir = Path(cfg.train.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    caught = {"bad_steps": 0, "nonfinite": 0}
    held = read_items(setup["heldout"])
    t0 = time.perf_counter()
    halted = None
    final_acc = {}
    with Trainer(cfg, log=lambda *_: None) as trainer:
        policy = trainer.recovery.bad_steps

        def counted(report, step, progress):  # every report the guard makes reaches the policy: count it there
            caught["bad_steps"] += report.bad
            caught["nonfinite"] += report.nonfinite
            return policy(report, step, progress)

        trainer.recovery.bad_steps = counted
        try:
            trainer.train()
        except TrainingHalted as e:
            halted = str(e)
        rollbacks = trainer.recovery.rollbacks
        if halted is None:
            for name, items in (("statements", [i for i in held if not i.multiple_choice]),
                                ("questions", [i for i in held if i.multiple_choice])):
                acc = teacher_accuracy(trainer.model, trainer.tokenizer, items)
                final_acc[name] = acc.accuracy if name == "statements" else acc.mc_accuracy
    wall = time.perf_counter() - t0
    records = read_metrics(run_dir)
    evals = [{k: r.get(k) for k in ("step", "flops", "val_loss", "teacher_acc", "teacher_mc_acc")}
             for r in records if r["kind"] == "eval"]
    growth = next(({k: r[k] for k in ("step", "loss_before", "loss_after")} for r in records if r["kind"] == "growth"),
                  None)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the metrics are the result; keep the disk free
    losses = [e["val_loss"] for e in evals]
    diverged = (halted is not None or not losses or losses[-1] is None or not math.isfinite(losses[-1])
                or losses[-1] > losses[0])
    return {"size": size, "arm": arm, "lr": lr, "seed": seed, "diverged": diverged, "halted": halted,
            "final_val_loss": losses[-1] if losses and not diverged else None, "evals": evals, "growth": growth,
            "ramp_steps": cfg.stages[1].ramp_steps, "final_teacher": final_acc, "rollbacks": rollbacks, **caught,
            "steps": setup["steps"], "tokens": setup["steps"] * cfg.train.tokens_per_step,
            "flops": evals[-1]["flops"] if evals else None, "wall_s": wall}


# ---- the sweep --------------------------------------------------------------------------------------------------
class Sweep:
    """What each (size, arm) needs next: its grid (first seed), a higher rate while none diverged, a lower one while
    the best is the lowest (so that the best is never at the grid's edge), then the second seed at its best and its
    largest stable rate."""

    def __init__(self, sizes: list[str], arms: list[str], lrs: tuple[float, ...], seeds: tuple[int, ...]):
        self.sizes, self.arms, self.lrs, self.seeds = sizes, arms, [round_lr(x) for x in lrs], seeds
        self.results: dict[tuple, dict] = {}
        self.extended: dict[tuple, int] = {}
        self.lowered: dict[tuple, int] = {}
        self.best: dict[tuple, float | None] = {}
        self.stable: dict[tuple, float | None] = {}

    def start(self) -> list[tuple]:
        return [(s, a, lr, self.seeds[0]) for s in self.sizes for a in self.arms for lr in self.lrs]

    def first_seed(self, size: str, arm: str) -> dict[float, dict]:
        return {k[2]: r for k, r in self.results.items() if k[:2] == (size, arm) and k[3] == self.seeds[0]}

    def after(self, key: tuple, pending: set[tuple]) -> list[tuple]:
        size, arm, _, seed = key
        if seed != self.seeds[0] or any(k[:2] == (size, arm) and k[3] == seed for k in pending):
            return []
        runs = self.first_seed(size, arm)
        top = max(runs)
        n = self.extended.get((size, arm), 0)
        if not any(r["diverged"] for r in runs.values()) and n < MAX_EXTENSIONS and top * GRID_FACTOR <= 1.0:
            self.extended[(size, arm)] = n + 1
            return [(size, arm, round_lr(top * GRID_FACTOR), self.seeds[0])]
        self.decide(size, arm)
        best, low, n = self.best[(size, arm)], min(runs), self.lowered.get((size, arm), 0)
        if best is not None and best == low and n < MAX_EXTENSIONS:  # bracket the best from below too
            self.lowered[(size, arm)] = n + 1
            return [(size, arm, round_lr(low / GRID_FACTOR), self.seeds[0])]
        chosen = {best, self.stable[(size, arm)]} - {None}
        return [(size, arm, lr, s) for lr in sorted(chosen) for s in self.seeds[1:]]

    def decide(self, size: str, arm: str) -> None:
        runs = self.first_seed(size, arm)
        fine = {lr: r["final_val_loss"] for lr, r in runs.items() if not r["diverged"]}
        self.best[(size, arm)] = min(fine, key=fine.get) if fine else None
        self.stable[(size, arm)] = largest_stable(runs)


def largest_stable(runs: dict[float, dict]) -> float | None:
    """The largest rate below which (inclusive) no run of the grid diverged."""
    stable = None
    for lr in sorted(runs):
        if runs[lr]["diverged"]:
            break
        stable = lr
    return stable


def lr_sensitivity(losses: dict[float, float | None], ceiling: float) -> float | None:
    """Wortsman et al. 2023's LR sensitivity over a grid of rates: the mean of min(L(lr), L0) - L*, L* the best final
    loss of the grid and L0 = `ceiling` (the loss of a uniform prediction, ln of the vocabulary): 0 when every rate
    does as well as the best, growing as rates away from the best lose more. A diverged run (its final loss None,
    as run_one records it) counts as L0; with every run diverged there is no L*, and no sensitivity (None)."""
    capped = [ceiling if v is None else min(v, ceiling) for v in losses.values()]
    if all(v is None for v in losses.values()):
        return None
    return statistics.fmean(v - min(capped) for v in capped)


def describe(key: tuple, r: dict) -> str:
    """The line a finished run prints."""
    loss = "diverged" if r["diverged"] else f"{r['final_val_loss']:.4f}"
    return (f"{key[0]:>7} {key[1]:>8} lr {key[2]:.3g} seed {key[3]}: {loss}, teacher "
            f"{r['final_teacher'].get('statements', float('nan')):.3f}, bad steps {r['bad_steps']}, "
            f"rollbacks {r['rollbacks']} ({r['wall_s']:.0f} s)")


# ---- figures of merit -------------------------------------------------------------------------------------------
def growth_event(r: dict) -> dict:
    """Across the growth: the validation loss and teacher accuracy at the growth step, and the largest rise of the
    one and fall of the other at the evaluations up to the end of the ramp."""
    if r["growth"] is None or r["diverged"]:
        return {}
    g, ramp = r["growth"]["step"], r["ramp_steps"]
    at = next((e for e in r["evals"] if e["step"] == g), None)
    during = [e for e in r["evals"] if g < e["step"] <= g + ramp]
    if at is None or not during:
        return {}
    out = {"val_at_growth": at["val_loss"], "val_rise": max(e["val_loss"] for e in during) - at["val_loss"],
           "probe_jump": r["growth"]["loss_after"] - r["growth"]["loss_before"]}
    if at.get("teacher_acc") is not None:
        out["acc_at_growth"] = at["teacher_acc"]
        out["acc_fall"] = at["teacher_acc"] - min(e["teacher_acc"] for e in during)
    return out


def mean_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(sweep: Sweep, setup: dict) -> dict:
    from flm.config import ModelConfig
    from flm.model import flops_per_token

    out = {"sizes": []}
    for size in sweep.sizes:
        final = ModelConfig(**dict(setup["sizes"])[size], vocab_size=setup["model_vocab"], max_seq_len=setup["seq_len"])
        head = flops_per_token(dataclasses.replace(final, teacher_head=True), setup["seq_len"])
        arms = {}
        for arm in sweep.arms:
            if (size, arm) not in sweep.best:
                sweep.decide(size, arm)
            best, stable = sweep.best[(size, arm)], sweep.stable[(size, arm)]
            grid = {}
            for (s, a, lr, seed), r in sorted(sweep.results.items()):
                if (s, a) == (size, arm):
                    grid.setdefault(lr, {})[seed] = {**{k: r[k] for k in ("final_val_loss", "diverged", "bad_steps",
                                                                          "rollbacks")},
                                                     "teacher_statements": r["final_teacher"].get("statements")}
            at_best = [r for k, r in sweep.results.items() if k[:3] == (size, arm, best)] if best else []
            events = [growth_event(r) for r in at_best]
            stable_runs = [r for k, r in sweep.results.items() if k[:3] == (size, arm, stable)] if stable else []
            arms[arm] = {
                "best_lr": best, "largest_stable_lr": stable,
                "largest_stable_all_seeds": bool(stable_runs) and not any(r["diverged"] for r in stable_runs),
                "diverged_any": any(r["diverged"] for k, r in sweep.results.items() if k[:2] == (size, arm)),
                "seeds_at_best": [r["seed"] for r in at_best],
                "val_loss": mean_of([r["final_val_loss"] for r in at_best]),
                "val_loss_per_seed": [r["final_val_loss"] for r in at_best],
                "teacher_statements": mean_of([r["final_teacher"].get("statements") for r in at_best]),
                "teacher_statements_per_seed": [r["final_teacher"].get("statements") for r in at_best],
                "teacher_questions": mean_of([r["final_teacher"].get("questions") for r in at_best]),
                "teacher_questions_per_seed": [r["final_teacher"].get("questions") for r in at_best],
                "bad_steps_at_best": mean_of([r["bad_steps"] for r in at_best]),
                "rollbacks_at_best": mean_of([r["rollbacks"] for r in at_best]),
                "bad_steps_all": sum(r["bad_steps"] for k, r in sweep.results.items() if k[:2] == (size, arm)),
                "rollbacks_all": sum(r["rollbacks"] for k, r in sweep.results.items() if k[:2] == (size, arm)),
                "growth": {key: mean_of([e.get(key) for e in events])
                           for key in ("val_at_growth", "val_rise", "probe_jump", "acc_at_growth", "acc_fall")},
                "flops": at_best[0]["flops"] if at_best else None, "tokens": at_best[0]["tokens"] if at_best else None,
                "wall_s": mean_of([r["wall_s"] for r in at_best]), "grid": grid}
        # LR sensitivity on the rates every arm ran with the first seed (the same grid for all).
        ceiling = math.log(setup["model_vocab"])
        firsts = {arm: {lr: r["final_val_loss"] for lr, r in sweep.first_seed(size, arm).items()} for arm in sweep.arms}
        shared = sorted(set.intersection(*(set(v) for v in firsts.values()))) if firsts else []
        for arm, a in arms.items():
            a["lr_sensitivity"] = lr_sensitivity({lr: firsts[arm][lr] for lr in shared}, ceiling) if shared else None
        out["sizes"].append({"size": size, "final": dict(setup["sizes"])[size], "arms": arms,
                             "sensitivity_rates": shared, "uniform_loss": ceiling,
                             "head_flops_share": (head - flops_per_token(final, setup["seq_len"])) / head})
    return out


# ---- sizing -----------------------------------------------------------------------------------------------------
def measure(setup: dict, steps: int = 6) -> dict[str, dict[str, float]]:
    """Seconds per step of each stage shape (separate arm: the dearest) and per evaluation (with the teacher's), here."""
    import torch

    from flm.train import Trainer

    torch.set_num_threads(setup["threads"])
    out = {}
    for size, _ in setup["sizes"]:
        cfg = build_config(size, "separate", 1e-3, SEEDS[0], setup, Path(setup["out"]) / "measure")
        with Trainer(cfg, log=lambda *_: None) as trainer:
            times = []
            for stage in range(2):
                if stage:
                    trainer.step = trainer.stages[0].end
                    trainer.grow()
                for _ in range(2):
                    trainer.train_step()
                t0 = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step()
                times.append((time.perf_counter() - t0) / steps)
            t0 = time.perf_counter()
            trainer.evaluate()
            trainer.evaluate_teacher()
            out[size] = {"step_s": times, "eval_s": time.perf_counter() - t0}
        shutil.rmtree(Path(setup["out"]) / "measure", ignore_errors=True)
    return out


def projection(setup: dict, timing: dict, arms: list[str], grid: int, seeds: int) -> dict:
    """Per-run time and the whole benchmark's: grid + one extension + the second seed at two rates, per arm."""
    rows, total = [], 0.0
    half = setup["steps"] // 2
    runs_per_arm = grid + 1 + 2 * (seeds - 1)
    for size, _ in setup["sizes"]:
        t = timing[size]
        run_s = half * t["step_s"][0] + (setup["steps"] - half) * t["step_s"][1] + round(1 / EVAL_FRAC) * t["eval_s"]
        rows.append({"size": size, "run_s": run_s})
        total += run_s * runs_per_arm * len(arms)
    return {"runs": rows, "runs_per_arm": runs_per_arm, "total_s": total / setup["jobs"]}


# ---- report -----------------------------------------------------------------------------------------------------
def plot(summary: dict, path: Path) -> None:
    """Per size: final validation loss (top) and held-out statement accuracy (bottom) against the peak rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = summary["sizes"]
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.5 * len(sizes), 7), dpi=120, squeeze=False, sharex="col")
    for col, s in enumerate(sizes):
        top, bottom = axes[0][col], axes[1][col]
        for i, (arm, a) in enumerate(s["arms"].items()):
            color = f"C{i}"
            fine = {float(lr): [v for v in seeds.values() if not v["diverged"]] for lr, seeds in a["grid"].items()}
            fine = {lr: v for lr, v in sorted(fine.items()) if v}
            if fine:
                top.plot(list(fine), [statistics.fmean(x["final_val_loss"] for x in v) for v in fine.values()],
                         marker="o", color=color, label=arm)
                accs = {lr: mean_of([x["teacher_statements"] for x in v]) for lr, v in fine.items()}
                accs = {lr: acc for lr, acc in accs.items() if acc is not None}
                bottom.plot(list(accs), list(accs.values()), marker="o", color=color, label=arm)
            for lr, seeds in a["grid"].items():
                if any(v["diverged"] for v in seeds.values()):
                    for ax in (top, bottom):
                        ax.axvline(float(lr), color=color, ls=":", lw=0.8)
        top.set_title(f"final {s['size']}, grown from half width")
        top.set_ylabel("final validation loss")
        bottom.set_ylabel("held-out statements: teacher accuracy")
        bottom.set_xlabel("peak learning rate (dotted: a run diverged)")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _f(value, fmt: str = ".4f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _spread(mean, values: list, fmt: str) -> str:
    """The mean over seeds and, with several, their range: '4.4751 [4.4702, 4.4800]'."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return _f(mean, fmt)
    return f"{_f(mean, fmt)} [{_f(min(values), fmt)}, {_f(max(values), fmt)}]"


def report(summary: dict, path: Path) -> None:
    m, s = summary["machine"], summary["setup"]
    gpu = f", {m['gpu']}" if "gpu" in m else ""
    corpus = f" (its first {s['max_chars']:,} characters)" if s["max_chars"] else ""
    tokens = s["steps"] * s["batch"] * s["seq_len"]
    epochs = tokens / s["text_train_tokens"]
    lines = [f"# Unified vs separate teacher-signal objective ({s['preset']} preset)", "",
             f"Command (from the repository root): `{summary['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB{gpu}; Python {m['python']}, torch "
             f"{m['torch']}. Date {summary['date']}. {summary['runs_done']} runs, {summary['run_s'] / 60:.0f} min of runs "
             f"with {s['jobs']} jobs x {s['threads']} thread(s) (this invocation {summary['wall_s'] / 60:.0f} min, "
             f"reusing finished runs); load average before {summary['load_before']}, after {summary['load_after']}. "
             f"Raw results: [{path.stem}.json]({path.stem}.json), plot: [{path.stem}.png]({path.stem}.png).",
             "", "## Set-up", "",
             f"- Data: the bundled corpus{corpus}, BPE vocabulary {s['vocab']} with the label tokens; validation: the "
             f"first {s['eval_batches']} batches of {s['val_tokens']:,} held-out corpus tokens, the same for every arm. "
             f"Teacher arms: {1 - TEACHER_WEIGHT:.0%} corpus / {TEACHER_WEIGHT:.0%} bundled propositions in every "
             f"batch; held-out teacher records: {s['heldout_statements']} statements, {s['heldout_questions']} "
             "two-option questions.",
             f"- Runs: {s['steps']} steps of {s['batch']} x {s['seq_len']} tokens (the control reads {epochs:.2f} "
             f"epochs of the corpus, a teacher arm {(1 - TEACHER_WEIGHT) * epochs:.2f}); growth (msg, width x2, heads "
             f"x2) at step {s['steps'] // 2}, ramp {round(RAMP_FRAC * s['steps'])} steps; evaluations every "
             f"{round(EVAL_FRAC * s['steps'])} steps. Arms, divergence and figures of merit: the benchmark's "
             "docstring (`benchmarks/objective_ablation.py`).", ""]
    for size in summary["sizes"]:
        f = size["final"]
        lines += [f"## Final model {size['size']} ({f['n_layers']} layers, d_model {f['d_model']}, {f['n_heads']} heads)",
                  "", f"Training FLOPs per run: {_f(size['arms'][summary['arms'][0]]['flops'], '.3g')}; the separate "
                  f"head adds {100 * size['head_flops_share']:.3f}% (6 x 2 x d_model per token).", "",
                  "Means over the seeds at the best rate, their range in brackets.", "",
                  "| arm | best lr | largest stable lr | LR sensitivity | val loss | teacher acc (statements) | "
                  "two-option questions | bad steps / rollbacks (best lr) | val rise at growth | "
                  "teacher acc fall at growth |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, a in size["arms"].items():
            g = a["growth"]
            stable = ("" if a["diverged_any"] else ">= ") + _f(a["largest_stable_lr"], ".3g")
            stable += "" if a["largest_stable_all_seeds"] else " (seed 2 diverged)"
            lines.append(f"| {arm} | {_f(a['best_lr'], '.3g')} | {stable} | {_f(a['lr_sensitivity'], '.3f')} | "
                         f"{_spread(a['val_loss'], a['val_loss_per_seed'], '.4f')} | "
                         f"{_spread(a['teacher_statements'], a['teacher_statements_per_seed'], '.3f')} | "
                         f"{_spread(a['teacher_questions'], a['teacher_questions_per_seed'], '.3f')} | "
                         f"{_f(a['bad_steps_at_best'], '.1f')} / {_f(a['rollbacks_at_best'], '.1f')} | "
                         f"{_f(g['val_rise'])} | {_f(g['acc_fall'], '.3f')} |")
        rates = size["sensitivity_rates"]
        if rates:
            lines += ["", f"LR sensitivity (Wortsman et al. 2023): the mean over the {len(rates)} rates every arm ran "
                      f"with the first seed ({rates[0]:g} to {rates[-1]:g}) of min(L(lr), L0) - L*, L* the arm's best "
                      f"final loss there and L0 = ln {summary['setup']['model_vocab']} = {size['uniform_loss']:.3f} "
                      "(a uniform prediction): lower is a flatter, more forgiving curve."]
        lines += ["", "Final validation loss by peak rate (seeds averaged; D: diverged; [bad steps/rollbacks] summed):", ""]
        for arm, a in size["arms"].items():
            cells = []
            for lr, seeds in sorted(a["grid"].items(), key=lambda kv: float(kv[0])):
                v = list(seeds.values())
                loss = "D" if any(x["diverged"] for x in v) else _f(mean_of([x["final_val_loss"] for x in v]))
                cells.append(f"{float(lr):.3g}: {loss} [{sum(x['bad_steps'] for x in v)}/{sum(x['rollbacks'] for x in v)}]")
            lines.append(f"- {arm}: " + ", ".join(cells))
        lines.append("")
    lines += ["## Read with care", "",
              "- The control reads a third more corpus tokens than the teacher arms (its teacher sequences are text), "
              "so a lower validation loss there is partly more text, not only no teacher signal.",
              "- Two seeds give a spread, not a confidence interval; the held-out questions are few (see the count "
              "above), so their accuracy moves in large steps.",
              "- At weight 1 a separate label weighs in the loss what a unified label does; other weights are not "
              "swept here (`train.teacher_loss_weight`).", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--arms", default=",".join(ARMS), help=f"among {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=2, choices=[1, 2])
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (preset's)")
    p.add_argument("--out", default=None, help="run folders, data and cache (default runs/objective_ablation_PRESET, "
                                               "with --smoke runs/objective_ablation_smoke)")
    p.add_argument("--report", default=None, help="Markdown report (default docs/results/objective_ablation.md; with "
                                                   "--smoke, OUT/objective_ablation.md)")
    p.add_argument("--plan", action="store_true", help="measure step times and print the projection only")
    p.add_argument("--smoke", action="store_true", help="one size, one rate, one seed, 24 steps, a small corpus")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    arms = args.arms.split(",")
    if not arms or set(arms) - set(ARMS):
        p.error(f"--arms among {', '.join(ARMS)}")
    smoke = args.smoke
    out = Path(args.out or ("runs/objective_ablation_smoke" if smoke else f"runs/objective_ablation_{args.preset}"))
    report_path = Path(args.report) if args.report else (out / "objective_ablation.md" if smoke
                                                         else Path("docs/results/objective_ablation.md"))
    jobs = args.jobs or preset.jobs
    sizes = preset.sizes[:1] if smoke else preset.sizes
    seeds = SEEDS[:1] if smoke else SEEDS[:args.seeds]
    setup = {"sizes": sizes, "vocab": 512 if smoke else preset.vocab, "seq_len": preset.seq_len,
             "batch": preset.batch, "steps": 24 if smoke else preset.steps, "device": preset.device,
             "eval_batches": 2 if smoke else preset.eval_batches, "out": str(out), "jobs": jobs,
             "threads": max(1, (os.cpu_count() or 1) // jobs) if preset.device == "cpu" else 1,
             "max_chars": 300_000 if smoke else None,
             "mixed_dir": str(out / "data_mixed"), "text_dir": str(out / "data_text")}
    lrs = preset.lrs[1:2] if smoke else preset.lrs

    from flm.files import write_json_report

    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    t_start = time.perf_counter()
    data = prepare_all(setup)
    setup["heldout"] = data["heldout"]
    setup["model_vocab"] = 128 * math.ceil(data["vocab"] / 128)
    if args.plan:
        timing = measure(setup)
        plan = projection(setup, timing, arms, len(lrs), len(seeds))
        for size, t in timing.items():
            print(f"{size}: {1000 * t['step_s'][0]:.0f} / {1000 * t['step_s'][1]:.0f} ms per step (half / final "
                  f"width), {t['eval_s']:.2f} s per evaluation")
        for row in plan["runs"]:
            print(f"{row['size']}: {row['run_s']:.0f} s per run of {setup['steps']} steps")
        print(f"projected: {plan['total_s'] / 60:.0f} min for {plan['runs_per_arm']} runs per arm and size, "
              f"{len(arms)} arms, {len(sizes)} sizes, {jobs} jobs")
        return
    settings = [args.preset, arms, [n for n, _ in sizes], setup["vocab"], setup["steps"], setup["eval_batches"], lrs,
                seeds, setup["max_chars"], RAMP_FRAC, WARMUP_FRAC, EVAL_FRAC, CKPT_FRAC, SPIKE_WINDOW, MAX_ROLLBACKS,
                TEACHER_WEIGHT, TEACHER_HELDOUT, GRID_FACTOR, MAX_EXTENSIONS if not smoke else 0]
    fingerprint = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
    sweep = Sweep([n for n, _ in sizes], arms, lrs, seeds)
    if smoke:  # one rate: no extension, no second seed
        sweep.after = lambda key, pending: []
    run_all(sweep, setup, out / f"runs-{fingerprint}.jsonl", jobs, run=run_one, key=KEY, describe=describe)
    summary = summarize(sweep, setup)
    from flm.data.teacher import read_items

    held = read_items(setup["heldout"])
    summary.update(arms=arms, machine=machine(), command=" ".join(["python benchmarks/objective_ablation.py", *sys.argv[1:]]),
                   date=datetime.datetime.now().isoformat(timespec="seconds"), wall_s=time.perf_counter() - t_start,
                   run_s=sum(r["wall_s"] for r in sweep.results.values()) / jobs, runs_done=len(sweep.results),
                   load_before=load_before, load_after=", ".join(f"{v:.2f}" for v in os.getloadavg()))
    summary["setup"] = {"preset": args.preset + (" --smoke" if smoke else ""), "vocab": data["vocab"],
                        "model_vocab": setup["model_vocab"],
                        "max_chars": setup["max_chars"], "val_tokens": data["val_tokens"],
                        "eval_batches": setup["eval_batches"], "steps": setup["steps"], "batch": setup["batch"],
                        "seq_len": setup["seq_len"], "jobs": jobs, "threads": setup["threads"],
                        "heldout_statements": sum(not i.multiple_choice for i in held),
                        "heldout_questions": sum(i.multiple_choice for i in held), "lrs": list(lrs),
                        "seeds": list(seeds), "text_train_tokens": data["text_train_tokens"],
                        "mixed_train_tokens": data["mixed_train_tokens"]}
    summary["runs"] = list(sweep.results.values())
    write_json_report(report_path.with_suffix(".json"), summary)
    plot(summary, report_path.with_suffix(".png"))
    report(summary, report_path)
    print(f"wrote {report_path} (+ .json, .png) in {summary['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
