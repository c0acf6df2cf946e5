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
import growth_recipe as gr  # noqa: E402
import recipes  # noqa: E402

from flm.config import TrainConfig, load_config  # noqa: E402
from flm.errors import FlmError  # noqa: E402
from flm.train.schedule import plan_stages  # noqa: E402

RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.toml"))
HORIZON = json.loads((ROOT / recipes.HORIZON_JSON).read_text())
RECIPE = json.loads((ROOT / recipes.RECIPE_JSON).read_text())


def test_the_checked_in_recipes_are_what_the_measurements_write(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipes.py"), "--out", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, text=True)
    written = sorted(tmp_path.glob("*.toml"))
    assert [p.name for p in written] == [p.name for p in RECIPES] and RECIPES
    for mine, theirs in zip(written, RECIPES):
        assert mine.read_text() == theirs.read_text(), theirs.name


def test_winners_are_the_best_worst_seed_per_horizon_and_only_when_every_seed_saved():
    doc = copy.deepcopy(HORIZON)
    found = recipes.candidates(doc, RECIPE)
    for h, arms in found.items():
        best = max(arms, key=lambda c: (min(c["saving"]["per_seed"]), c["saving"]["geomean"]))
        assert recipes.winners(found)[h] is best
    assert recipes.winners(found)[20.0]["arm"] == "stack-quarter"  # 1.63 at worst against gradual stacking's 1.59
    for h in doc["horizons"]:  # one seed that loses disqualifies an arm
        for a in h["arms"].values():
            if a.get("saving") and a["saving"].get("geomean"):
                a["saving"]["min"] = 0.99
    assert set(recipes.winners(recipes.candidates(doc, None))) == set()


def test_bound_is_the_token_ratio_at_equal_flops():
    """20 tokens/param, stack: steps 2,345 + 1,759 + 1,563 against scratch's 3,908 at the same FLOPs."""
    stack = next(c for c in recipes.candidates(HORIZON, None)[20.0] if c["arm"] == "stack")
    assert stack["steps"] == [2345, 1759, 1563]
    assert stack["bound"] == pytest.approx(5667 / 3908)


@pytest.mark.parametrize("source, arm", [("growth_horizon", "stack"), ("growth_recipe", "stack-quarter")])
def test_a_recipe_is_the_measured_run_with_flm_defaults_elsewhere(source, arm):
    doc = HORIZON if source == "growth_horizon" else RECIPE
    win = next(c for c in recipes.candidates(HORIZON, RECIPE)[20.0] if (c["source"], c["arm"]) == (source, arm))
    cfg = recipes.recipe_config(win, 20.0, doc, "h20")
    if source == "growth_horizon":
        bench, steps = gh.build_config(arm, 20.0, win["lr"], gh.SEEDS[0], recipes.setup_of(doc))
        assert steps == win["steps"] == [2345, 1759, 1563]
    else:
        bench, steps = gr.build_config(f"{arm}@{win['f']}", 20.0, win["lr"], gr.SEEDS[0], recipes.setup_of(doc))
        run = next(r for r in doc["runs"] if (r["arm"], r["lr"], r["seed"]) == (f"{arm}@4/5", win["lr"], 1337))
        assert steps == run["steps"] and cfg.train.schedule == "wsd" and cfg.stages[1].lr_at_growth == "continue"
    assert cfg.model == bench.model and cfg.stages == bench.stages
    assert [s.steps for s in plan_stages(cfg, cfg.model)] == steps
    assert [getattr(cfg.train, k) for k in recipes.RECIPE_TRAIN] == [getattr(bench.train, k)
                                                                     for k in recipes.RECIPE_TRAIN]
    defaults = TrainConfig()
    assert (cfg.train.ckpt_every, cfg.train.on_bad_step, cfg.train.spike_factor, cfg.train.progress) == (
        defaults.ckpt_every, defaults.on_bad_step, defaults.spike_factor, defaults.progress)
    assert cfg.data.corpus == "bundled" and cfg.train.run_dir == "runs/recipes/h20"


def test_a_measurement_the_code_no_longer_rebuilds_is_refused():
    win = dict(recipes.winners(recipes.candidates(HORIZON, None))[20.0], steps=[1, 2, 3])
    assert win["arm"] == "stack"
    with pytest.raises(FlmError, match=r"today's code builds steps \[2345, 1759, 1563\], the measurement ran "
                                       r"\[1, 2, 3\]: re-measure"):
        recipes.recipe_config(win, 20.0, HORIZON, "h20")


def test_a_refused_measurement_leaves_the_recipes_folder_as_it_was(tmp_path):
    """One line, a non-zero exit, and the recipes already there untouched."""
    doc = copy.deepcopy(HORIZON)
    for h in doc["horizons"]:
        for a in h["arms"].values():
            if a.get("steps") and len(a["steps"]) == 3:
                a["steps"] = [1, 2, 3]
    (tmp_path / "horizon.json").write_text(json.dumps(doc))
    out = tmp_path / "recipes"
    out.mkdir()
    (out / "mine.toml").write_text("kept")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipes.py"), "--out", str(out),
                          "--horizon-json", str(tmp_path / "horizon.json"), "--recipe-json", str(tmp_path / "none")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "re-measure before writing" in run.stderr
    assert [p.name for p in out.iterdir()] == ["mine.toml"] and (out / "mine.toml").read_text() == "kept"


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


def test_the_plan_s_measured_figures_are_the_measurements():
    """`flm plan` quotes measured savings and bounds (flm.plan.report.MEASURED): each is its JSON's figure."""
    from flm.plan.report import MEASURED

    found = {(c["source"] + ".md", c["arm"]): c for c in recipes.candidates(HORIZON, RECIPE)[20.0]}
    arms = {"late stacking L/4 -> L after 4/5 of the tokens, WSD": "stack-quarter",
            "gradual stacking L/4 -> L/2 -> L": "stack", "width + depth d/2, L/2 -> d, L after 2/3, WSD": "width-depth",
            "MSG width growth, 3 stages": "msg"}
    assert [name for name, *_ in MEASURED] == list(arms)
    for name, got, bound, page in MEASURED:
        c = found[(page, arms[name])]
        assert (got, bound) == (round(c["saving"]["geomean"], 2), round(c["bound"], 2)), name
        if c["source"] == "growth_recipe":  # the growth point the name states is the measured best's
            assert f"after {c['f']}" in name
