"""The whole format, written by one process: `model.safetensors` (weights) and `train_state.safetensors`
(Adam state and the RNG state, keys of flm.checkpoint.state). Nothing is pickled.

Loading reads one tensor at a time and gives each parameter its piece (flm.checkpoint.pieces), so a model
sharded over any layout loads a whole checkpoint without ever holding more than one tensor whole. `WholeWriter`
writes the same two files one tensor at a time, for a model that does not fit in memory (`flm grow`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from flm.checkpoint.folders import MODEL_FILE, STATE_FILE
from flm.checkpoint.pieces import place_state, write_pieces
from flm.checkpoint.state import (adam_fields, adam_key, generator_of, named_params, optimizer_state,
                                  persistent_tensors, restore_rng, rng_key, rng_state)
from flm.checkpoint.stream import StreamingSafetensors
from flm.errors import FlmError


def save_whole(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Write the two files into `folder` (raises OSError / SafetensorError on a write error). Without an
    optimizer, the checkpoint's Adam state is fresh (a model imported from elsewhere)."""
    host = lambda tensors: {k: v.detach().contiguous().cpu() for k, v in tensors.items()}  # noqa: E731
    save_file(host(persistent_tensors(model)), str(folder / MODEL_FILE))
    rng = {rng_key(k): v for k, v in rng_state().items()}
    adam = host(optimizer_state(optimizer)) if optimizer is not None else {}
    save_file({**adam, **rng}, str(folder / STATE_FILE))


class WholeWriter:
    """The two files of `folder` written one tensor at a time (flm.checkpoint.stream); `close` when all are
    added, `discard` on an error."""

    def __init__(self, folder: Path):
        self._model = StreamingSafetensors(Path(folder) / MODEL_FILE)
        self._state = StreamingSafetensors(Path(folder) / STATE_FILE)

    def weight(self, name: str, value: torch.Tensor) -> None:
        self._model.add(name, value)

    def adam(self, name: str, field: str, value: torch.Tensor) -> None:
        self._state.add(adam_key(name, field), value)

    def rng(self, states: dict[str, torch.Tensor]) -> None:
        for generator, value in states.items():
            self._state.add(rng_key(generator), value)

    def close(self) -> None:
        self._model.close()
        self._state.close()

    def discard(self) -> None:
        self._model.discard()
        self._state.discard()


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise FlmError(f"cannot read {path}: {e}") from None


def saved_rng(state_file) -> dict[str, torch.Tensor]:
    """The generators' states in an open `train_state.safetensors`."""
    return {g: state_file.get_tensor(key) for key in state_file.keys() if (g := generator_of(key))}


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
            fields = adam_fields(f.keys())
            for name, p in params.items():
                if name in fields:
                    optimizer.state[p] = {field: place_state(p, f.get_tensor(adam_key(name, field)))
                                          for field in fields[name]}
            if restore:
                restore_rng(saved_rng(f))
    except SafetensorError as e:
        raise FlmError(f"cannot read {path}: {e}") from None
