"""Coordinate check (REFERENCE.md §3): does each layer's activation scale stay flat as width grows?

Models of several widths, under μP and under standard parametrization, are trained for a few steps
at a constant LR on the same batches; after each step the mean |coordinate| of every layer's output
is measured on one fixed validation batch. Under μP the scales should not depend on the width (slope
≈ 0 of log scale vs log width); under SP the updates of hidden matrices and of the readout grow with
the width (slope ≈ 1 for the logits), which is why SP's best LR shrinks as models widen.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from flm.config import Config
from flm.config.mup import PARAMETRIZATIONS
from flm.data import iter_eval_batches
from flm.model import FLM
from flm.mup.report import NAMES, figure, markdown_table, write_outputs
from flm.mup.runs import at_width, quiet
from flm.train import Trainer


@torch.no_grad()
def activation_scales(model: FLM, tokens: torch.Tensor) -> dict[str, float]:
    """Mean |x| of the embedding output, each block's attention output, MLP output and residual stream, and logits."""
    scales: dict[str, float] = {}

    def record(name: str) -> Callable:
        def hook(_module, _inputs, output):
            scales[name] = output.abs().mean().item()
        return hook

    modules = [("embedding", model.embed)]
    for i, block in enumerate(model.blocks):
        modules += [(f"block{i}.attn", block.attn), (f"block{i}.mlp", block.mlp), (f"block{i}.out", block)]
    handles = [module.register_forward_hook(record(name)) for name, module in modules]
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(tokens)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    scales["logits"] = logits.abs().mean().item()
    return scales


def slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width)."""
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def coord_check(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Scales[parametrization][width] = one dict of layer scales per step (0 = at init), and the final slopes."""
    m, tc = cfg.mup, cfg.train
    widths = sorted(m.widths)
    shapes = {(p, w): at_width(cfg, w, p) for p in PARAMETRIZATIONS for w in widths}  # checked up front
    scales: dict[str, dict[int, list[dict[str, float]]]] = {}
    for p in PARAMETRIZATIONS:
        scales[p] = {}
        for width in widths:
            run = shapes[p, width]
            # Constant LR from the first step: warmup would hide the updates being measured.
            run.train = dataclasses.replace(run.train, max_steps=m.coord_steps, warmup_steps=0, min_lr=tc.lr)
            with Trainer(run, log=quiet, guard=False) as trainer:
                x, _ = next(iter_eval_batches(trainer.data.val_shards, tc.batch_size, tc.seq_len, 1))
                history = [activation_scales(trainer.model, x)]
                for _ in range(m.coord_steps):
                    trainer.train_step()
                    history.append(activation_scales(trainer.model, x))
            scales[p][width] = history
            log(f"{NAMES[p]} width {width}: logits {history[-1]['logits']:.3g}, "
                f"last block {history[-1][f'block{run.model.n_layers - 1}.out']:.3g}")
    layers = list(scales[PARAMETRIZATIONS[0]][widths[0]][-1])
    slopes = {p: {layer: slope(widths, [scales[p][w][-1][layer] for w in widths]) for layer in layers}
              for p in PARAMETRIZATIONS}
    hidden = [layer for layer in layers if layer.startswith("block")]
    # How the slopes develop: the mean over the hidden layers' slopes, and the logits', after each step.
    by_step = {p: [{"hidden": float(np.mean([slope(widths, [scales[p][w][t][layer] for w in widths]) for layer in hidden])),
                    "logits": slope(widths, [scales[p][w][t]["logits"] for w in widths])}
                   for t in range(m.coord_steps + 1)] for p in PARAMETRIZATIONS}
    if not all(math.isfinite(s) for p in slopes.values() for s in p.values()):
        log("warning: some activations are not finite (diverged); lower train.lr")
    return {"widths": widths, "steps": m.coord_steps, "lr": tc.lr, "base_width": cfg.model.base_width,
            "layers": layers, "slopes": slopes, "slopes_by_step": by_step,
            "scales": {p: {str(w): h for w, h in s.items()} for p, s in scales.items()}}


def write_report(result: dict[str, Any], out_dir: Path) -> list[Path]:
    widths, layers, slopes = result["widths"], result["layers"], result["slopes"]
    final = {p: {w: result["scales"][p][str(w)][-1] for w in widths} for p in PARAMETRIZATIONS}
    rows = [[layer, f"{slopes['mup'][layer]:+.3f}", f"{slopes['sp'][layer]:+.3f}",
             " / ".join(f"{final['mup'][w][layer]:.3g}" for w in widths),
             " / ".join(f"{final['sp'][w][layer]:.3g}" for w in widths)] for layer in layers]
    text = (f"# Coordinate check\n\nMean |activation| after {result['steps']} steps at constant LR {result['lr']:g} "
            f"(base width {result['base_width']}); slope of log scale vs log width over widths "
            f"{', '.join(map(str, widths))}.\n\n"
            + markdown_table(["layer", "μP slope", "SP slope", "μP scale by width", "SP scale by width"], rows)
            + "\n\nSlope after each step (step 0 = at init): mean over the hidden layers above, and the logits.\n\n"
            + markdown_table(["step", "μP hidden", "μP logits", "SP hidden", "SP logits"],
                             [[str(t)] + [f"{result['slopes_by_step'][p][t][k]:+.2f}" for p in PARAMETRIZATIONS
                                          for k in ("hidden", "logits")] for t in range(result["steps"] + 1)]) + "\n")
    plt = figure()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharey=True)
    colors = plt.cm.tab20(np.linspace(0, 1, len(layers)))
    for ax, p in zip(axes, PARAMETRIZATIONS):
        for layer, color in zip(layers, colors):
            ax.plot(widths, [final[p][w][layer] for w in widths], "o-", ms=3, lw=1.2, color=color,
                    label=f"{layer} ({slopes[p][layer]:+.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width (d_model)")
        ax.set_title(f"{NAMES[p]}: after {result['steps']} steps")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("mean |activation|")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return write_outputs(out_dir, "coord_check", result, text, fig)
