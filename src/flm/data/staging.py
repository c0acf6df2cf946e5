"""Where a prepare writes before it is done, and the switch that makes its output the prepared folder.

Everything goes to `DIR/.prepare-<fingerprint>/` first: the tokenizer, each part's shards and, written last, each
part's manifest (`part-IIII-of-NNNN.json`, what it wrote). A part is done when its manifest is there, so a killed
run redoes only unfinished parts, and parts running on many machines meet in one folder. A folder prepared
earlier stays untouched, and readable, throughout.

The switch (`commit`) stages meta.json, removes DIR/meta.json, moves the staged files into DIR, deletes files of
the previous preparation and moves meta.json in last: a folder with a meta.json is complete. A switch that is
interrupted (a few renames) is finished by the next prepare, which finds the staged meta.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from flm.data.tokenizer import HF_FILE, TIKTOKEN_FILE, TIKTOKEN_META, Tokenizer, load_tokenizer_dir
from flm.errors import FlmError
from flm.files import atomic_write, fsync_path

META = "meta.json"
TOKENIZER_FILES = (HF_FILE, TIKTOKEN_FILE, TIKTOKEN_META)
_MANIFEST = re.compile(r"part-(\d{4})-of-(\d{4})\.json")
# Files a preparation writes into DIR: shards, masks, held-out records (and their temporary files).
_PREPARED = re.compile(r"(s\d+_)?(train|val)(_p\d{4}of\d{4})?_\d{5,}\.(bin|mask)(\.tmp)?|s\d+_heldout\.jsonl(\.tmp)?"
                       r"|meta\.json\.tmp")


def staging_dir(out: Path, fingerprint: str) -> Path:
    return out / f".prepare-{fingerprint}"


def other_staging(out: Path) -> list[Path]:
    """Staging folders in `out`; after a switch, those of other data configs (kept: their parts may be wanted)."""
    return sorted(out.glob(".prepare-*"))


def shard_name(prefix: str, split: str, part: int, parts: int, index: int) -> str:
    """`{prefix}{split}_NNNNN.bin`, as before parts existed, or with parts `{prefix}{split}_pIIIIofNNNN_NNNNN.bin`."""
    tag = "" if parts == 1 else f"_p{part:04d}of{parts:04d}"
    return f"{prefix}{split}{tag}_{index:05d}.bin"


def manifest_path(staging: Path, part: int, parts: int) -> Path:
    return staging / f"part-{part:04d}-of-{parts:04d}.json"


def write_manifest(staging: Path, part: int, parts: int, manifest: dict[str, Any]) -> None:
    atomic_write(manifest_path(staging, part, parts), [(json.dumps(manifest, indent=1) + "\n").encode()])


def finished_parts(staging: Path) -> dict[int, dict[int, dict[str, Any]]]:
    """{parts N: {part I: manifest}} of the manifests in `staging`."""
    found: dict[int, dict[int, dict[str, Any]]] = {}
    if not staging.is_dir():
        return found
    for path in staging.iterdir():
        match = _MANIFEST.fullmatch(path.name)
        if match:
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise FlmError(f"corrupt part manifest {path} ({e}): delete it and prepare that part again") from e
            found.setdefault(int(match[2]), {})[int(match[1])] = manifest
    return found


def clear_part(staging: Path, part: int, parts: int) -> None:
    """Delete what an earlier, unfinished or repeated run of this part left (its manifest first)."""
    manifest_path(staging, part, parts).unlink(missing_ok=True)
    tag = "" if parts == 1 else f"_p{part:04d}of{parts:04d}"
    mine = re.compile(rf"(s\d+_)?(train|val){tag}_\d{{5,}}\.(bin|mask)(\.tmp)?"
                      + (r"|s\d+_heldout\.jsonl(\.tmp)?" if part == 0 else ""))
    for path in staging.iterdir():
        if mine.fullmatch(path.name):
            path.unlink()


def staged_tokenizer(staging: Path) -> Tokenizer | None:
    if (staging / HF_FILE).is_file() or (staging / TIKTOKEN_META).is_file():
        return load_tokenizer_dir(staging)
    return None


def install_tokenizer(tok: Tokenizer, staging: Path) -> Tokenizer:
    """Save `tok` into `staging` file by file atomically (parts that start together may all do it), and return it
    as reloaded from there: every part and worker then encodes with the very same files."""
    staging.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=staging, prefix=".tokenizer-"))
    try:
        tok.save(scratch)
        for name in tok.files:  # for tiktoken the rank file first, then the description that points at it
            os.replace(scratch / name, staging / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return load_tokenizer_dir(staging)


def commit(out: Path, staging: Path, meta: dict[str, Any], files: list[str]) -> None:
    """Make the staged `files` (and `meta`, last) the prepared folder `out`; see the module docstring."""
    atomic_write(staging / META, [(json.dumps({**meta, "files": files}, indent=2) + "\n").encode()])
    finish_commit(out, staging)


def finish_commit(out: Path, staging: Path) -> None:
    """Carry out (or, after an interruption, complete) the switch that `commit` staged."""
    staged = json.loads((staging / META).read_text(encoding="utf-8"))
    files = staged.pop("files")
    (out / META).unlink(missing_ok=True)
    for name in files:
        if (staging / name).exists():
            os.replace(staging / name, out / name)
        elif not (out / name).exists():
            raise FlmError(f"{staging}: {name} is missing, so the staged preparation cannot be completed: run "
                           "`flm prepare --force`")
    keep = set(files)
    for path in out.iterdir():
        if path.is_file() and path.name not in keep and (_PREPARED.fullmatch(path.name) or
                                                         path.name in TOKENIZER_FILES):
            path.unlink()
    atomic_write(out / META, [(json.dumps(staged, indent=2) + "\n").encode()])
    fsync_path(out)
    shutil.rmtree(staging)


