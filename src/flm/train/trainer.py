"""The training loop: one place that owns model, optimizer, data position, growth, checkpoints and metrics.

A run is a list of stages (flm.train.schedule). At each stage boundary the model and its Adam state
are grown into the next stage's shape with MSG (flm.growth), the new structure held at zero by masks
that ramp in over K steps and are then folded away.

The loop is the same in one process and under torchrun: where the model lives (one device, or spread over a
torchrun job's layout) is the trainer's placement (flm.train.placement), asked for everything that depends on
it, as torchtitan's one Trainer works over ParallelDims.

Resuming is bit-exact on CPU: the checkpoint holds the weights, Adam moments and step counts, the
RNG state, the loader's global sample counter, the stage and the ramp position, the step guard's
window, and the learning rate is a pure function of the step. So N steps + resume + N steps computes
exactly what 2N uninterrupted steps compute, also in the middle of a mask ramp.

Faults (docs/reliability.md): the run folder is locked to one writer (flm.checkpoint.lock) for as long as the
trainer is open (`with Trainer(cfg) as trainer:`); every step passes the step guard (flm.train.guard), which
cancels a non-finite or spiking step on the device, and `train.on_bad_step` (flm.train.recovery) decides at the
next point where the host reads the device anyway; a checkpoint is only written from finite weights, and a write
error is one line naming the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import torch

from flm.config import Config, ModelConfig, config_to_dict
from flm.data import PreparedData, iter_eval_batches, load_prepared
from flm.data.loader import IGNORE
from flm.errors import FlmError, TrainingHalted
from flm.growth import Ramp
from flm.model import flops_per_token, generate, param_count
from flm.model.flm import SeparateTeacher
from flm.checkpoint import RunLock, list_checkpoints, read_meta, resolve_checkpoint, save_checkpoint
from flm.train.guard import StepGuard
from flm.train.metrics import peak_bf16_flops, plot_losses
from flm.train.placement import OneProcess, Placement
from flm.train.progress import Progress, finite
from flm.train.recovery import Recovery
from flm.train.schedule import lr_at, plan_stages, tokens_and_flops_at


def resolve_model_config(model: ModelConfig, data: PreparedData, teacher_objective: str = "unified") -> ModelConfig:
    """Fill the vocabulary size from the tokenizer (padded to a multiple of 128 for fast matmuls), and give the
    model its teacher head under the separate teacher-signal objective."""
    if teacher_objective == "separate":
        model = dataclasses.replace(model, teacher_head=True)
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=128 * math.ceil(data.vocab_size / 128))
    if model.vocab_size < data.vocab_size:
        raise FlmError(f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's ({data.vocab_size})")
    return model


def _quiet(_: str) -> None:
    pass


class Trainer:
    """A run's training loop over a placement (default: this process alone; flm.launch gives torchrun's).

    A context manager: leaving it releases the run lock and the placement (under torchrun, the process group).
    """

    def __init__(self, cfg: Config, log: Callable[[str], None] = print, guard: bool = True,
                 placement: Placement | None = None):
        """`log`: where lines go (on the main process only); `guard=False` (the μP tools) lets a diverging run
        diverge, which is what a sweep measures; `placement`: made by flm.launch under torchrun, owned (and closed)
        by the trainer from now on."""
        self.cfg = cfg
        self.placement = placement if placement is not None else OneProcess(cfg)
        self.log = log if self.placement.is_main else _quiet
        tc = cfg.train
        self.run_dir = Path(tc.run_dir)
        self._lock = None
        try:
            self._lock = RunLock(self.run_dir).acquire() if self.placement.is_main else None
            self._start(guard)
        except BaseException:
            self.close()
            raise

    def _start(self, guard: bool) -> None:
        """The data, the stages and stage 1's fresh model, drawn from train.seed."""
        cfg, tc, placement = self.cfg, self.cfg.train, self.placement
        self.device, self.autocast = placement.device, placement.autocast
        self.data = load_prepared(Path(cfg.data.dir))
        self.tokenizer = self.data.tokenizer()
        self.stages = plan_stages(cfg, resolve_model_config(cfg.model, self.data, tc.teacher_objective))
        self.teacher = self._separate_teacher()
        placement.check(self.stages)
        peak = peak_bf16_flops(self.device) if placement.bf16 else None
        self.peak_flops = peak * placement.world if peak else None  # MFU: against the peak of all the job's devices
        torch.manual_seed(tc.seed)
        self.stage = 0
        self.ramp: Ramp | None = None
        self.model, self.optimizer = placement.build(self.stages[0])
        self.model.teacher = self.teacher
        self.loader = None
        self._follow_data_slice()
        self._heldout = None  # teacher-signal held-out records, read at the first evaluation
        self.step = 0
        self.guard = StepGuard(tc.spike_factor, tc.spike_window, self.device) if guard else None
        self.last_step_bad: torch.Tensor | None = None  # the guard's flag for the last step (device)
        self.recovery = Recovery(tc, self.ckpt_root)

    def _separate_teacher(self) -> SeparateTeacher | None:
        """What a model with a teacher head trains with (train.teacher_objective = "separate"; None: unified)."""
        tc = self.cfg.train
        if tc.teacher_objective != "separate":
            return None
        if not isinstance(self.placement, OneProcess):
            raise FlmError("train.teacher_objective = 'separate' trains in one process (not yet under torchrun)")
        if self.tokenizer.label_ids is None:
            raise FlmError(f"train.teacher_objective = 'separate': the prepared data in {self.data.dir} has no label "
                           "tokens (prepare it with a teacher source)")
        true_id, false_id = self.tokenizer.label_ids
        return SeparateTeacher(true_id, false_id, tc.teacher_loss_weight)

    def _follow_data_slice(self) -> None:
        """A loader of this process's slice of every global batch, at the current data position; made anew only
        when the slicing changed (at first, and after a growth or a load into another layout)."""
        part, parts = self.placement.data_slice()
        if self.loader is not None and (self.loader.rank, self.loader.world_size) == (part, parts):
            return
        tc = self.cfg.train
        seen = self.loader.samples_seen if self.loader is not None else 0
        self.loader = self.data.train_loader(tc.batch_size // parts, tc.seq_len, seed=tc.seed, rank=part,
                                             world_size=parts)
        self.loader.samples_seen = seen

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what the run holds beyond its objects: the run lock, and the placement's (a process group)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.placement.close()

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
        return {**meta, **self.placement.checkpoint_meta()}

    def write_extra(self, folder: Path) -> None:
        """The files a checkpoint holds besides tensors and meta.json: the tokenizer and the guard's window."""
        self.tokenizer.save(folder)
        if self.guard is not None:
            self.guard.save(folder)

    def save(self) -> Path:
        return save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, self.checkpoint_meta(),
                               self.cfg.train.keep_last, write_extra=self.write_extra,
                               distributed=self.placement.distributed)

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
        if stage != self.stage:
            self.model, self.optimizer = self.placement.build(self.stages[stage], init=False)
            self.model.teacher = self.teacher
            self.stage = stage
        self.placement.load(path, meta, self.model, self.optimizer, self.log)
        self._follow_data_slice()
        self.ramp = Ramp.from_dict(meta["ramp"]) if meta["ramp"] else None
        if self.ramp:
            self.placement.apply_masks(self.model, self.ramp)
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

    # ---- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over the stage's micro-batches, clip, AdamW. Returns (loss, grad norm) tensors."""
        tc, placement = self.cfg.train, self.placement
        accum = self.stages[self.stage].grad_accum
        lr = lr_at(self.step, self.stages)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]  # μP: hidden matrices at lr / width_mult (flm.model.mup_rules)
        batches = [self.loader.next_batch() for _ in range(accum)]
        # The step's gradient is that of the mean over ALL its loss tokens (targets != -100), wherever they fall:
        # masked sources leave micro-batches with different counts, and weighting each micro-batch's mean by its
        # share of the tokens makes accumulation equal one big batch.
        counts = [int((y != IGNORE).sum()) for _, y in batches]
        n_loss_tokens = placement.count(sum(counts))
        if n_loss_tokens == 0:
            raise FlmError(f"step {self.step} drew no loss targets (every target masked): check the data sources")
        total = torch.zeros((), device=self.device)
        for (x, y), n in zip(batches, counts):
            loss = placement.forward_backward(self.model, self._to_device(x), self._to_device(y), n, n_loss_tokens)
            total += loss * n
        grad_norm = placement.clip(self.model, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        loss = placement.step_loss(total / n_loss_tokens)
        self.last_step_bad = self.guard.check(self.step + 1, loss, grad_norm) if self.guard is not None else None
        self.optimizer.step(skip=self.last_step_bad)  # a bad step changes nothing (decided on the device)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ramp is not None:
            self.ramp.steps_done += 1
            placement.apply_masks(self.model, self.ramp)
            if self.ramp.c >= 1.0:
                self.ramp = None  # folded: an ordinary model of the new shape
        return loss, grad_norm

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A batch tensor on the training device. To a GPU through pinned memory: a copy from ordinary (pageable)
        host memory may wait for the device to finish its queue, which would stall the step's launches."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `eval_batches` validation batches (fixed order, so comparable)."""
        tc = self.cfg.train
        self.model.eval()
        losses = [self.placement.batch_loss(self.model, x, y) for x, y in iter_eval_batches(
            self.data.val_shards, tc.batch_size, tc.seq_len, tc.eval_batches, self.data.val_masks)]
        self.model.train()
        return torch.stack(losses).mean().item()

    def evaluate_teacher(self) -> dict[str, float]:
        """Accuracy on the held-out records of the teacher sources ({} without any), for the `eval` record. It
        needs whole logits; a model sharded over tp or pp leaves it to `flm eval teacher`."""
        if not self.data.teacher_heldout or not self.placement.whole_logits:
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
        loss = self.placement.forward_backward(self.model, x.to(self.device), y.to(self.device), n,
                                               self.placement.count(n))
        norm = self.placement.clip(self.model, float("inf"))
        self.model.zero_grad(set_to_none=True)
        self.model.train()
        return loss.item(), norm.item()

    def grow(self) -> dict[str, Any]:
        """Grow model and Adam state into the next stage's shape; returns the growth record."""
        nxt = self.stages[self.stage + 1]
        loss_before, grad_before = self.probe()
        self.model, self.optimizer, ramp = self.placement.grow(self.model, self.optimizer, nxt)
        self.model.teacher = self.teacher
        self.stage += 1
        self.ramp = ramp if ramp.c < 1.0 else None
        self._follow_data_slice()  # the next stage's layout may slice the batches otherwise
        loss_after, grad_after = self.probe()
        return {"kind": "growth", "step": self.step, "stage": self.stage + 1, "operator": nxt.operator,
                "loss_before": loss_before,
                "loss_after": loss_after, "grad_norm_before": grad_before, "grad_norm_after": grad_after,
                "params_before": param_count(self.stages[self.stage - 1].model), "params_after": param_count(nxt.model)}

    def sample(self, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
        """A continuation of `prompt` by the model as it is now. Under torchrun every process takes part in
        gathering the model, the main process samples, and every process returns its text."""
        model = self.placement.whole_model(self.model, self.optimizer, self.ramp)
        text = None
        if model is not None:
            tok = self.tokenizer
            gen = torch.Generator(device=self.device).manual_seed(seed)
            out = generate(model, tok.encode(prompt), max_new_tokens, temperature=0.8, top_k=50, eot_id=tok.eot_id,
                           generator=gen, vocab_limit=tok.vocab_size)
            text = prompt + tok.decode([t for t in out if t != tok.eot_id])
        return self.placement.share(text)

    # ---- the loop ----------------------------------------------------------------------------------
    def describe(self) -> str:
        tc = self.cfg.train
        lines = []
        for s in self.stages:
            c = s.model
            kv = f" ({c.kv_heads} key/value)" if c.kv_heads != c.n_heads else ""
            arch = "" if c.arch == "flm" else f" ({c.arch})"
            lines.append(f"stage {s.index + 1}{arch}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads{kv} x "
                         f"{c.head_dim}, ffn {c.ffn_dim}, vocab {c.vocab_size}: {param_count(c) / 1e6:.2f}M parameters; "
                         f"steps {s.start}-{s.end} x {s.grad_accum * tc.batch_size * tc.seq_len:,} tokens, "
                         f"lr {s.lr_start:.2e} -> {s.lr_end:.2e}"
                         + (f", grown by {s.operator}, ramp {s.ramp_steps}" if s.index else ""))
        precision = "bf16 autocast" if self.placement.bf16 else "fp32"
        lines.append(f"data: {self.data.train_tokens:,} train / {self.data.val_tokens:,} validation tokens from "
                     f"{self.data.dir}; {self.max_steps} steps on {self.device.type} ({precision})")
        if self.teacher is not None:
            lines.append(f"teacher signal: separate head at the label positions (train.teacher_objective), loss weight "
                         f"{self.teacher.weight:g}")
        placed = self.placement.describe()
        return "\n".join(lines + ([placed] if placed else []))

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
        end = min(self.max_steps, until_step) if until_step is not None else self.max_steps
        try:
            val_loss = self._run(end)
            if val_loss is None:  # nothing left to train (e.g. resuming a finished run): still report where it stands
                val_loss = self.evaluate()
        except RuntimeError as e:  # under torchrun, a collective that timed out or lost a peer ends it with one line
            what = self.placement.peer_failure(e)
            if what is None:
                raise
            raise TrainingHalted(f"{what}; {self.recovery.last_good()}") from None
        if self.placement.is_main:
            plot_losses(self.run_dir)
        found = list_checkpoints(self.ckpt_root)
        return {"step": self.step, "val_loss": val_loss, "checkpoint": str(found[-1]) if found else None}

    def _run(self, end: int) -> float | None:
        """Steps up to `end`, growing at stage boundaries, with records, evaluations and checkpoints at their
        intervals; returns the last validation loss (None if none was measured)."""
        tc = self.cfg.train
        progress = Progress(self.run_dir, tc, self.step, end, self.placement.is_main, self.log, self.device)
        val_loss = None
        try:
            while self.step < end:
                if self.step == self.stages[self.stage].end:
                    progress.grown(self.grow())
                loss, grad_norm = self.train_step()
                progress.stepped(loss, self.last_step_bad)
                log_now = self.step % tc.log_every == 0 or self.step == end
                eval_now = self.step % tc.eval_every == 0 or self.step == end
                save_now = self.step % tc.ckpt_every == 0 or self.step == end
                if (log_now or eval_now or save_now) and self._recovered(progress, check_weights=save_now):
                    continue  # from the restored step
                if log_now:
                    mean, tok_s = progress.interval(self.step,
                                                    self.stages[self.stage].grad_accum * tc.batch_size * tc.seq_len)
                    progress.trained(self._train_record(mean, finite(grad_norm.item()), tok_s))
                if eval_now:
                    val_loss = self.evaluate()
                    teacher = self.evaluate_teacher()
                    _, flops = tokens_and_flops_at(self.step, self.stages, tc.batch_size, tc.seq_len)
                    progress.evaluated({"kind": "eval", "step": self.step, "stage": self.stage + 1,
                                        "val_loss": finite(val_loss), "flops": flops, **teacher}, val_loss, teacher)
                if save_now:
                    self.save()
                    progress.pause()  # checkpoint time is not training throughput
        finally:
            progress.close()
        return val_loss

    def _recovered(self, progress: Progress, check_weights: bool) -> bool:
        """Apply train.on_bad_step (flm.train.recovery) to the steps the guard cancelled since its last report and,
        with `check_weights`, to weights about to be saved; True if the run went back to a checkpoint."""
        rollback = self.recovery.bad_steps(self.guard.report(), self.step, progress) if self.guard is not None else None
        if rollback is None and check_weights and not self.placement.weights_finite(self.model):
            rollback = self.recovery.bad_weights(self.step)  # never write a checkpoint nothing can resume from
        if rollback is None:
            return False
        detected = self.step
        position = self.recovery.data_position(self.loader.samples_seen, self.stages[self.stage].grad_accum)
        self._restore(rollback.to)
        self.loader.samples_seen = position
        self.recovery.rolled_back(rollback, detected, self.step, position, progress)
        return True
