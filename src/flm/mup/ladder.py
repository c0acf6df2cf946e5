"""The runs of `flm predict`, cached in the output folder: one WSD run per (width, seed) evaluated at several
token counts by branching short decays off its stable phase, and growth runs trained whole.

WSD branching (REFERENCE.md §9). A WSD run of T steps holds the peak LR (after warmup) until step
s = T - d, d = max(1, round(train.decay_fraction x T)), then decays to train.min_lr over d steps. Before s the
LR does not depend on T, so runs of every length share one trunk: the trunk trains at the peak and saves a
checkpoint at each branch start s_k; the branch of length T_k resumes that checkpoint under the schedule of a
T_k-step run, decays over its d_k steps and is evaluated at step T_k. A branch is therefore exactly the T_k-step
run trained on its own (same seed, same batches; resume is bit-exact on CPU), and one trunk of
max(T_k) - d_max steps plus the decays gives the loss at every D_k = T_k x tokens per step. Under the cosine
schedule there is no trunk to share: each length is its own run.

Caching: each run lives in OUT/runs/NAME-HASH, HASH a digest of everything that determines its training (the
config without its length, run folder, logging and tool settings). A branch's result is a JSON file there,
written when it finishes and reused on every later invocation; the trunk's checkpoints stay while branches are
missing (a killed run continues from the newest one at or before the next branch start), and only the newest
is kept once all are done (so a later, longer branch continues from it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flm.config import Config, config_to_dict
from flm.errors import FlmError
from flm.files import atomic_write
from flm.mup.runs import quiet
from flm.train import Trainer

# Settings that change what a run logs or where it writes, not what it trains.
_UNKEYED_TRAIN = ("run_dir", "max_steps", "keep_last", "ckpt_every", "eval_every", "log_every", "progress",
                  "tensorboard", "sample_tokens", "resume")


@dataclass(frozen=True)
class Branch:
    """One evaluation point of a WSD run: its length, decay and where it leaves the trunk."""

    steps: int  # T: the run's length; evaluated after step T
    decay_steps: int  # d = max(1, round(decay_fraction x T))
    start: int  # s = T - d: the trunk's step the branch resumes from


def branch_plan(cfg: Config, lengths: list[int]) -> list[Branch]:
    """The branches of a run evaluated at `lengths` steps (ascending); each must leave the trunk after warmup."""
    tc = cfg.train
    out = []
    for t in sorted(set(lengths)):
        d = max(1, round(tc.decay_fraction * t)) if tc.schedule == "wsd" else 0
        if tc.schedule == "wsd" and t - d < tc.warmup_steps:
            raise FlmError(f"a {t}-step WSD branch would start its decay at step {t - d}, inside the "
                           f"{tc.warmup_steps}-step warmup: use longer runs or a shorter train.warmup_steps")
        out.append(Branch(t, d, t - d))
    return out


def run_key(cfg: Config) -> str:
    """Digest of what the run trains (not how long, where, or how it logs)."""
    doc = config_to_dict(cfg)
    for section in ("mup", "plan"):
        doc.pop(section, None)
    for key in _UNKEYED_TRAIN:
        doc["train"].pop(key, None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]


def _checkpoints(root: Path) -> dict[int, Path]:
    """The trunk's complete checkpoints by step: Trainer.save() writes ROOT/step_<8 digits>/ with meta.json last
    (flm.checkpoint; read here by name so that flm.mup keeps to config, model, data and train)."""
    found = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / "meta.json").is_file()] \
        if root.is_dir() else []
    return {int(p.name[5:]): p for p in found}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, doc: dict[str, Any]) -> None:
    atomic_write(path, [json.dumps(doc, indent=1).encode()])


def _steps(trainer: Trainer, end: int) -> bool:
    """Train to step `end` (growing at stage boundaries); False as soon as the loss is not finite."""
    while trainer.step < end:
        if trainer.step == trainer.stages[trainer.stage].end:
            trainer.grow()
        loss, _ = trainer.train_step()
        if not math.isfinite(loss.item()):
            return False
    return True


def _with(cfg: Config, run_dir: Path, max_steps: int, keep_last: int = 3) -> Config:
    train = dataclasses.replace(cfg.train, run_dir=str(run_dir), max_steps=max_steps, keep_last=keep_last,
                                warmup_steps=min(cfg.train.warmup_steps, max_steps))
    return dataclasses.replace(cfg, train=train)


def run_folder(root: Path, name: str, cfg: Config) -> Path:
    return root / f"{name}-{run_key(cfg)}"


def branch_results(cfg: Config, folder: Path, lengths: list[int], log: Callable[[str], None] = quiet,
                   keep_checkpoints: bool = False) -> dict[int, dict[str, Any]]:
    """Validation loss of the single-stage run `cfg` after each of `lengths` steps (see the module docstring);
    {length: {"steps", "tokens", "val_loss", "seconds", "cached"}}. val_loss is inf for a run that diverged."""
    key = run_key(cfg)
    plan = branch_plan(cfg, lengths)
    tps = cfg.train.tokens_per_step
    out: dict[int, dict[str, Any]] = {}
    for b in plan:
        cached = _read(folder / f"branch-{b.steps}.json")
        if cached is not None and cached.get("key") == key:
            out[b.steps] = {**cached, "cached": True}
    todo = [b for b in plan if b.steps not in out]
    if not todo:
        return out
    folder.mkdir(parents=True, exist_ok=True)

    def record(b: Branch, val: float, seconds: float) -> None:
        doc = {"key": key, "steps": b.steps, "decay_steps": b.decay_steps, "branch_start": b.start,
               "tokens": b.steps * tps, "val_loss": val, "seconds": seconds}
        _write(folder / f"branch-{b.steps}.json", doc)
        out[b.steps] = {**doc, "cached": False}
        log(f"  {folder.name}: {b.steps} steps ({b.steps * tps:,} tokens): validation loss {val:.4f} ({seconds:.1f} s)")

    if cfg.train.schedule != "wsd":  # no shared trunk: each length is a run of its own
        for b in todo:
            t0 = time.perf_counter()
            with Trainer(_with(cfg, folder / f"run-{b.steps}", b.steps), log=quiet, guard=False) as trainer:
                val = trainer.evaluate() if _steps(trainer, b.steps) else math.inf
            shutil.rmtree(folder / f"run-{b.steps}", ignore_errors=True)  # it holds only the run lock
            record(b, val if math.isfinite(val) else math.inf, time.perf_counter() - t0)
        return out

    trunk_dir = folder / "trunk"
    last = max(b.steps for b in plan)
    t0 = time.perf_counter()
    with Trainer(_with(cfg, trunk_dir, last, keep_last=10**6), log=quiet, guard=False) as trunk:
        saved = _checkpoints(trunk.ckpt_root)
        usable = [s for s in saved if s <= todo[0].start]
        if usable:
            trunk.resume(str(saved[max(usable)]))
        diverged = False
        for b in todo:
            if b.start not in saved:
                if diverged or not _steps(trunk, b.start):
                    diverged = True
                    record(b, math.inf, time.perf_counter() - t0)
                    continue
                saved[b.start] = trunk.save()
            with Trainer(_with(cfg, folder / f"branch-{b.steps}", b.steps), log=quiet, guard=False) as branch:
                branch.resume(str(saved[b.start]))
                val = branch.evaluate() if _steps(branch, b.steps) else math.inf
            shutil.rmtree(folder / f"branch-{b.steps}", ignore_errors=True)  # it holds only the run lock
            record(b, val if math.isfinite(val) else math.inf, time.perf_counter() - t0)
            t0 = time.perf_counter()
        if not keep_checkpoints and all(b.steps in out for b in plan):
            steps = sorted(_checkpoints(trunk.ckpt_root).items())
            for _, path in steps[:-1]:
                shutil.rmtree(path, ignore_errors=True)
    return out


def whole_run(cfg: Config, folder: Path, log: Callable[[str], None] = quiet) -> dict[str, Any]:
    """A run with [[stages]] (a growth schedule) trained to its end and evaluated; cached like a branch."""
    key = run_key(cfg)
    path = folder / "result.json"
    cached = _read(path)
    if cached is not None and cached.get("key") == key:
        return {**cached, "cached": True}
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Trainer(_with(cfg, folder / "run", cfg.train.max_steps), log=quiet, guard=False) as trainer:
        end = trainer.max_steps
        val = trainer.evaluate() if _steps(trainer, end) else math.inf
    shutil.rmtree(folder / "run", ignore_errors=True)  # it holds only the run lock
    doc = {"key": key, "steps": end, "val_loss": val if math.isfinite(val) else math.inf,
           "seconds": time.perf_counter() - t0}
    _write(path, doc)
    log(f"  {folder.name}: {end} steps: validation loss {doc['val_loss']:.4f} ({doc['seconds']:.1f} s)")
    return {**doc, "cached": False}
