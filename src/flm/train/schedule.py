"""The run as a list of stages: steps, batch, learning rate and FLOPs of each (REFERENCE.md §2, §5, §9).

A run without `[[stages]]` is one stage of `train.max_steps` steps. With stages, each one's steps
come from its token budget. The learning rate is a pure function of the step (so resuming is exact):

- `train.schedule = "cosine"`: one cosine from `train.lr` to `train.min_lr` over the whole run; each stage
  decays along a cosine of its own from its start LR to the run's cosine value at its end.
- `train.schedule = "wsd"` (warmup-stable-decay): the LR holds its peak until the last `train.decay_fraction`
  of the run's steps, then falls to `train.min_lr` (shape `train.decay_shape`). A grown model keeps a high LR
  through its growth to catch up; every point of the stable phase can be decayed into a finished model.

A grown stage starts its LR as its `lr_at_growth` says: on the run's schedule ("continue"), re-warmed linearly
to it over the stage's `warmup_steps` ("rewarm"; FLM-101B's choice), or back at the peak ("peak": train.lr or
the stage's own lr; MSG's choice). Every stage multiplies by its linear warmup, the first by train.warmup_steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from flm.config import Config, ModelConfig
from flm.errors import FlmError
from flm.growth import check_growable, ramp_length
from flm.model import flops_per_token


@dataclass(frozen=True)
class Decay:
    """The run's shape after warmup: for "wsd", where its decay starts and how it falls (the same for all stages)."""

    schedule: str  # "cosine" or "wsd"
    start: int  # first step of the WSD decay (the run's length for "cosine")
    steps: int  # length of the WSD decay
    shape: str  # "linear", "cosine" or "1-sqrt"
    min_lr: float

    def factor(self, step: int) -> float:
        """WSD's multiplier of (peak - min_lr) at `step`: 1 through the stable phase, falling to 0 at the end."""
        p = min(1.0, max(0.0, (step - self.start) / self.steps))
        if self.shape == "linear":
            return 1.0 - p
        if self.shape == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0 - math.sqrt(p)

    def lr(self, peak: float, step: int) -> float:
        return self.min_lr + (peak - self.min_lr) * self.factor(step)


def run_decay(cfg: Config, total: int) -> Decay:
    """The run's Decay over `total` steps: WSD decays over its last round(decay_fraction x total) steps (>= 1)."""
    tc = cfg.train
    steps = max(1, round(tc.decay_fraction * total)) if tc.schedule == "wsd" else 0
    return Decay(tc.schedule, total - steps, steps, tc.decay_shape, tc.min_lr)


@dataclass(frozen=True)
class Stage:
    index: int
    model: ModelConfig
    start: int  # first global optimizer step of the stage
    steps: int
    grad_accum: int  # micro-batches of train.batch_size sequences per step
    lr_start: float
    lr_end: float
    warmup: int
    peak: float  # "wsd": the LR of the stable phase while this stage trains
    decay: Decay
    ramp_steps: int  # K of the growth into this stage (0 for the first stage and for growths without masks)
    new_layers: str
    operator: str  # the growth family of the growth into this stage
    clone_noise: float
    copy_noise: float  # noise on copied layers' weight matrices, relative to their RMS

    @property
    def end(self) -> int:
        return self.start + self.steps


def plan_stages(cfg: Config, model: ModelConfig) -> list[Stage]:
    """Resolve the config into stages; `model` is cfg.model with its vocabulary filled in."""
    tc = cfg.train
    if not cfg.stages:
        decay = run_decay(cfg, tc.max_steps)
        return [Stage(0, model, 0, tc.max_steps, tc.grad_accum, tc.lr, tc.min_lr, tc.warmup_steps, tc.lr, decay, 0,
                      "stack", "msg", 0.0, 0.0)]
    shapes = [dataclasses.replace(m, vocab_size=model.vocab_size, teacher_head=model.teacher_head)
              for m in cfg.stage_models()]
    for i in range(1, len(shapes)):  # refuse an impossible growth now, not hours into the run
        try:
            check_growable(shapes[i - 1], shapes[i], cfg.stages[i].operator, cfg.stages[i].new_layers)
        except FlmError as e:
            raise FlmError(f"stages[{i}]: {e}") from None
    ramps = [0] + [ramp_length(stage.operator, shapes[i - 1], shapes[i], stage.ramp_steps)
                   for i, stage in enumerate(cfg.stages) if i]
    sizes = []
    for i, stage in enumerate(cfg.stages):
        sequences = stage.batch_size or tc.batch_size * tc.grad_accum
        if sequences % tc.batch_size:
            raise FlmError(f"stages[{i}].batch_size ({sequences}) must be a multiple of train.batch_size ({tc.batch_size})")
        steps = math.ceil(stage.tokens / (sequences * tc.seq_len))
        if ramps[i] > steps:
            raise FlmError(f"stages[{i}].ramp_steps ({stage.ramp_steps}) is longer than the stage ({steps} steps): "
                           "the masks must reach 1 before the next growth or the end")
        sizes.append((sequences // tc.batch_size, steps))
    total = sum(steps for _, steps in sizes)
    decay = run_decay(cfg, total)

    def cosine(step: int) -> float:
        return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * step / total))

    out, start = [], 0
    for i, (stage, shape, (accum, steps)) in enumerate(zip(cfg.stages, shapes, sizes)):
        peak = tc.lr if stage.lr is None else stage.lr  # the stage's own lr is its peak ("peak", or a first stage)
        at_peak = i == 0 or stage.lr is not None or stage.lr_at_growth == "peak"
        if decay.schedule == "wsd":
            peak = peak if at_peak else tc.lr
            lr_start, lr_end = decay.lr(peak, start), decay.lr(peak, start + steps)
        else:
            lr_start, lr_end = (peak if at_peak else cosine(start)), cosine(start + steps)
        warmup = stage.warmup_steps if i else (stage.warmup_steps or tc.warmup_steps)
        out.append(Stage(i, shape, start, steps, accum, lr_start, lr_end, warmup, peak, decay, ramps[i],
                         stage.new_layers, stage.operator, stage.clone_noise, stage.copy_noise))
        start += steps
    return out


def stage_at(step: int, stages: list[Stage]) -> Stage:
    """The stage that trains optimizer step `step` (0-based)."""
    for stage in stages:
        if step < stage.end:
            return stage
    return stages[-1]


def lr_at(step: int, stages: list[Stage]) -> float:
    """The learning rate of optimizer step `step` (0-based): the stage's curve times its linear warmup."""
    s = stage_at(step, stages)
    local = step - s.start
    if s.decay.schedule == "wsd":
        lr = s.decay.lr(s.peak, step)
    else:
        lr = s.lr_end + 0.5 * (s.lr_start - s.lr_end) * (1 + math.cos(math.pi * min(1.0, local / max(1, s.steps))))
    return lr * min(1.0, (local + 1) / s.warmup) if s.warmup else lr


def tokens_and_flops_at(step: int, stages: list[Stage], batch_size: int, seq_len: int) -> tuple[int, float]:
    """Training tokens and FLOPs spent before optimizer step `step`, counting every stage's own shape."""
    tokens, flops = 0, 0.0
    for s in stages:
        n = max(0, min(step, s.end) - s.start) * s.grad_accum * batch_size * seq_len
        tokens += n
        flops += n * flops_per_token(s.model, seq_len)
    return tokens, flops
