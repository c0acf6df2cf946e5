"""Documents out of one corpus file, read as a stream: plain text, JSON lines (also gzip or zstd compressed) and
Parquet with a `text` column.

Nothing holds more than one document (or one Parquet batch) at a time, so a corpus of any size reads in constant
memory. Errors name the file and line (or Parquet row): `data/x.jsonl.zst:7: malformed JSONL line ...`.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from flm.errors import FlmError, require_module

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
TEXT_SUFFIX = ".txt"
# What a corpus folder is searched for; a glob or a single file is read whatever its name.
FOLDER_SUFFIXES = (TEXT_SUFFIX, *JSONL_SUFFIXES, PARQUET_SUFFIX)
_PARQUET_BATCH_ROWS = 1024


def known_suffix(path: Path) -> bool:
    return path.name.endswith(FOLDER_SUFFIXES)


def iter_file_documents(path: Path) -> Iterator[str]:
    """The non-empty documents of one file: a JSONL record's "text", a Parquet row's `text`, or (any other file)
    the whole file as one document."""
    if path.name.endswith(JSONL_SUFFIXES):
        return _jsonl_documents(path)
    if path.name.endswith(PARQUET_SUFFIX):
        return _parquet_documents(path)
    return _text_document(path)


def _text_document(path: Path) -> Iterator[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FlmError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except OSError as e:
        raise FlmError(f"cannot read {path}: {e.strerror or e}") from e
    if text.strip():
        yield text


def _jsonl_documents(path: Path) -> Iterator[str]:
    """One document per line, taken from its "text" field; blank lines are skipped."""
    for lineno, line in text_lines(path):
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, TypeError, KeyError):
            text = None
        if not isinstance(text, str):
            raise FlmError(f"{path}:{lineno}: malformed JSONL line (expected an object with a string \"text\" field)")
        if text.strip():
            yield text


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a (possibly compressed) JSONL file; a line that is not UTF-8
    is an FlmError naming file and line."""
    for lineno, raw in numbered_lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FlmError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        if line.strip():
            yield lineno, line


def numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a possibly compressed file, split at b"\\n" only: JSON strings may hold raw U+2028
    and friends, which a text-mode reader would also split at. A damaged or truncated file is an FlmError."""
    lineno = 0
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise FlmError(f"cannot read {path}: {e.strerror or e}") from e
    damaged: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    with raw:
        if path.name.endswith(".gz"):
            lines: Iterable[bytes] = gzip.GzipFile(fileobj=raw)
        elif path.name.endswith(".zst"):
            require_module("zstandard", "data")
            import zstandard

            damaged += (zstandard.ZstdError,)
            lines = _split_lines(_zstd_blocks(raw, zstandard.ZstdDecompressor()))
        else:
            lines = raw
        try:
            for lineno, line in enumerate(lines, 1):
                yield lineno, line
        except damaged as e:
            raise FlmError(f"{path}:{lineno + 1}: cannot read ({e})") from e


def _zstd_blocks(raw: IO[bytes], decompressor: Any) -> Iterator[bytes]:
    """Decompressed data of every frame in turn. zstandard's stream reader ends quietly inside a cut-off frame;
    here that is an EOFError, so a truncated file is never taken for a shorter one."""
    frame = None
    while chunk := raw.read(1 << 20):
        while chunk:
            frame = frame or decompressor.decompressobj()
            yield frame.decompress(chunk)
            chunk, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
    if frame is not None:
        raise EOFError("the file ends inside a zstd frame (truncated?)")


def _split_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for block in blocks:
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from (line + b"\n" for line in lines)
    if rest:
        yield rest


def _parquet_documents(path: Path) -> Iterator[str]:
    """The `text` column, row by row, read one batch at a time; a null text is an error naming its row."""
    require_module("pyarrow", "data")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        schema = table.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise FlmError(f"{path}: not a readable Parquet file ({e})") from e
    if "text" not in schema.names:
        raise FlmError(f"{path}: no \"text\" column (columns: {', '.join(schema.names)})")
    if not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
        raise FlmError(f"{path}: the \"text\" column holds {schema.field('text').type}, not strings")
    row = 0
    try:
        for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=["text"]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    raise FlmError(f"{path}: row {row}: \"text\" is null")
                if text.strip():
                    yield text
    except (OSError, pa.ArrowException) as e:
        raise FlmError(f"{path}: row {row + 1}: cannot read ({e})") from e
