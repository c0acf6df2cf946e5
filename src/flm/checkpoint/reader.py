"""A checkpoint's tensors read one at a time, in either format: what `flm grow` grows, without ever holding the
whole model (a safetensors file is mapped only while one tensor is read; a sharded checkpoint is asked for one
tensor at a time)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from flm.checkpoint.folders import SHARDED, is_sharded
from flm.checkpoint.state import split_key
from flm.checkpoint.whole import MODEL_FILE, STATE_FILE
from flm.errors import FlmError


class Lazy(Mapping):
    """A read-only mapping whose values are made when asked for (read from disk, gathered from shards), and not
    kept: what lets growth hold one tensor at a time."""

    def __init__(self, keys: list[str], make: Callable[[str], object]):
        self._keys, self._set, self._make = list(keys), set(keys), make

    def __getitem__(self, key: str):
        if key not in self._set:
            raise KeyError(key)
        return self._make(key)

    def __contains__(self, key: object) -> bool:  # without making the value
        return key in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class CheckpointReader:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.sharded = is_sharded(self.path)
        try:
            if self.sharded:
                from flm.checkpoint.sharded import _saved

                self._shapes = _saved(self.path)
                keys = list(self._shapes)
            else:
                keys = []
                for file in (MODEL_FILE, STATE_FILE):
                    with safe_open(str(self.path / file), framework="pt") as f:
                        keys += list(f.keys())
        except (SafetensorError, OSError) as e:
            raise FlmError(f"cannot read {self.path}: {e}") from None
        self._fields: dict[str, list[str]] = {}
        for key in keys:
            if key.startswith("opt."):
                name, field = split_key(key)
                self._fields.setdefault(name, []).append(field)
        names = [k for k in keys if not k.startswith(("opt.", "rng."))]
        self.weights: Mapping[str, torch.Tensor] = Lazy(names, self._tensor)
        self.adam: Mapping[str, dict[str, torch.Tensor]] = Lazy(
            list(self._fields), lambda name: {f: self._tensor(f"opt.{name}.{f}") for f in self._fields[name]})

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            if not self.sharded:  # opened for each tensor: the mapping, and its pages, go when it is read
                file = STATE_FILE if key.startswith(("opt.", "rng.")) else MODEL_FILE
                with safe_open(str(self.path / file), framework="pt") as f:
                    return f.get_tensor(key)
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import HuggingFaceStorageReader

            shape, dtype = self._shapes[key]
            out = {key: torch.empty(shape, dtype=dtype)}
            with warnings.catch_warnings():  # DCP warns that it loads in one process, which is what no_dist asks for
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(out, storage_reader=HuggingFaceStorageReader(str(self.path / SHARDED)), no_dist=True)
            return out[key]
        except (SafetensorError, OSError) as e:
            raise FlmError(f"cannot read {key} from {self.path}: {e}") from None

    def rng(self) -> dict[str, torch.Tensor]:
        """The generators of the (first) process that wrote the checkpoint."""
        if self.sharded:
            path = self.path / "rng" / "rank_0.safetensors"
            return load_file(str(path)) if path.is_file() else {}
        with safe_open(str(self.path / STATE_FILE), framework="pt") as f:
            return {k[len("rng."):]: f.get_tensor(k) for k in f.keys() if k.startswith("rng.")}
