"""benchmarks/predict_blind.py: a finished law against runs it never saw, as the report reads them.

The means, gains and predictions are recomputed by hand from a law written in the test (Chinchilla's formula and
a per-D power law), not with the module's own evaluation: the reference is the mean of the fit's run and the new
seeds, a gain is that mean minus a width's mean, and the predicted gain is the law's difference.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

from flm.data import load_prepared
from flm.mup.predict import width_counts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import predict_blind  # noqa: E402  (a script's module, beside it in benchmarks/)

JOINT = {"E": 2.0, "A": 1.5, "alpha": 0.3, "B": 2.0, "beta": 0.2}
OWN = {"E": 3.0, "A": 0.6, "alpha": 0.25}
SCALES = {"n0": 20_000.0, "d0": 100_000.0, "c0": 1e10}


def joint_law(n: float, d: float) -> float:
    return (JOINT["E"] + JOINT["A"] * (n / SCALES["n0"]) ** -JOINT["alpha"]
            + JOINT["B"] * (d / SCALES["d0"]) ** -JOINT["beta"])


def own_law(n: float) -> float:
    return OWN["E"] + OWN["A"] * (n / SCALES["n0"]) ** -OWN["alpha"]


def test_the_blind_check_reads_means_gains_and_both_laws_by_hand(tiny, tmp_path):
    """Reference width 64: the fit's run (seed 0) and two new seeds; width 128 with two seeds, 192 with one; a control
    (width 32, seed 0) trained again. With no run scatter and every replicate the law itself, each interval is its
    point; the gain by this D's law (`fixed_d`) is read only where the fit measured the runs' D."""
    cfg = tiny.config(tmp_path / "unused", "model.mup=true", "model.head_dim=16", "model.base_width=32")
    data = load_prepared(tiny.data)
    steps = 10
    tokens = steps * cfg.train.tokens_per_step
    law = {"form": "chinchilla", "params": JOINT, "scales": SCALES, "at_tokens": None, "interval": 0.8,
           "replicates": [{"params": JOINT}] * 8, "run_noise": 0.0,
           "fitted": {"params": [width_counts(cfg, 32, data)[0], width_counts(cfg, 64, data)[0]]}}
    doc = {"law": law, "reference": {"width": 64}, "bootstrap": {"seed": 0},
           "points": [{"width": 64, "seed": 0, "tokens": tokens, "val_loss": 4.0, "role": "fit"},
                      {"width": 32, "seed": 0, "tokens": tokens, "val_loss": 4.5, "role": "fit"},
                      {"width": 64, "seed": 0, "tokens": 2 * tokens, "val_loss": 3.0, "role": "fit"}],
           "fixed_d": [{"tokens": float(tokens), "params": OWN, "scales": SCALES, "replicates": [{"params": OWN}] * 8}]}
    runs = [{"width": 64, "seed": 1, "val_loss": 4.1}, {"width": 64, "seed": 2, "val_loss": 3.95},
            {"width": 128, "seed": 0, "val_loss": 3.8}, {"width": 128, "seed": 1, "val_loss": 3.9},
            {"width": 192, "seed": 0, "val_loss": 3.7}, {"width": 32, "seed": 0, "val_loss": 4.5}]
    out = predict_blind.analyse(doc, cfg, data, runs, steps, (32, 0))

    ref = statistics.fmean([4.0, 4.1, 3.95])
    assert out["reference"]["val_loss"] == pytest.approx(ref, rel=1e-12) and out["reference"]["seeds"] == [0, 1, 2]
    assert out["control"] == {"width": 32, "seed": 0, "fit_value": 4.5, "trained": 4.5}
    n_ref = width_counts(cfg, 64, data)[0]
    assert out["reference"]["predicted"] == pytest.approx(joint_law(n_ref, tokens), rel=1e-12)
    assert [(r["width"], r["seed"]) for r in out["runs"]] == [(128, 0), (128, 1), (192, 0)]
    for w, losses in ((128, [3.8, 3.9]), (192, [3.7])):
        row = next(r for r in out["widths"] if r["width"] == w)
        n = width_counts(cfg, w, data)[0]
        gain = ref - statistics.fmean(losses)
        assert row["seeds"] == len(losses) and row["measured_gain"] == pytest.approx(gain, rel=1e-12)
        predicted = joint_law(n_ref, tokens) - joint_law(n, tokens)
        assert row["predicted_gain"] == pytest.approx(predicted, rel=1e-9)
        assert row["gain_low"] == pytest.approx(predicted, rel=1e-9) == row["gain_high"]
        assert row["gain_rel_error"] == pytest.approx(predicted / gain - 1, rel=1e-9)
        own = own_law(n_ref) - own_law(n)
        assert row["this_d"]["predicted_gain"] == pytest.approx(own, rel=1e-9)
        assert row["this_d"]["gain_rel_error"] == pytest.approx(own / gain - 1, rel=1e-9)
        assert row["this_d"]["gain_covered"] == (abs(own - gain) < 1e-12)
    # at a D the fit measured but fixed_d does not hold: no this-D law
    doc["fixed_d"][0]["tokens"] = 2.0 * tokens
    other = predict_blind.analyse(doc, cfg, data, runs, steps, (32, 0))
    assert all("this_d" not in r for r in other["widths"])
