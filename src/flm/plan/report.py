"""What `flm plan` shows: plain-text tables, a JSON document and the parameters-vs-tokens figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flm.config import ModelConfig
from flm.config.layout import Layout
from flm.errors import FlmError
from flm.plan.cost import PlanResult, StageCost
from flm.plan.hardware import GPU
from flm.plan.memory import GIB, MemoryEstimate
from flm.plan.search import SearchResult

ZETTA = 1e21
FORMULA_NAMES = {
    "6nd": "6·N per token (N = all parameters)",
    "model": "6·N_matmul + 12·L·attn_dim·s per token (Narayanan's 72·(...) without recomputation)",
    "recompute": "Megatron with full activation recomputation, 96·s·L·d²(1 + s/6d + V/16Ld) per sequence",
    "paper": "Megatron-DeepSpeed with factor 3.5, 84·s·L·d²(1 + s/6d + V/16Ld) per sequence",
}


def table(header: list[str], rows: list[list[str]], left: int = 2) -> str:
    """Columns padded to their widest cell; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def shape(model: ModelConfig) -> str:
    return f"{model.n_layers}x{model.d_model} h{model.n_heads}"


def _count(n: float) -> str:
    """Parameters or tokens with a unit: 16.93B, 124.4M, 8.2K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:,.2f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _fixed(x: float, places: int) -> str:
    """`places` decimals, or two significant digits when that would show only zeros (small runs)."""
    return f"{x:,.{places}f}" if x == 0 or abs(x) >= 10**-places else f"{x:.2g}"


def _stage_row(s: StageCost, gpu: GPU) -> list[str]:
    return [s.name, shape(s.model), _count(s.params), _count(s.tokens), f"{s.tflops_per_gpu:.1f}",
            f"{s.tflops_per_gpu / gpu.peak_tflops:.1%}", _fixed(s.flops / ZETTA, 2), _fixed(s.recompute_flops / ZETTA, 2),
            _fixed(s.days, 2), _fixed(s.gpu_hours, 0), "$" + _fixed(s.cost, 0)]


def format_plan(r: PlanResult) -> str:
    header = ["stage", "shape", "params", "tokens", "TFLOP/s", "util", f"ZF {r.flops_formula}", "ZF recompute",
              "days", "GPU-hours", "cost"]
    rows = [_stage_row(s, r.gpu) for s in r.stages]
    if r.growth_days:
        rows.append(["growth", f"{len(r.stages) - 1} events", "", "", "", "", "", "", f"{r.growth_days:.2f}", "", ""])
    rows.append(["total", "", "", _count(r.total_tokens), "", "", _fixed(r.total_flops / ZETTA, 2),
                 _fixed(r.total_recompute_flops / ZETTA, 2), _fixed(r.total_days, 2), _fixed(r.total_gpu_hours, 0),
                 "$" + _fixed(r.total_cost, 0)])
    rows.append(_stage_row(r.scratch, r.gpu))
    return "\n".join([
        f"{len(r.stages)} stage(s) on {r.n_gpus} x {r.gpu.name} (dense bf16 peak {r.gpu.peak_tflops:g} TFLOP/s), "
        f"${r.price_per_gpu_hour:,.2f} per GPU-hour, sequence length {r.seq_len}",
        table(header, rows),
        f"ZF {r.flops_formula}: {FORMULA_NAMES[r.flops_formula]}; days = these FLOPs / "
        f"({r.n_gpus} x TFLOP/s per GPU x goodput {r.goodput:g}) / 86400",
        f"ZF recompute: {FORMULA_NAMES['recompute']} (what the GPUs execute if every layer is recomputed)",
        f"from scratch: the final shape on all {_count(r.total_tokens)} tokens at the last stage's throughput",
        f"at equal tokens growth takes {r.saving:.1%} less time ({r.speedup:.2f}x): an upper bound while the grown "
        "model learns no more per token than scratch's, reached if it matches scratch's loss after the same tokens",
        *format_bound(r),
    ])


# What growth schedules reached against their own bounds at 20 tokens per non-embedding parameter (4 x 64 final
# model, CPU, tests/test_recipes.py checks each against its JSON): (schedule, measured saving to scratch's final
# loss, its bound by the steps it ran, the page in docs/results/).
MEASURED = [("late stacking L/4 -> L after 4/5 of the tokens, WSD", 1.68, 1.67, "growth_recipe.md"),
            ("gradual stacking L/4 -> L/2 -> L", 1.68, 1.45, "growth_horizon.md"),
            ("width + depth d/2, L/2 -> d, L after 2/3, WSD", 1.05, 1.95, "growth_recipe.md"),
            ("MSG width growth, 3 stages", 1.11, 1.65, "growth_horizon.md")]
DEFAULT_BOUND_WARNING = 1.5


def format_bound(r: PlanResult) -> list[str]:
    """Each growth's f and r, the schedule's saving bound, and a warning when it cannot reach the target."""
    if not r.growths:
        return []
    lines = ["growth " + ", ".join(f"{i + 1} (after {a.name}): f = {f:.2f}, r = {q:.2f}"
                                   for i, ((f, q), a) in enumerate(zip(r.growths, r.stages)))
             + f"; saving bound {r.saving_bound:.2f}x less compute than from scratch (FLOPs at equal tokens; "
             "1 / (1 - f(1 - r)) for one growth)",
             "measured at 20 tokens/param (docs/results/): "
             + "; ".join(f"{name} {got:.2f}x against its bound {bound:.2f}x ({page})"
                         for name, got, bound, page in MEASURED)
             + "; above the bound where the smaller stages learned more per token than scratch's model"]
    target = r.target_saving
    if target is not None and r.saving_bound < target:
        lines.append(f"warning: this schedule can save at most {r.saving_bound:.2f}x by the bound, below "
                     f"plan.target_saving = {target:g}x: grow later or from a smaller model")
    elif target is None and r.saving_bound < DEFAULT_BOUND_WARNING:
        lines.append(f"warning: this schedule can save at most {r.saving_bound:.2f}x by the bound (below "
                     f"{DEFAULT_BOUND_WARNING}x): grow later or from a smaller model")
    return lines


def format_memory(rows: list[tuple[str, Layout, MemoryEstimate]], gpu: GPU, n_gpus: int) -> str:
    header = ["stage", "layout", "GPUs", "weights", "grads", "optimizer", "activations", "total", "usable", "fits"]
    # Megatron's notation, as in the paper's tables (the torchrun trainer's messages use Layout.describe()).
    body = [[name, f"TP{lay.tp} PP{lay.pp} DP{lay.dp}", str(lay.world_size), *(f"{b / GIB:.1f}" for b in
             (m.params, m.grads, m.optimizer, m.activations, m.total, m.usable)), "yes" if m.fits else "NO"]
            for name, lay, m in rows]
    lay = rows[0][1]
    notes = [f"memory per GPU in GiB on {gpu.name} ({gpu.memory_gib:g} GiB), most loaded (first) pipeline stage: "
             "bf16 weights, fp32 grads, fp32 master weights + Adam moments"
             f" ({'sharded over DP' if lay.distributed_optimizer else 'not sharded'}); activations per "
             f"Korthikanti et al. 2022 with {lay.recompute} recomputation, sequence parallel "
             f"{'on' if lay.sequence_parallel else 'off'}, micro-batch {lay.micro_batch_size}"]
    odd = [name for name, lay, _ in rows if lay.world_size != n_gpus]
    if odd:
        notes.append(f"note: the layout of {', '.join(odd)} does not use plan.n_gpus = {n_gpus} GPUs")
    return "\n".join([table(header, body), *notes])


def format_search(s: SearchResult, gpu: GPU) -> str:
    best = s.best
    header = ["stage", "shape", "params", "tokens", "days", "GPU-hours", "cost"]
    rows = [[st.name, shape(st.model), _count(st.params), _count(st.tokens), _fixed(st.days, 2),
             _fixed(st.gpu_hours, 0), "$" + _fixed(st.cost, 0)] for st in best.stages]
    if best.growth_days:
        rows.append(["growth", f"{len(best.stages) - 1} events", "", "", f"{best.growth_days:.2f}", "", ""])
    rows.append(["total", "", "", _count(best.total_tokens), _fixed(best.total_days, 2),
                 _fixed(best.total_gpu_hours, 0), "$" + _fixed(best.total_cost, 0)])
    sc = s.scratch
    rows.append([sc.name, shape(sc.model), _count(sc.params), _count(sc.tokens), _fixed(sc.days, 2),
                 _fixed(sc.gpu_hours, 0), "$" + _fixed(sc.cost, 0)])
    options = ", ".join(f"{len(o.stages)}: {_count(o.total_tokens)}" for o in s.options)
    return "\n".join([
        f"schedule search: budget {_fixed(s.budget_gpu_hours, 0)} GPU-hours "
        f"(${_fixed(s.budget_gpu_hours * best.price_per_gpu_hour, 0)}) on {best.n_gpus} x {gpu.name} at {sc.tflops_per_gpu:.1f} TFLOP/s per GPU",
        table(header, rows),
        f"the grown model sees {s.token_gain:.2f}x the tokens of training it from scratch "
        f"({_count(best.stages[-1].tokens)} of them at the final size)",
        f"tokens seen by number of stages: {options}",
    ])


def _stage_dict(s: StageCost) -> dict[str, Any]:
    return {"name": s.name, "n_layers": s.model.n_layers, "d_model": s.model.d_model, "n_heads": s.model.n_heads,
            "params": s.params, "tokens": s.tokens, "tflops_per_gpu": s.tflops_per_gpu, "flops": s.flops,
            "recompute_flops": s.recompute_flops, "days": s.days, "gpu_hours": s.gpu_hours, "cost": s.cost}


def plan_to_dict(r: PlanResult) -> dict[str, Any]:
    return {"gpu": r.gpu.name, "peak_tflops": r.gpu.peak_tflops, "n_gpus": r.n_gpus,
            "price_per_gpu_hour": r.price_per_gpu_hour, "flops_formula": r.flops_formula, "goodput": r.goodput,
            "seq_len": r.seq_len, "stages": [_stage_dict(s) for s in r.stages], "growth_days": r.growth_days,
            "total": {"tokens": r.total_tokens, "flops": r.total_flops, "recompute_flops": r.total_recompute_flops,
                      "days": r.total_days, "gpu_hours": r.total_gpu_hours, "cost": r.total_cost},
            "from_scratch": _stage_dict(r.scratch), "saving": r.saving, "speedup": r.speedup,
            "growths": [{"f": f, "r": q} for f, q in r.growths], "saving_bound": r.saving_bound}


def memory_to_dict(rows: list[tuple[str, Layout, MemoryEstimate]]) -> list[dict[str, Any]]:
    return [{"stage": name, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "micro_batch_size": lay.micro_batch_size,
             "sequence_parallel": lay.sequence_parallel, "recompute": lay.recompute,
             "distributed_optimizer": lay.distributed_optimizer, "params_gib": m.params / GIB,
             "grads_gib": m.grads / GIB, "optimizer_gib": m.optimizer / GIB, "activations_gib": m.activations / GIB,
             "total_gib": m.total / GIB, "usable_gib": m.usable / GIB, "fits": m.fits} for name, lay, m in rows]


def search_to_dict(s: SearchResult) -> dict[str, Any]:
    best = s.best
    return {"budget_gpu_hours": s.budget_gpu_hours, "stages": [_stage_dict(st) for st in best.stages],
            "growth_days": best.growth_days, "total_tokens": best.total_tokens, "total_days": best.total_days,
            "total_gpu_hours": best.total_gpu_hours, "total_cost": best.total_cost,
            "from_scratch": _stage_dict(s.scratch), "token_gain": s.token_gain,
            "tokens_by_stage_count": {len(o.stages): o.total_tokens for o in s.options}}


def save_png(r: PlanResult, path: str | Path) -> None:
    """Parameters against cumulative tokens (the paper's Figure 1): each stage a step, the area under the
    steps ∝ compute (6·N·D); from scratch the dashed rectangle of the final size over all the tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    start = 0.0
    for s in r.stages:
        end = start + s.tokens / 1e9
        ax.fill_between([start, end], 0, s.params / 1e9, alpha=0.35)
        ax.plot([start, start, end, end], [0, s.params / 1e9, s.params / 1e9, 0], color="C0", lw=1.5)
        ax.text((start + end) / 2, s.params / 1e9, f"{s.name}\n{s.days:.2f} d", ha="center", va="bottom", fontsize=8)
        start = end
    final = r.scratch.params / 1e9
    ax.plot([0, 0, start, start], [0, final, final, 0], ls="--", color="C3",
            label=f"from scratch: {r.scratch.days:.2f} d")
    ax.set(xlabel="tokens (billions)", ylabel="parameters (billions)", ylim=(0, final * 1.25),
           xlim=(-0.01 * start, start * 1.02),
           title=f"growth: {r.total_days:.2f} days, {r.speedup:.2f}x faster than from scratch")
    ax.legend(loc="upper left")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise FlmError(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
