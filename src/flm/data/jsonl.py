"""JSONL records with errors that point at the file and line, for the instruction and teacher-signal sources."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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
    """Records of a .jsonl file or of every .jsonl file under a folder (sorted paths); blank lines are skipped.

    A line that is not JSON, or that `parse` rejects with a ValueError, is an FlmError "FILE:LINE: what is wrong".
    """
    records = []
    for path in jsonl_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FlmError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
        except OSError as e:
            raise FlmError(f"cannot read {path}: {e.strerror or e}") from e
        # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends.
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append(parse(json.loads(line)))
            except json.JSONDecodeError as e:
                raise FlmError(f"{path}:{lineno}: malformed JSONL line ({e.msg} at column {e.colno})") from None
            except ValueError as e:
                raise FlmError(f"{path}:{lineno}: {e}") from None
    if not records:
        raise FlmError(f"{root} holds no records")
    return records
