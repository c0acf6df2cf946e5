"""Loss laws L(N, D): the parametric forms, their robust multi-start fit, leave-one-width-out cross-validation,
the bootstrap, and the growth model's η (docs/mup.md, "Fits in N and D").

A point is one evaluated run: N non-embedding parameters, D training tokens, C training FLOPs
(flm.model.flops_per_token x D), its validation loss L, and the run it came from (a width and a seed: the
several token counts of one WSD run are one run). Every form is fitted on log L with a Huber loss on the
residuals (Besiroglu et al. 2024's re-fit of Chinchilla: δ = 1e-3), from a grid of starting points, keeping the
best; N, D and C are divided by the smallest fitted value (`Scales`) so that every parameter is O(1).

Forms (the JSON names of their parameters in brackets; n = N/n0, d = D/d0, c = C/c0):
- chinchilla   L = E + A·n^-alpha + B·d^-beta                        [E, A, alpha, B, beta]
- kaplan       L = E + (A·n^-alpha + B/d)^gamma                      [E, A, alpha, B, gamma]
  (Kaplan et al. 2020's L(N, D) plus an irreducible E: N and D interact, the terms do not add)
- interaction  L = E + A·n^-alpha + B·n^gamma·d^-beta               [E, A, alpha, B, beta, gamma]
  (chinchilla whose data term scales with N: gamma > 0 when a wider model gains more from more tokens, so that
  the gain of width grows with D; gamma = 0 is chinchilla)
- compute      L = E + A·c^-alpha                                    [E, A, alpha]
- n_only       L = E + A·n^-alpha, at one D only (the old `flm predict`: fitted on the longest fitted D)

The forms in N and D need at least 3 distinct D (E, B and beta are otherwise not identified) and every form
at least 3 distinct N. The growth model (`fit_eta`) says a growth run is a from-scratch run of its final shape
that saw D_eff = D_last + eta·D_before tokens (D_before: the tokens trained before the last growth).

flm.plan.predict evaluates the same forms from the JSON document with plain arithmetic; tests/test_predict.py
checks that the two agree.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from flm.errors import FlmError
from flm.plan.predict import quantile  # the planner evaluates intervals the same way

LOG_FLOOR = -30.0  # bounds of the log-scale parameters (e, a, b)
ETA_BOUNDS = (0.0, 2.0)  # eta's range: 0 (pre-growth tokens worthless) .. 2 (worth twice a final-model token)


@dataclass(frozen=True)
class Scales:
    n0: float
    d0: float
    c0: float


@dataclass
class Points:
    """Evaluated runs, one entry per (run, token count)."""

    n: np.ndarray
    d: np.ndarray
    c: np.ndarray
    loss: np.ndarray
    width: np.ndarray  # the group of leave-one-width-out and of the bootstrap's first stage
    run: np.ndarray  # the bootstrap's second stage: every point of a run is drawn together

    @staticmethod
    def of(rows: list[dict]) -> "Points":
        """From dicts with keys params, tokens, flops, val_loss, width, run."""
        if not rows:
            raise FlmError("no points to fit")
        return Points(np.array([float(r["params"]) for r in rows]), np.array([float(r["tokens"]) for r in rows]),
                      np.array([float(r["flops"]) for r in rows]), np.array([float(r["val_loss"]) for r in rows]),
                      np.array([int(r["width"]) for r in rows]), np.array([str(r["run"]) for r in rows]))

    def take(self, index: np.ndarray) -> "Points":
        return Points(self.n[index], self.d[index], self.c[index], self.loss[index], self.width[index], self.run[index])

    def scales(self) -> Scales:
        return Scales(float(self.n.min()), float(self.d.min()), float(self.c.min()))


# ---- the forms ---------------------------------------------------------------------------------------------
class Form:
    """A law: `log_loss(theta, n, d, c)` with its Jacobian in the fitted parameters theta (log-scale amplitudes)."""

    name = ""
    names: tuple[str, ...] = ()  # the JSON names, in theta's order
    needs_d = False  # needs >= 3 distinct D
    formula = ""

    def log_loss(self, theta: np.ndarray, n: np.ndarray, d: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def bounds(self, loss: np.ndarray) -> tuple[list[float], list[float]]:
        raise NotImplementedError

    def starts(self, loss: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def to_params(self, theta: np.ndarray) -> dict[str, float]:
        """theta -> the JSON's parameters: E, A, B are exp of their log; exponents as they are."""
        return {k: float(math.exp(v)) if k in ("E", "A", "B") else float(v) for k, v in zip(self.names, theta)}

    def from_params(self, params: dict[str, float]) -> np.ndarray:
        return np.array([math.log(params[k]) if k in ("E", "A", "B") else params[k] for k in self.names])


