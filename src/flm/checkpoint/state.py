"""The one naming scheme of a checkpoint's tensors, shared by both formats.

- weights by their parameter name (`blocks.3.mlp.fc1.weight`), each shared tensor once (a tied head is
  saved as the embedding);
- Adam state as `opt.<parameter name>.<field>` (exp_avg, exp_avg_sq, step, and `age` for grown tensors:
  flm.train.adamw);
- the random number generators as `torch_cpu` and `cuda` (this process's device), prefixed `rng.` where they
  share a file with Adam state (the whole format).

Keys are built and taken apart only by the functions here, so the scheme is spelled once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_ADAM, _RNG = "opt.", "rng."


def adam_key(name: str, field: str) -> str:
    """The key of Adam field `field` of parameter `name`."""
    return f"{_ADAM}{name}.{field}"


def adam_fields(keys: Iterable[str]) -> dict[str, list[str]]:
    """The Adam fields saved for each parameter, by parameter name, among a file's `keys`."""
    out: dict[str, list[str]] = {}
    for key in keys:
        if key.startswith(_ADAM):
            name, field = key[len(_ADAM):].rsplit(".", 1)
            out.setdefault(name, []).append(field)
    return out


def rng_key(generator: str) -> str:
    """The key of a generator's state in a file shared with Adam state."""
    return _RNG + generator


def generator_of(key: str) -> str | None:
    """The generator whose state `key` holds; None for a weight or Adam state."""
    return key[len(_RNG):] if key.startswith(_RNG) else None


def is_weight(key: str) -> bool:
    return not key.startswith((_ADAM, _RNG))


def persistent_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's saved tensors by name, in place (DTensors stay sharded); each shared tensor once."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t.detach()
    return out


def named_params(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The model's parameters by name, each tensor once (the optimizer's groups carry the names)."""
    return {name: p for group in optimizer.param_groups for name, p in zip(group["names"], group["params"])}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam state keyed `opt.<name>.<field>`, in place."""
    out = {}
    for name, p in named_params(optimizer).items():
        for field, value in optimizer.state.get(p, {}).items():
            out[adam_key(name, field)] = value
    return out


def rng_state() -> dict[str, torch.Tensor]:
    """This process's generators: the CPU's, and its current GPU's on CUDA."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
