"""`flm plan --predict FIT.json`: the final loss of training from scratch and of each candidate growth schedule, with
intervals, from a law fitted by `flm predict` (docs/mup.md); and which to choose.

FIT.json is `flm predict`'s predict.json; its "law" section holds the chosen form, its parameters, the bootstrap
replicates' parameters (each with its own eta when growth runs were fitted) and what N, D and C mean. The laws are
evaluated here with plain arithmetic (flm.mup.laws fits them with numpy; tests/test_predict.py checks that the
two agree):

    chinchilla  L = E + A·n^-alpha + B·d^-beta         n = N/n0, d = D/d0, c = C/c0
    interaction L = E + A·n^-alpha + B·n^gamma·d^-beta
    kaplan      L = E + (A·n^-alpha + B/d)^gamma
    compute     L = E + A·c^-alpha
    n_only      L = E + A·n^-alpha (only at the one D it was fitted at)

N is the final shape's non-embedding parameter count, C = flm.model.flops_per_token(final shape) x D. A growth
schedule is the scratch run of its final shape that saw D_eff = D_last + eta·D_before tokens (D_before: every
token trained before the last growth). The point prediction is the fitted law's; the interval is the central
`interval` share of the replicates' predictions, and the difference to scratch is taken replicate by replicate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flm.config import ModelConfig, PlanConfig
from flm.errors import FlmError
from flm.files import read_json_report
from flm.model.counting import flops_per_token, non_embedding_params

LAW_VERSION = 1
FORM_PARAMS = {"chinchilla": ("E", "A", "alpha", "B", "beta"), "interaction": ("E", "A", "alpha", "B", "beta", "gamma"),
               "kaplan": ("E", "A", "alpha", "B", "gamma"),
               "compute": ("E", "A", "alpha"), "n_only": ("E", "A", "alpha")}


def load_law(path: str | Path) -> dict[str, Any]:
    """The "law" section of `flm predict`'s JSON (or a bare law document), checked."""
    doc = read_json_report(path)
    law = doc.get("law", doc) if isinstance(doc, dict) else None
    if not isinstance(law, dict) or law.get("version") != LAW_VERSION or law.get("form") not in FORM_PARAMS:
        raise FlmError(f"{path} holds no fitted law (write one with `flm predict`)")
    for params in [law["params"]] + [r["params"] for r in law.get("replicates", [])]:
        missing = [k for k in FORM_PARAMS[law["form"]] if k not in params]
        if missing:
            raise FlmError(f"{path}: the {law['form']} law lacks {', '.join(missing)}")
    if len(law.get("replicates", [])) < 2:
        raise FlmError(f"{path}: the law has no bootstrap replicates to give an interval")
    return law


def law_loss(law: dict[str, Any], params: dict[str, float], n: float, d: float, c: float) -> float:
    """The law's loss at N = n, D = d, C = c with these parameters."""
    s = law["scales"]
    x_n, x_d, x_c = n / s["n0"], d / s["d0"], c / s["c0"]
    form, p = law["form"], params
    if form == "chinchilla":
        return p["E"] + p["A"] * x_n ** -p["alpha"] + p["B"] * x_d ** -p["beta"]
    if form == "interaction":
        return p["E"] + p["A"] * x_n ** -p["alpha"] + p["B"] * x_n ** p["gamma"] * x_d ** -p["beta"]
    if form == "kaplan":
        return p["E"] + (p["A"] * x_n ** -p["alpha"] + p["B"] / x_d) ** p["gamma"]
    if form == "compute":
        return p["E"] + p["A"] * x_c ** -p["alpha"]
    at = law.get("at_tokens")
    if at is not None and abs(d / at - 1) > 1e-9:
        raise FlmError(f"the fitted law (n_only) holds only at D = {at:,.0f} tokens, not {d:,.0f}: fit with several "
                       "mup.branch_steps to predict other token counts")
    return p["E"] + p["A"] * x_n ** -p["alpha"]