def _e_starts(loss: np.ndarray) -> list[float]:
    return [math.log(f * float(loss.min())) for f in (0.3, 0.7, 0.95)]


def _spread(loss: np.ndarray, e: float) -> float:
    return max(float(loss.mean()) - math.exp(e), 1e-3 * float(loss.mean()))


class Chinchilla(Form):
    name = "chinchilla"
    names = ("E", "A", "alpha", "B", "beta")
    needs_d = True
    formula = "L = E + A·(N/n0)^-alpha + B·(D/d0)^-beta"

    def log_loss(self, theta, n, d, c):
        e, a, alpha, b, beta = theta
        ln_n, ln_d = np.log(n), np.log(d)
        t0 = np.full_like(ln_n, math.exp(e))
        t1 = np.exp(a - alpha * ln_n)
        t2 = np.exp(b - beta * ln_d)
        total = t0 + t1 + t2
        jac = np.stack([t0, t1, -ln_n * t1, t2, -ln_d * t2], axis=1) / total[:, None]
        return np.log(total), jac

    def bounds(self, loss):
        top = math.log(float(loss.max()))
        return [LOG_FLOOR, LOG_FLOOR, 0.0, LOG_FLOOR, 0.0], [top, 30.0, 3.0, 30.0, 3.0]

    def starts(self, loss):
        out = []
        for e, split, alpha, beta in itertools.product(_e_starts(loss), (0.3, 0.7), (0.1, 0.4, 1.0), (0.1, 0.4, 1.0)):
            r = _spread(loss, e)
            out.append(np.array([e, math.log(split * r), alpha, math.log((1 - split) * r), beta]))
        return out


class Interaction(Chinchilla):
    """Chinchilla with gamma appended: its bounds and starts, each start at gamma -0.1, 0 and 0.1."""

    name = "interaction"
    names = ("E", "A", "alpha", "B", "beta", "gamma")
    needs_d = True
    formula = "L = E + A·(N/n0)^-alpha + B·(N/n0)^gamma·(D/d0)^-beta"

    def log_loss(self, theta, n, d, c):
        e, a, alpha, b, beta, gamma = theta
        ln_n, ln_d = np.log(n), np.log(d)
        t0 = np.full_like(ln_n, math.exp(e))
        t1 = np.exp(a - alpha * ln_n)
        t2 = np.exp(b + gamma * ln_n - beta * ln_d)
        total = t0 + t1 + t2
        jac = np.stack([t0, t1, -ln_n * t1, t2, -ln_d * t2, ln_n * t2], axis=1) / total[:, None]
        return np.log(total), jac

    def bounds(self, loss):
        lo, hi = super().bounds(loss)
        return lo + [-2.0], hi + [2.0]

    def starts(self, loss):
        return [np.append(x, gamma) for x in super().starts(loss) for gamma in (-0.1, 0.0, 0.1)]


class Kaplan(Form):
    name = "kaplan"
    names = ("E", "A", "alpha", "B", "gamma")
    needs_d = True
    formula = "L = E + (A·(N/n0)^-alpha + B·(D/d0)^-1)^gamma"

    def log_loss(self, theta, n, d, c):
        e, a, alpha, b, gamma = theta
        ln_n, ln_d = np.log(n), np.log(d)
        u = np.exp(a - alpha * ln_n)
        v = np.exp(b - ln_d)
        s = u + v
        p = s ** gamma
        big_e = math.exp(e)
        total = big_e + p
        ds = gamma * p / s  # d p / d s
        jac = np.stack([np.full_like(s, big_e), ds * u, -ln_n * ds * u, ds * v, p * np.log(s)], axis=1)
        return np.log(total), jac / total[:, None]

    def bounds(self, loss):
        top = math.log(float(loss.max()))
        return [LOG_FLOOR, LOG_FLOOR, 0.0, LOG_FLOOR, 0.02], [top, 30.0, 4.0, 30.0, 3.0]

    def starts(self, loss):
        out = []
        for e, split, alpha, gamma in itertools.product(_e_starts(loss), (0.3, 0.7), (0.3, 1.0, 2.0), (0.2, 0.5, 1.0)):
            s = _spread(loss, e) ** (1 / gamma)
            out.append(np.array([e, math.log(split * s), alpha, math.log((1 - split) * s), gamma]))
        return out


