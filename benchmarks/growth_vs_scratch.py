"""Growth vs training from scratch: compute to reach the same validation loss.

Both arms end in the same architecture, read the same data in the same order (same loader seed)
and get the same total training-FLOPs budget. Each arm's peak learning rate is tuned by a small
sweep; the best run of each arm is compared. The scratch arm's final validation loss is the target:
the speedup is (scratch FLOPs to reach it) / (growth FLOPs to reach it), with the FLOPs of the small
stages counted (flm.model.flops_per_token of each stage's own shape). Wall-clock to the target is
reported too (it includes evaluation pauses equally for both arms).

    python benchmarks/growth_vs_scratch.py                   # the CPU-scale experiment (~35 min on 2 quiet cores)
    python benchmarks/growth_vs_scratch.py --budget-scale 0.25 --lrs 3e-3   # a quick look

Writes runs/growth_vs_scratch/{summary.json,curves.png} and one run folder per arm and LR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from flm.config import StageConfig, load_config
from flm.data import prepare
from flm.model import flops_per_token
from flm.train import Trainer
from flm.train.trainer import resolve_model_config
from flm.train.metrics import read_metrics

FINAL = dict(n_layers=4, d_model=128, n_heads=4)  # the `tiny` preset: both arms end here
# Growth: 2 x 64 -> 2 x 128 (width, heads, ffn) -> 4 x 128 (depth). Each event about doubles the
# non-embedding parameters; stage token budgets are chosen so the FLOPs total equals scratch's.
GROWTH = [dict(n_layers=2, d_model=64, n_heads=2, share=0.30),
          dict(n_layers=2, d_model=128, n_heads=4, share=0.30),
          dict(n_layers=4, d_model=128, n_heads=4, share=0.40)]


def base_overrides(run_dir: Path, lr: float, eval_every: int) -> list[str]:
    return [f"train.run_dir='{run_dir}'", f"train.lr={lr}", f"train.min_lr={lr / 10}", "train.batch_size=16",
            "train.seq_len=128", f"train.eval_every={eval_every}", "train.eval_batches=16", "train.ckpt_every=100000",
            "train.log_every=50", "train.progress=false", "train.tensorboard=false", "model.head_dim=32",
            "model.max_seq_len=128", "train.sample_tokens=0"]


def run_arm(arm: str, lr: float, budget_flops: float, root: Path, eval_every: int) -> dict:
    run_dir = root / f"{arm}_lr{lr:g}"
    overrides = base_overrides(run_dir, lr, eval_every)
    tokens_per_step = 16 * 128
    if arm == "scratch":
        cfg = load_config(None, overrides + [f"model.{k}={v}" for k, v in FINAL.items()])
        per_token = flops_per_token(resolve_model_config(cfg.model, prepare(cfg.data, log=lambda *_: None)), 128)
        cfg.train.max_steps = int(budget_flops / (per_token * tokens_per_step))
        cfg.train.warmup_steps = max(1, cfg.train.max_steps // 20)
    else:
        first = GROWTH[0]
        cfg = load_config(None, overrides + [f"model.{k}={v}" for k, v in first.items() if k != "share"])
        base = resolve_model_config(cfg.model, prepare(cfg.data, log=lambda *_: None))
        stages = []
        for i, shape in enumerate(GROWTH):
            model = dataclasses.replace(base, **{k: v for k, v in shape.items() if k != "share"})
            tokens = int(shape["share"] * budget_flops / flops_per_token(model, 128))
            stages.append(StageConfig(name=f"{shape['n_layers']}x{shape['d_model']}", tokens=tokens,
                                      n_layers=shape["n_layers"], d_model=shape["d_model"], n_heads=shape["n_heads"],
                                      d_ff=4 * shape["d_model"], warmup_steps=max(1, tokens // tokens_per_step // 20)
                                      if i == 0 else 10, ramp_steps=20 if i else 100))
        cfg.stages = stages
        cfg.validate()
    trainer = Trainer(cfg, log=lambda *_: None)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    growths = [r for r in read_metrics(run_dir) if r["kind"] == "growth"]
    steps_to_seconds = wall / trainer.step
    return {"arm": arm, "lr": lr, "final_val_loss": evals[-1]["val_loss"], "wall_s": wall,
            "curve": [(r["flops"], r["val_loss"], r["step"] * steps_to_seconds) for r in evals],
            "growth_flops": [_flops_at(trainer, g["step"]) for g in growths], "steps": trainer.step}


def _flops_at(trainer: Trainer, step: int) -> float:
    from flm.train.schedule import tokens_and_flops_at

    return tokens_and_flops_at(step, trainer.stages, trainer.cfg.train.batch_size, trainer.cfg.train.seq_len)[1]


def first_reaching(curve: list[tuple[float, float, float]], target: float) -> tuple[float, float] | None:
    """(FLOPs, seconds) where the validation curve first reaches `target`, linearly interpolated."""
    prev = None
    for flops, loss, secs in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return flops, secs
            f = (prev[1] - target) / (prev[1] - loss)
            return prev[0] + f * (flops - prev[0]), prev[2] + f * (secs - prev[2])
        prev = (flops, loss, secs)
    return None


def plot(best: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for arm, run in best.items():
        flops, loss, _ = zip(*run["curve"])
        ax.plot([f / 1e12 for f in flops], loss, "o-", ms=3, label=f"{arm} (lr {run['lr']:g})")
    for i, f in enumerate(best["growth"]["growth_flops"]):
        ax.axvline(f / 1e12, color="grey", ls="--", lw=1, label="growth" if i == 0 else None)
    ax.axhline(best["scratch"]["final_val_loss"], color="black", lw=0.8, ls=":", label="scratch final loss")
    ax.set_xlabel("training TFLOPs")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-tflops", type=float, default=24.0,
                   help="training FLOPs budget of each run in TFLOPs (24: 1,000 steps of the final shape)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply the budget (for quick looks)")
    p.add_argument("--lrs", default="1.5e-3,3e-3,6e-3", help="peak learning rates to sweep for each arm")
    p.add_argument("--out", default="runs/growth_vs_scratch")
    args = p.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    budget = args.budget_tflops * 1e12 * args.budget_scale
    lrs = [float(v) for v in args.lrs.split(",")]
    runs = []
    for lr in lrs:
        for arm in ("scratch", "growth"):
            run = run_arm(arm, lr, budget, root, eval_every=25)
            runs.append(run)
            print(f"{arm:>7} lr {lr:g}: final validation loss {run['final_val_loss']:.4f} "
                  f"({run['steps']} steps, {run['wall_s']:.0f} s)", flush=True)
    best = {arm: min((r for r in runs if r["arm"] == arm), key=lambda r: r["final_val_loss"])
            for arm in ("scratch", "growth")}
    target = best["scratch"]["final_val_loss"]
    scratch_at = first_reaching(best["scratch"]["curve"], target)
    growth_at = first_reaching(best["growth"]["curve"], target)
    summary = {"budget_flops": budget, "target_val_loss": target, "lrs": lrs,
               "sweep": [{k: r[k] for k in ("arm", "lr", "final_val_loss", "wall_s", "steps")} for r in runs],
               "scratch": {"lr": best["scratch"]["lr"], "flops_to_target": scratch_at[0], "seconds_to_target": scratch_at[1]},
               "growth": {"lr": best["growth"]["lr"], "final_val_loss": best["growth"]["final_val_loss"],
                          "flops_to_target": growth_at[0] if growth_at else None,
                          "seconds_to_target": growth_at[1] if growth_at else None}}
    if growth_at:
        summary["speedup_flops"] = scratch_at[0] / growth_at[0]
        summary["speedup_wall_clock"] = scratch_at[1] / growth_at[1]
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(best, root / "curves.png")
    print(f"target (best scratch final validation loss): {target:.4f}")
    if growth_at:
        print(f"growth reaches it with {growth_at[0] / 1e12:.2f} TFLOPs vs scratch {scratch_at[0] / 1e12:.2f}: "
              f"{summary['speedup_flops']:.2f}x less compute, {summary['speedup_wall_clock']:.2f}x less wall-clock")
    else:
        print(f"growth does not reach it within the budget (its best final loss: {best['growth']['final_val_loss']:.4f})")
    print(f"wrote {root / 'summary.json'} and {root / 'curves.png'}")


if __name__ == "__main__":
    main()
