"""The training loop under torchrun: flm.train.Trainer with its model spread over a 3-D layout.

Every process lays the model out on the meta device, keeps only its part (pipeline stage, tensor-
parallel slices, FSDP shards) and receives the values of that part tensor by tensor, exactly those
`FLM(cfg)` draws from the same seed. The data order does not depend on the layout: each optimizer
step reads the same global batch of train.batch_size x grad_accum sequences as one process would,
each data-parallel rank a contiguous slice of every micro-batch, and each rank's loss is weighted by
its share of the step's loss tokens over all ranks. So any layout computes what one process computes,
up to floating-point reduction order. Checkpoints are DCP (flm.checkpoint.sharded) and reshard to
any other layout on load; growth at a stage boundary reshards too (flm.parallel.grow)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import loss_parallel

from flm.config import Config, ModelConfig
from flm.config.layout import Layout
from flm.data.loader import IGNORE
from flm.errors import FlmError, TrainingHalted
from flm.growth import Ramp, apply_masks, layer_sources
from flm.model import FLM
from flm.model.flm import held_blocks, lm_loss
from flm.checkpoint import is_sharded, load_model, load_train_state
from flm.checkpoint.pieces import write_pieces
from flm.checkpoint.state import named_params
from flm.parallel.grow import OldModel, fresh_values, grow_sharded
from flm.parallel.mesh import build_mesh, dp_rank, init_distributed
from flm.parallel.norms import clip_grad_norm
from flm.parallel.parallelize import parallelize
from flm.parallel.pipeline import build_schedule, check_pipeline
from flm.parallel.tensor import check_tensor_parallel, local_slice
from flm.train.schedule import Stage
from flm.train.trainer import Trainer


def _quiet(_: str) -> None:
    pass


# DTensor warns, on every process, each time a reduction over the 2-D (dp, tp) mesh takes two collectives
# instead of one: here that is one scalar per step (the gradient norm) and the one-off gathers of growth.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


class ParallelTrainer(Trainer):
    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        device = init_distributed(cfg.train.device, cfg.parallel.timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main, self.distributed = self.rank == 0, True
        self._meshes: dict[Layout, Any] = {}
        # Every stage's layout is checked now, not hours into the run when its growth comes.
        layouts = [self._layout_of(i, cfg) for i in range(max(1, len(cfg.stages)))]
        self.layout = layouts[0]
        super().__init__(cfg, log if self.is_main else _quiet, device=device)
        for stage, layout in zip(self.stages[1:], layouts[1:]):
            self._check_model(stage.model, layout)
        self.loader = self._loader(0)
        if self.peak_flops:  # MFU: the run's tokens/s against the peak of all its GPUs
            self.peak_flops *= self.world

    # ---- layout ------------------------------------------------------------------------------------
    def _layout_of(self, stage: int, cfg: Config | None = None) -> Layout:
        cfg = cfg or self.cfg
        tp, pp, dp = cfg.stage_layout(cfg.stages[stage] if cfg.stages else None)
        layout = Layout(tp=tp, pp=pp, dp=dp, dp_replicate=cfg.parallel.dp_replicate)
        where = f"stages[{stage}]" if cfg.stages else "[parallel]"
        if dp % layout.dp_replicate:
            raise FlmError(f"{where}: parallel.dp_replicate ({layout.dp_replicate}) must divide dp ({dp})")
        if layout.world_size != self.world:
            raise FlmError(f"{where}: layout {layout.describe()} needs {layout.world_size} processes, "
                           f"but torchrun started {self.world}")
        if cfg.train.batch_size % dp:
            raise FlmError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the data-parallel "
                           f"degree ({dp}): each rank reads an equal slice of every micro-batch")
        return layout

    @property
    def mesh(self):
        if self.layout not in self._meshes:
            self._meshes[self.layout] = build_mesh(self.layout, self.device)
        return self._meshes[self.layout]

    def _loader(self, samples_seen: int):
        """This rank's slice of every global micro-batch, continuing at `samples_seen` global samples."""
        tc, dp = self.cfg.train, self.layout.dp
        loader = self.data.train_loader(tc.batch_size // dp, tc.seq_len, seed=tc.seed, rank=dp_rank(self.mesh),
                                        world_size=dp)
        loader.samples_seen = samples_seen
        return loader

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def pp_microbatches(self) -> int:
        return self.cfg.parallel.pp_microbatches or self.layout.pp

    # ---- model ----------------------------------------------------------------------------------
    def _shell(self, cfg: ModelConfig) -> FLM:
        """A model of shape `cfg` sharded over the current layout (this process's pipeline stage, its
        tensor-parallel slices, its FSDP shards), with memory for its own pieces only and no values yet
        (rotary tables excepted). Under pipeline parallelism `self._root` is the stage module around it."""
        with torch.device("meta"):
            model = FLM(cfg)
        self._check_model(cfg, self.layout)
        self._root = parallelize(model, self.layout, self.mesh, self.cfg.parallel, self.cfg.train.compile,
                                 bf16=not isinstance(self.autocast, contextlib.nullcontext))
        self._root.to_empty(device=self.device)
        model.init_rotary()
        return model

    def _check_model(self, cfg: ModelConfig, layout: Layout) -> None:
        pc = self.cfg.parallel
        if layout.pp > 1:
            check_pipeline(cfg, layout.pp, self.cfg.train.batch_size // layout.dp,
                           pc.pp_microbatches or layout.pp)
            if pc.sequence_parallel and layout.tp > 1:
                raise FlmError("sequence parallelism with pipeline parallelism is not supported: set "
                               "parallel.sequence_parallel = false or parallel.pp = 1")
        if layout.tp > 1:
            check_tensor_parallel(cfg, layout.tp, self.cfg.train.seq_len, pc.sequence_parallel)

    def _new_model(self, cfg: ModelConfig) -> FLM:
        """Sharded, with exactly the initial values of `FLM(cfg)` from the same seed, made tensor by tensor."""
        model = self._shell(cfg)
        write_pieces(dict(model.named_parameters()), fresh_values(cfg))
        return model

    def _use(self, model: FLM, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make the sharded `model` (just built by `_shell`) the one being trained; under pipeline parallelism
        its stage runs through a schedule."""
        super()._use(model, optimizer)
        self.schedule = None
        if self.layout.pp > 1:
            self.schedule = build_schedule(self._root, self.mesh["pp"], self.device, self.cfg.parallel.pp_schedule,
                                           self.pp_microbatches, self._pipeline_loss)

    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A pipeline micro-batch's loss: its summed cross-entropy times the weight of one token."""
        return lm_loss(logits, targets, reduction="sum") * self._token_weight

    def _pipeline_run(self, x: torch.Tensor, y: torch.Tensor, token_weight: float, train: bool) -> torch.Tensor:
        """One micro-batch through the pipeline (forward, and backward if `train`); returns the sum of its
        micro-batches' losses, on every stage (the last one computes it)."""
        self._token_weight = token_weight
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        first, last = self.pp_rank == 0, self.last_stage
        with self._context():
            run(*([x] if first else []), **({"target": y, "losses": losses} if last else {}))
        total = torch.stack([_local(v).detach().float() for v in losses]).sum() if last else torch.zeros(())
        total = total.to(self.device)
        dist.all_reduce(total, group=self.mesh["pp"].get_group())
        return total

    def _context(self) -> contextlib.ExitStack:
        """What a forward/backward under tensor parallelism needs: the loss over vocabulary-sharded
        logits, and plain mask buffers treated as replicated values."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast)
        if self.layout.tp > 1:
            stack.enter_context(loss_parallel())
            stack.enter_context(implicit_replication())
        return stack

    # ---- hooks of the training step ----------------------------------------------------------------
    def _global_count(self, n: int) -> int:
        """Loss tokens of the step over all data-parallel ranks (tensor/pipeline ranks read the same ones)."""
        total = torch.tensor(n, dtype=torch.int64, device=self.device)
        dist.all_reduce(total)
        return int(total) // (self.layout.tp * self.layout.pp)

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, n: int, n_step: int) -> torch.Tensor:
        """As one process, but FSDP averages gradients over the dp ranks, so the weight is n·dp / n_step;
        a micro-batch without loss tokens still runs (every rank takes part in every collective), at weight 0."""
        if self.schedule is not None:  # summed token losses, each weighted dp / n_step
            total = self._pipeline_run(x, y, self.layout.dp / n_step, train=True)
            return total * n_step / (self.layout.dp * n) if n else torch.zeros((), device=self.device)
        with self._context():
            logits, loss = self.model(x, y)
            objective = loss * (n * self.layout.dp / n_step) if n else logits.sum() * 0.0
            objective.backward()
        return _local(loss.detach()) if n else torch.zeros((), device=self.device)

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        pp_group = self.mesh["pp"].get_group() if self.layout.pp > 1 else None
        return clip_grad_norm(self.model.parameters(), max_norm, pp_group)

    def _apply_masks(self) -> None:
        blocks = held_blocks(self.model)
        apply_masks(self.model, self.ramp, blocks=blocks)
        if self.layout.tp > 1:  # heads and FFN units are split over tp: each rank keeps its part of the masks
            for block in blocks.values():
                block.attn.head_mask = local_slice(block.attn.head_mask, self.mesh["tp"])
                block.mlp.unit_mask = local_slice(block.mlp.unit_mask, self.mesh["tp"])

    def _data_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over data-parallel ranks of a value that the tensor- and pipeline-parallel ranks share."""
        total = value.detach().float().clone()
        dist.all_reduce(total)
        return total / (self.layout.tp * self.layout.pp)

    def _step_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """This rank's tokens' share of the step's mean, summed over the data-parallel ranks (a collective on
        one scalar, no host synchronisation): the step guard needs the same value on every rank."""
        return self._data_sum(loss)

    def weights_finite(self) -> bool:
        """Every rank's pieces finite (a minimum over all ranks)."""
        ok = torch.stack([torch.isfinite(_piece(p)).all() for p in self.model.parameters()]).all()
        flag = ok.to(torch.int32).to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def _batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The same value as one process: each data-parallel rank takes a slice of the batch (the whole batch
        when it is smaller than dp) and the slices' token sums make the batch's mean."""
        dp = self.layout.dp
        sliced = len(x) % dp == 0
        if sliced:
            part = dp_rank(self.mesh)
            x, y = x.chunk(dp)[part], y.chunk(dp)[part]
        x, y = x.to(self.device), y.to(self.device)
        n = int((y != IGNORE).sum())
        if self.schedule is not None:
            loss = self._pipeline_run(x, y, 1.0, train=False) / max(n, 1)
        else:
            with self._context():
                _, loss = self.model(x, y)
            loss = _local(loss).float()
        if sliced:
            loss = self._data_sum(loss * n if n else torch.zeros_like(loss)) / self._global_count(n)
        return loss

    def evaluate_teacher(self) -> dict[str, float]:
        """Teacher-signal accuracy needs whole logits; sharded over tp or pp it is left to `flm eval teacher`."""
        if self.layout.tp > 1 or self.layout.pp > 1:
            return {}
        return super().evaluate_teacher()

    def _grow_into(self, nxt: Stage) -> Ramp:
        """Grow the sharded model and Adam state into stage `nxt`, under that stage's layout."""
        old_cfg = self.model.cfg
        old = OldModel(self.optimizer, old_cfg, self.layout.pp, self.mesh["pp"])
        self.layout = self._layout_of(nxt.index)
        sources = layer_sources(old_cfg.n_layers, nxt.model.n_layers, nxt.new_layers)
        model = self._shell(nxt.model)
        optimizer = grow_sharded(old, model, sources, self.cfg.train, seed=self.cfg.train.seed, index=nxt.index,
                                 operator=nxt.operator, noise=nxt.clone_noise)
        del old
        self._use(model, optimizer)
        self.loader = self._loader(self.loader.samples_seen)  # the data-parallel slices may have changed
        self.ramp = Ramp(old_cfg, sources, nxt.ramp_steps, operator=nxt.operator)
        self._apply_masks()
        return self.ramp

    def sample(self, prompt: str, max_new_tokens: int, seed: int = 0) -> str | None:
        """No sampling from a sharded model: `flm generate RUN_DIR` reads the sharded checkpoint."""
        return None

    def describe(self) -> str:
        pc = self.cfg.parallel
        extras = [name for name, on in (("sequence parallel", pc.sequence_parallel and self.layout.tp > 1),
                                        ("activation checkpointing", pc.activation_checkpointing)) if on]
        return (super().describe() + f"\nparallel: {self.world} processes, {self.layout.describe()}"
                + "".join(f", {e}" for e in extras))

    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """The base loop; a collective that times out (a stuck rank) or loses a peer ends it with one line."""
        try:
            return super().train(until_step)
        except RuntimeError as e:  # gloo raises RuntimeError, NCCL DistBackendError (a RuntimeError too)
            text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            if "timed out" in text.lower():
                raise TrainingHalted(f"rank {self.rank}: a collective did not finish within parallel.timeout_s = "
                                     f"{self.cfg.parallel.timeout_s:g} s: another rank is stuck (stopped, swapping, a "
                                     f"hung GPU) or gone; {self._last_good()}") from None
            if isinstance(e, dist.DistError):
                raise TrainingHalted(f"rank {self.rank}: lost another rank ({text}); {self._last_good()}") from None
            raise

    def close(self) -> None:
        super().close()
        dist.destroy_process_group()

    # ---- checkpoints -------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(),
                "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                           "dp_replicate": self.layout.dp_replicate, "world_size": self.world}}

    def _load_checkpoint(self, path: Path, meta: dict[str, Any], stage: int) -> None:
        if stage != self.stage:
            self.stage, self.layout = stage, self._layout_of(stage)
            self._use(self._shell(self.stages[stage].model))  # the checkpoint fills it
            self.loader = self._loader(0)
        saved_world = meta["layout"]["world_size"] if is_sharded(path) else 1
        self.log(f"loading {path}, saved with {saved_world} processes, into {self.layout.describe()}")
        load_model(path, named_params(self.optimizer), partial=self.layout.pp > 1)
        load_train_state(path, self.optimizer, self.rank, self.world)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value as a plain tensor (plain tensors pass through)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _piece(t: torch.Tensor) -> torch.Tensor:
    """This rank's own piece of a sharded parameter (plain tensors pass through)."""
    return t.to_local() if hasattr(t, "to_local") else t


def start_parallel(cfg: Config, prepare: Callable[[Any], Any], log: Callable[[str], None] = print) -> Trainer:
    """The ParallelTrainer of this torchrun process; the first process prepares the data while the others wait."""
    init_distributed(cfg.train.device, cfg.parallel.timeout_s)
    if dist.get_rank() == 0:
        prepare(cfg.data)
    dist.barrier()
    return ParallelTrainer(cfg, log)
