"""Loss prediction (μScaling, REFERENCE.md §3): fit L(N) = a·N^b + c on a ladder of widths, predict wider ones.

Every ladder run uses the config's (transferred) hyperparameters, the same data in the same order
and the same number of steps; only the width differs. N is the non-embedding parameter count. The
widest `holdout` runs are left out of the fit, and the relative error of their prediction is what
says whether the fit can be trusted. With [[stages]] in the config, the same ladder (single-stage,
as many steps as the whole schedule) also predicts the growth run's final loss, from the final
stage's N and from the FLOPs the schedule spends, with the same fitted widths, and the staged run is
trained to compare.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.optimize import least_squares

from flm.config import Config
from flm.data import load_prepared
from flm.errors import FlmError
from flm.model import flops_per_token, non_embedding_params
from flm.mup.report import NAMES, figure, markdown_table, write_outputs
from flm.mup.runs import at_width, quiet, train_and_evaluate
from flm.train import Trainer
from flm.train.schedule import Stage, plan_stages, tokens_and_flops_at
from flm.train.trainer import resolve_model_config


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


def predict(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    m, tc = cfg.mup, cfg.train
    p = "mup" if cfg.model.mup else "sp"
    data = load_prepared(Path(cfg.data.dir))
    stages = plan_stages(cfg, resolve_model_config(cfg.model, data)) if cfg.stages else None
    steps = stages[-1].end if stages else tc.max_steps
    runs = {width: at_width(cfg, width, p) for width in sorted(m.ladder)}  # every width checked before any training
    wider = {width: at_width(cfg, width, p).model for width in m.extrapolate}
    ladder = []
    for width, run in runs.items():
        run.train = dataclasses.replace(run.train, max_steps=steps, warmup_steps=min(run.train.warmup_steps, steps))
        result = train_and_evaluate(run)
        if result.diverged:
            raise FlmError(f"the width-{width} run diverged at step {result.steps}: lower train.lr")
        model = resolve_model_config(run.model, data)
        tokens = steps * tc.tokens_per_step
        ladder.append({"width": width, "params": non_embedding_params(model), "tokens": tokens,
                       "flops": tokens * flops_per_token(model, tc.seq_len), "val_loss": result.val_loss,
                       "seconds": result.seconds})
        log(f"width {width}: N {ladder[-1]['params']:,}, validation loss {result.val_loss:.4f} ({result.seconds:.0f} s)")
    fit_rows, held = ladder[:-m.holdout], ladder[-m.holdout:]
    law = fit_power_law([r["params"] for r in fit_rows], [r["val_loss"] for r in fit_rows])
    for i, r in enumerate(ladder):
        r["predicted"] = float(law(r["params"]))
        r["relative_error"] = abs(r["predicted"] - r["val_loss"]) / r["val_loss"]
        r["in_fit"] = i < len(fit_rows)
    extrapolated = []
    for width, model in wider.items():
        model = resolve_model_config(model, data)
        extrapolated.append({"width": width, "params": non_embedding_params(model),
                             "predicted": float(law(non_embedding_params(model)))})
    out = {"parametrization": p, "steps": steps, "lr": tc.lr, "init_std": cfg.model.init_std,
           "output_mult": cfg.model.output_mult, "fit": dataclasses.asdict(law), "formula": law.formula(),
           "ladder": ladder, "holdout_widths": [r["width"] for r in held],
           "largest_holdout_error": held[-1]["relative_error"], "extrapolated": extrapolated}
    if stages:
        out["staged"] = staged_comparison(cfg, stages, fit_rows, law, log)
    return out


def staged_comparison(cfg: Config, stages: list[Stage], fit_rows: list[dict], by_params: PowerLaw,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """Predict a growth run's final loss from the fitted ladder runs, by N and by FLOPs; train it and compare."""
    tc = cfg.train
    by_flops = fit_power_law([r["flops"] for r in fit_rows], [r["val_loss"] for r in fit_rows])
    final = stages[-1]
    tokens, flops = tokens_and_flops_at(final.end, stages, tc.batch_size, tc.seq_len)
    run = dataclasses.replace(cfg, train=dataclasses.replace(tc, run_dir=str(Path(cfg.mup.out_dir) / "staged")))
    log(f"training the growth schedule ({len(stages)} stages, {final.end} steps) in {run.train.run_dir}")
    with Trainer(run, log=quiet) as trainer:
        measured = trainer.train()["val_loss"]
    n = non_embedding_params(final.model)
    pred_n, pred_c = float(by_params(n)), float(by_flops(flops))
    return {"stages": [f"{s.model.n_layers}x{s.model.d_model}" for s in stages], "steps": final.end,
            "tokens": tokens, "flops": flops, "final_params": n, "val_loss": measured,
            "fit_params": dataclasses.asdict(by_params), "fit_flops": dataclasses.asdict(by_flops),
            "predicted_from_params": pred_n, "relative_error_params": abs(pred_n - measured) / measured,
            "predicted_from_flops": pred_c, "relative_error_flops": abs(pred_c - measured) / measured}


