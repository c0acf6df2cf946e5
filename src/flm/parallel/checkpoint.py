"""Distributed checkpoints: torch.distributed.checkpoint (DCP) writing safetensors, resharded on load.

A sharded checkpoint is an ordinary checkpoint folder (`step_NNNNNNNN/`, written in a hidden folder
and renamed into place, last K kept, meta.json, tokenizer) whose tensors are in `sharded/`: every
process writes the pieces it owns through DCP's safetensors writer, one file per process, each
piece's offset in the file header (JSON, nothing pickled). Tensors are addressed by the same names
as in single-process checkpoints (`blocks.3.mlp.fc1.weight`, `opt.blocks.3.mlp.fc1.weight.exp_avg`).

Loading asks DCP for exactly the pieces the loading process owns under its own layout, so a
checkpoint saved at dp2 x tp2 resumes at dp4, at tp4 x pp2, or in one process without a process
group (`flm train`, `flm generate`, `flm export` read it like any checkpoint). Per-process RNG states
sit in `rng/rank_R.safetensors` and are restored when the number of processes is unchanged.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from flm.errors import FlmError
from flm.parallel.pieces import shard_like, write_pieces
from flm.train.adamw import scalar_step
from flm.train.checkpoint import SHARDED


def named_params(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The model's parameters by name, each tensor once (the optimizer groups carry the names)."""
    return {name: p for group in optimizer.param_groups for name, p in zip(group["names"], group["params"])}


def train_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """What DCP saves and loads: parameters and Adam state (moments, step counts) by name."""
    out = {}
    for name, p in named_params(optimizer).items():
        out[name] = p
        for key, value in optimizer.state.get(p, {}).items():
            out[f"opt.{name}.{key}"] = value
    return out


def save_sharded(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its pieces into `folder/sharded/` and its RNG state; collective."""
    dcp.save(train_state(optimizer), storage_writer=HuggingFaceStorageWriter(str(folder / SHARDED),
                                                                             save_distributed=True))
    (folder / "rng").mkdir(exist_ok=True)
    save_file({"torch_cpu": torch.get_rng_state(), **_cuda_rng()}, str(folder / "rng" / f"rank_{dist.get_rank()}.safetensors"))


def _cuda_rng() -> dict[str, torch.Tensor]:
    return {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}


def _saved_shapes(folder: Path) -> dict[str, torch.Size]:
    try:
        meta = HuggingFaceStorageReader(str(folder / SHARDED)).read_metadata()
    except Exception as e:  # a missing or corrupt file: the user's checkpoint, not our bug
        raise FlmError(f"cannot read the sharded checkpoint {folder}: {e}") from None
    return {key: md.size for key, md in meta.state_dict_metadata.items()}


def load_sharded(folder: Path, optimizer: torch.optim.Optimizer | None, params: dict[str, torch.Tensor],
                 distributed: bool, rng_rank: int | None = None) -> None:
    """Load parameters (and, with `optimizer`, Adam state) into this process's pieces, in place.

    Adam state is created empty first, shaped like its parameter (sharded the same way), with a
    scalar or per-element step count as saved, and DCP fills it. `rng_rank`: whose saved RNG state
    this process continues with (None: leave the RNG alone).
    """
    shapes = _saved_shapes(folder)
    missing = sorted(set(params) - set(shapes))
    if missing:
        raise FlmError(f"checkpoint {folder} does not fit this model: missing {missing[:3]}")
    for name, p in params.items():
        if tuple(shapes[name]) != tuple(p.shape):
            raise FlmError(f"checkpoint {folder}: {name} has shape {tuple(shapes[name])}, "
                           f"model expects {tuple(p.shape)}")
    wanted = dict(params)
    if optimizer is not None:
        for name, p in params.items():
            if f"opt.{name}.exp_avg" not in shapes:
                continue
            per_element = len(shapes[f"opt.{name}.step"]) > 0
            state = {"step": torch.zeros_like(p) if per_element else scalar_step(0, p.device),
                     "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            optimizer.state[p] = state
            wanted.update({f"opt.{name}.{k}": v for k, v in state.items()})
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is what no_dist asks for
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(folder / SHARDED)), no_dist=not distributed)
    if rng_rank is not None:
        _restore_rng(folder, rng_rank)


def _restore_rng(folder: Path, rank: int) -> None:
    path = folder / "rng" / f"rank_{rank}.safetensors"
    if not path.is_file():
        return
    states = load_file(str(path))
    torch.set_rng_state(states["torch_cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


@torch.no_grad()
def load_whole(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    """Load a single-process checkpoint (`model.safetensors`, `train_state.safetensors`) into a sharded model:
    each tensor is read whole from the file, one at a time, and every process keeps its piece."""
    params = named_params(optimizer)
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f, \
                safe_open(str(folder / "train_state.safetensors"), framework="pt") as g:
            missing = sorted(set(params) - set(f.keys()))
            if missing:
                raise FlmError(f"checkpoint {folder} does not fit this model: missing {missing[:3]}")
            write_pieces(params, ((name, f.get_tensor(name)) for name in params))
            saved = set(g.keys())
            for name, p in params.items():
                fields = {k: f"opt.{name}.{k}" for k in ("exp_avg", "exp_avg_sq", "step")}
                if all(key in saved for key in fields.values()):
                    state = {k: g.get_tensor(key) for k, key in fields.items()}
                    optimizer.state[p] = {k: scalar_step(v, p.device) if k == "step" and v.dim() == 0
                                          else shard_like(p, v) for k, v in state.items()}
    except (SafetensorError, OSError) as e:
        raise FlmError(f"cannot read {folder}: {e}") from None
