"""The step guard on its own, step by step against counts worked out by hand (tests/test_reliability.py checks the
policies in whole runs; AdamW's cancelled step, which the guard's flag triggers: tests/test_adamw.py)."""

from __future__ import annotations

import pytest
import torch

from flm.errors import FlmError
from flm.train.guard import StepGuard

NAN, INF = float("nan"), float("inf")


def run(guard: StepGuard, losses: list[float], norms: list[float] | None = None, first_step: int = 1) -> list[bool]:
    norms = norms or [1.0] * len(losses)
    return [bool(guard.check(first_step + i, torch.tensor(loss), torch.tensor(norm)))
            for i, (loss, norm) in enumerate(zip(losses, norms))]


def test_non_finite_loss_or_norm_is_flagged_and_counted():
    guard = StepGuard(spike_factor=0.0, window=4, device=torch.device("cpu"))
    flags = run(guard, [2.0, NAN, 1.9, INF, 1.8, 1.7], [1.0, 1.0, NAN, 1.0, 1.0, -INF])
    assert flags == [False, True, True, True, False, True]
    report = guard.report()
    assert (report.bad, report.nonfinite, report.first, report.longest_run) == (4, 4, 2, 3)
    after = guard.report()  # counts restart; the run in progress (1 bad step) carries over
    assert (after.bad, after.nonfinite, after.first, after.longest_run) == (0, 0, 0, 1)
    assert run(guard, [1.6], first_step=7) == [False]
    assert guard.report().longest_run == 1 and guard.report().longest_run == 0  # the good step ended the run


def test_a_spike_is_judged_against_the_median_of_accepted_losses_once_the_window_is_full():
    guard = StepGuard(spike_factor=3.0, window=4, device=torch.device("cpu"))
    # Not armed for the first 4 steps: a steep start is never a spike.
    assert run(guard, [10.0, 9.0, 1.0, 1.0]) == [False] * 4
    # The window holds 10, 9, 1, 1: median 1 (torch.nanmedian takes the lower middle) -> threshold 3.
    assert run(guard, [2.9, 3.5], first_step=5) == [False, True]
    # The spike is not part of the window (NaN there), so the next normal loss passes and the same jump is
    # judged again against ordinary losses only.
    assert run(guard, [1.0, 3.5], first_step=7) == [False, True]
    report = guard.report()
    assert (report.bad, report.nonfinite, report.first, report.longest_run) == (2, 0, 6, 1)
    # The ring wraps: after 4 more accepted losses of 1.0 the old 10 and 9 are gone, and 3.5 is still a spike.
    assert run(guard, [1.0] * 4 + [3.5], first_step=9) == [False] * 4 + [True]
    assert torch.equal(guard.history.isnan(), torch.tensor([True, False, False, False]))
    # A spike is a loss *above* factor x median: exactly 3.0 (median 1.0) passes.
    assert run(guard, [1.0, 3.0], first_step=14) == [False, False]


def test_no_spike_test_when_it_is_off_and_reset_forgets_everything(tmp_path):
    off = StepGuard(spike_factor=0.0, window=2, device=torch.device("cpu"))
    assert run(off, [1.0, 1.0, 1000.0]) == [False, False, False]
    on = StepGuard(spike_factor=2.0, window=2, device=torch.device("cpu"))
    assert run(on, [1.0, 1.0, 1000.0]) == [False, False, True]
    on.save(tmp_path)
    copy = StepGuard(spike_factor=2.0, window=2, device=torch.device("cpu"))
    copy.load(tmp_path, on.seen)
    assert copy.seen == 3 and torch.equal(copy.history.isnan(), on.history.isnan())
    assert run(copy, [1000.0], first_step=4) == run(on, [1000.0], first_step=4) == [True]
    other = StepGuard(spike_factor=2.0, window=3, device=torch.device("cpu"))  # another window: starts empty
    other.load(tmp_path, on.seen)
    assert other.seen == 0 and other.history.isnan().all()
    for folder, seen in [(tmp_path / "none", on.seen), (tmp_path, None)]:  # no window saved, or no count in meta
        fresh = StepGuard(spike_factor=2.0, window=2, device=torch.device("cpu"))
        fresh.load(folder, seen)
        assert fresh.seen == 0 and fresh.history.isnan().all()
    (tmp_path / "guard.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(FlmError, match=r"^cannot read .*guard\.safetensors: ") as e:
        copy.load(tmp_path, on.seen)
    assert "\n" not in str(e.value)
    on.reset()
    assert on.seen == 0 and on.history.isnan().all() and on.report().bad == 0
    assert run(on, [1.0, 1.0, 1000.0]) == [False, False, True]  # re-armed only after the window fills again
