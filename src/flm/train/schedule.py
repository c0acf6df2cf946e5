"""The run as a list of stages: steps, batch, learning rate and FLOPs of each (REFERENCE.md §2, §5).

A run without `[[stages]]` is one stage of `train.max_steps` steps. With stages, each one's steps
come from its token budget. The learning rate follows one cosine from `train.lr` to `train.min_lr`
over the whole run; a stage may set its own start LR (FLM-101B: 4e-4 → 3.4e-4 → 2e-4), from which
it decays to the run's cosine value at its end, and every stage starts with a linear (re-)warmup.
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
class Stage:
    index: int
    model: ModelConfig
    start: int  # first global optimizer step of the stage
    steps: int
    grad_accum: int  # micro-batches of train.batch_size sequences per step
    lr_start: float
    lr_end: float
    warmup: int
    ramp_steps: int  # K of the growth into this stage (0 for the first stage and for growths without masks)
    new_layers: str
    operator: str  # the growth family of the growth into this stage
    clone_noise: float

    @property
    def end(self) -> int:
        return self.start + self.steps


def plan_stages(cfg: Config, model: ModelConfig) -> list[Stage]:
    """Resolve the config into stages; `model` is cfg.model with its vocabulary filled in."""
    tc = cfg.train
    if not cfg.stages:
        return [Stage(0, model, 0, tc.max_steps, tc.grad_accum, tc.lr, tc.min_lr, tc.warmup_steps, 0, "stack", "msg",
                      0.0)]
    shapes = [dataclasses.replace(m, vocab_size=model.vocab_size) for m in cfg.stage_models()]
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

    def cosine(step: int) -> float:
        return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * step / total))

    out, start = [], 0
    for i, (stage, shape, (accum, steps)) in enumerate(zip(cfg.stages, shapes, sizes)):
        lr_start = stage.lr if stage.lr is not None else (tc.lr if i == 0 else cosine(start))
        warmup = stage.warmup_steps if i else (stage.warmup_steps or tc.warmup_steps)
        out.append(Stage(i, shape, start, steps, accum, lr_start, cosine(start + steps), warmup, ramps[i],
                         stage.new_layers, stage.operator, stage.clone_noise))
        start += steps
    return out


def stage_at(step: int, stages: list[Stage]) -> Stage:
    """The stage that trains optimizer step `step` (0-based)."""
    for stage in stages:
        if step < stage.end:
            return stage
    return stages[-1]


def lr_at(step: int, stages: list[Stage]) -> float:
    s = stage_at(step, stages)
    local = step - s.start
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
