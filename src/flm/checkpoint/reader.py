"""A checkpoint's tensors read one at a time, in either format: what `flm grow` grows and `flm export hf` copies,
without ever holding the whole model (a safetensors file is mapped only while one tensor is read; a sharded
checkpoint is asked for one tensor at a time)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from flm.checkpoint.folders import MODEL_FILE, SHARDED, STATE_FILE, is_sharded
from flm.checkpoint.state import adam_fields, adam_key, is_weight
from flm.checkpoint.whole import saved_rng
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
    """`weights` (name -> tensor) and `adam` (name -> {field: tensor}) read when asked for; `shapes` of the
    weights known without reading them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.sharded = is_sharded(self.path)
        shapes: dict[str, tuple[int, ...]] = {}
        try:
            if self.sharded:
                from flm.checkpoint.sharded import saved_tensors

                self._saved = saved_tensors(self.path)
                shapes = {key: tuple(shape) for key, (shape, _) in self._saved.items()}
            else:
                for file in (MODEL_FILE, STATE_FILE):
                    with safe_open(str(self.path / file), framework="pt") as f:
                        shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except (SafetensorError, OSError) as e:
            raise FlmError(f"cannot read {self.path}: {e}") from None
        self._fields = adam_fields(shapes)
        self.shapes = {key: shape for key, shape in shapes.items() if is_weight(key)}
        self.weights: Mapping[str, torch.Tensor] = Lazy(list(self.shapes), self._tensor)
        self.adam: Mapping[str, dict[str, torch.Tensor]] = Lazy(
            list(self._fields), lambda name: {f: self._tensor(adam_key(name, f)) for f in self._fields[name]})

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            if not self.sharded:  # opened for each tensor: the mapping, and its pages, go when it is read
                file = MODEL_FILE if is_weight(key) else STATE_FILE
                with safe_open(str(self.path / file), framework="pt") as f:
                    return f.get_tensor(key)
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import HuggingFaceStorageReader

            shape, dtype = self._saved[key]
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
            from flm.checkpoint.sharded import rng_file

            path = rng_file(self.path, 0)
            return load_file(str(path)) if path.is_file() else {}
        with safe_open(str(self.path / STATE_FILE), framework="pt") as f:
            return saved_rng(f)
