"""The learning-rate schedules against tables worked out by hand: WSD's stable phase and its three decay shapes,
and how a grown stage starts ("continue", "rewarm", "peak") under WSD and cosine. The cosine schedule of a
three-stage run is checked the same way in test_training_arithmetic.py.

Tolerance: 1e-12 relative, the rounding of a few double-precision operations written in another order here."""

from __future__ import annotations

import math

import pytest

from flm.config import load_config
from flm.errors import FlmError
from flm.train.schedule import lr_at, plan_stages

# One micro-batch of 4 x 32 = 128 tokens a step; no data is read (plan_stages needs only the config).
BASE = ["model.vocab_size=512", "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.head_dim=32",
        "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32", "train.lr=1e-3", "train.min_lr=1e-4",
        "train.warmup_steps=2"]


def schedule(*extra: str, stages: str | None = None, tmp_path=None) -> list[float]:
    path = None
    if stages is not None:
        path = tmp_path / "stages.toml"
        path.write_text(stages)
    cfg = load_config(path, [*BASE, *extra])
    planned = plan_stages(cfg, cfg.model)
    return [lr_at(k, planned) for k in range(planned[-1].end + 1)]  # one past the end: where the decay lands


@pytest.mark.parametrize("shape, at8, at9", [
    ("linear", 1e-4 + 9e-4 * (2 / 3), 1e-4 + 9e-4 * (1 / 3)),  # 1 - p at p = 1/3, 2/3
    ("cosine", 1e-4 + 9e-4 * 0.75, 1e-4 + 9e-4 * 0.25),  # (1 + cos(pi p)) / 2: 3/4, 1/4
    ("1-sqrt", 1e-4 + 9e-4 * (1 - math.sqrt(1 / 3)), 1e-4 + 9e-4 * (1 - math.sqrt(2 / 3))),
])
def test_wsd_one_stage_by_hand(shape, at8, at9):
    """10 steps, warmup 2, decay over the last round(0.3 x 10) = 3 steps (7, 8, 9): peak 1e-3 until step 7,
    then down to min_lr 1e-4, reached one step past the end."""
    got = schedule("train.max_steps=10", "train.schedule=wsd", "train.decay_fraction=0.3",
                   f"train.decay_shape={shape!r}")
    want = [5e-4] + [1e-3] * 7 + [at8, at9, 1e-4]  # warmup 1/2, then the stable phase (step 7 is p = 0)
    assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_wsd_decay_is_at_least_one_step():
    got = schedule("train.max_steps=10", "train.schedule=wsd", "train.decay_fraction=0.01")
    assert got[:10] == pytest.approx([5e-4] + [1e-3] * 9, rel=1e-12)  # the decay is the run's last step alone
    assert got[10] == pytest.approx(1e-4, rel=1e-12)


STAGES = """
[[stages]]
tokens = 1280
[[stages]]
n_layers = 3
tokens = 640
ramp_steps = 2
{second}
[[stages]]
d_ff = 512
tokens = 640
ramp_steps = 2
{third}
"""


def test_wsd_stages_rewarm_and_peak_by_hand(tmp_path):
    """Stages of 10, 5 and 5 steps; decay over the last 5 (steps 15-19, linear). Stage 2 re-warms over 2 steps to
    the stable 1e-3; stage 3 goes back to its own peak 2e-3, from which the decay falls to min_lr."""
    got = schedule("train.schedule=wsd", "train.decay_fraction=0.25", tmp_path=tmp_path,
                   stages=STAGES.format(second='lr_at_growth = "rewarm"\nwarmup_steps = 2',
                                        third='lr_at_growth = "peak"\nlr = 2e-3'))
    want = [5e-4] + [1e-3] * 9  # stage 1: warmup 1/2, 1
    want += [5e-4] + [1e-3] * 4  # stage 2: re-warm 1/2, 1
    want += [1e-4 + 1.9e-3 * (1 - k / 5) for k in range(5)]  # stage 3: 2e-3, 1.62e-3, ... from its own peak
    want += [1e-4]
    assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_wsd_continue_is_the_one_stage_schedule(tmp_path):
    """Growth with "continue" leaves the LR where a one-stage WSD run of the same 20 steps has it."""
    staged = schedule("train.schedule=wsd", "train.decay_fraction=0.25", "train.decay_shape='cosine'",
                      tmp_path=tmp_path, stages=STAGES.format(second='lr_at_growth = "continue"', third=""))
    flat = schedule("train.max_steps=20", "train.schedule=wsd", "train.decay_fraction=0.25",
                    "train.decay_shape='cosine'")
    want = [5e-4] + [1e-3] * 14 + [1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)] + [1e-4]
    assert staged == pytest.approx(want, rel=1e-12, abs=0)
    assert flat == pytest.approx(want, rel=1e-12, abs=0)


def test_cosine_peak_returns_to_train_lr(tmp_path):
    """Under cosine, "peak" starts the grown stage at train.lr and decays along its own cosine to the run's cosine
    value at its end; the default (no warmup) starts it on the run's cosine."""
    run_cosine = [1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * k / 20)) for k in range(21)]
    peak = schedule(tmp_path=tmp_path, stages=STAGES.format(second='lr_at_growth = "peak"', third=""))
    assert peak[10] == pytest.approx(1e-3, rel=1e-12)
    stage2 = [run_cosine[15] + 0.5 * (1e-3 - run_cosine[15]) * (1 + math.cos(math.pi * k / 5)) for k in range(5)]
    assert peak[10:15] == pytest.approx(stage2, rel=1e-12)
    default = schedule(tmp_path=tmp_path, stages=STAGES.format(second="", third=""))
    assert default[10] == pytest.approx(run_cosine[10], rel=1e-12)


@pytest.mark.parametrize("settings, stage, message", [
    (["train.schedule='linear'"], None, "train.schedule must be one of ('cosine', 'wsd'), got 'linear'"),
    (["train.decay_fraction=0"], None, "train.decay_fraction must be in (0, 1], got 0.0"),
    (["train.decay_shape='exp'"], None, "train.decay_shape must be one of ('linear', 'cosine', '1-sqrt'), got 'exp'"),
    ([], 'lr_at_growth = "continue"\nwarmup_steps = 3',
     "stages[1].lr_at_growth = 'continue' takes no warmup_steps (that is 'rewarm')"),
    ([], 'lr_at_growth = "rewarm"', "stages[1].lr_at_growth = 'rewarm' needs warmup_steps > 0"),
    ([], 'lr_at_growth = "rewarm"\nwarmup_steps = 2\nlr = 1e-3',
     "stages[1].lr sets the stage's own start LR: use lr_at_growth = 'peak' with it, or drop it"),
    ([], 'lr_at_growth = "back"', "stages[1].lr_at_growth must be one of ('continue', 'rewarm', 'peak'), got 'back'"),
])
def test_schedule_settings_are_checked(tmp_path, settings, stage, message):
    with pytest.raises(FlmError) as e:
        schedule(*settings, "train.max_steps=10", tmp_path=tmp_path,
                 stages=None if stage is None else STAGES.format(second=stage, third=""))
    assert str(e.value) == f"config error: {message}"


def test_first_stage_is_not_a_growth(tmp_path):
    with pytest.raises(FlmError, match=r"^config error: stages\[0\]\.lr_at_growth: the first stage is not a growth"):
        schedule(tmp_path=tmp_path, stages=STAGES.replace("tokens = 1280", 'tokens = 1280\nlr_at_growth = "peak"', 1)
                 .format(second="", third=""))
