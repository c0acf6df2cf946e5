"""Token shards: a 64-byte header and a flat array of token ids, memory-mapped for reading.

Layout (little-endian): magic b"FLMSHARD", u32 format version, u32 dtype code (2 = uint16, 4 = uint32),
u64 vocab_size, u64 token_count, zero padding to 64 bytes, then token_count ids. The header lets a reader
reject a truncated or foreign file before training on garbage, and `read_shard` checks every id against vocab_size.
The padding is reserved: a reader requires it to be zero, so a flipped byte there is reported as damage, and a
later format version can put fields there that no older reader silently ignores.

Loss masks sit beside the token shards of sources that have them (instruction and teacher data): the same header
with magic b"FLMLMASK", dtype code 1 (uint8), vocab_size 2 and token_count entries, one 0/1 byte per token of the
shard (1: the token is a loss target). A byte per token keeps any slice a plain memory-map read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flm.errors import FlmError
from flm.files import DurableFile

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
    with ShardFile(path, vocab_size) as shard:
        shard.write(tokens)


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a 0/1 loss mask file, atomically, in the format described in the module docstring."""
    with ShardFile(path, vocab_size=2, mask=True) as shard:
        shard.write(mask)


class ShardFile:
    """A shard (or with `mask`, a loss mask file) written piece by piece, so no shard has to fit in memory.

    Every piece is checked as it comes (ids in [0, vocab_size), mask bytes 0 or 1). The header, which holds the
    count, is filled in on `close`, and only then does the file appear under its name (flm.files.DurableFile);
    leaving the `with` block by an exception, or a failing `close`, removes the temporary file.
    """

    def __init__(self, path: str | Path, vocab_size: int, mask: bool = False):
        self.path = Path(path)
        self.vocab_size, self.mask = vocab_size, mask
        self.dtype = _MASK_DTYPE if mask else shard_dtype(vocab_size)
        self.count = 0
        self._out = DurableFile(self.path)
        self._out.file.write(bytes(HEADER_SIZE))

    def write(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        what = "mask" if self.mask else "shard"
        if self.mask and (values.ndim != 1 or values.dtype.kind not in "biu"
                          or (values.size and (int(values.max()) > 1 or int(values.min()) < 0))):
            raise FlmError(f"cannot write {what} {self.path.name}: the mask must be a 1-D array of 0s and 1s")
        if not self.mask:
            if values.ndim != 1 or values.dtype.kind not in "iu":
                raise FlmError(f"cannot write {what} {self.path.name}: tokens must be a 1-D integer array")
            if values.size and (int(values.min()) < 0 or int(values.max()) >= self.vocab_size):
                raise FlmError(f"cannot write {what} {self.path.name}: token ids must be in [0, {self.vocab_size}), "
                               f"got [{int(values.min())}, {int(values.max())}]")
        self._out.file.write(np.ascontiguousarray(values, dtype=self.dtype).data)
        self.count += values.size

    def close(self) -> None:
        magic, code = (MASK_MAGIC, _MASK_CODE) if self.mask else (MAGIC, _dtype_code(self.dtype))
        try:
            self._out.file.seek(0)
            self._out.file.write(_HEADER.pack(magic, VERSION, code, self.vocab_size, self.count))
            self._out.commit()
        except BaseException:
            self._out.abort()
            raise

    def abort(self) -> None:
        self._out.abort()

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _dtype_code(dtype: np.dtype) -> int:
    return next(c for c, d in _DTYPES.items() if d == dtype)


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
    reserved = raw[_HEADER.size:]
    if any(reserved):
        at = _HEADER.size + next(i for i, b in enumerate(reserved) if b)
        raise FlmError(f"bad {what_file} {path}: reserved header byte {at} is {raw[at]:#04x}, not zero "
                       "(a damaged file)")
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
    """The shard's tokens as a read-only memory map, after checking that every id is inside its vocabulary.

    The check is one vectorised max over the file (over 10 GB/s from the page cache on one core, docs/data.md;
    from disk, one read of the file), so an id the embedding would fail on is reported here, naming the shard, and
    not as an IndexError somewhere in training.
    """
    header = read_shard_header(path)
    tokens = _map(path, header)
    if tokens.size and int(tokens.max()) >= header.vocab_size:
        position = int(np.argmax(tokens >= header.vocab_size))
        raise FlmError(f"bad token shard {path}: token id {int(tokens[position])} at position {position} is outside "
                       f"its vocabulary of {header.vocab_size} ids (a damaged file, or one written for another "
                       "tokenizer): prepare the data again (`flm prepare --force`)")
    return tokens


def read_mask(path: str | Path) -> np.ndarray:
    """A loss mask file's 0/1 bytes as a read-only memory map."""
    return _map(path, read_mask_header(path))


def _map(path: str | Path, header: ShardHeader) -> np.ndarray:
    if header.token_count == 0:
        return np.empty(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.token_count,))
