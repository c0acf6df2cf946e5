"""Durable files: what `fsync` needs, in one place for checkpoints, prepared data and reports alike.

A file that other code trusts by its name (a shard, a manifest, a checkpoint's tensors, a report) must never be
seen half-written, nor lost to a crash after its writer returned. Every such file is written by `DurableFile`: to
a temporary name beside it, flushed and fsynced, then renamed over the name in one step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from flm.errors import FlmError


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (the renames into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableFile:
    """`path` written through `file` (a temporary `<name>.tmp` beside it), in place only after `commit`.

    `commit` flushes, fsyncs and renames; `abort` (or leaving a `with` block by an exception) removes the
    temporary file. A failed commit removes it too and re-raises, so an error never leaves a stray file behind.
    Either may be called again after either, which does nothing: a writer that aborts all its files on any error
    need not track which of them were already committed.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file: BinaryIO = open(self.tmp, "wb")
        self._ended = False

    def commit(self) -> None:
        if self._ended:
            return
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._ended = True

    def abort(self) -> None:
        if not self._ended:
            self._ended = True
            self.file.close()
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> BinaryIO:
        return self.file

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def atomic_write(path: Path, parts: Iterable[bytes | memoryview]) -> None:
    """Write `parts` one after another as the file `path`, durably (DurableFile)."""
    with DurableFile(path) as f:
        for part in parts:
            f.write(part)


def write_json_report(path: str | Path, data: object) -> None:
    """Write a report (`flm plan --json`, `flm eval ... --json`, the benchmarks' results) as indented UTF-8 JSON,
    durably, creating its folder. Values JSON lacks (lm-eval's task configs hold functions) are written as their
    str(); a write that fails is one line naming the file."""
    path = Path(path)
    text = json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, [text.encode("utf-8")])
    except OSError as e:
        raise FlmError(f"cannot write {path}: {e.strerror}") from None


def read_json_report(path: str | Path) -> object:
    """Read a report written by `write_json_report` (or any JSON file); a file that is missing, unreadable or not
    JSON is one line naming it."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise FlmError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise FlmError(f"{path} is not JSON: {e}") from None
