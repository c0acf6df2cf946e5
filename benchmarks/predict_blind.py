"""A blind check of a finished loss prediction: runs no fit has seen, against the law's predictions.

Question: `flm predict --holdout` checks a law on held-out runs; once a form has been chosen with those runs in
view (docs/results/predict.md), they no longer test it. This trains runs that neither the fit nor the choice of
form has seen, with the ladder's own config, and compares them with the law in FIT.json:
- widths never trained (default 352 and 480: 4.8x and 9.0x the widest fitted N of configs/predict_ladder.toml),
  several seeds each, at the longest fitted D (`--steps`, default 1,600 steps: 1.6M tokens);
- more seeds of the reference (the widest fitted width, at the same D), so that the measured gain of width, the
  reference's mean loss minus the new width's, is a difference of means over seeds, not of two single runs.
Each run's loss is compared with the law's interval for one run (the bootstrap's replicates times one run's own
scatter, `run_noise` in FIT.json), each width's mean with the interval for the mean of its seeds, and each gain with
the interval of a difference of two such means (flm.mup.predict.Predictor, as `flm predict` prints them). Where
the fit measured the runs' D, each gain is also read from that D's own law (FIT.json's `fixed_d`).

Control: one run of the fit is trained again (width 32, seed 0) and must give FIT.json's value for it: the runs
here are the runs `flm predict` trains (same config, seed train.seed + k, same data order and evaluation).

    python benchmarks/predict_blind.py --seeds 4 --ref-seeds 5          # -> docs/results/predict_blind.{md,json}
    python benchmarks/predict_blind.py --seeds 4 --ref-seeds 5 --steps 800 --report docs/results/predict_blind_800.md
    python benchmarks/predict_blind.py --widths 192 --seeds 1 --ref-seeds 1 --steps 200 --out /tmp/blind \
        --report /tmp/blind/report.md                                   # a minute

Runs are kept in OUT/runs-<steps>.jsonl: started again, it trains only what is missing. One torch thread a run,
`--jobs` runs at a time (default: the cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from growth_horizon import machine, run_all  # noqa: E402  (the same machine record and runner)

KEY = ("width", "seed", "steps")


def run_one(width: int, seed: int, steps: int, setup: dict) -> dict:
    """Train the ladder config at `width`, seed index `seed`, for `steps` steps; its validation loss."""
    import torch

    from flm.config import load_config
    from flm.mup.runs import at_width, train_and_evaluate

    torch.set_num_threads(1)
    cfg = load_config(setup["config"], [])
    run = at_width(cfg, width, "mup" if cfg.model.mup else "sp")
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, seed=cfg.train.seed + seed, max_steps=steps,
                                                             run_dir=str(Path(setup["out"]) / f"w{width}-s{seed}-{steps}")))
    result = train_and_evaluate(run)
    return {"width": width, "seed": seed, "steps": steps, "val_loss": result.val_loss, "seconds": result.seconds}


class Runs:
    """Every run at once (run_all's sweep: nothing waits on another)."""

    def __init__(self, keys: list[tuple]):
        self.keys, self.results = keys, {}

    def start(self) -> list[tuple]:
        return list(self.keys)

    def after(self, key: tuple, pending: set[tuple]) -> list[tuple]:
        return []


def predictor(doc: dict, ref_runs: int, law: dict | None = None):
    """A law of a predict.json (its chosen law, or `law`) with its replicates and the fit's run scatter, as
    flm.mup.predict.Predictor."""
    from flm.mup import laws
    from flm.mup.predict import Predictor, law_fit

    law = {**doc["law"], **(law or {})}
    fit = law_fit(law)
    boot = laws.Bootstrap([law_fit(law, r["params"]).theta for r in law["replicates"]], None, 0)
    return Predictor(fit, boot, None, law["interval"], law.get("run_noise", 0.0), doc["bootstrap"]["seed"], ref_runs)


def analyse(doc: dict, cfg, data, runs: list[dict], steps: int, control: tuple[int, int] | None) -> dict:
    """Per run, per width (mean over seeds) and per gain: measured, predicted, interval, error, covered."""
    tokens = steps * cfg.train.tokens_per_step
    ref = doc["reference"]
    fitted = {(p["width"], p["seed"]): p["val_loss"] for p in doc["points"] if p["tokens"] == tokens}
    by_width: dict[int, dict[int, float]] = {}
    for r in runs:
        by_width.setdefault(r["width"], {})[r["seed"]] = r["val_loss"]
    ref_losses = {s: v for (w, s), v in fitted.items() if w == ref["width"]} | by_width.pop(ref["width"], {})
    out: dict = {"reference": {"width": ref["width"], "seeds": sorted(ref_losses), "val_loss":
                               statistics.fmean(ref_losses.values()), "losses": ref_losses}}
    if control is not None:
        w, s = control
        out["control"] = {"width": w, "seed": s, "fit_value": fitted.get((w, s)),
                          "trained": by_width.pop(w, {}).get(s)}
    from flm.mup.predict import width_counts

    pred = predictor(doc, len(ref_losses))
    # this D's own law (flm predict's fixed_d), when the fit measured this D
    own = [{"form": "n_only", "params": g["params"], "scales": g["scales"], "at_tokens": g["tokens"],
            "replicates": g["replicates"]} for g in doc.get("fixed_d", []) if math.isclose(g["tokens"], tokens)]
    pred_d = predictor(doc, len(ref_losses), own[0]) if own else None
    n_ref, fpt_ref = width_counts(cfg, ref["width"], data)
    ref_x = (n_ref, tokens, fpt_ref * tokens)
    out["reference"]["predicted"] = float(pred.fit.predict(*ref_x)[0])
    checks, widths = [], []
    for width, losses in sorted(by_width.items()):
        n, fpt = width_counts(cfg, width, data)
        x = (n, tokens, fpt * tokens)
        for seed, loss in sorted(losses.items()):
            p = pred.loss(*x)
            checks.append({"width": width, "seed": seed, "params": n, "val_loss": loss, **p,
                           "rel_error": p["predicted"] / loss - 1, "covered": p["low"] <= loss <= p["high"]})
        mean = statistics.fmean(losses.values())
        k = len(losses)
        p, g = pred.loss(*x, runs=k), pred.gain(ref_x, *x, runs=k)
        gain = out["reference"]["val_loss"] - mean
        widths.append({"width": width, "params": n, "factor": n / doc["law"]["fitted"]["params"][1], "seeds": k,
                       "val_loss": mean, **p, "rel_error": p["predicted"] / mean - 1,
                       "covered": p["low"] <= mean <= p["high"], "measured_gain": gain, **g,
                       "gain_rel_error": g["predicted_gain"] / gain - 1 if gain else math.nan,
                       "gain_covered": g["gain_low"] <= gain <= g["gain_high"]})
        if pred_d is not None:
            g = pred_d.gain(ref_x, *x, runs=k)
            widths[-1]["this_d"] = {**g, "gain_rel_error": g["predicted_gain"] / gain - 1 if gain else math.nan,
                                    "gain_covered": g["gain_low"] <= gain <= g["gain_high"]}
    out.update(runs=checks, widths=widths, noise=pred.noise, form=doc["law"]["form"],
               interval=doc["law"]["interval"], tokens=tokens)
    return out


def report(result: dict, setup: dict, path: Path) -> None:
    from flm.files import write_json_report
    from flm.mup.report import markdown_table

    level = round(100 * result["interval"])
    ref = result["reference"]
    lines = ["# A blind check of the loss prediction: new widths and seeds against the law\n",
             f"Command: `{setup['command']}` ({setup['date']}, {setup['wall_min']:.0f} min wall for this call on "
             f"{setup['machine']['cpu']}, {setup['machine']['cores']} cores, {setup['jobs']} runs at a time, one "
             f"thread each; the runs, some trained by an earlier call, took {setup['run_min']:.0f} min of one core "
             f"summed). Fit: `{setup['fit']}` ({result['form']} law); config `{setup['config']}`. Every run "
             f"trains {result['tokens']:,} tokens. Raw figures: "
             f"[{path.with_suffix('.json').name}]({path.with_suffix('.json').name}).\n"]
    if "control" in result:
        c = result["control"]
        if c["fit_value"] is None:
            lines.append(f"Control: width {c['width']} seed {c['seed']} has no point at this D in the fit.\n")
        else:
            lines.append(f"Control: width {c['width']} seed {c['seed']} trained again: {c['trained']:.6f} against the "
                         f"fit's {c['fit_value']:.6f} (difference {c['trained'] - c['fit_value']:+.1e}).\n")
    lines.append(f"Reference: width {ref['width']}, seeds {ref['seeds']}: mean {ref['val_loss']:.4f} "
                 f"({', '.join(f'{v:.4f}' for v in ref['losses'].values())}); the law says {ref['predicted']:.4f}. "
                 f"One run's own scatter (the fit's): {100 * result['noise']:.2f}% of its loss.\n")
    lines += ["## Each run against the interval for one run\n", markdown_table(
        ["width", "seed", "N", "val loss", "predicted", f"{level}% interval", "rel. error", "covered"],
        [[str(r["width"]), str(r["seed"]), f"{r['params']:,}", f"{r['val_loss']:.4f}", f"{r['predicted']:.4f}",
          f"[{r['low']:.4f}, {r['high']:.4f}]", f"{100 * r['rel_error']:+.2f}%", "yes" if r["covered"] else "no"]
         for r in result["runs"]]), "",
              "## Each width: the mean over its seeds, and the gain over the reference\n", markdown_table(
        ["width", "N / widest fitted", "seeds", "mean loss", "predicted", f"{level}% interval", "rel. error",
         "gain measured", "gain predicted", f"gain {level}%", "gain error", "covered"],
        [[str(w["width"]), f"{w['factor']:.1f}x", str(w["seeds"]), f"{w['val_loss']:.4f}", f"{w['predicted']:.4f}",
          f"[{w['low']:.4f}, {w['high']:.4f}]", f"{100 * w['rel_error']:+.2f}%", f"{w['measured_gain']:+.4f}",
          f"{w['predicted_gain']:+.4f}", f"[{w['gain_low']:+.4f}, {w['gain_high']:+.4f}]",
          f"{100 * w['gain_rel_error']:+.1f}%", "yes" if w["gain_covered"] else "no"] for w in result["widths"]]), ""]
    own = [w for w in result["widths"] if "this_d" in w]
    if own:
        lines += ["## The gain by this D's own law\n",
                  "flm predict's law for a measured D (`fixed_d` in the fit: L = E + A·(N/n0)^-alpha fitted on the "
                  "ladder's points at this D alone, its bootstrap, the same run scatter).\n", markdown_table(
                      ["width", "seeds", "gain measured", "gain predicted", f"gain {level}%", "gain error", "covered"],
                      [[str(w["width"]), str(w["seeds"]), f"{w['measured_gain']:+.4f}",
                        f"{w['this_d']['predicted_gain']:+.4f}",
                        f"[{w['this_d']['gain_low']:+.4f}, {w['this_d']['gain_high']:+.4f}]",
                        f"{100 * w['this_d']['gain_rel_error']:+.1f}%", "yes" if w["this_d"]["gain_covered"] else "no"]
                       for w in own]), ""]
    n_cov = sum(r["covered"] for r in result["runs"])
    g_cov = sum(w["gain_covered"] for w in result["widths"])
    lines.append(f"Summary: largest loss error {100 * max(abs(r['rel_error']) for r in result['runs']):.2f}% over "
                 f"{len(result['runs'])} runs, {n_cov} inside their {level}% interval; gains: "
                 + ", ".join(f"width {w['width']} {100 * w['gain_rel_error']:+.1f}%" for w in result["widths"])
                 + f", {g_cov} of {len(result['widths'])} inside their interval"
                 + ("; by this D's own law: " + ", ".join(f"width {w['width']} {100 * w['this_d']['gain_rel_error']:+.1f}%"
                                                          for w in own) if own else "") + ".")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    write_json_report(path.with_suffix(".json"), {"setup": setup, **result})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/predict_ladder.toml", help="the ladder's config")
    p.add_argument("--fit", default="docs/results/predict.json", help="the predict.json whose law is checked")
    p.add_argument("--widths", default="352,480", help="widths to train (multiples of model.head_dim)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per width (train.seed, +1, ...)")
    p.add_argument("--ref-seeds", type=int, default=3, help="seeds of the reference in all, the fit's included")
    p.add_argument("--steps", type=int, default=1600, help="steps of every run (the fit's longest D)")
    p.add_argument("--no-control", action="store_true", help="skip retraining one of the fit's runs")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="runs/predict_blind")
    p.add_argument("--report", default="docs/results/predict_blind.md")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers inherit it: one thread a run

    from flm.config import load_config
    from flm.data import load_prepared, prepare

    cfg = load_config(args.config, [])
    prepare(cfg.data)
    data = load_prepared(Path(cfg.data.dir))
    doc = json.loads(Path(args.fit).read_text())
    ref_width = doc["reference"]["width"]
    fitted_seeds = {p["seed"] for p in doc["points"] if p["width"] == ref_width and p["role"] == "fit"}
    widths = [int(w) for w in args.widths.split(",")]
    if ref_width in widths or any(w in {p["width"] for p in doc["points"]} for w in widths):
        p.error("--widths must be widths the fit has never seen")
    keys = [(w, s, args.steps) for w in widths for s in range(args.seeds)]
    keys += [(ref_width, s, args.steps) for s in range(args.ref_seeds) if s not in fitted_seeds]
    control = None if args.no_control else (min(p["width"] for p in doc["points"]), 0)
    if control is not None:
        keys.append((*control, args.steps))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {"config": args.config, "fit": args.fit, "out": str(out), "jobs": args.jobs,
             "command": "python benchmarks/predict_blind.py " + " ".join(sys.argv[1:]), "machine": machine(),
             "date": datetime.date.today().isoformat()}
    t0 = time.perf_counter()
    sweep = Runs(keys)
    run_all(sweep, setup, out / f"runs-{args.steps}.jsonl", args.jobs, run=run_one, key=KEY,
            describe=lambda k, r: f"width {k[0]} seed {k[1]}: {r['val_loss']:.4f} ({r['seconds']:.0f} s)")
    setup["wall_min"] = (time.perf_counter() - t0) / 60
    setup["run_min"] = sum(sweep.results[k]["seconds"] for k in keys) / 60  # runs cached from earlier calls too
    result = analyse(doc, cfg, data, [sweep.results[k] for k in keys], args.steps, control)
    report(result, setup, Path(args.report))
    print(Path(args.report).read_text())


if __name__ == "__main__":
    main()