class PowerForm(Form):
    """E + A·x^-alpha in one variable: `compute` (x = c) or `n_only` (x = n, at one D)."""

    names = ("E", "A", "alpha")

    def __init__(self, name: str, formula: str):
        self.name, self.formula = name, formula

    def x(self, n, d, c):
        return c if self.name == "compute" else n

    def log_loss(self, theta, n, d, c):
        e, a, alpha = theta
        ln_x = np.log(self.x(n, d, c))
        t0 = np.full_like(ln_x, math.exp(e))
        t1 = np.exp(a - alpha * ln_x)
        total = t0 + t1
        return np.log(total), np.stack([t0, t1, -ln_x * t1], axis=1) / total[:, None]

    def bounds(self, loss):
        return [LOG_FLOOR, LOG_FLOOR, 0.0], [math.log(float(loss.max())), 30.0, 3.0]

    def starts(self, loss):
        return [np.array([e, math.log(_spread(loss, e)), alpha])
                for e, alpha in itertools.product(_e_starts(loss), (0.05, 0.2, 0.5, 1.0))]


FORMS: dict[str, Form] = {f.name: f for f in (
    Chinchilla(), Interaction(), Kaplan(), PowerForm("compute", "L = E + A·(C/c0)^-alpha"),
    PowerForm("n_only", "L = E + A·(N/n0)^-alpha at D = the longest fitted D"))}


# ---- fitting -----------------------------------------------------------------------------------------------
@dataclass
class Fit:
    form: Form
    theta: np.ndarray
    scales: Scales
    cost: float
    at_d: float | None = None  # n_only: the one D where the law holds
    optima: list[np.ndarray] = field(default_factory=list)  # the best few distinct optima (bootstrap starts)

    @property
    def params(self) -> dict[str, float]:
        return self.form.to_params(self.theta)

    def predict(self, n, d, c) -> np.ndarray:
        """Predicted loss (NaN where the law does not hold: n_only away from its D)."""
        n, d, c = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (n, d, c))
        value, _ = self.form.log_loss(self.theta, n / self.scales.n0, d / self.scales.d0, c / self.scales.c0)
        out = np.exp(value)
        if self.at_d is not None:
            out = np.where(np.isclose(d, self.at_d, rtol=1e-9), out, np.nan)
        return out


def fit_subset(form: Form, pts: Points) -> tuple[Points, float | None]:
    """The points `form` is fitted on: all of them, or for n_only those at the longest D."""
    if form.name != "n_only":
        return pts, None
    at = float(pts.d.max())
    return pts.take(np.isclose(pts.d, at, rtol=1e-9)), at


def can_fit(form: Form, pts: Points) -> str | None:
    """None, or why `form` cannot be fitted on these points."""
    sub, _ = fit_subset(form, pts)
    if len(np.unique(sub.n)) < 3:
        return f"{form.name} needs at least 3 distinct N, got {len(np.unique(sub.n))}"
    if form.needs_d and len(np.unique(sub.d)) < 3:
        return f"{form.name} needs at least 3 distinct D, got {len(np.unique(sub.d))}"
    return None


def huber(r: np.ndarray, delta: float) -> float:
    """sum of huber_delta(r): r²/2 within delta, delta·(|r| - delta/2) beyond."""
    a = np.abs(r)
    return float(np.sum(np.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta))))


