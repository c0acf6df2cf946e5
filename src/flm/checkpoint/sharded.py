"""The sharded format, written by all processes of a torchrun job: torch.distributed.checkpoint (DCP) with its
safetensors writer, resharded on load.

Tensors sit in `sharded/`: every process writes the pieces it owns, one file per process, each piece's offset
in the file header (JSON, nothing pickled), under the names of flm.checkpoint.state (parameters, and Adam state
as `opt.<name>.<field>`). Each process's generators sit in `rng/rank_R.safetensors`. Loading asks DCP for exactly
the pieces the loading process owns under its own layout, so a checkpoint saved at dp2 x tp2 resumes at dp4, at
tp4 x pp2, or in one process without a process group.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from flm.checkpoint.folders import RNG_DIR, SHARDED
from flm.checkpoint.pieces import local_device
from flm.checkpoint.state import adam_fields, adam_key, named_params, optimizer_state, restore_rng, rng_state
from flm.errors import FlmError


def save_sharded(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its pieces of the parameters and Adam state, and its generators; collective."""
    dcp.save({**named_params(optimizer), **optimizer_state(optimizer)},
             storage_writer=HuggingFaceStorageWriter(str(folder / SHARDED), save_distributed=True))
    (folder / RNG_DIR).mkdir(exist_ok=True)
    save_file(rng_state(), str(rng_file(folder, dist.get_rank())))


def rng_file(folder: Path, rank: int) -> Path:
    """Where process `rank` of the job that wrote checkpoint `folder` saved its generators."""
    return folder / RNG_DIR / f"rank_{rank}.safetensors"


def saved_tensors(folder: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor of the checkpoint by key, with its whole shape and dtype (read from DCP's metadata)."""
    try:
        meta = HuggingFaceStorageReader(str(folder / SHARDED)).read_metadata()
    except Exception as e:  # a missing or corrupt file: the user's checkpoint, not our bug
        raise FlmError(f"cannot read the sharded checkpoint {folder}: {e}") from None
    return {key: (md.size, md.properties.dtype) for key, md in meta.state_dict_metadata.items()}


def load_sharded(folder: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
                 distributed: bool, rng_rank: int | None = None) -> None:
    """Load parameters (and, with `optimizer`, Adam state) into this process's pieces, in place.

    Adam state is created empty first, each field shaped and typed as saved (sharded like its parameter when
    it has the parameter's shape), and DCP fills it. `rng_rank`: whose saved generators this process continues
    with (None: leave them alone).
    """
    saved = saved_tensors(folder)
    missing = sorted(set(params) - set(saved))
    if missing:
        raise FlmError(f"checkpoint {folder} does not fit this model: missing {missing[:3]}")
    for name, p in params.items():
        if tuple(saved[name][0]) != tuple(p.shape):
            raise FlmError(f"checkpoint {folder}: {name} has shape {tuple(saved[name][0])}, "
                           f"model expects {tuple(p.shape)}")
    wanted = dict(params)
    if optimizer is not None:
        fields = adam_fields(saved)
        for name, p in named_params(optimizer).items():
            state = {}
            for field in fields.get(name, ()):
                shape, dtype = saved[adam_key(name, field)]
                state[field] = (torch.zeros_like(p, dtype=dtype) if tuple(shape) == tuple(p.shape) and len(shape)
                                else torch.zeros(shape, dtype=dtype, device=local_device(p)))
            if state:
                optimizer.state[p] = state
                wanted.update({adam_key(name, field): value for field, value in state.items()})
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is what no_dist asks for
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(folder / SHARDED)), no_dist=not distributed)
    path = rng_file(folder, rng_rank)
    if rng_rank is not None and path.is_file():
        restore_rng(load_file(str(path)))
