"""configs/recipes/*.toml and benchmarks/recipes.py: the recipes are the measured winners, as a user trains them.

The checked-in recipes are what the script writes from the checked-in measurements (so neither moves without the
other); a winner is the largest saving per horizon and only when above 1; a recipe reads back as the measured run
(model, stages, schedule, rate, steps) with flm's defaults elsewhere; a measurement the code no longer rebuilds is
refused; every recipe trains and plans.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import growth_horizon as gh  # noqa: E402  (scripts' modules, beside it in benchmarks/)
import recipes  # noqa: E402

from flm.config import TrainConfig, load_config  # noqa: E402
from flm.errors import FlmError  # noqa: E402

RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.toml"))
HORIZON = json.loads((ROOT / recipes.HORIZON_JSON).read_text())


def test_the_checked_in_recipes_are_what_the_measurements_write(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipes.py"), "--out", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, text=True)
    written = sorted(tmp_path.glob("*.toml"))
    assert [p.name for p in written] == [p.name for p in RECIPES] and RECIPES
    for mine, theirs in zip(written, RECIPES):
        assert mine.read_text() == theirs.read_text(), theirs.name


def test_winners_are_the_largest_saving_per_horizon_and_only_above_one():
    doc = copy.deepcopy(HORIZON)
    found = recipes.candidates(doc, None)
    for h in doc["horizons"]:
        arms = {a: v["saving"]["geomean"] for a, v in h["arms"].items() if v.get("saving") and
                v["saving"].get("geomean")}
        best = max(arms, key=arms.get)
        assert {c["arm"] for c in found[float(h["tokens_per_param"])]} == set(arms)
        assert recipes.winners(found)[float(h["tokens_per_param"])]["arm"] == best
    for h in doc["horizons"]:  # nothing saves: no recipe
        for a in h["arms"].values():
            if a.get("saving") and a["saving"].get("geomean"):
                a["saving"]["geomean"] = 0.9
    assert recipes.winners(recipes.candidates(doc, None)) == {}


def test_bound_is_the_token_ratio_at_equal_flops():
    """20 tokens/param, stack: steps 2,345 + 1,759 + 1,563 against scratch's 3,908 at the same FLOPs."""
    stack = next(c for c in recipes.candidates(HORIZON, None)[20.0] if c["arm"] == "stack")
    assert stack["steps"] == [2345, 1759, 1563]
    assert stack["bound"] == pytest.approx(5667 / 3908)


def test_a_recipe_is_the_measured_run_with_flm_defaults_elsewhere():
    win = recipes.winners(recipes.candidates(HORIZON, None))[20.0]
    cfg = recipes.recipe_config(win, 20.0, HORIZON, "h20")
    bench, steps = gh.build_config(win["arm"], 20.0, win["lr"], gh.SEEDS[0], recipes.setup_of(HORIZON))
    assert steps == win["steps"] and cfg.model == bench.model and cfg.stages == bench.stages
    assert [getattr(cfg.train, k) for k in recipes.RECIPE_TRAIN] == [getattr(bench.train, k)
                                                                     for k in recipes.RECIPE_TRAIN]
    defaults = TrainConfig()
    assert (cfg.train.ckpt_every, cfg.train.on_bad_step, cfg.train.spike_factor, cfg.train.progress) == (
        defaults.ckpt_every, defaults.on_bad_step, defaults.spike_factor, defaults.progress)
    assert cfg.data.corpus == "bundled" and cfg.train.run_dir == "runs/recipes/h20"


def test_a_measurement_the_code_no_longer_rebuilds_is_refused():
    win = dict(recipes.winners(recipes.candidates(HORIZON, None))[20.0], steps=[1, 2, 3])
    with pytest.raises(FlmError, match=r"today's code builds steps \[2345, 1759, 1563\], the measurement ran "
                                       r"\[1, 2, 3\]: re-measure"):
        recipes.recipe_config(win, 20.0, HORIZON, "h20")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_plans_and_trains(path, tmp_path, tiny, cli):
    """`flm plan` prints its growths' f and r; the recipe trains and grows at each boundary, shortened to two steps
    a stage on the suite's prepared corpus."""
    cfg = load_config(path)
    assert len(cfg.stages) >= 2 and "Growth recipe for about" in path.read_text()
    plan = cli("plan", path)
    assert plan.status == 0 and "growth 1 (after" in plan.out, plan.err
    step = cfg.train.batch_size * cfg.train.seq_len
    sets = [f"data.dir={tiny.data}", *tiny.corpus, f"train.run_dir={tmp_path / 'run'}", "train.warmup_steps=1",
            "train.eval_every=2", "train.eval_batches=1", "train.sample_tokens=0", "train.progress=false",
            *(f"stages.{i}.tokens={2 * step}" for i in range(len(cfg.stages))),
            *(f"stages.{i}.ramp_steps=1" for i in range(1, len(cfg.stages))),
            *(f"stages.{i}.warmup_steps=1" for i, s in enumerate(cfg.stages) if s.warmup_steps)]
    result = cli("train", "-c", path, *(a for s in sets for a in ("--set", s)))
    assert result.status == 0, result.err
    assert [f"grew to stage {i + 1}" in result.out for i in range(1, len(cfg.stages))] == [True] * (len(cfg.stages) - 1)
