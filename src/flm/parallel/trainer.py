"""The placement of a torchrun job (flm.train.placement): the training loop's model spread over a 3-D layout.

Every process lays the model out on the meta device, keeps only its part (pipeline stage, tensor-
parallel slices, FSDP shards) and receives the values of that part tensor by tensor, exactly those
`build_model(cfg)` draws from the same seed. The data order does not depend on the layout: each optimizer
step reads the same global batch of train.batch_size x grad_accum sequences as one process would,
each data-parallel rank a contiguous slice of every micro-batch, and each rank's loss is weighted by
its share of the step's loss tokens over all ranks. So any layout computes what one process computes,
up to floating-point reduction order. Checkpoints are DCP (flm.checkpoint.sharded) and reshard to
any other layout on load; growth at a stage boundary reshards too (flm.parallel.grow)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import loss_parallel

from flm.config import Config, ModelConfig
from flm.config.layout import Layout
from flm.data.loader import IGNORE
from flm.errors import FlmError
from flm.growth import Ramp, apply_masks, layer_sources
from flm.model import FLM, build_model
from flm.model.decoder import held_blocks, lm_loss
from flm.model.registry import init_order
from flm.checkpoint import is_sharded, load_model, load_train_state
from flm.checkpoint.pieces import gather, write_pieces
from flm.checkpoint.state import named_params
from flm.parallel.grow import OldModel, fresh_values, grow_sharded
from flm.parallel.mesh import build_mesh, dp_rank, init_distributed
from flm.parallel.norms import clip_grad_norm
from flm.parallel.parallelize import parallelize
from flm.parallel.pipeline import build_schedule, check_pipeline
from flm.parallel.tensor import check_tensor_parallel, local_slice
from flm.train.optim import build_optimizer
from flm.train.placement import autocast_for, uses_bf16
from flm.train.schedule import Stage

T = TypeVar("T")

# DTensor warns, on every process, each time a reduction over the 2-D (dp, tp) mesh takes two collectives
# instead of one: here that is one scalar per step (the gradient norm) and the one-off gathers of growth.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


class Torchrun:
    """This process's part of the model under torchrun, each stage at its own layout ([parallel], or the stage's
    tp/pp/dp). Joins the process group (once, here) and checks every stage's layout against the job."""

    distributed = True

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = init_distributed(cfg.train.device, cfg.parallel.timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.bf16 = uses_bf16(cfg.train, self.device)
        self.autocast = autocast_for(self.bf16, self.device)
        self._meshes: dict[Layout, Any] = {}
        # Every stage's layout is checked now, not hours into the run when its growth comes.
        self.layouts = [self._layout_of(i) for i in range(max(1, len(cfg.stages)))]
        self.layout = self.layouts[0]
        self.schedule = None  # the pipeline schedule of the model built last (pipeline parallelism only)

    # ---- layout ------------------------------------------------------------------------------------
    def _layout_of(self, stage: int) -> Layout:
        cfg = self.cfg
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

    def check(self, stages: list[Stage]) -> None:
        for stage, layout in zip(stages, self.layouts):
            self._check_model(stage.model, layout)

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

    @property
    def mesh(self):
        if self.layout not in self._meshes:
            self._meshes[self.layout] = build_mesh(self.layout, self.device)
        return self._meshes[self.layout]

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    def run_once(self, fn: Callable[[], Any]) -> None:
        if self.is_main:
            fn()
        dist.barrier()

    def data_slice(self) -> tuple[int, int]:
        return dp_rank(self.mesh), self.layout.dp

    # ---- model ----------------------------------------------------------------------------------
    def _shell(self, cfg: ModelConfig) -> FLM:
        """A model of shape `cfg` sharded over the current layout (this process's pipeline stage, its
        tensor-parallel slices, its FSDP shards), with memory for its own pieces only and no values yet
        (rotary tables excepted). Under pipeline parallelism `self._root` is the stage module around it."""
        with torch.device("meta"):
            model = build_model(cfg)
        self._root = parallelize(model, self.layout, self.mesh, self.cfg.parallel, self.cfg.train.compile,
                                 bf16=self.bf16)
        self._root.to_empty(device=self.device)
        model.init_rotary()
        return model

    def _placed(self, model: FLM, optimizer: torch.optim.Optimizer | None = None
                ) -> tuple[FLM, torch.optim.Optimizer]:
        """The sharded `model` (just made by `_shell`) with `optimizer` (default: a fresh one); under pipeline
        parallelism its stage runs through a schedule."""
        optimizer = optimizer if optimizer is not None else build_optimizer(model, self.cfg.train)
        self.schedule = None
        if self.layout.pp > 1:
            self.schedule = build_schedule(self._root, self.mesh["pp"], self.device, self.cfg.parallel.pp_schedule,
                                           self.cfg.parallel.pp_microbatches or self.layout.pp, self._pipeline_loss)
        return model, optimizer

    def build(self, stage: Stage, init: bool = True) -> tuple[FLM, torch.optim.Optimizer]:
        """Sharded under `stage`'s layout; with `init`, exactly the initial values of `build_model(cfg)` from the
        same seed, made tensor by tensor."""
        self.layout = self.layouts[stage.index]
        model = self._shell(stage.model)
        if init:
            write_pieces(dict(model.named_parameters()), fresh_values(stage.model))
        return self._placed(model)

    def grow(self, model: FLM, optimizer: torch.optim.Optimizer, nxt: Stage
             ) -> tuple[FLM, torch.optim.Optimizer, Ramp]:
        """Grow the sharded model and Adam state into stage `nxt`, under that stage's layout."""
        tc, old_cfg = self.cfg.train, model.cfg
        old = OldModel(optimizer, old_cfg, self.layout.pp, self.mesh["pp"])
        self.layout = self.layouts[nxt.index]
        sources = layer_sources(old_cfg.n_layers, nxt.model.n_layers, nxt.new_layers)
        grown = self._shell(nxt.model)
        grown_optimizer = grow_sharded(old, grown, sources, tc, seed=tc.seed, index=nxt.index,
                                       operator=nxt.operator, noise=nxt.clone_noise, copy_noise=nxt.copy_noise)
        del old
        grown, grown_optimizer = self._placed(grown, grown_optimizer)
        ramp = Ramp(old_cfg, sources, nxt.ramp_steps, operator=nxt.operator)
        self.apply_masks(grown, ramp)
        return grown, grown_optimizer, ramp

    def apply_masks(self, model: FLM, ramp: Ramp) -> None:
        blocks = held_blocks(model)
        apply_masks(model, ramp, blocks=blocks)
        if self.layout.tp > 1:  # heads and FFN units are split over tp: each rank keeps its part of the masks
            for block in blocks.values():
                block.attn.head_mask = local_slice(block.attn.head_mask, self.mesh["tp"])
                block.mlp.unit_mask = local_slice(block.mlp.unit_mask, self.mesh["tp"])

    # ---- the training step ---------------------------------------------------------------------------
    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A pipeline micro-batch's loss: its summed cross-entropy times the weight of one token."""
        return lm_loss(logits, targets, reduction="sum") * self._token_weight

    def _pipeline_run(self, x: torch.Tensor, y: torch.Tensor, token_weight: float, train: bool) -> torch.Tensor:
        """One micro-batch through the pipeline (forward, and backward if `train`); returns the sum of its
        micro-batches' losses, on every stage (the last one computes it)."""
        self._token_weight = token_weight
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        first, last = self.pp_rank == 0, self.pp_rank == self.layout.pp - 1
        with self._context():
            run(*([x] if first else []), **({"target": y, "losses": losses} if last else {}))
        total = torch.stack([gather(v).detach().float() for v in losses]).sum() if last else torch.zeros(())
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

    def count(self, n: int) -> int:
        """Loss tokens of the step over all data-parallel ranks (tensor/pipeline ranks read the same ones)."""
        total = torch.tensor(n, dtype=torch.int64, device=self.device)
        dist.all_reduce(total)
        return int(total) // (self.layout.tp * self.layout.pp)

    def forward_backward(self, model: FLM, x: torch.Tensor, y: torch.Tensor, n: int, n_step: int) -> torch.Tensor:
        """As one process, but FSDP averages gradients over the dp ranks, so the weight is n·dp / n_step;
        a micro-batch without loss tokens still runs (every rank takes part in every collective), at weight 0."""
        if self.schedule is not None:  # summed token losses, each weighted dp / n_step
            total = self._pipeline_run(x, y, self.layout.dp / n_step, train=True)
            return total * n_step / (self.layout.dp * n) if n else torch.zeros((), device=self.device)
        with self._context():
            logits, loss = model(x, y)
            objective = loss * (n * self.layout.dp / n_step) if n else logits.sum() * 0.0
            objective.backward()
        return gather(loss.detach()) if n else torch.zeros((), device=self.device)

    def clip(self, model: FLM, max_norm: float) -> torch.Tensor:
        pp_group = self.mesh["pp"].get_group() if self.layout.pp > 1 else None
        return clip_grad_norm(model.parameters(), max_norm, pp_group)

    def _data_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over data-parallel ranks of a value that the tensor- and pipeline-parallel ranks share."""
        total = value.detach().float().clone()
        dist.all_reduce(total)
        return total / (self.layout.tp * self.layout.pp)

    def step_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """This rank's tokens' share of the step's mean, summed over the data-parallel ranks (a collective on
        one scalar, no host synchronisation): the step guard needs the same value on every rank."""
        return self._data_sum(loss)

    def weights_finite(self, model: FLM) -> bool:
        """Every rank's pieces finite (a minimum over all ranks)."""
        ok = torch.stack([torch.isfinite(_piece(p)).all() for p in model.parameters()]).all()
        flag = ok.to(torch.int32).to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def batch_loss(self, model: FLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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
                _, loss = model(x, y)
            loss = gather(loss).float()
        if sliced:
            loss = self._data_sum(loss * n if n else torch.zeros_like(loss)) / self.count(n)
        return loss

    @property
    def whole_logits(self) -> bool:
        return self.layout.tp == 1 and self.layout.pp == 1

    def whole_model(self, model: FLM, optimizer: torch.optim.Optimizer, ramp: Ramp | None) -> FLM | None:
        """Gathered tensor by tensor (a collective on every process, in the same order) into a whole model on the
        main process's device, with the ramp's masks."""
        cfg = model.cfg
        tensors = OldModel(optimizer, cfg, self.layout.pp, self.mesh["pp"]).weights
        whole = None
        if self.is_main:
            with torch.device("meta"):
                whole = build_model(cfg)
            whole.to_empty(device=self.device)
            if cfg.tie_embeddings:  # to_empty gives every module a tensor of its own
                whole.lm_head.weight = whole.embed.weight
            whole.init_rotary()
        params = dict(whole.named_parameters()) if whole is not None else {}
        with torch.no_grad():
            for name in init_order(cfg):
                value = tensors[name]
                if whole is not None:
                    params[name].copy_(value)
        if whole is not None and ramp is not None:
            apply_masks(whole, ramp)
        return whole

    def share(self, value: T) -> T:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---- checkpoints -------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        return {"layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                           "dp_replicate": self.layout.dp_replicate, "world_size": self.world}}

    def load(self, path: Path, meta: dict[str, Any], model: FLM, optimizer: torch.optim.Optimizer,
             log: Callable[[str], None]) -> None:
        saved_world = meta["layout"]["world_size"] if is_sharded(path) else 1
        log(f"loading {path}, saved with {saved_world} processes, into {self.layout.describe()}")
        load_model(path, named_params(optimizer), partial=self.layout.pp > 1)
        load_train_state(path, optimizer, self.rank, self.world)

    # ---- the job -----------------------------------------------------------------------------------
    def describe(self) -> str:
        pc = self.cfg.parallel
        extras = [name for name, on in (("sequence parallel", pc.sequence_parallel and self.layout.tp > 1),
                                        ("activation checkpointing", pc.activation_checkpointing)) if on]
        return f"parallel: {self.world} processes, {self.layout.describe()}" + "".join(f", {e}" for e in extras)

    def peer_failure(self, error: RuntimeError) -> str | None:
        """gloo raises RuntimeError, NCCL DistBackendError (a RuntimeError too); the timeout may be named on any
        line of a multi-line message."""
        whole = str(error).strip()
        text = whole.splitlines()[-1] if whole else type(error).__name__
        if any(word in whole.lower() for word in ("timed out", "timeout")):  # gloo says either
            return (f"rank {self.rank}: a collective did not finish within parallel.timeout_s = "
                    f"{self.cfg.parallel.timeout_s:g} s: another rank is stuck (stopped, swapping, a hung GPU) or gone")
        if isinstance(error, dist.DistError):
            return f"rank {self.rank}: lost another rank ({text})"
        return None

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _piece(t: torch.Tensor) -> torch.Tensor:
    """This rank's own piece of a sharded parameter (plain tensors pass through)."""
    return t.to_local() if hasattr(t, "to_local") else t
