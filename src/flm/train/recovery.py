"""What a run does about bad steps and bad weights: `train.on_bad_step` (docs/reliability.md).

The step guard (flm.train.guard) cancels a bad step on the device; the loop reads what it saw only where the host
reads the device anyway (a log, an evaluation, a checkpoint) and asks this policy what follows: go on and count
(`skip`), stop with a distinct exit status (`stop`), or return to the newest checkpoint before the first bad step
and continue with the data after the batches already read (`rollback`, as PaLM did after its loss spikes). Weights
that are not finite at a checkpoint are never written: they roll back under `rollback` and stop otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flm.checkpoint import list_checkpoints, step_of
from flm.config import TrainConfig
from flm.errors import TrainingHalted
from flm.train.guard import GuardReport
from flm.train.progress import Progress


@dataclass(frozen=True)
class Rollback:
    to: Path  # the newest checkpoint before the first bad step
    first_bad: int
    what: str  # what went wrong, for the record and the line


class Recovery:
    """The policy of one trainer; it counts the rollbacks of the trainer's whole life (train.max_rollbacks)."""

    def __init__(self, tc: TrainConfig, ckpt_root: Path):
        self.tc, self.ckpt_root = tc, ckpt_root
        self.rollbacks = 0

    def last_good(self) -> str:
        found = list_checkpoints(self.ckpt_root)
        return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"

    def bad_steps(self, report: GuardReport, step: int, progress: Progress) -> Rollback | None:
        """The policy for the steps the guard cancelled since its last report, seen at `step`: a rollback to make,
        or None to go on; raises TrainingHalted to stop."""
        if not report.bad:
            return None
        tc = self.tc
        what = ("non-finite loss or gradient norm" if report.nonfinite
                else f"loss spike (above {tc.spike_factor:g} x the median of the last {tc.spike_window} steps)")
        progress.log({"kind": "guard", "step": step, "bad_steps": report.bad, "nonfinite": report.nonfinite,
                      "first_bad_step": report.first, "policy": tc.on_bad_step})
        if tc.on_bad_step == "stop":
            raise TrainingHalted(f"step {report.first}: {what}; the update was cancelled and the run stopped "
                                 f"(train.on_bad_step = 'stop'); {self.last_good()}")
        if tc.on_bad_step == "skip":
            if report.longest_run >= tc.max_bad_steps:
                raise TrainingHalted(f"{report.longest_run} bad steps in a row up to step {step} ({what}): the "
                                     f"weights or the data are broken; {self.last_good()}; "
                                     "train.on_bad_step = 'rollback' returns to it by itself")
            progress.say(f"step {step}: cancelled {report.bad} update(s) since the last report ({what}), the first "
                         f"at step {report.first}; training goes on (train.on_bad_step = 'skip')")
            return None
        return self._rollback(report.first, what)

    def bad_weights(self, step: int) -> Rollback:
        """Non-finite weights at `step`'s checkpoint: the rollback to make, or TrainingHalted."""
        what = "non-finite weights"
        if self.tc.on_bad_step != "rollback":
            raise TrainingHalted(f"step {step}: {what}; no checkpoint written; {self.last_good()}")
        return self._rollback(step, what)

    def _rollback(self, first_bad: int, what: str) -> Rollback:
        earlier = [p for p in list_checkpoints(self.ckpt_root) if step_of(p) < first_bad]
        if not earlier:
            raise TrainingHalted(f"step {first_bad}: {what}, and no checkpoint before it to roll back to; stopped")
        if self.rollbacks >= self.tc.max_rollbacks:
            raise TrainingHalted(f"step {first_bad}: {what} again after {self.rollbacks} rollbacks "
                                 f"(train.max_rollbacks); stopped; {self.last_good()}")
        return Rollback(earlier[-1], first_bad, what)

    def data_position(self, samples_seen: int, grad_accum: int) -> int:
        """Where the data continues after a rollback: after the batches read so far, plus train.rollback_skip
        steps' worth."""
        return samples_seen + self.tc.rollback_skip * grad_accum * self.tc.batch_size

    def rolled_back(self, rollback: Rollback, detected: int, step: int, position: int, progress: Progress) -> None:
        """Count and report a rollback made at step `detected`, back to `step`, the data at `position`."""
        self.rollbacks += 1
        progress.rewind(step)
        progress.log({"kind": "rollback", "step": step, "detected_at": detected, "first_bad_step": rollback.first_bad,
                      "samples_seen": position, "reason": rollback.what, "rollbacks": self.rollbacks})
        progress.say(f"step {detected}: {rollback.what} at step {rollback.first_bad}; rolled back to {rollback.to} "
                     f"(step {step}) and continuing with the data after the bad batches (rollback {self.rollbacks} "
                     f"of {self.tc.max_rollbacks})")