def write_report(result: dict[str, Any], out_dir: Path) -> list[Path]:
    rows = [[str(r["width"]), f"{r['params']:,}", f"{r['flops']:.3g}", f"{r['val_loss']:.4f}", f"{r['predicted']:.4f}",
             f"{100 * r['relative_error']:.2f}%", "fit" if r["in_fit"] else "held out"] for r in result["ladder"]]
    rows += [[str(r["width"]), f"{r['params']:,}", "", "", f"{r['predicted']:.4f}", "", "predicted only"]
             for r in result["extrapolated"]]
    lines = [f"# Loss prediction\n\n{NAMES[result['parametrization']]}, lr {result['lr']:g}, "
             f"init_std {result['init_std']:g}, output_mult {result['output_mult']:g}, {result['steps']} steps per run. "
             f"Fit: {result['formula']} (N = non-embedding parameters).\n",
             markdown_table(["width", "N", "train FLOPs", "val loss", "predicted", "rel. error", "role"], rows), "",
             f"Relative error on the largest held-out width ({result['holdout_widths'][-1]}): "
             f"**{100 * result['largest_holdout_error']:.2f}%**."]
    staged = result.get("staged")
    if staged:
        lines += ["", "## Growth schedule", "",
                  f"Stages {' -> '.join(staged['stages'])}, {staged['steps']} steps, {staged['flops']:.3g} training "
                  f"FLOPs; final stage N {staged['final_params']:,}. Measured validation loss {staged['val_loss']:.4f}.",
                  "",
                  f"- predicted from N (as if trained from scratch at the final shape): "
                  f"{staged['predicted_from_params']:.4f} ({100 * staged['relative_error_params']:.2f}% error)",
                  f"- predicted from the FLOPs spent: {staged['predicted_from_flops']:.4f} "
                  f"({100 * staged['relative_error_flops']:.2f}% error)"]
    plt = figure()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    fit = [r for r in result["ladder"] if r["in_fit"]]
    held = [r for r in result["ladder"] if not r["in_fit"]]
    law = PowerLaw(**result["fit"])
    xs = [r["params"] for r in result["ladder"]] + [r["params"] for r in result["extrapolated"]]
    grid = np.geomspace(min(xs), max(xs), 200)
    ax.plot(grid, law(grid), "-", color="grey", lw=1.2, label=result["formula"])
    ax.plot([r["params"] for r in fit], [r["val_loss"] for r in fit], "o", color="C0", label="measured, in fit")
    ax.plot([r["params"] for r in held], [r["val_loss"] for r in held], "o", mfc="none", color="C3", ms=8,
            label="measured, held out")
    if result["extrapolated"]:
        ax.plot([r["params"] for r in result["extrapolated"]], [r["predicted"] for r in result["extrapolated"]],
                "x", color="grey", label="predicted")
    if staged:
        ax.plot([staged["final_params"]], [staged["val_loss"]], "D", color="C2", label="growth run (measured)")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel(f"validation loss after {result['steps']} steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_outputs(out_dir, "predict", result, "\n".join(lines) + "\n", fig)