def quantile(values: list[float], q: float) -> float:
    """numpy's default (linear) quantile."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Prediction:
    name: str
    stages: list[str]  # shapes, e.g. "24x2048"
    tokens_before: float
    tokens_last: float
    tokens_eff: float  # D_eff at the fitted eta (all tokens for a single stage)
    loss: float  # the fitted law's prediction
    low: float
    high: float
    samples: list[float]  # one per replicate
    diff: tuple[float, float, float] | None = None  # loss - scratch's: point, low, high (replicate by replicate)


def predict_schedule(law: dict[str, Any], name: str, stages: list[tuple[ModelConfig, float]], seq_len: int,
                     eta: float | None = None) -> Prediction:
    """A schedule's final loss: (shape, tokens) per stage, the last one the final model. `eta` replaces the fitted
    one (and the replicates'); without either a growth schedule cannot be predicted."""
    final = stages[-1][0]
    before, last = sum(t for _, t in stages[:-1]), stages[-1][1]
    n = non_embedding_params(final)
    fpt = flops_per_token(final, seq_len)
    growth = law.get("growth")
    if before and eta is None and not growth:
        raise FlmError("the fit has no growth model (fit one with mup.growth_widths in `flm predict`)")
    point_eta = eta if eta is not None else (growth["eta"] if growth else 0.0)

    def value(params: dict[str, float], e: float) -> float:
        d = last + e * before
        return law_loss(law, params, n, d, fpt * d)

    samples = [value(r["params"], eta if eta is not None else r.get("eta", point_eta)) for r in law["replicates"]]
    tail = (1.0 - law["interval"]) / 2
    return Prediction(name, [f"{m.n_layers}x{m.d_model}" for m, _ in stages], before, last, last + point_eta * before,
                      value(law["params"], point_eta), quantile(samples, tail), quantile(samples, 1 - tail), samples)


def with_difference(p: Prediction, scratch: Prediction, level: float) -> Prediction:
    diffs = [a - b for a, b in zip(p.samples, scratch.samples)]
    tail = (1.0 - level) / 2
    return Prediction(p.name, p.stages, p.tokens_before, p.tokens_last, p.tokens_eff, p.loss, p.low, p.high, p.samples,
                      (p.loss - scratch.loss, quantile(diffs, tail), quantile(diffs, 1 - tail)))


def compare(law: dict[str, Any], candidates: list[tuple[str, list[tuple[ModelConfig, float]]]], seq_len: int,
            eta: float | None = None) -> list[Prediction]:
    """Every candidate's prediction; the first must be training from scratch, the others carry their difference."""
    out = [predict_schedule(law, name, stages, seq_len, eta) for name, stages in candidates]
    return [out[0]] + [with_difference(p, out[0], law["interval"]) for p in out[1:]]


TIE = 5e-5  # a loss difference below half the last printed digit is no difference


def choose(rows: list[Prediction]) -> tuple[Prediction, str]:
    """The lowest predicted loss, and how sure: whether the difference's interval to scratch excludes 0. A schedule
    less than TIE below scratch ties with it, and scratch, the simpler run, is chosen."""
    best = min(rows, key=lambda r: r.loss)
    scratch = rows[0]
    if best is not scratch and best.diff[0] > -TIE:
        return scratch, (f"train from scratch: the best growth schedule ({best.name}) is predicted within {TIE:g} of "
                         "scratch's loss, no difference at this precision (the law sees no gain from more tokens "
                         "here), and scratch is the simpler run")
    if best is scratch:
        beaten = [r for r in rows[1:] if r.diff and r.diff[2] < 0]
        verdict = ("train from scratch: no growth schedule is predicted to reach a lower loss"
                   + (f" (though {beaten[0].name}'s interval lies below scratch)" if beaten else ""))
    elif best.diff[2] < 0:
        verdict = (f"grow: {best.name} is predicted {-best.diff[0]:.4f} below scratch, and its whole interval of the "
                   f"difference is below 0")
    else:
        verdict = (f"{best.name} by the point prediction ({-best.diff[0]:.4f} below scratch), but the interval of the "
                   f"difference [{best.diff[1]:+.4f}, {best.diff[2]:+.4f}] includes 0: not a clear win over scratch, "
                   "which is the simpler run")
    return best, verdict


def flops_to_gpu_hours(flops: float, plan: PlanConfig, tflops_per_gpu: float) -> float:
    """GPU-hours to execute `flops` (counted by plan.flops_formula) at this throughput and goodput."""
    return flops / (tflops_per_gpu * 1e12 * plan.goodput) / 3600.0


def notes(law: dict[str, Any], final: ModelConfig, seq_len: int, rows: list[Prediction]) -> list[str]:
    """How far the predictions reach beyond what was fitted, and differences of model family."""
    out = []
    fam = law.get("family", {})
    for key in ("n_layers", "head_dim", "vocab_size"):
        if key in fam and getattr(final, key, None) != fam[key]:
            out.append(f"the fit's ladder had {key} = {fam[key]}, the final shape {getattr(final, key, None)}: the law "
                       "was fitted on another family of shapes")
    if law.get("seq_len") not in (None, seq_len):
        out.append(f"the fit's runs used sequence length {law['seq_len']}, the plan {seq_len}")
    n_max, d_max = law["fitted"]["params"][1], law["fitted"]["tokens"][1]
    n = non_embedding_params(final)
    d = max(r.tokens_eff for r in rows)
    if n > n_max or d > d_max:
        out.append(f"extrapolating: N is {n / n_max:,.3g}x the widest fitted N, D_eff up to {d / d_max:,.3g}x the "
                   "longest fitted D; the intervals cover the fit's uncertainty, not a change of regime")
    if law.get("run_noise"):
        out.append(f"the intervals are for the expected loss: one run lands a further {100 * law['run_noise']:.2f}% "
                   "(1 sd) above or below it, as seeds did on the ladder")
    return out


def _tokens(t: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if t >= scale:
            return f"{t / scale:.3g}{unit}"
    return f"{t:.0f}"


def format_comparison(law: dict[str, Any], rows: list[Prediction], budget_gpu_hours: float, final: ModelConfig,
                      seq_len: int, eta_note: str | None = None) -> str:
    level = round(100 * law["interval"])
    growth = law.get("growth")
    head = [f"predicted final loss ({law['form']} law, {len(law['replicates'])} bootstrap replicates, {level}% "
            f"intervals) for a budget of {budget_gpu_hours:,.4g} GPU-hours"
            + (f"; growth: D_eff = D_last + eta·D_before, eta = {growth['eta']:.3f}" if growth else "")]
    if eta_note:
        head.append(eta_note)
    header = ["schedule", "stages", "tokens", "D_eff", "loss", f"{level}% interval", "vs scratch", f"{level}% interval"]
    body = []
    for r in rows:
        tokens = r.tokens_before + r.tokens_last
        diff = ["", ""] if r.diff is None else [f"{r.diff[0]:+.4f}", f"[{r.diff[1]:+.4f}, {r.diff[2]:+.4f}]"]
        shapes = r.stages if len(r.stages) <= 4 else [r.stages[0], r.stages[1], "...", r.stages[-1]]
        body.append([r.name, " -> ".join(shapes), _tokens(tokens), _tokens(r.tokens_eff), f"{r.loss:.4f}",
                     f"[{r.low:.4f}, {r.high:.4f}]", *diff])
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
             for cells in [header, ["-" * w for w in widths], *body]]
    best, verdict = choose(rows)
    return "\n".join(head + lines + [f"choose: {verdict}"] + [f"note: {n}" for n in notes(law, final, seq_len, rows)])


def to_dict(rows: list[Prediction], verdict: str) -> dict[str, Any]:
    return {"candidates": [{"name": r.name, "stages": r.stages, "tokens_before": r.tokens_before,
                            "tokens_last": r.tokens_last, "tokens_eff": r.tokens_eff, "loss": r.loss, "low": r.low,
                            "high": r.high, **({"vs_scratch": list(r.diff)} if r.diff else {})} for r in rows],
            "choice": verdict}