def fit_form(form: Form, pts: Points, scales: Scales | None = None, delta: float = 1e-3,
             starts: list[np.ndarray] | None = None, keep: int = 4, max_starts: int = 12) -> Fit:
    """Minimise sum huber_delta(log L_form - log L) from several starts; the best optimum.

    Starts: `starts`, or the form's grid, of which the `max_starts` with the lowest objective are optimised.
    scipy's least_squares with loss="huber" and f_scale=delta minimises exactly that sum (scaled by 1/delta²...
    its cost is delta² x sum rho(r²/delta²)/2, the same minimiser), by a trust-region method within the bounds,
    with the analytic Jacobian."""
    problem = can_fit(form, pts)
    if problem:
        raise FlmError(problem)
    sub, at_d = fit_subset(form, pts)
    scales = scales or pts.scales()
    n, d, c = sub.n / scales.n0, sub.d / scales.d0, sub.c / scales.c0
    target = np.log(sub.loss)
    lo, hi = form.bounds(sub.loss)
    lo_a, hi_a = np.array(lo), np.array(hi)

    def residual(theta):
        return form.log_loss(theta, n, d, c)[0] - target

    def jacobian(theta):
        return form.log_loss(theta, n, d, c)[1]

    if starts is None:
        grid = [np.clip(x, lo_a + 1e-9, hi_a - 1e-9) for x in form.starts(sub.loss)]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            scores = [huber(residual(x), delta) for x in grid]
        starts = [grid[i] for i in np.argsort(np.nan_to_num(scores, nan=np.inf))[:max_starts]]
    found = []
    for start in starts:
        x0 = np.clip(start, lo_a + 1e-9, hi_a - 1e-9)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            r = least_squares(residual, x0, jac=jacobian, bounds=(lo_a, hi_a), loss="huber", f_scale=delta,
                              x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=400)
        if np.all(np.isfinite(r.x)) and np.isfinite(r.cost):
            found.append((float(r.cost), r.x))
    if not found:
        raise FlmError(f"the {form.name} fit failed from every start")
    found.sort(key=lambda t: t[0])
    optima: list[np.ndarray] = []
    for _, theta in found:
        if all(np.max(np.abs(theta - o)) > 1e-4 for o in optima):
            optima.append(theta)
        if len(optima) == keep:
            break
    return Fit(form, found[0][1], scales, found[0][0], at_d, optima)


# ---- leave-one-width-out cross-validation -----------------------------------------------------------------
def cross_validate(form: Form, pts: Points, delta: float = 1e-3, starts: list[np.ndarray] | None = None) -> dict:
    """Fit on every width but one, predict the left-out width's points; for each width in turn (each fold from
    `starts`, e.g. the full fit's optima; default the form's grid).

    Returns rms_rel, the score that chooses the form: the root mean square of the relative error over the
    left-out points of every fold but the smallest width's (that fold extrapolates towards smaller models, which
    no prediction needs, and the smallest widths are the first to leave a power law); per_width, every fold's
    mean absolute relative error (the smallest's included); widest_left_out, the widest width's (the
    extrapolation a prediction makes). A fold whose remaining points cannot be fitted (too few distinct N or D)
    is skipped and named."""
    scales = pts.scales()
    errors, per_width, skipped = [], {}, []
    widths = sorted(set(pts.width.tolist()))
    for w in widths:
        train, test = pts.take(pts.width != w), pts.take(pts.width == w)
        if can_fit(form, train):
            skipped.append(int(w))
            continue
        fit = fit_form(form, train, scales, delta, starts=starts)
        pred = fit.predict(test.n, test.d, test.c)
        ok = np.isfinite(pred)
        if not ok.any():
            skipped.append(int(w))
            continue
        rel = (pred[ok] - test.loss[ok]) / test.loss[ok]
        if w != widths[0]:
            errors.extend(rel.tolist())
        per_width[int(w)] = float(np.mean(np.abs(rel)))
    rms = float(np.sqrt(np.mean(np.square(errors)))) if errors else math.inf
    return {"rms_rel": rms, "per_width": per_width, "widest_left_out": per_width.get(int(widths[-1])),
            "points": len(errors), "skipped_widths": skipped}


# ---- a run's own scatter -------------------------------------------------------------------------------------
def run_noise(pts: Points) -> tuple[float, int]:
    """How far one run lands from its expectation: the pooled standard deviation of log loss over the seed-runs of
    the same width at the same D, and its degrees of freedom; (0.0, 0) without repeated seeds.

    The bootstrap of the law's parameters gives an interval for the expected loss; a measured run adds its own
    scatter (its seed: initialisation and data order), which a held-out check compares against."""
    groups: dict[tuple[int, float], list[float]] = {}
    for w, d, log_loss in zip(pts.width.tolist(), pts.d.tolist(), np.log(pts.loss).tolist()):
        groups.setdefault((int(w), float(d)), []).append(log_loss)
    repeated = [np.array(v) for v in groups.values() if len(v) > 1]
    df = sum(len(v) - 1 for v in repeated)
    if df == 0:
        return 0.0, 0
    return math.sqrt(sum(float(np.sum((v - v.mean()) ** 2)) for v in repeated) / df), df


