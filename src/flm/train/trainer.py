"""The training loop: one place that owns model, optimizer, data position, growth, checkpoints and metrics.

A run is a list of stages (flm.train.schedule). At each stage boundary the model and its Adam state
are grown into the next stage's shape with MSG (flm.growth), the new structure held at zero by masks
that ramp in over K steps and are then folded away.

Resuming is bit-exact on CPU: the checkpoint holds the weights, Adam moments and step counts, the
RNG state, the loader's global sample counter, the stage and the ramp position, the step guard's
window, and the learning rate is a pure function of the step. So N steps + resume + N steps computes
exactly what 2N uninterrupted steps compute, also in the middle of a mask ramp.

Faults (docs/reliability.md): the run folder is locked to one writer (flm.checkpoint.lock); every step
passes the step guard (flm.train.guard), which cancels a non-finite or spiking step on the device and
lets `train.on_bad_step` decide at the next point where the host reads the device anyway; a checkpoint
is only written from finite weights, and a write error is one line naming the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from flm.config import Config, ModelConfig, config_to_dict
from flm.data import PreparedData, iter_eval_batches, load_prepared
from flm.data.loader import IGNORE
from flm.device import resolve_device
from flm.errors import FlmError, TrainingHalted
from flm.growth import Ramp, apply_masks, grow_training
from flm.model import FLM, flops_per_token, generate, param_count
from flm.checkpoint import (RunLock, list_checkpoints, load_model, load_train_state, persistent_tensors, read_meta,
                            resolve_checkpoint, save_checkpoint, step_of)
from flm.train.guard import StepGuard
from flm.train.metrics import MetricsLogger, peak_bf16_flops, plot_losses
from flm.train.optim import adam_state_by_name, build_optimizer
from flm.train.schedule import Stage, lr_at, plan_stages, tokens_and_flops_at
from flm.train.transforms import apply_activation_checkpointing, compile_blocks


def resolve_model_config(model: ModelConfig, data: PreparedData) -> ModelConfig:
    """Fill the vocabulary size from the tokenizer (padded to a multiple of 128 for fast matmuls)."""
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=128 * math.ceil(data.vocab_size / 128))
    if model.vocab_size < data.vocab_size:
        raise FlmError(f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's ({data.vocab_size})")
    return model


class Trainer:
    """One process. flm.parallel.ParallelTrainer runs the same loop under torchrun, overriding the hooks
    marked below (how a micro-batch runs, gradient clipping, masks, checkpoints, growth)."""

    is_main = True  # the process that writes metrics and prints
    distributed = False  # several processes share the model (and write sharded checkpoints together)

    def __init__(self, cfg: Config, log: Callable[[str], None] = print, guard: bool = True,
                 device: torch.device | None = None):
        """`device`: where this process trains (default: train.device); `guard=False` (the μP tools) lets a
        diverging run diverge, which is what a sweep measures."""
        self.cfg, self.log = cfg, log
        tc = cfg.train
        self.run_dir = Path(tc.run_dir)
        self._lock = RunLock(self.run_dir).acquire() if self.is_main else None
        self.device = device if device is not None else resolve_device(tc.device)
        use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        self.data = load_prepared(Path(cfg.data.dir))
        self.tokenizer = self.data.tokenizer()
        self.stages = plan_stages(cfg, resolve_model_config(cfg.model, self.data))
        self.peak_flops = peak_bf16_flops(self.device) if use_bf16 else None
        torch.manual_seed(tc.seed)
        self.stage = 0
        self.ramp: Ramp | None = None
        self._use(self._new_model(self.stages[0].model))
        self.loader = self.data.train_loader(tc.batch_size, tc.seq_len, seed=tc.seed)
        self._heldout = None  # teacher-signal held-out records, read at the first evaluation
        self.step = 0
        self.guard = StepGuard(tc.spike_factor, tc.spike_window, self.device) if guard else None
        self.last_step_bad: torch.Tensor | None = None  # the guard's flag for the last step (device)
        self.rollbacks = 0

    def _new_model(self, cfg: ModelConfig) -> FLM:
        """A freshly initialised model of shape `cfg`, ready to train (hook: sharded under torchrun).

        Drawn on the host and moved, so the values do not depend on the device; then activation checkpointing
        and torch.compile per block where configured (flm.train.transforms, as flm.parallel.parallelize does)."""
        return self._transformed(FLM(cfg).to(self.device))

    def _transformed(self, model: FLM) -> FLM:
        if self.cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.cfg.train.compile:
            compile_blocks(model)
        return model

    def _use(self, model: FLM, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make `model` the one being trained, with `optimizer` (default: a fresh one over its parameters)."""
        self.model = model
        self.optimizer = optimizer if optimizer is not None else build_optimizer(model, self.cfg.train)

    @property
    def max_steps(self) -> int:
        return self.stages[-1].end

    # ---- checkpoints -------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoint_meta(self) -> dict[str, Any]:
        """Everything of the run's state that is not a tensor (flm.checkpoint.meta lists what is read)."""
        meta = {"config": config_to_dict(self.cfg), "model": config_to_dict(self.model.cfg), "stage": self.stage,
                "ramp": self.ramp.to_dict() if self.ramp else None, "data": self.loader.state_dict()}
        if self.guard is not None:
            meta["guard_seen"] = self.guard.seen
        return meta

    def write_extra(self, folder: Path) -> None:
        """The files a checkpoint holds besides tensors and meta.json: the tokenizer and the guard's window."""
        self.tokenizer.save(folder)
        if self.guard is not None:
            self.guard.save(folder)

    def save(self) -> Path:
        return save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, self.checkpoint_meta(),
                               self.cfg.train.keep_last, write_extra=self.write_extra, distributed=self.distributed)

    def weights_finite(self) -> bool:
        """Whether every weight is finite (hook: all ranks agree under torchrun); one read from the device."""
        return bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())

    def resume(self, spec: str) -> bool:
        """Load the checkpoint named by `spec` ('auto' = newest in this run); False if there is none."""
        path = resolve_checkpoint(spec, self.ckpt_root)
        if path is None:
            return False
        self._restore(path)
        self.log(f"resumed from {path} at step {self.step} (stage {self.stage + 1}/{len(self.stages)})")
        return True

    def _restore(self, path: Path) -> None:
        """Model, optimizer, RNG, data position, ramp, guard window and step from checkpoint `path`."""
        meta = read_meta(path, resume=True)
        stage = meta["stage"]
        if stage >= len(self.stages) or meta["model"] != config_to_dict(self.stages[stage].model):
            raise FlmError(f"checkpoint {path} was trained with a different model config; "
                           "use the same config (growth between shapes is `flm grow`)")
        self._load_checkpoint(path, meta, stage)
        self.ramp = Ramp.from_dict(meta["ramp"]) if meta["ramp"] else None
        if self.ramp:
            self._apply_masks()
        if meta["data"] is not None:
            try:
                self.loader.load_state_dict(meta["data"])
            except FlmError as e:
                raise FlmError(f"{path}: {e}") from None
        else:  # step 0 (imported from a Hugging Face folder): a fresh run reads the data from the start too
            self.loader.samples_seen = 0
        if self.guard is not None:
            seen = meta.get("guard_seen")
            self.guard.load(path, seen if isinstance(seen, int) else None)
        self.step = meta["step"]

    def _load_checkpoint(self, path: Path, meta: dict[str, Any], stage: int) -> None:
        """Weights and optimizer state of checkpoint `path` into this trainer, at `stage`'s shape."""
        if stage != self.stage:
            self._use(self._new_model(self.stages[stage].model))
        self.stage = stage
        load_model(path, persistent_tensors(self.model))
        load_train_state(path, self.optimizer)

    # ---- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over the stage's micro-batches, clip, AdamW. Returns (loss, grad norm) tensors."""
        tc = self.cfg.train
        accum = self.stages[self.stage].grad_accum
        lr = lr_at(self.step, self.stages)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]  # μP: hidden matrices at lr / width_mult (flm.model.mup_rules)
        batches = [self.loader.next_batch() for _ in range(accum)]
        # The step's gradient is that of the mean over ALL its loss tokens (targets != -100), wherever they fall:
        # masked sources leave micro-batches with different counts, and weighting each micro-batch's mean by its
        # share of the tokens makes accumulation equal one big batch.
        counts = [int((y != IGNORE).sum()) for _, y in batches]
        n_loss_tokens = self._global_count(sum(counts))
        if n_loss_tokens == 0:
            raise FlmError(f"step {self.step} drew no loss targets (every target masked): check the data sources")
        total = torch.zeros((), device=self.device)
        for (x, y), n in zip(batches, counts):
            loss = self._forward_backward(self._to_device(x), self._to_device(y), n, n_loss_tokens)
            total += loss * n
        grad_norm = self._clip_grad_norm(tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        loss = self._step_loss(total / n_loss_tokens)
        self.last_step_bad = self.guard.check(self.step + 1, loss, grad_norm) if self.guard is not None else None
        self.optimizer.step(skip=self.last_step_bad)  # a bad step changes nothing (decided on the device)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ramp is not None:
            self.ramp.steps_done += 1
            self._apply_masks()
            if self.ramp.c >= 1.0:
                self.ramp = None  # folded: an ordinary model of the new shape
        return loss, grad_norm

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A batch tensor on the training device. To a GPU through pinned memory: a copy from ordinary (pageable)
        host memory may wait for the device to finish its queue, which would stall the step's launches."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    # Hooks (overridden by flm.parallel.ParallelTrainer).
    def _step_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's mean loss over all its tokens, from this process's share (more processes share a step)."""
        return loss

    def _global_count(self, n: int) -> int:
        """Loss tokens of the whole step, from this process's count (more processes read the same step)."""
        return n

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, n: int, n_step: int) -> torch.Tensor:
        """Forward and backward of one micro-batch holding `n` of the step's `n_step` loss tokens, its mean
        loss weighted by n / n_step; returns that (detached) mean."""
        if n == 0:
            return torch.zeros((), device=self.device)  # its mean would be 0/0; it contributes nothing
        with self.autocast:
            _, loss = self.model(x, y)
        (loss * (n / n_step)).backward()
        return loss.detach()

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def _apply_masks(self) -> None:
        apply_masks(self.model, self.ramp)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `eval_batches` validation batches (fixed order, so comparable)."""
        tc = self.cfg.train
        self.model.eval()
        losses = [self._batch_loss(x, y) for x, y in iter_eval_batches(
            self.data.val_shards, tc.batch_size, tc.seq_len, tc.eval_batches, self.data.val_masks)]
        self.model.train()
        return torch.stack(losses).mean().item()

    def _batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss over one validation batch's loss tokens (hook: sliced over the ranks under torchrun)."""
        with self.autocast:
            _, loss = self.model(x.to(self.device), y.to(self.device))
        return loss.float()

    def evaluate_teacher(self) -> dict[str, float]:
        """Accuracy on the held-out records of the teacher sources ({} without any), for the `eval` record."""
        if not self.data.teacher_heldout:
            return {}
        from flm.eval.teacher import read_heldout, teacher_accuracy

        if self._heldout is None:
            self._heldout = read_heldout(self.data.teacher_heldout)
        result = teacher_accuracy(self.model, self.tokenizer, self._heldout)
        record = {"teacher_acc": result.accuracy}
        if result.mc_accuracy is not None:
            record["teacher_mc_acc"] = result.mc_accuracy
        return record

    def probe(self) -> tuple[float, float]:
        """(loss, gradient norm) on the first validation batch, dropout off; changes nothing."""
        tc = self.cfg.train
        x, y = next(iter_eval_batches(self.data.val_shards, tc.batch_size, tc.seq_len, 1, self.data.val_masks))
        self.model.eval()
        n = int((y != IGNORE).sum())
        loss = self._forward_backward(x.to(self.device), y.to(self.device), n, self._global_count(n))
        norm = self._clip_grad_norm(float("inf"))
        self.model.zero_grad(set_to_none=True)
        self.model.train()
        return loss.item(), norm.item()

    def grow(self) -> dict[str, Any]:
        """Grow model and Adam state into the next stage's shape; returns the growth record."""
        nxt = self.stages[self.stage + 1]
        loss_before, grad_before = self.probe()
        ramp = self._grow_into(nxt)
        self.stage += 1
        self.ramp = ramp if ramp.c < 1.0 else None
        loss_after, grad_after = self.probe()
        return {"kind": "growth", "step": self.step, "stage": self.stage + 1, "operator": nxt.operator,
                "loss_before": loss_before,
                "loss_after": loss_after, "grad_norm_before": grad_before, "grad_norm_after": grad_after,
                "params_before": param_count(self.stages[self.stage - 1].model), "params_after": param_count(nxt.model)}

    def _grow_into(self, nxt: Stage) -> Ramp:
        """Replace model and optimizer by their growth into stage `nxt`, masks set at c = 0 (hook)."""
        model, ramp, state = grow_training(self.model, adam_state_by_name(self.optimizer), nxt.model, nxt.new_layers,
                                           nxt.ramp_steps, seed=self.cfg.train.seed, index=nxt.index,
                                           operator=nxt.operator, noise=nxt.clone_noise)
        self._use(self._transformed(model), build_optimizer(model, self.cfg.train, state))
        return ramp

    def sample(self, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
        tok = self.tokenizer
        ids = tok.encode(prompt)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = generate(self.model, ids, max_new_tokens, temperature=0.8, top_k=50, eot_id=tok.eot_id,
                       generator=gen, vocab_limit=tok.vocab_size)
        return prompt + tok.decode([t for t in out if t != tok.eot_id])

    # ---- the loop ----------------------------------------------------------------------------------
    def describe(self) -> str:
        tc = self.cfg.train
        lines = []
        for s in self.stages:
            c = s.model
            lines.append(f"stage {s.index + 1}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads x "
                         f"{c.head_dim}, ffn {c.ffn_dim}, vocab {c.vocab_size}: {param_count(c) / 1e6:.2f}M parameters; "
                         f"steps {s.start}-{s.end} x {s.grad_accum * tc.batch_size * tc.seq_len:,} tokens, "
                         f"lr {s.lr_start:.2e} -> {s.lr_end:.2e}"
                         + (f", grown by {s.operator}, ramp {s.ramp_steps}" if s.index else ""))
        precision = "bf16 autocast" if not isinstance(self.autocast, contextlib.nullcontext) else "fp32"
        lines.append(f"data: {self.data.train_tokens:,} train / {self.data.val_tokens:,} validation tokens from "
                     f"{self.data.dir}; {self.max_steps} steps on {self.device.type} ({precision})")
        return "\n".join(lines)

    def _train_record(self, loss: float | None, grad_norm: float | None, tok_s: float) -> dict[str, Any]:
        """A `train` metrics record; loss and grad norm are None when the interval had no finite value."""
        tc = self.cfg.train
        tokens, flops = tokens_and_flops_at(self.step, self.stages, tc.batch_size, tc.seq_len)
        record = {"kind": "train", "step": self.step, "stage": self.stage + 1, "loss": loss, "grad_norm": grad_norm,
                  "lr": lr_at(self.step - 1, self.stages), "tokens": tokens, "flops": flops, "tokens_per_s": tok_s}
        if self.ramp is not None:
            record["growth_c"] = self.ramp.c
        if self.peak_flops:
            record["mfu"] = tok_s * flops_per_token(self.model.cfg, tc.seq_len) / self.peak_flops
        return record

    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """Run all stages to the end (or stop after `until_step`, keeping the schedule of the full run)."""
        tc = self.cfg.train
        end = min(self.max_steps, until_step) if until_step is not None else self.max_steps
        metrics = MetricsLogger(self.run_dir, tc.tensorboard and self.is_main,
                                resume_step=self.step if self.step else None, enabled=self.is_main, note=self.log)
        progress = None
        if tc.progress and self.is_main and sys.stderr.isatty():  # a log file gets lines, not a redrawn bar
            from tqdm import tqdm

            progress = tqdm(total=end, initial=self.step, unit="step", dynamic_ncols=True)
        emit = progress.write if progress is not None else self.log
        val_loss = None
        t_last, step_last = time.perf_counter(), self.step
        loss_sum, loss_n = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        try:
            while self.step < end:
                if self.step == self.stages[self.stage].end:
                    record = self.grow()
                    metrics.log(record)
                    emit(f"step {self.step}: grew to stage {record['stage']} ({record['params_before'] / 1e6:.2f}M -> "
                         f"{record['params_after'] / 1e6:.2f}M parameters): loss {record['loss_before']:.4f} -> "
                         f"{record['loss_after']:.4f}, grad norm {record['grad_norm_before']:.3f} -> "
                         f"{record['grad_norm_after']:.3f}")
                    t_last = time.perf_counter()
                loss, grad_norm = self.train_step()
                kept = (~self.last_step_bad if self.last_step_bad is not None
                        else torch.ones((), dtype=torch.bool, device=self.device))
                loss_sum += torch.where(kept, loss, 0.0)  # a cancelled step's loss is not averaged
                loss_n += kept
                if progress is not None:
                    progress.update(1)
                log_now = self.step % tc.log_every == 0 or self.step == end
                eval_now = self.step % tc.eval_every == 0 or self.step == end
                save_now = self.step % tc.ckpt_every == 0 or self.step == end
                rolled_back = (log_now or eval_now or save_now) and self._handle_bad_steps(metrics, emit)
                if not rolled_back and save_now and not self.weights_finite():
                    self._on_bad_weights(metrics, emit)  # never write a checkpoint nothing can resume from
                    rolled_back = True
                if rolled_back:  # continue from the restored step
                    if progress is not None:
                        progress.n = self.step
                        progress.refresh()
                    t_last, step_last = time.perf_counter(), self.step
                    loss_sum.zero_(), loss_n.zero_()
                    continue
                if log_now:
                    tok_s = ((self.step - step_last) * self.stages[self.stage].grad_accum * tc.batch_size * tc.seq_len
                             / (time.perf_counter() - t_last))
                    n = loss_n.item()
                    record = self._train_record((loss_sum / n).item() if n else None, finite(grad_norm.item()), tok_s)
                    metrics.log(record)
                    shown = f"{record['loss']:.4f}" if n else "n/a (every step cancelled)"
                    if progress is not None:
                        progress.set_postfix(loss=shown, lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
                    else:
                        norm = record["grad_norm"]
                        emit(f"step {self.step}/{end} loss {shown} lr {record['lr']:.2e} "
                             f"grad_norm {'n/a' if norm is None else f'{norm:.3f}'} tok/s {tok_s:,.0f}")
                    t_last, step_last = time.perf_counter(), self.step
                    loss_sum.zero_(), loss_n.zero_()
                if eval_now:
                    val_loss = self.evaluate()
                    teacher = self.evaluate_teacher()
                    _, flops = tokens_and_flops_at(self.step, self.stages, tc.batch_size, tc.seq_len)
                    metrics.log({"kind": "eval", "step": self.step, "stage": self.stage + 1, "val_loss": finite(val_loss),
                                 "flops": flops, **teacher})
                    emit(f"step {self.step}: validation loss {val_loss:.4f} (perplexity {perplexity(val_loss)})"
                         + "".join(f", {k.replace('_', ' ')} {100 * v:.1f}%" for k, v in teacher.items()))
                if save_now:
                    self.save()
                    t_last = time.perf_counter()  # checkpoint time is not training throughput
        finally:
            if progress is not None:
                progress.close()
            metrics.close()
        if val_loss is None:  # nothing left to train (e.g. resuming a finished run): still report where it stands
            val_loss = self.evaluate()
        if self.is_main:
            plot_losses(self.run_dir)
        found = list_checkpoints(self.ckpt_root)
        return {"step": self.step, "val_loss": val_loss, "checkpoint": str(found[-1]) if found else None}

    # ---- faults --------------------------------------------------------------------------------------
    def _last_good(self) -> str:
        found = list_checkpoints(self.ckpt_root)
        return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"

    def _handle_bad_steps(self, metrics: MetricsLogger, emit: Callable[[str], None]) -> bool:
        """Apply train.on_bad_step to the steps the guard cancelled since the last look; True if it rolled
        back (the loop then continues from the restored step)."""
        if self.guard is None:
            return False
        report = self.guard.report()
        if not report.bad:
            return False
        tc = self.cfg.train
        what = ("non-finite loss or gradient norm" if report.nonfinite
                else f"loss spike (above {tc.spike_factor:g} x the median of the last {tc.spike_window} steps)")
        metrics.log({"kind": "guard", "step": self.step, "bad_steps": report.bad, "nonfinite": report.nonfinite,
                     "first_bad_step": report.first, "policy": tc.on_bad_step})
        if tc.on_bad_step == "stop":
            raise TrainingHalted(f"step {report.first}: {what}; the update was cancelled and the run stopped "
                                 f"(train.on_bad_step = 'stop'); {self._last_good()}")
        if tc.on_bad_step == "skip":
            if report.longest_run >= tc.max_bad_steps:
                raise TrainingHalted(f"{report.longest_run} bad steps in a row up to step {self.step} ({what}): the "
                                     f"weights or the data are broken; {self._last_good()}; "
                                     "train.on_bad_step = 'rollback' returns to it by itself")
            emit(f"step {self.step}: cancelled {report.bad} update(s) since the last report ({what}), the first at "
                 f"step {report.first}; training goes on (train.on_bad_step = 'skip')")
            return False
        self._rollback(report.first, what, metrics, emit)
        return True

    def _on_bad_weights(self, metrics: MetricsLogger, emit: Callable[[str], None]) -> None:
        """Non-finite weights at a checkpoint: roll back under 'rollback', else stop; nothing is written."""
        what = "non-finite weights"
        if self.cfg.train.on_bad_step != "rollback":
            raise TrainingHalted(f"step {self.step}: {what}; no checkpoint written; {self._last_good()}")
        self._rollback(self.step, what, metrics, emit)

    def _rollback(self, first_bad: int, what: str, metrics: MetricsLogger, emit: Callable[[str], None]) -> None:
        """Return to the newest checkpoint before step `first_bad` and continue with the data after the batches
        read so far (plus train.rollback_skip steps' worth), as PaLM did after its loss spikes."""
        tc = self.cfg.train
        earlier = [p for p in list_checkpoints(self.ckpt_root) if step_of(p) < first_bad]
        if not earlier:
            raise TrainingHalted(f"step {first_bad}: {what}, and no checkpoint before it to roll back to; stopped")
        if self.rollbacks >= tc.max_rollbacks:
            raise TrainingHalted(f"step {first_bad}: {what} again after {self.rollbacks} rollbacks "
                                 f"(train.max_rollbacks); stopped; {self._last_good()}")
        detected = self.step
        position = self.loader.samples_seen + tc.rollback_skip * self.stages[self.stage].grad_accum * tc.batch_size
        self._restore(earlier[-1])
        self.loader.samples_seen = position
        self.rollbacks += 1
        metrics.rewind(self.step)
        metrics.log({"kind": "rollback", "step": self.step, "detected_at": detected, "first_bad_step": first_bad,
                     "samples_seen": position, "reason": what, "rollbacks": self.rollbacks})
        emit(f"step {detected}: {what} at step {first_bad}; rolled back to {earlier[-1]} (step {self.step}) and "
             f"continuing with the data after the bad batches (rollback {self.rollbacks} of {tc.max_rollbacks})")

    def close(self) -> None:
        """Release what the run holds beyond its objects: the run lock (and the process group under torchrun)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def perplexity(loss: float) -> str:
    """exp(loss) for printing, without overflowing for a diverged loss."""
    return f"{math.exp(loss):.1f}" if loss < 700 else ("nan" if math.isnan(loss) else "inf")


def finite(value: float) -> float | None:
    """A metric for metrics.jsonl: None instead of NaN or infinity, which JSON does not have."""
    return value if math.isfinite(value) else None
