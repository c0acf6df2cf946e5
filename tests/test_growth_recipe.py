"""benchmarks/growth_recipe.py: what its numbers rest on, checked without training beyond a few steps.

The bound against hand arithmetic; each arm's source shape, growth family and token split (f of its tokens before
the growth, the FLOPs of scratch within one step); WSD and lr_at_growth in the configs it builds, which validate
and plan; the sweep's order (brackets, fractions one after another, the best setting's seeds and B/2 runs); the
finished-run saving; one tiny run that grows where the config says.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import growth_horizon as gh  # noqa: E402  (scripts' modules, beside it in benchmarks/)
import growth_recipe as gr  # noqa: E402

from flm.config import ModelConfig  # noqa: E402
from flm.model import flops_per_token  # noqa: E402
from flm.train.schedule import lr_at, plan_stages, tokens_and_flops_at  # noqa: E402

FINAL = gh.PRESETS["cpu"].final  # 4 layers, d_model 64, 4 heads x 16, FFN 256


def make_setup(preset=gh.PRESETS["cpu"], vocab=2048, data_dir="unused", out="unused", **changes) -> dict:
    setup = {"preset": preset, "final": preset.final,
             "final_model": ModelConfig(**preset.final, vocab_size=vocab, max_seq_len=preset.seq_len),
             "data_dir": str(data_dir), "out": str(out), "eval_batches": 16, "evals": 30, "threads": 1,
             "operators": {arm: family for arm, (_, family) in gr.ARMS.items()}, "lr_at_growth": "continue",
             "new_layers": "stack", "copy_noise": 0.0, "decay_fraction": 0.2, "decay_shape": "linear"}
    return setup | changes


# ---- the bound -------------------------------------------------------------------------------------------------
def test_the_bound_is_one_over_one_minus_f_times_one_minus_r():
    assert gr.saving_bound(2 / 3, 1 / 4) == pytest.approx(2.0, rel=1e-12)  # 1 / (1 - 2/3 · 3/4) = 1 / (1/2)
    assert gr.saving_bound(0.8, 0.5) == pytest.approx(1 / 0.6, rel=1e-12)
    assert gr.saving_bound(0.5, 0.25) == pytest.approx(1 / 0.625, rel=1e-12)
    assert gr.saving_bound(0.0, 0.1) == 1.0 and gr.saving_bound(0.7, 1.0) == 1.0  # no growth, or no cheaper source
    for f in (0.1, 0.5, 0.8, 0.9, 0.99, 0.999999):  # r = 1/2: 1 / (1 - f/2) < 2 for every f < 1
        assert gr.saving_bound(f, 0.5) < 2.0


def test_flops_ratios_of_the_cpu_arms_by_hand():
    """flops_per_token = 6 (L (d·3a + a·d + 2·d·f) + d·V) + 12·L·a·s, at V = 2048, s = 128."""
    def by_hand(L, d, a, f, V=2048, s=128):
        return 6 * (L * (d * 3 * a + a * d + 2 * d * f) + d * V) + 12 * L * a * s

    final = by_hand(4, 64, 64, 256)
    assert final == 2_359_296
    setup = make_setup()
    assert gr.flops_ratio("stack-half", setup) == pytest.approx(by_hand(2, 64, 64, 256) / final)  # 2/3
    assert gr.flops_ratio("stack-quarter", setup) == pytest.approx(0.5)  # 1,179,648 / 2,359,296
    assert gr.flops_ratio("width-depth", setup) == pytest.approx(by_hand(2, 32, 32, 128) / final)
    assert gr.flops_ratio("msg-width", setup) == pytest.approx(by_hand(4, 32, 32, 128) / final)
    # so at f = 4/5 only width-depth's bound clears 2x, msg-width's is 2x exactly, the depth arms' are far below
    assert gr.saving_bound(0.8, gr.flops_ratio("width-depth", setup)) > 2.3
    assert gr.saving_bound(0.8, gr.flops_ratio("msg-width", setup)) == pytest.approx(2.0)
    assert gr.saving_bound(0.8, gr.flops_ratio("stack-quarter", setup)) < 1.7


# ---- the arms' configs ------------------------------------------------------------------------------------------
SOURCES = {"stack-half": (2, 64, 4, 256), "stack-quarter": (1, 64, 4, 256), "width-depth": (2, 32, 2, 128),
           "msg-width": (4, 32, 2, 128)}


@pytest.mark.parametrize("arm", list(gr.ARMS))
def test_each_arm_grows_once_from_its_source_to_the_final_model(arm):
    setup = make_setup()
    cfg, steps = gr.build_config(gr.Variant(arm, "wsd", Fraction(4, 5)).name, 20, 8e-3, 1337, setup)
    assert [tuple(getattr(s, k) for k in gr.SHAPE_KEYS) for s in cfg.stages] == [SOURCES[arm], (4, 64, 4, 256)]
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads, cfg.model.d_ff) == SOURCES[arm]
    grown = cfg.stages[1]
    assert grown.operator == ("stack" if arm.startswith("stack") else "msg") and grown.new_layers == "stack"
    assert cfg.model.mup and cfg.model.base_width == 64 and cfg.model.head_dim == 16
    stages = plan_stages(cfg, dataclasses.replace(cfg.model, vocab_size=2048))  # the growth is one flm accepts
    assert [s.steps for s in stages] == steps and stages[1].model.d_model == 64 and stages[1].model.n_layers == 4


@pytest.mark.parametrize("arm", list(gr.ARMS))
@pytest.mark.parametrize("f", [*gr.FRACTIONS, Fraction(9, 10)])
@pytest.mark.parametrize("budget", [1.0, gr.HALF])
def test_token_split_is_f_before_growth_and_flops_are_scratchs(arm, f, budget):
    setup = make_setup()
    p = setup["preset"]
    tps = p.batch * p.seq_len
    cfg, (n1, n2) = gr.build_config(gr.Variant(arm, "wsd", f, budget).name, 20, 8e-3, 1337, setup)
    assert [s.tokens for s in cfg.stages] == [n1 * tps, n2 * tps]
    assert abs(n1 - f * (n1 + n2)) <= 1  # f of the arm's tokens before the growth, to a step
    stages = plan_stages(cfg, dataclasses.replace(cfg.model, vocab_size=2048))
    _, flops = tokens_and_flops_at(n1 + n2, stages, p.batch, p.seq_len)
    final_step = tps * flops_per_token(setup["final_model"], p.seq_len)
    scratch_cfg, (n0,) = gr.build_config(gr.Variant("scratch", "wsd").name, 20, 8e-3, 1337, setup)
    assert n0 == gh.horizon_steps(20, setup) == round(20 * 200_064 / tps)  # 20 tokens per non-embedding parameter
    assert abs(flops - budget * n0 * final_step) <= final_step  # equal FLOPs, within one step of the final model
    # the arm reads as many more tokens than scratch as its bound says (FLOPs at equal tokens)
    bound = gr.saving_bound(n1 / (n1 + n2), gr.flops_ratio(arm, setup))
    assert (n1 + n2) / (budget * n0) == pytest.approx(bound, rel=2e-3)


def test_schedules_and_lr_at_growth_in_the_configs():
    setup = make_setup(decay_fraction=0.1, decay_shape="1-sqrt")
    for schedule in gr.SCHEDULES:
        cfg, (n0,) = gr.build_config(gr.Variant("scratch", schedule).name, 20, 4e-3, 1337, setup)
        assert cfg.train.schedule == schedule and not cfg.stages and cfg.train.max_steps == n0
        assert cfg.train.lr == 4e-3 and cfg.train.min_lr == pytest.approx(4e-4)
        assert cfg.train.warmup_steps == round(gh.WARMUP_FRAC * n0)
    cfg, (n1, n2) = gr.build_config("width-depth@4/5", 20, 8e-3, 1337, setup)
    assert cfg.train.schedule == "wsd" and cfg.train.decay_fraction == 0.1 and cfg.train.decay_shape == "1-sqrt"
    assert cfg.stages[1].lr_at_growth == "continue" and cfg.stages[1].warmup_steps == 0
    assert cfg.stages[1].ramp_steps == round(gh.RAMP_FRAC * n2)
    # "continue" under WSD: the LR is the peak on both sides of the growth, the decay over the last 10% of steps
    stages = plan_stages(cfg, dataclasses.replace(cfg.model, vocab_size=2048))
    assert lr_at(n1 - 1, stages) == lr_at(n1, stages) == 8e-3
    assert lr_at(n1 + n2 - 1, stages) < 8e-3 * 0.5
    for mode, warm in (("rewarm", True), ("peak", False)):
        cfg, (_, n2) = gr.build_config("stack-quarter@4/5", 20, 8e-3, 1337, make_setup(lr_at_growth=mode))
        assert cfg.stages[1].lr_at_growth == mode
        assert cfg.stages[1].warmup_steps == (round(gh.WARMUP_FRAC * n2) if warm else 0)


@pytest.mark.parametrize("operator", ["msg", "zero", "clone"])
@pytest.mark.parametrize("new_layers", ["stack", "insert"])
def test_width_depth_operators_and_new_layers_build_valid_configs(operator, new_layers):
    setup = make_setup(new_layers=new_layers)
    setup["operators"] = setup["operators"] | {"width-depth": operator}
    cfg, steps = gr.build_config("width-depth@2/3", 20, 8e-3, 1337, setup)
    cfg.validate()
    assert cfg.stages[1].operator == operator and cfg.stages[1].new_layers == new_layers
    assert [s.steps for s in plan_stages(cfg, dataclasses.replace(cfg.model, vocab_size=2048))] == steps


def test_gpu_preset_configs_validate():
    setup = make_setup(preset=gh.PRESETS["gpu"], vocab=16384)
    for name in ["scratch-cosine", "scratch-wsd", *(f"{arm}@4/5" for arm in gr.ARMS)]:
        cfg, steps = gr.build_config(name, 20, 2e-3, 1337, setup)
        assert cfg.train.device == "cuda" and sum(steps) == cfg.train.max_steps


def test_copy_noise_reaches_the_grown_stage():
    cfg, _ = gr.build_config("stack-quarter@4/5", 20, 8e-3, 1337, make_setup(copy_noise=0.2))
    assert cfg.stages[1].copy_noise == 0.2


def test_variant_names_round_trip():
    for v in [gr.Variant("scratch", "cosine"), gr.Variant("scratch", "wsd"), gr.Variant("width-depth", "wsd",
              Fraction(2, 3)), gr.Variant("msg-width", "wsd", Fraction(4, 5), gr.HALF)]:
        assert gr.Variant.parse(v.name) == v
    assert gr.Variant("width-depth", "wsd", Fraction(2, 3), 0.5).name == "width-depth@2/3:0.5"
    assert gr.fraction("0.8") == Fraction(4, 5) and gr.fraction("0.67") == Fraction(67, 100)
    with pytest.raises(ValueError):
        gr.fraction("1")


# ---- the sweep -------------------------------------------------------------------------------------------------
def test_sweep_brackets_chains_fractions_then_runs_the_best_settings_seeds_and_half_budget():
    """Fake losses with their minimum at a known rate per setting: every grid ends bracketed, the second fraction
    starts on the first one's best, and each group's best setting gets the other seeds (and an arm B/2 runs)."""
    optimum = {"scratch-cosine": 4e-3, "scratch-wsd": 2e-3, "width-depth@4/5": 3.2e-2, "width-depth@2/3": 1.6e-2}
    level = {"scratch-cosine": 1.0, "scratch-wsd": 0.99, "width-depth@4/5": 0.9, "width-depth@2/3": 0.95}
    groups = {"scratch": ["scratch-cosine", "scratch-wsd"], "width-depth": ["width-depth@4/5", "width-depth@2/3"]}
    sweeps = gr.RecipeSweeps(groups, 20.0, {"scratch": 4e-3, "width-depth": 8e-3}, 3, (1, 2, 3), half=True)
    ready, order = sweeps.start(), []
    assert {k[0] for k in ready} == {"scratch-cosine", "scratch-wsd", "width-depth@4/5"}  # fractions wait
    while ready:
        key = ready.pop(0)
        order.append(key)
        name = gr.Variant.parse(key[0]).at(1.0).name
        loss = level[name] + abs(math.log2(key[2] / optimum[name])) / 100
        sweeps.results[key] = {"final_val_loss": loss}
        ready += sweeps.after(key, set(ready))
    for name, lr in optimum.items():
        assert sweeps.best[(name, 20.0)] == lr
        lrs = sorted(sweeps.finals(name, 20.0))
        assert lrs[0] < lr < lrs[-1]  # bracketed
    first_45 = [i for i, k in enumerate(order) if k[0] == "width-depth@4/5" and k[3] == 1]
    first_23 = [i for i, k in enumerate(order) if k[0] == "width-depth@2/3"]
    assert first_23[0] > first_45[-1]  # 2/3 starts once 4/5's grid is settled, centred on its best (3.2e-2)
    assert [order[i][2] for i in first_23[:3]] == [1.6e-2, 3.2e-2, 6.4e-2]
    assert sweeps.winner == {"scratch": "scratch-wsd", "width-depth": "width-depth@4/5"}
    assert {k for k in order if k[3] != 1} == {("scratch-wsd", 20.0, 2e-3, 2), ("scratch-wsd", 20.0, 2e-3, 3),
                                                ("width-depth@4/5", 20.0, 3.2e-2, 2),
                                                ("width-depth@4/5", 20.0, 3.2e-2, 3),
                                                ("width-depth@4/5:0.5", 20.0, 3.2e-2, 2),
                                                ("width-depth@4/5:0.5", 20.0, 3.2e-2, 3)}
    assert [k for k in order if ":" in k[0]] == [("width-depth@4/5:0.5", 20.0, 3.2e-2, s) for s in (1, 2, 3)]


# ---- figures of merit ------------------------------------------------------------------------------------------
def run(final: float, curve: list) -> dict:
    return {"final_val_loss": final, "diverged": False, "curve": curve}


def test_finished_saving_reads_the_half_run_then_interpolates_then_falls_below_one():
    scratch = run(2.0, [(25.0, 3.0), (50.0, 2.5), (100.0, 2.0)])  # B = 100, target 2.0
    full = run(1.8, [(50.0, 2.6), (100.0, 1.8)])
    assert gr.finished_saving(scratch, full, run(1.9, [(25.0, 2.2), (50.0, 1.9)])) \
        == pytest.approx(100 / (25 + 0.2 / 0.3 * 25))  # the B/2 run reaches 2.0 on its curve: > 2x
    # the B/2 run ends at 2.2: between the finished runs, in log FLOPs, half-way in loss -> sqrt(50 · 100)
    assert gr.finished_saving(scratch, full, run(2.2, [(25.0, 2.4), (50.0, 2.2)])) \
        == pytest.approx(100 / math.sqrt(50 * 100))
    assert gr.finished_saving(scratch, full, None) == gh.saving(scratch, full) == pytest.approx(100 / 87.5)
    worse = run(2.5, [(50.0, 2.9), (100.0, 2.5)])  # never reaches 2.0: FLOPs scratch needs for 2.5, over B
    assert gr.finished_saving(scratch, worse, run(2.7, [(50.0, 2.7)])) == pytest.approx(0.5)


# ---- one tiny run ----------------------------------------------------------------------------------------------
def test_a_tiny_width_depth_run_grows_exactly_where_its_config_says(tiny_data, tmp_path):
    preset = dataclasses.replace(gh.PRESETS["cpu"], seq_len=32, batch=4)
    setup = make_setup(preset, vocab=512, data_dir=tiny_data, out=tmp_path, evals=3, eval_batches=1)
    result = gr.run_one("width-depth@4/5", 0.004, 8e-3, 1337, setup)  # 6 scratch steps of 128 tokens
    n1, n2 = result["steps"]
    assert result["arm"] == "width-depth@4/5" and not result["diverged"] and math.isfinite(result["final_val_loss"])
    assert [g["step"] for g in result["growths"]] == [n1] and result["growths"][0]["operator"] == "msg"
    assert result["growths"][0]["loss_after"] == pytest.approx(result["growths"][0]["loss_before"], abs=1e-5)
    final_step = 128 * flops_per_token(setup["final_model"], 32)
    assert abs(result["curve"][-1][0] - gh.horizon_steps(0.004, setup) * final_step) <= final_step