# ---- the growth model ---------------------------------------------------------------------------------------
@dataclass
class GrowthPoints:
    """Finished growth runs: the final shape's N and FLOPs per token, tokens before the last growth and after it."""

    n: np.ndarray
    fpt: np.ndarray
    d_before: np.ndarray
    d_last: np.ndarray
    loss: np.ndarray
    run: np.ndarray

    @staticmethod
    def of(rows: list[dict]) -> "GrowthPoints":
        return GrowthPoints(*(np.array([float(r[k]) for r in rows]) for k in
                              ("params", "flops_per_token", "tokens_before", "tokens_last", "val_loss")),
                            np.array([str(r["run"]) for r in rows]))

    def take(self, index: np.ndarray) -> "GrowthPoints":
        return GrowthPoints(self.n[index], self.fpt[index], self.d_before[index], self.d_last[index],
                            self.loss[index], self.run[index])


def growth_predict(fit: Fit, eta: float, g: GrowthPoints) -> np.ndarray:
    """Final loss of growth runs: the law at (N_final, D_eff = D_last + eta·D_before, C = FLOPs/token·D_eff)."""
    d_eff = g.d_last + eta * g.d_before
    return fit.predict(g.n, d_eff, g.fpt * d_eff)


def fit_eta(fit: Fit, g: GrowthPoints, delta: float = 1e-3, bounds: tuple[float, float] = ETA_BOUNDS) -> float:
    """eta minimising sum huber_delta(log L_pred - log L) over the growth runs, the law held fixed."""
    if len(g.loss) == 0:
        raise FlmError("no growth runs to fit eta on")

    def residual(x):
        return np.log(growth_predict(fit, float(x[0]), g)) - np.log(g.loss)

    best = None
    for start in (0.1, 0.5, 0.9, 1.5):
        r = least_squares(residual, [start], bounds=([bounds[0]], [bounds[1]]), loss="huber", f_scale=delta,
                          xtol=1e-12, ftol=1e-12, gtol=1e-12)
        if best is None or r.cost < best.cost:
            best = r
    return float(best.x[0])


# ---- the bootstrap -----------------------------------------------------------------------------------------
@dataclass
class Bootstrap:
    thetas: list[np.ndarray]
    etas: list[float] | None
    redraws: int  # draws thrown away for too few distinct widths


def bootstrap(fit: Fit, pts: Points, replicates: int, seed: int, delta: float = 1e-3,
              growth: GrowthPoints | None = None) -> Bootstrap:
    """Two-stage cluster bootstrap: draw the widths with replacement, then within each drawn width its runs
    (seeds) with replacement, every point of a drawn run with it; refit (from the full fit's best optima), and
    with growth runs also draw those (by run) and refit eta on the replicate's law. A draw with too few distinct
    widths (or D) for the form is redrawn. Seeded: the same seed gives the same replicates."""
    rng = np.random.default_rng(seed)
    widths = np.array(sorted(set(pts.width.tolist())))
    runs_of = {w: np.array(sorted(set(pts.run[pts.width == w].tolist()))) for w in widths}
    point_index = {r: np.flatnonzero(pts.run == r) for r in set(pts.run.tolist())}
    thetas, etas, redraws = [], [] if growth is not None else None, 0
    while len(thetas) < replicates:
        drawn = rng.choice(widths, size=len(widths), replace=True)
        index = np.concatenate([point_index[r] for w in drawn
                                for r in rng.choice(runs_of[w], size=len(runs_of[w]), replace=True)])
        sample = pts.take(index)
        g_sample = growth.take(rng.integers(0, len(growth.loss), len(growth.loss))) if growth is not None else None
        if can_fit(fit.form, sample):
            redraws += 1
            if redraws > 20 * replicates:
                raise FlmError("the bootstrap keeps drawing too few distinct widths: add widths to the ladder")
            continue
        rep = fit_form(fit.form, sample, fit.scales, delta, starts=fit.optima, keep=1)
        thetas.append(rep.theta)
        if g_sample is not None:
            etas.append(fit_eta(rep, g_sample, delta))
    return Bootstrap(thetas, etas, redraws)


def interval(values: list[float], level: float) -> tuple[float, float]:
    """The central `level` interval of the replicates (percentile bootstrap)."""
    tail = (1.0 - level) / 2
    return quantile(values, tail), quantile(values, 1.0 - tail)
