"""Hyperparameter search on a narrow proxy: lr x init_std x output_mult, grid or random (REFERENCE.md §3).

Run at several widths and under both parametrizations, it also shows whether the best LR transfers:
under μP it should not move with the width; under SP it should shrink as the model widens.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any, Callable

from flm.config import Config
from flm.mup.report import NAMES, figure, markdown_table, write_outputs
from flm.mup.runs import at_width, train_and_evaluate, with_hyperparameters

KEYS = ("lr", "init_std", "output_mult")


def sweep_points(cfg: Config) -> list[dict[str, float]]:
    """Every combination of the lists (grid), or `trials` points log-uniform within each list's range (random)."""
    m = cfg.mup
    lists = (m.lrs, m.init_stds, m.output_mults)
    if m.search == "grid":
        return [dict(zip(KEYS, values)) for values in itertools.product(*lists)]
    rng = random.Random(cfg.train.seed)

    def draw(values: list[float]) -> float:
        lo, hi = math.log(min(values)), math.log(max(values))
        return float(f"{math.exp(rng.uniform(lo, hi)):.3g}")

    return [dict(zip(KEYS, (draw(v) for v in lists))) for _ in range(m.trials)]


def sweep(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every point at every sweep width under every parametrization; the best point of each, and transfer."""
    m = cfg.mup
    points = sweep_points(cfg)
    shapes = {(p, w): at_width(cfg, w, p) for p in m.parametrizations for w in m.sweep_widths}  # checked up front
    runs = []
    total = len(points) * len(m.sweep_widths) * len(m.parametrizations)
    for p in m.parametrizations:
        for width in m.sweep_widths:
            for point in points:
                run = with_hyperparameters(shapes[p, width], **point)
                result = train_and_evaluate(run)
                runs.append({"parametrization": p, "width": width, **point,
                             "val_loss": None if result.diverged else result.val_loss,
                             "train_loss": None if result.diverged else result.train_loss, "seconds": result.seconds})
                log(f"[{len(runs)}/{total}] {NAMES[p]} width {width} lr {point['lr']:g} init_std {point['init_std']:g} "
                    f"output_mult {point['output_mult']:g}: "
                    + ("diverged" if result.diverged else f"validation loss {result.val_loss:.4f}")
                    + f" ({result.seconds:.0f} s)")
    best = {}
    for p in m.parametrizations:
        for width in m.sweep_widths:
            done = [r for r in runs if r["parametrization"] == p and r["width"] == width and r["val_loss"] is not None]
            best[f"{p}@{width}"] = min(done, key=lambda r: r["val_loss"]) if done else None
    return {"steps": cfg.train.max_steps, "search": m.search, "base_width": cfg.model.base_width,
            "widths": list(m.sweep_widths), "parametrizations": list(m.parametrizations), "runs": runs, "best": best,
            "transfer": transfer(cfg, best)}


def transfer(cfg: Config, best: dict[str, Any]) -> dict[str, Any]:
    """Per parametrization: the best LR at each width, and (grid search) how many grid steps it moves."""
    m = cfg.mup
    lrs = sorted(m.lrs)
    out = {}
    for p in m.parametrizations:
        found = {w: best[f"{p}@{w}"]["lr"] for w in m.sweep_widths if best[f"{p}@{w}"] is not None}
        entry: dict[str, Any] = {"best_lr": {str(w): lr for w, lr in found.items()}}
        if m.search == "grid" and len(found) == len(m.sweep_widths) and len(found) > 1:
            index = [lrs.index(found[w]) for w in sorted(found)]
            entry["grid_steps"] = max(index) - min(index)
        out[p] = entry
    return out


def _fmt(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.4f}"


def write_report(result: dict[str, Any], out_dir: Path) -> list[Path]:
    rows = [[NAMES[r["parametrization"]], str(r["width"]), f"{r['lr']:g}", f"{r['init_std']:g}",
             f"{r['output_mult']:g}", _fmt(r["val_loss"]), _fmt(r["train_loss"])] for r in result["runs"]]
    lines = [f"# Hyperparameter sweep\n\n{result['search']} search, {result['steps']} steps per run, "
             f"base width {result['base_width']}.\n",
             markdown_table(["param.", "width", "lr", "init_std", "output_mult", "val loss", "train loss"], rows), "",
             "## Best point", ""]
    for key, r in result["best"].items():
        p, width = key.split("@")
        lines.append(f"- {NAMES[p]} width {width}: " + ("every run diverged" if r is None else
                     f"lr {r['lr']:g}, init_std {r['init_std']:g}, output_mult {r['output_mult']:g} "
                     f"-> validation loss {r['val_loss']:.4f}"))
    if any(len(t["best_lr"]) > 1 for t in result["transfer"].values()):
        lines += ["", "## Transfer of the best LR across widths", ""]
        for p, t in result["transfer"].items():
            moved = f" ({t['grid_steps']} grid step(s) apart)" if "grid_steps" in t else ""
            lines.append(f"- {NAMES[p]}: " + ", ".join(f"width {w}: {lr:g}" for w, lr in t["best_lr"].items()) + moved)
    plt = figure()
    params = result["parametrizations"]
    fig, axes = plt.subplots(1, len(params), figsize=(5.5 * len(params), 4.3), dpi=120, sharey=True, squeeze=False)
    for ax, p in zip(axes[0], params):
        for width in result["widths"]:
            # For each LR, the best over the other hyperparameters at this width.
            by_lr: dict[float, float] = {}
            for r in result["runs"]:
                if r["parametrization"] == p and r["width"] == width and r["val_loss"] is not None:
                    by_lr[r["lr"]] = min(by_lr.get(r["lr"], math.inf), r["val_loss"])
            if by_lr:
                lrs = sorted(by_lr)
                # A grid's points form a curve; random points are a scatter (their other hyperparameters differ).
                style = "o-" if result["search"] == "grid" else "o"
                ax.plot(lrs, [by_lr[lr] for lr in lrs], style, ms=4, label=f"width {width}")
                best_lr = min(by_lr, key=by_lr.get)
                ax.plot([best_lr], [by_lr[best_lr]], "k*", ms=10)
        ax.set_xscale("log")
        if result["search"] == "grid":  # label the grid's LRs
            ticks = sorted({r["lr"] for r in result["runs"]})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks], minor=False)
            ax.set_xticks([], minor=True)
        ax.set_xlabel("peak learning rate")
        ax.set_title(NAMES[p])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"validation loss after {result['steps']} steps")
    fig.tight_layout()
    return write_outputs(out_dir, "sweep", result, "\n".join(lines) + "\n", fig)
