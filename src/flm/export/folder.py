"""What every Hugging Face folder flm writes shares, whatever the architecture: the weight files (one, or shards
with an index), streamed one tensor at a time from a checkpoint, and its JSON files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flm.checkpoint import CheckpointReader
from flm.checkpoint.stream import StreamingSafetensors
from flm.errors import FlmError

WEIGHTS_FILE = "model.safetensors"  # Hugging Face's names, whatever a checkpoint calls its own weights file
INDEX_FILE = "model.safetensors.index.json"


def plan_shards(names: list[str], sizes: list[int], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of at most `max_bytes` (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in zip(names, sizes):
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_weights(reader: CheckpointReader, expected: dict[str, tuple[int, ...]], out: Path, max_bytes: int,
                  dtype: torch.dtype, hf_name: Callable[[str], str],
                  value: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """The checkpoint's weights (either format) under their Hugging Face names (`hf_name`), in `dtype`, split into
    shards of at most `max_bytes`; one tensor in memory at a time. `expected` (flm name -> shape, in the order the
    files hold them) is checked against the checkpoint first; `value(name, tensor)` may transform a tensor (in
    float64 where it must round once) before its cast."""
    if reader.shapes != expected:
        wrong = sorted(set(reader.shapes.items()) ^ set(expected.items()))
        raise FlmError(f"{reader.path} does not match its config: first difference {wrong[0]}")
    names = list(expected)
    sizes = [torch.Size(expected[n]).numel() * dtype.itemsize for n in names]
    shards = plan_shards(names, sizes, max_bytes)
    files = ([WEIGHTS_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, shard in zip(files, shards):
        writer = StreamingSafetensors(out / file)
        try:
            for name in shard:
                tensor = reader.weights[name]
                if value is not None:
                    tensor = value(name, tensor)
                writer.add(hf_name(name), tensor.to(dtype))
                del tensor
            writer.close()
        except BaseException:
            writer.discard()
            raise
    if len(shards) > 1:
        weight_map = {hf_name(n): file for file, shard in zip(files, shards) for n in shard}
        write_json(out / INDEX_FILE, {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FlmError(f"cannot read {path}: {e}") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A folder's JSON file as Hugging Face writes them (indent 2, UTF-8); the folder is published as a whole."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
