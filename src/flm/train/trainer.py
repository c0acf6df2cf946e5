"""The training loop: one place that owns model, optimizer, data position, growth, checkpoints and metrics.

A run is a list of stages (flm.train.schedule). At each stage boundary the model and its Adam state
are grown into the next stage's shape with MSG (flm.growth), the new structure held at zero by masks
that ramp in over K steps and are then folded away.

Resuming is bit-exact on CPU: the checkpoint holds the weights, Adam moments and step counts, the
RNG state, the loader's global sample counter, the stage and the ramp position, and the learning
rate is a pure function of the step. So N steps + resume + N steps computes exactly what 2N
uninterrupted steps compute, also in the middle of a mask ramp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from flm.config import Config, ModelConfig, config_to_dict
from flm.data import PreparedData, iter_eval_batches, load_prepared
from flm.data.loader import IGNORE
from flm.device import resolve_device
from flm.errors import FlmError
from flm.growth import Ramp, apply_masks, grow_model
from flm.model import FLM, flops_per_token, generate, param_count
from flm.train.checkpoint import (list_checkpoints, load_model_state, load_train_state, read_meta,
                                  resolve_checkpoint, save_checkpoint)
from flm.train.metrics import MetricsLogger, peak_bf16_flops, plot_losses
from flm.train.optim import build_optimizer, grow_optimizer
from flm.train.schedule import Stage, lr_at, plan_stages, tokens_and_flops_at


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

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        tc = cfg.train
        self.device = resolve_device(tc.device)
        use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        self.data = load_prepared(Path(cfg.data.dir))
        self.tokenizer = self.data.tokenizer()
        self.stages = plan_stages(cfg, resolve_model_config(cfg.model, self.data))
        self.run_dir = Path(tc.run_dir)
        self.peak_flops = peak_bf16_flops(self.device) if use_bf16 else None
        torch.manual_seed(tc.seed)
        self.stage = 0
        self.ramp: Ramp | None = None
        self._use(self._new_model(self.stages[0].model))
        self.loader = self.data.train_loader(tc.batch_size, tc.seq_len, seed=tc.seed)
        self._heldout = None  # teacher-signal held-out records, read at the first evaluation
        self.step = 0

    def _new_model(self, cfg: ModelConfig) -> FLM:
        """A freshly initialised model of shape `cfg`, ready to train (hook: sharded under torchrun)."""
        return FLM(cfg).to(self.device)

    def _use(self, model: FLM, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make `model` the one being trained, with `optimizer` (default: a fresh one over its parameters)."""
        self.model = model
        self.optimizer = optimizer if optimizer is not None else build_optimizer(model, self.cfg.train)
        self.step_fn = torch.compile(model) if self.cfg.train.compile else model

    @property
    def max_steps(self) -> int:
        return self.stages[-1].end

    # ---- checkpoints -------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path:
        meta = {"config": config_to_dict(self.cfg), "model": config_to_dict(self.model.cfg), "stage": self.stage,
                "ramp": self.ramp.to_dict() if self.ramp else None, "data": self.loader.state_dict()}
        return save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, meta,
                               self.cfg.train.keep_last, write_extra=self.tokenizer.save)

    def resume(self, spec: str) -> bool:
        """Load the checkpoint named by `spec` ('auto' = newest in this run); False if there is none."""
        path = resolve_checkpoint(spec, self.ckpt_root)
        if path is None:
            return False
        meta = read_meta(path)
        stage = meta.get("stage", 0)
        if stage >= len(self.stages) or meta["model"] != config_to_dict(self.stages[stage].model):
            raise FlmError(f"checkpoint {path} was trained with a different model config; "
                           "use the same config (growth between shapes is `flm grow`)")
        self._load_checkpoint(path, meta, stage)
        self.ramp = Ramp.from_dict(meta["ramp"]) if meta.get("ramp") else None
        if self.ramp:
            self._apply_masks()
        if meta.get("data"):
            self.loader.load_state_dict(meta["data"])
        else:  # e.g. imported from a Hugging Face folder: no data position to restore
            self.log(f"{path} holds no data position: reading the data from the start")
        self.step = meta["step"]
        self.log(f"resumed from {path} at step {self.step} (stage {self.stage + 1}/{len(self.stages)})")
        return True

    def _load_checkpoint(self, path: Path, meta: dict[str, Any], stage: int) -> None:
        """Weights and optimizer state of checkpoint `path` into this trainer, at `stage`'s shape."""
        if stage != self.stage:
            self._use(self._new_model(self.stages[stage].model))
        self.stage = stage
        load_model_state(path, self.model)
        load_train_state(path, self.optimizer)

    # ---- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over the stage's micro-batches, clip, AdamW. Returns (loss, grad norm) tensors."""
        tc = self.cfg.train
        accum = self.stages[self.stage].grad_accum
        lr = lr_at(self.step, self.stages)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]  # μP: hidden matrices at lr / width_mult (flm.mup.rules)
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
            loss = self._forward_backward(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                                          n, n_loss_tokens)
            total += loss * n
        grad_norm = self._clip_grad_norm(tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ramp is not None:
            self.ramp.steps_done += 1
            self._apply_masks()
            if self.ramp.c >= 1.0:
                self.ramp = None  # folded: an ordinary model of the new shape
        return total / n_loss_tokens, grad_norm

    # Hooks (overridden by flm.parallel.ParallelTrainer).
    def _global_count(self, n: int) -> int:
        """Loss tokens of the whole step, from this process's count (more processes read the same step)."""
        return n

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, n: int, n_step: int) -> torch.Tensor:
        """Forward and backward of one micro-batch holding `n` of the step's `n_step` loss tokens, its mean
        loss weighted by n / n_step; returns that (detached) mean."""
        if n == 0:
            return torch.zeros((), device=self.device)  # its mean would be 0/0; it contributes nothing
        with self.autocast:
            _, loss = self.step_fn(x, y)
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
        losses = []
        for x, y in iter_eval_batches(self.data.val_shards, tc.batch_size, tc.seq_len, tc.eval_batches,
                                      self.data.val_masks):
            with self.autocast:
                _, loss = self.step_fn(x.to(self.device), y.to(self.device))
            losses.append(loss.float())
        self.model.train()
        return torch.stack(losses).mean().item()

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
        return {"kind": "growth", "step": self.step, "stage": self.stage + 1, "loss_before": loss_before,
                "loss_after": loss_after, "grad_norm_before": grad_before, "grad_norm_after": grad_after,
                "params_before": param_count(self.stages[self.stage - 1].model), "params_after": param_count(nxt.model)}

    def _grow_into(self, nxt: Stage) -> Ramp:
        """Replace model and optimizer by their growth into stage `nxt`, masks set at c = 0 (hook)."""
        model, ramp = grow_model(self.model, nxt.model, nxt.new_layers, nxt.ramp_steps)
        self._use(model, grow_optimizer(self.optimizer, self.model.cfg, model, ramp.sources, self.cfg.train))
        return ramp

    def sample(self, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
        tok = self.tokenizer
        ids = tok.encode(prompt)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = generate(self.model, ids, max_new_tokens, temperature=0.8, top_k=50, eot_id=tok.eot_id,
                       generator=gen, vocab_limit=tok.vocab_size)
        return prompt + tok.decode([t for t in out if t != tok.eot_id])

    def close(self) -> None:
        """Release what the run holds beyond its objects (the process group under torchrun)."""

    # ---- the loop ----------------------------------------------------------------------------------
    def describe(self) -> str:
        tc = self.cfg.train
        lines = []
        for s in self.stages:
            c = s.model
            lines.append(f"stage {s.index + 1}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads x "
                         f"{c.head_dim}, ffn {c.ffn_dim}, vocab {c.vocab_size}: {param_count(c) / 1e6:.2f}M parameters; "
                         f"steps {s.start}-{s.end} x {s.grad_accum * tc.batch_size * tc.seq_len:,} tokens, "
                         f"lr {s.lr_start:.2e} -> {s.lr_end:.2e}" + (f", ramp {s.ramp_steps}" if s.index else ""))
        precision = "bf16 autocast" if not isinstance(self.autocast, contextlib.nullcontext) else "fp32"
        lines.append(f"data: {self.data.train_tokens:,} train / {self.data.val_tokens:,} validation tokens from "
                     f"{self.data.dir}; {self.max_steps} steps on {self.device.type} ({precision})")
        return "\n".join(lines)

    def _train_record(self, loss: float, grad_norm: float, tok_s: float) -> dict[str, Any]:
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
                                resume_step=self.step if self.step else None, enabled=self.is_main)
        progress = None
        if tc.progress and self.is_main:
            from tqdm import tqdm

            progress = tqdm(total=end, initial=self.step, unit="step", dynamic_ncols=True)
        emit = progress.write if progress is not None else self.log
        val_loss = None
        t_last, step_last = time.perf_counter(), self.step
        loss_sum, loss_n = torch.zeros((), device=self.device), 0
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
                loss_sum += loss
                loss_n += 1
                if progress is not None:
                    progress.update(1)
                if self.step % tc.log_every == 0 or self.step == end:
                    tok_s = ((self.step - step_last) * self.stages[self.stage].grad_accum * tc.batch_size * tc.seq_len
                             / (time.perf_counter() - t_last))
                    record = self._train_record((loss_sum / loss_n).item(), grad_norm.item(), tok_s)
                    metrics.log(record)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
                    else:
                        emit(f"step {self.step}/{end} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                             f"grad_norm {record['grad_norm']:.3f} tok/s {tok_s:,.0f}")
                    t_last, step_last = time.perf_counter(), self.step
                    loss_sum, loss_n = torch.zeros((), device=self.device), 0
                if self.step % tc.eval_every == 0 or self.step == end:
                    val_loss = self.evaluate()
                    teacher = self.evaluate_teacher()
                    _, flops = tokens_and_flops_at(self.step, self.stages, tc.batch_size, tc.seq_len)
                    metrics.log({"kind": "eval", "step": self.step, "stage": self.stage + 1, "val_loss": val_loss,
                                 "flops": flops, **teacher})
                    emit(f"step {self.step}: validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.1f})"
                         + "".join(f", {k.replace('_', ' ')} {100 * v:.1f}%" for k, v in teacher.items()))
                if self.step % tc.ckpt_every == 0 or self.step == end:
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
