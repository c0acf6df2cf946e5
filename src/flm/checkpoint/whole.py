"""The whole format, written by one process: `model.safetensors` (weights) and `train_state.safetensors`
(Adam state and the RNG state, keys of flm.checkpoint.state, the RNG's prefixed `rng.`). Nothing is pickled.

Loading reads one tensor at a time and gives each parameter its piece (flm.checkpoint.pieces), so a model
sharded over any layout loads a whole checkpoint without ever holding more than one tensor whole.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from flm.checkpoint.pieces import place_state, write_pieces
from flm.checkpoint.state import named_params, optimizer_state, persistent_tensors, restore_rng, rng_state, split_key
from flm.errors import FlmError

MODEL_FILE, STATE_FILE = "model.safetensors", "train_state.safetensors"


def save_whole(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Write the two files into `folder` (raises OSError / SafetensorError on a write error). Without an
    optimizer, the checkpoint's Adam state is fresh (a model imported from elsewhere)."""
    host = lambda tensors: {k: v.detach().contiguous().cpu() for k, v in tensors.items()}  # noqa: E731
    save_file(host(persistent_tensors(model)), str(folder / MODEL_FILE))
    rng = {f"rng.{k}": v for k, v in rng_state().items()}
    adam = host(optimizer_state(optimizer)) if optimizer is not None else {}
    save_file({**adam, **rng}, str(folder / STATE_FILE))


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise FlmError(f"cannot read {path}: {e}") from None


def load_whole_model(folder: Path, params: dict[str, torch.Tensor], partial: bool = False) -> None:
    """Each tensor of `params` (by name; plain or sharded) from `folder/model.safetensors`, one at a time.
    `partial`: the model holds some of the checkpoint's tensors only (a pipeline stage)."""
    path = Path(folder) / MODEL_FILE
    try:
        with _open(path) as f:
            saved = set(f.keys())
            missing, unexpected = sorted(set(params) - saved), sorted(saved - set(params))
            if missing or (unexpected and not partial):
                raise FlmError(f"checkpoint {folder} does not fit this model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
            for name, p in params.items():
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(p.shape):
                    raise FlmError(f"checkpoint {folder}: {name} has shape {shape}, model expects {tuple(p.shape)}")
            write_pieces(params, ((name, f.get_tensor(name)) for name in params))
    except SafetensorError as e:
        raise FlmError(f"cannot read {path}: {e}") from None


def load_whole_train_state(folder: Path, optimizer: torch.optim.Optimizer, restore: bool) -> None:
    """Adam state by parameter name into `optimizer` (each field placed like its parameter), and, if
    `restore`, the generators of the process that wrote it."""
    path = Path(folder) / STATE_FILE
    params = named_params(optimizer)
    try:
        with _open(path) as f:
            fields: dict[str, list[str]] = {}
            for key in f.keys():
                if key.startswith("opt."):
                    name, field = split_key(key)
                    fields.setdefault(name, []).append(field)
            for name, p in params.items():
                if name in fields:
                    optimizer.state[p] = {field: place_state(p, f.get_tensor(f"opt.{name}.{field}"))
                                          for field in fields[name]}
            if restore:
                restore_rng({k[len("rng."):]: f.get_tensor(k) for k in f.keys() if k.startswith("rng.")})
    except SafetensorError as e:
        raise FlmError(f"cannot read {path}: {e}") from None
