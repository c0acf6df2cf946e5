"""Token shards: a 64-byte header and a flat array of token ids, memory-mapped for reading.

Layout (little-endian): magic b"FLMSHARD", u32 format version, u32 dtype code (2 = uint16, 4 = uint32),
u64 vocab_size, u64 token_count, zero padding to 64 bytes, then token_count ids. The header lets a reader
reject a truncated or foreign file before training on garbage.

Loss masks sit beside the token shards of sources that have them (instruction and teacher data): the same header
with magic b"FLMLMASK", dtype code 1 (uint8), vocab_size 2 and token_count entries, one 0/1 byte per token of the
shard (1: the token is a loss target). A byte per token keeps any slice a plain memory-map read.
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
MASK_MAGIC = b"FLMLMASK"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQ")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_MASK_CODE, _MASK_DTYPE = 1, np.dtype("u1")


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


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a 0/1 loss mask file, atomically, in the format described in the module docstring."""
    path = Path(path)
    mask = np.asarray(mask)
    if mask.ndim != 1 or mask.dtype.kind not in "biu" or (mask.size and int(mask.max()) > 1) or \
            (mask.size and int(mask.min()) < 0):
        raise FlmError(f"cannot write mask {path.name}: the mask must be a 1-D array of 0s and 1s")
    header = _HEADER.pack(MASK_MAGIC, VERSION, _MASK_CODE, 2, mask.size).ljust(HEADER_SIZE, b"\0")
    atomic_write(path, [header, np.ascontiguousarray(mask, dtype=_MASK_DTYPE).data])


def read_shard_header(path: str | Path) -> ShardHeader:
    """Parse and check a shard's header against the file size; any mismatch is an FlmError naming the file."""
    return _read_header(path, MAGIC, "token shard")


def read_mask_header(path: str | Path) -> ShardHeader:
    """Parse and check a loss mask file's header, as `read_shard_header` does for token shards."""
    return _read_header(path, MASK_MAGIC, "loss mask")


def _read_header(path: str | Path, magic_expected: bytes, what_file: str) -> ShardHeader:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except OSError as e:
        raise FlmError(f"cannot read {what_file} {path}: {e.strerror or e}") from e
    if len(raw) < HEADER_SIZE:
        raise FlmError(f"bad {what_file} {path}: {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, code, vocab_size, count = _HEADER.unpack_from(raw)
    if magic != magic_expected:
        raise FlmError(f"bad {what_file} {path}: wrong magic {magic!r}, not an flm {what_file}")
    if version != VERSION:
        raise FlmError(f"bad {what_file} {path}: unknown format version {version} (this flm reads version {VERSION})")
    codes = {_MASK_CODE: _MASK_DTYPE} if magic == MASK_MAGIC else _DTYPES
    if code not in codes:
        raise FlmError(f"bad {what_file} {path}: unknown dtype code {code} (expected {' or '.join(map(str, codes))})")
    dtype = codes[code]
    if vocab_size > np.iinfo(dtype).max + 1:
        raise FlmError(f"bad {what_file} {path}: dtype {dtype.name} cannot hold vocab_size {vocab_size}")
    expected = HEADER_SIZE + count * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise FlmError(f"bad {what_file} {path}: {what} ({size} bytes, header promises {expected})")
    return ShardHeader(version, dtype, vocab_size, count)


def read_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as a read-only memory map (nothing is loaded until it is indexed)."""
    return _map(path, read_shard_header(path))


def read_mask(path: str | Path) -> np.ndarray:
    """A loss mask file's 0/1 bytes as a read-only memory map."""
    return _map(path, read_mask_header(path))


def _map(path: str | Path, header: ShardHeader) -> np.ndarray:
    if header.token_count == 0:
        return np.empty(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.token_count,))
