"""JSONL records with errors that point at the file and line, for the instruction and teacher-signal sources."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from flm.data.formats import text_lines
from flm.errors import FlmError

T = TypeVar("T")


def jsonl_files(root: Path) -> list[Path]:
    """`root` itself, or the .jsonl files under the folder `root` in sorted order."""
    if root.is_dir():
        files = sorted((p for p in root.rglob("*.jsonl") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise FlmError(f"no .jsonl files under {root}")
        return files
    if root.is_file():
        return [root]
    raise FlmError(f"data source not found: {root}")


def read_jsonl(root: Path, parse: Callable[[Any], T]) -> list[T]:
    """All records of `iter_jsonl`, as a list."""
    return list(iter_jsonl(root, parse))


def iter_jsonl(root: Path, parse: Callable[[Any], T]) -> Iterator[T]:
    """Records of a .jsonl file or of every .jsonl file under a folder (sorted paths), one line at a time; blank
    lines are skipped.

    A line that is not JSON, or that `parse` rejects with a ValueError, is an FlmError "FILE:LINE: what is wrong";
    so is a source without a single record (raised once it has been read to the end).
    """
    empty = True
    for path in jsonl_files(root):
        for lineno, line in text_lines(path):
            try:
                record = parse(json.loads(line))
            except json.JSONDecodeError as e:
                raise FlmError(f"{path}:{lineno}: malformed JSONL line ({e.msg} at column {e.colno})") from None
            except ValueError as e:
                raise FlmError(f"{path}:{lineno}: {e}") from None
            empty = False
            yield record
    if empty:
        raise FlmError(f"{root} holds no records")
