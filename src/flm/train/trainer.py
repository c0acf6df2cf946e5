"""The training loop: one place that owns model, optimizer, data position, checkpoints and metrics.

Resuming is bit-exact on CPU: the checkpoint holds the weights, Adam moments and step counts, the
RNG state and the loader's global sample counter, and the learning rate is a pure function of the
step, so N steps + resume + N steps computes exactly what 2N uninterrupted steps compute.
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
from flm.data import PreparedData, TokenLoader, iter_eval_batches, load_prepared
from flm.errors import FlmError
from flm.model import FLM, flops_per_token, generate, param_count
from flm.train.checkpoint import (list_checkpoints, load_model_state, load_train_state, read_meta,
                                  resolve_checkpoint, save_checkpoint)
from flm.train.metrics import MetricsLogger, peak_bf16_flops, plot_losses
from flm.train.optim import build_optimizer, lr_at


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlmError(f"train.device is {spec!r} but CUDA is not available on this machine")
    return device


def resolve_model_config(model: ModelConfig, data: PreparedData) -> ModelConfig:
    """Fill the vocabulary size from the tokenizer (padded to a multiple of 128 for fast matmuls)."""
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=128 * math.ceil(data.vocab_size / 128))
    if model.vocab_size < data.vocab_size:
        raise FlmError(f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's ({data.vocab_size})")
    return model


class Trainer:
    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        if cfg.stages:
            raise FlmError("this config has [[stages]]: growth schedules are not trained by this version of flm")
        tc = cfg.train
        self.device = resolve_device(tc.device)
        use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        self.data = load_prepared(Path(cfg.data.dir))
        self.tokenizer = self.data.tokenizer()
        self.model_cfg = resolve_model_config(cfg.model, self.data)
        self.run_dir = Path(tc.run_dir)
        torch.manual_seed(tc.seed)
        self.model = FLM(self.model_cfg).to(self.device)
        self.optimizer = build_optimizer(self.model, tc)
        self.step_fn = torch.compile(self.model) if tc.compile else self.model
        self.loader = TokenLoader(self.data.train_shards, tc.batch_size, tc.seq_len, seed=tc.seed)
        self.step = 0
        self.flops_per_token = flops_per_token(self.model_cfg, tc.seq_len)
        self.peak_flops = peak_bf16_flops(self.device) if use_bf16 else None

    # ---- checkpoints -------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path:
        meta = {"config": config_to_dict(self.cfg), "model": config_to_dict(self.model_cfg),
                "data": self.loader.state_dict(), "data_dir": str(self.data.dir)}
        return save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, meta,
                               self.cfg.train.keep_last, write_extra=self.tokenizer.save)

    def resume(self, spec: str) -> bool:
        """Load the checkpoint named by `spec` ('auto' = newest in this run); False if there is none."""
        path = resolve_checkpoint(spec, self.ckpt_root)
        if path is None:
            return False
        meta = read_meta(path)
        if meta["model"] != config_to_dict(self.model_cfg):
            raise FlmError(f"checkpoint {path} was trained with a different model config; "
                           "use the same config (growth between shapes is `flm grow`)")
        load_model_state(path, self.model)
        load_train_state(path, self.optimizer)
        self.loader.load_state_dict(meta["data"])
        self.step = meta["step"]
        self.log(f"resumed from {path} at step {self.step}")
        return True

    # ---- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over `grad_accum` micro-batches, clip, AdamW. Returns (loss, grad norm) tensors."""
        tc = self.cfg.train
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for _ in range(tc.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast:
                _, loss = self.step_fn(x, y)
            (loss / tc.grad_accum).backward()
            total += loss.detach()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / tc.grad_accum, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `eval_batches` validation batches (fixed order, so comparable)."""
        tc = self.cfg.train
        self.model.eval()
        losses = []
        for x, y in iter_eval_batches(self.data.val_shards, tc.batch_size, tc.seq_len, tc.eval_batches):
            with self.autocast:
                _, loss = self.step_fn(x.to(self.device), y.to(self.device))
            losses.append(loss.float())
        self.model.train()
        return torch.stack(losses).mean().item()

    def sample(self, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
        tok = self.tokenizer
        ids = tok.encode(prompt)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = generate(self.model, ids, max_new_tokens, temperature=0.8, top_k=50, eot_id=tok.eot_id,
                       generator=gen, vocab_limit=tok.vocab_size)
        return prompt + tok.decode([t for t in out if t != tok.eot_id])

    # ---- the loop ----------------------------------------------------------------------------------
    def describe(self) -> str:
        c, tc = self.model_cfg, self.cfg.train
        n = param_count(c)
        return (f"model: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads x {c.head_dim}, ffn {c.ffn_dim}, "
                f"vocab {c.vocab_size}: {n / 1e6:.2f}M parameters ({param_count(c, include_embedding=False) / 1e6:.2f}M "
                f"without embedding)\ndata: {self.data.train_tokens:,} train / {self.data.val_tokens:,} validation "
                f"tokens from {self.data.dir}\ntraining: {tc.max_steps} steps x {tc.tokens_per_step:,} tokens on "
                f"{self.device.type}{' (bf16 autocast)' if not isinstance(self.autocast, contextlib.nullcontext) else ' (fp32)'}")

    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """Run to `max_steps` (or stop after `until_step`, keeping the schedule of the full run)."""
        tc = self.cfg.train
        end = min(tc.max_steps, until_step) if until_step is not None else tc.max_steps
        metrics = MetricsLogger(self.run_dir, tc.tensorboard, resume_step=self.step if self.step else None)
        progress = None
        if tc.progress:
            from tqdm import tqdm

            progress = tqdm(total=end, initial=self.step, unit="step", dynamic_ncols=True)
        emit = progress.write if progress is not None else self.log
        val_loss = None
        t_last, step_last = time.perf_counter(), self.step
        loss_sum, loss_n = torch.zeros((), device=self.device), 0
        try:
            while self.step < end:
                loss, grad_norm = self.train_step()
                loss_sum += loss
                loss_n += 1
                if progress is not None:
                    progress.update(1)
                if self.step % tc.log_every == 0 or self.step == end:
                    now = time.perf_counter()
                    tok_s = (self.step - step_last) * tc.tokens_per_step / (now - t_last)
                    record = {"kind": "train", "step": self.step, "loss": (loss_sum / loss_n).item(),
                              "grad_norm": grad_norm.item(), "lr": lr_at(self.step - 1, tc),
                              "tokens": self.step * tc.tokens_per_step, "tokens_per_s": tok_s}
                    if self.peak_flops:
                        record["mfu"] = tok_s * self.flops_per_token / self.peak_flops
                    metrics.log(record)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                             tok_s=f"{tok_s:,.0f}")
                    else:
                        emit(f"step {self.step}/{end} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                             f"grad_norm {record['grad_norm']:.3f} tok/s {tok_s:,.0f}")
                    t_last, step_last = time.perf_counter(), self.step
                    loss_sum, loss_n = torch.zeros((), device=self.device), 0
                if self.step % tc.eval_every == 0 or self.step == end:
                    val_loss = self.evaluate()
                    metrics.log({"kind": "eval", "step": self.step, "val_loss": val_loss})
                    emit(f"step {self.step}: validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.1f})")
                if self.step % tc.ckpt_every == 0 or self.step == end:
                    self.save()
                    t_last = time.perf_counter()  # checkpoint time is not training throughput
        finally:
            if progress is not None:
                progress.close()
            metrics.close()
        plot_losses(self.run_dir)
        return {"step": self.step, "val_loss": val_loss, "checkpoint": str(list_checkpoints(self.ckpt_root)[-1])
                if list_checkpoints(self.ckpt_root) else None}
