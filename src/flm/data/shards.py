"""Token shards: a 64-byte header and a flat array of token ids, memory-mapped for reading.

Layout (little-endian): magic b"FLMSHARD", u32 format version, u32 dtype code (2 = uint16, 4 = uint32),
u64 vocab_size, u64 token_count, zero padding to 64 bytes, then token_count ids. The header lets a reader
reject a truncated or foreign file before training on garbage.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flm.errors import FlmError

MAGIC = b"FLMSHARD"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQ")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype: np.dtype
    vocab_size: int
    token_count: int


def shard_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every id: half the disk and page cache for vocabularies up to 65536."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write `tokens` as a shard, atomically: readers see the old file or the complete new one, never a part."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise FlmError(f"cannot write shard {path.name}: tokens must be a 1-D integer array")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise FlmError(f"cannot write shard {path.name}: token ids must be in [0, {vocab_size}), "
                       f"got [{int(tokens.min())}, {int(tokens.max())}]")
    dtype = shard_dtype(vocab_size)
    code = next(c for c, d in _DTYPES.items() if d == dtype)
    header = _HEADER.pack(MAGIC, VERSION, code, vocab_size, tokens.size).ljust(HEADER_SIZE, b"\0")
    atomic_write(path, [header, np.ascontiguousarray(tokens, dtype=dtype).data])


def atomic_write(path: Path, parts: Iterable[bytes | memoryview]) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_shard_header(path: str | Path) -> ShardHeader:
    """Parse and check a shard's header against the file size; any mismatch is an FlmError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except OSError as e:
        raise FlmError(f"cannot read shard {path}: {e.strerror or e}") from e
    if len(raw) < HEADER_SIZE:
        raise FlmError(f"bad shard {path}: {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, code, vocab_size, count = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise FlmError(f"bad shard {path}: wrong magic {magic!r}, not an flm token shard")
    if version != VERSION:
        raise FlmError(f"bad shard {path}: unknown format version {version} (this flm reads version {VERSION})")
    if code not in _DTYPES:
        raise FlmError(f"bad shard {path}: unknown dtype code {code} (expected 2 or 4)")
    dtype = _DTYPES[code]
    if vocab_size > np.iinfo(dtype).max + 1:
        raise FlmError(f"bad shard {path}: dtype {dtype.name} cannot hold vocab_size {vocab_size}")
    expected = HEADER_SIZE + count * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise FlmError(f"bad shard {path}: {what} ({size} bytes, header promises {expected})")
    return ShardHeader(version, dtype, vocab_size, count)


def read_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as a read-only memory map (nothing is loaded until it is indexed)."""
    header = read_shard_header(path)
    if header.token_count == 0:
        return np.empty(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.token_count,))
