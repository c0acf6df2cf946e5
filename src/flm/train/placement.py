"""Where the model lives: what the training loop asks of one process, and what flm.parallel answers under torchrun.

The loop (flm.train.trainer) is written once. Everything that depends on how many processes share the model is a
call on its placement: building and sharding a model, growing it, saving and loading its state, slicing the
data, summing counts and losses over ranks, clipping, masks. `OneProcess` is the placement of a single
process; `flm.parallel.trainer.Torchrun` spreads the model over a torchrun job. A placement exists before the
trainer (it joins the process group and chooses the device) and the trainer owns it from then on: the trainer's
`close` closes it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol, TypeVar

import torch

from flm.checkpoint import load_model, load_train_state, persistent_tensors
from flm.config import Config, TrainConfig
from flm.device import resolve_device
from flm.growth import Ramp, apply_masks, grow_training
from flm.model import FLM, build_model
from flm.train.optim import adam_state_by_name, build_optimizer
from flm.train.schedule import Stage
from flm.train.transforms import apply_activation_checkpointing, compile_blocks

T = TypeVar("T")


class Placement(Protocol):
    """The contract between the loop and a placement. `model` and `optimizer` arguments are always the ones the
    placement returned last (a placement may keep what goes with them, e.g. a pipeline schedule)."""

    device: torch.device  # this process's device
    bf16: bool  # the forward runs under bf16 autocast
    autocast: ContextManager  # that autocast, or nothing
    is_main: bool  # the process that prints, writes metrics and holds the run lock
    distributed: bool  # checkpoints are written by every process together (the sharded format)
    world: int  # processes in the job (MFU counts the peak of all their devices)

    def run_once(self, fn: Callable[[], Any]) -> None:
        """fn() on one process while the others wait (preparing the data writes files they all read)."""

    def check(self, stages: list[Stage]) -> None:
        """Refuse, before anything is built, a stage whose model does not fit its layout."""

    def data_slice(self) -> tuple[int, int]:
        """(this process's index, number of slices): which slice of every global batch this process reads."""

    def build(self, stage: Stage, init: bool = True) -> tuple[FLM, torch.optim.Optimizer]:
        """A model of `stage`'s shape ready to train and a fresh optimizer over it; `init=False`: its values will
        come from a checkpoint."""

    def count(self, n: int) -> int:
        """The step's loss tokens, from this process's `n`."""

    def forward_backward(self, model: FLM, x: torch.Tensor, y: torch.Tensor, n: int, n_step: int) -> torch.Tensor:
        """Forward and backward of one micro-batch holding `n` of the step's `n_step` loss tokens, its gradient
        weighted by n / n_step; returns its (detached) mean loss."""

    def step_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's mean loss over all its tokens, from this process's share (the same value on every rank)."""

    def clip(self, model: FLM, max_norm: float) -> torch.Tensor:
        """Clip the gradients to `max_norm` in total; returns their norm before clipping."""

    def batch_loss(self, model: FLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss over one validation batch's loss tokens."""

    def apply_masks(self, model: FLM, ramp: Ramp) -> None:
        """Set the growth masks for the ramp's current c."""

    def weights_finite(self, model: FLM) -> bool:
        """Whether every weight is finite, on every process (one read from the device)."""

    def grow(self, model: FLM, optimizer: torch.optim.Optimizer, nxt: Stage
             ) -> tuple[FLM, torch.optim.Optimizer, Ramp]:
        """Model and Adam state grown into stage `nxt` (flm.growth's one routine), masks at c = 0, and the ramp."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """What meta.json holds about the placement besides the run's state."""

    def load(self, path: Path, meta: dict[str, Any], model: FLM, optimizer: torch.optim.Optimizer,
             log: Callable[[str], None]) -> None:
        """Weights and Adam state of checkpoint `path` (either format) into `model` and `optimizer`."""

    @property
    def whole_logits(self) -> bool:
        """Whether a forward gives this process whole logits (what teacher-signal accuracy reads)."""

    def whole_model(self, model: FLM, optimizer: torch.optim.Optimizer, ramp: Ramp | None) -> FLM | None:
        """The model, whole, on the main process (None on the others), for sampling."""

    def share(self, value: T) -> T:
        """The main process's `value`, on every process."""

    def describe(self) -> str | None:
        """A line about the placement for the run's description (None: nothing to add)."""

    def peer_failure(self, error: RuntimeError) -> str | None:
        """What `error` says about the other processes (a collective timed out, a rank was lost), or None."""

    def close(self) -> None:
        """Release what the placement holds beyond its objects."""


def uses_bf16(tc: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast when asked, or by default on a GPU."""
    return tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")


def autocast_for(bf16: bool, device: torch.device) -> ContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class OneProcess:
    """The whole model in this process, on train.device."""

    is_main = True
    distributed = False
    world = 1
    whole_logits = True

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.bf16 = uses_bf16(cfg.train, self.device)
        self.autocast = autocast_for(self.bf16, self.device)

    def run_once(self, fn: Callable[[], Any]) -> None:
        fn()

    def check(self, stages: list[Stage]) -> None:
        pass  # one process takes any shape; launching checks that the layout asks for one process

    def data_slice(self) -> tuple[int, int]:
        return 0, 1

    def build(self, stage: Stage, init: bool = True) -> tuple[FLM, torch.optim.Optimizer]:
        """Drawn on the host and moved, so the values do not depend on the device (drawn also when a checkpoint
        will replace them, which keeps the generator where a resume expects it); then activation checkpointing and
        torch.compile per block where configured (as flm.parallel.parallelize does)."""
        model = self._transformed(build_model(stage.model).to(self.device))
        return model, build_optimizer(model, self.cfg.train)

    def _transformed(self, model: FLM) -> FLM:
        if self.cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.cfg.train.compile:
            compile_blocks(model)
        return model

    def count(self, n: int) -> int:
        return n

    def forward_backward(self, model: FLM, x: torch.Tensor, y: torch.Tensor, n: int, n_step: int) -> torch.Tensor:
        if n == 0:
            return torch.zeros((), device=self.device)  # its mean would be 0/0; it contributes nothing
        with self.autocast:
            _, loss = model(x, y)
        (loss * (n / n_step)).backward()
        return loss.detach()

    def step_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def clip(self, model: FLM, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def batch_loss(self, model: FLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            _, loss = model(x.to(self.device), y.to(self.device))
        return loss.float()

    def apply_masks(self, model: FLM, ramp: Ramp) -> None:
        apply_masks(model, ramp)

    def weights_finite(self, model: FLM) -> bool:
        return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())

    def grow(self, model: FLM, optimizer: torch.optim.Optimizer, nxt: Stage
             ) -> tuple[FLM, torch.optim.Optimizer, Ramp]:
        tc = self.cfg.train
        grown, ramp, state = grow_training(model, adam_state_by_name(optimizer), nxt.model, nxt.new_layers,
                                           nxt.ramp_steps, seed=tc.seed, index=nxt.index, operator=nxt.operator,
                                           noise=nxt.clone_noise, copy_noise=nxt.copy_noise)
        grown = self._transformed(grown)
        return grown, build_optimizer(grown, tc, state), ramp

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    def load(self, path: Path, meta: dict[str, Any], model: FLM, optimizer: torch.optim.Optimizer,
             log: Callable[[str], None]) -> None:
        load_model(path, persistent_tensors(model))
        load_train_state(path, optimizer)

    def whole_model(self, model: FLM, optimizer: torch.optim.Optimizer, ramp: Ramp | None) -> FLM | None:
        return model

    def share(self, value: T) -> T:
        return value

    def describe(self) -> str | None:
        return None

    def peer_failure(self, error: RuntimeError) -> str | None:
        return None

    def close(self) -> None:
        pass
