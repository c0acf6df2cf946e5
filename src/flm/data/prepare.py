"""`flm prepare`: corpus (or a mixture of sources) -> tokenizer -> train/validation split -> shards + meta.json,
as a stream: memory holds buffers and the tokenizer, never the corpus.

Three steps, run together by `prepare` or one by one on many machines (docs/data.md):
1. `prepare_tokenizer`: train BPE on one pass over the training text (flm.data.bpe_sample) or load the given
   tokenizer; with teacher data, append the two label tokens. It must be fixed before any part runs.
2. `prepare_part`: part I of N reads the corpus, tokenises its share of the documents in worker processes and
   writes their shards (flm.data.parts).
3. `merge`: checks that the parts agree and switches them in, meta.json last (flm.data.staging).

All of it is written to a staging folder inside the output folder, so a failed or killed prepare leaves a
previously prepared folder intact, and finished parts are kept for the next try. meta.json's fingerprint of the
data config lets a repeated prepare return at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flm.config.schema import DataConfig
from flm.data.bpe_sample import bpe_training_text
from flm.data.jsonl import jsonl_files
from flm.data.parts import SPLITS, tokenizer_digest, write_part
from flm.data.prepared import FORMAT_VERSION, PreparedData, load_prepared
from flm.data.sources import planned_sources
from flm.data.split import SPLIT_SALT
from flm.data.staging import (META, commit, finish_commit, finished_parts, install_tokenizer, manifest_path,
                              other_staging, staged_tokenizer, staging_dir)
from flm.data.teacher import BUNDLED, BUNDLED_VERSION
from flm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from flm.errors import FlmError

_DEFAULT_BPE_SAMPLE = DataConfig.bpe_sample_chars

Log = Callable[[str], None]


def prepare(cfg: DataConfig, log: Log = print, workers: int | None = None, force: bool = False,
            parts: int = 1) -> PreparedData:
    """Prepare `cfg.dir` from its sources, or reuse it if it was prepared from the same data config.

    `force` prepares again whatever is there. `parts` > 1 writes the folder that `parts` separate parts and a merge
    would (a killed run then resumes at the first unfinished part); a complete set of parts already staged is
    merged as it is.
    """
    cfg.validate()
    out, fingerprint = Path(cfg.dir), config_fingerprint(cfg)
    if not force and _fingerprint_of(out) == fingerprint:
        data = load_prepared(out)
        log(f"reusing prepared data in {out} (same data config)")
        return data
    staging = staging_dir(out, fingerprint)
    if force and staging.exists():
        shutil.rmtree(staging)
    if (staging / META).is_file():
        log(f"completing the switch to {staging}, which an interrupted prepare had staged")
        finish_commit(out, staging)
        return load_prepared(out)
    started = time.perf_counter()
    found = finished_parts(staging)
    if found and parts not in found:
        parts, manifests = _one_count(found, staging)
        if len(manifests) < parts:
            raise FlmError(f"{staging} holds {len(manifests)} of {parts} prepared parts: prepare the others "
                           f"({_missing(manifests, parts)}) and `flm prepare --merge`, or `flm prepare --force` to "
                           "prepare everything here")
        log(f"merging the {parts} parts prepared in {staging}")
    prepare_tokenizer(cfg, log)
    for part in range(parts):
        if part not in found.get(parts, {}):
            write_part(cfg, staging, fingerprint, part, parts, _workers(cfg, workers), log)
    data = merge(cfg, log)
    log(f"prepared {out} in {time.perf_counter() - started:.1f}s")
    return data


def prepare_tokenizer(cfg: DataConfig, log: Log = print) -> Tokenizer:
    """Step 1: the tokenizer of `cfg`, trained or loaded (with label tokens for teacher data), saved into the staging
    folder where the parts find it; one saved there before is reused."""
    cfg.validate()
    staging = staging_dir(Path(cfg.dir), config_fingerprint(cfg))
    tok = staged_tokenizer(staging)
    if tok is not None:
        log(f"tokenizer {tok.name}, from {staging}")
        return tok
    if cfg.tokenizer != "bpe":
        tok = load_tokenizer(cfg.tokenizer)
        log(f"tokenizer {tok.name}")
    else:
        started = time.perf_counter()
        tok = train_bpe(bpe_training_text(cfg, log), cfg.vocab_size)
        log(f"trained byte-level BPE, {tok.vocab_size} ids, in {time.perf_counter() - started:.1f}s")
    if any(src.kind == "teacher" for src in cfg.sources):
        tok.add_label_tokens()
        log(f"label tokens {tok.decode([tok.label_ids[0]])} / {tok.decode([tok.label_ids[1]])} = ids {tok.label_ids}")
    return install_tokenizer(tok, staging)


def prepare_part(cfg: DataConfig, part: int, parts: int, log: Log = print, workers: int | None = None,
                 force: bool = False) -> None:
    """Step 2: part `part` of `parts`, unless it (or the whole folder) is already prepared and not `force`."""
    cfg.validate()
    if not 0 <= part < parts:
        raise FlmError(f"--part {part}/{parts}: the part must be in [0, {parts})")
    out, fingerprint = Path(cfg.dir), config_fingerprint(cfg)
    staging = staging_dir(out, fingerprint)
    if not force and _fingerprint_of(out) == fingerprint:
        log(f"{out} is already prepared from this data config: nothing to do")
        return
    if not force and manifest_path(staging, part, parts).is_file():
        log(f"part {part}/{parts} is already prepared in {staging}")
        return
    if staged_tokenizer(staging) is None:
        if cfg.tokenizer == "bpe":
            raise FlmError(f"no trained tokenizer in {staging}: BPE is trained once, before the parts: run "
                           "`flm prepare --tokenizer-only` with this config first")
        prepare_tokenizer(cfg, log)
    started = time.perf_counter()
    write_part(cfg, staging, fingerprint, part, parts, _workers(cfg, workers), log)
    log(f"prepared part {part}/{parts} in {time.perf_counter() - started:.1f}s; when all {parts} are done: "
        "`flm prepare --merge`")


def merge(cfg: DataConfig, log: Log = print) -> PreparedData:
    """Step 3: check that the staged parts are complete and agree, then make them the prepared folder."""
    cfg.validate()
    out, fingerprint = Path(cfg.dir), config_fingerprint(cfg)
    staging = staging_dir(out, fingerprint)
    found = finished_parts(staging)
    if not found:
        raise FlmError(f"no prepared parts in {staging}: run `flm prepare --part I/N` for every part first")
    parts, manifests = _one_count(found, staging)
    if len(manifests) < parts:
        raise FlmError(f"{_missing(manifests, parts)} of {parts} not prepared yet (no manifest in {staging}): "
                       f"run `flm prepare --part I/{parts}` for them, then merge")
    tok = staged_tokenizer(staging)
    assert tok is not None, "parts are written with the staged tokenizer"
    digest = tokenizer_digest(staging, tok)
    for part, manifest in sorted(manifests.items()):
        if manifest["fingerprint"] != fingerprint or manifest["tokenizer"] != digest:
            raise FlmError(f"part {part}/{parts} in {staging} was written with another tokenizer or config: "
                           f"prepare it again (`flm prepare --part {part}/{parts} --force`)")
    layout, files = _merged_layout(cfg, [manifests[i] for i in range(parts)], staging, log)
    meta = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, **layout, "tokenizer": cfg.tokenizer,
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "parts": parts, "config": dataclasses.asdict(cfg)}
    commit(out, staging, meta, files + list(tok.files))
    left = other_staging(out)
    if left:
        log(f"left in {out}: {', '.join(p.name for p in left)}, staged by other data configs (delete if unwanted)")
    return load_prepared(out)


def _merged_layout(cfg: DataConfig, manifests: list[dict[str, Any]], staging: Path, log: Log
                   ) -> tuple[dict[str, Any], list[str]]:
    """meta.json's description of the shards (the parts' shards one after another), and the files it names."""
    entries = []
    for src in planned_sources(cfg):
        per_part = [m["sources"][src.index] for m in manifests]
        if src.kind == "teacher":
            entry = {key: per_part[0][key] for key in ("train", "heldout")}
        else:
            if len({json.dumps([p["seen"], p["moved"]]) for p in per_part}) > 1:
                raise FlmError(f"the parts in {staging} read different documents from source {src.index} "
                               f"({src.name}); did it change while they ran? Prepare again with --force")
            entry = {split: _joined([p[split] for p in per_part]) for split in SPLITS}
        if cfg.sources:
            targets = entry["train"].get("loss_tokens", entry["train"]["tokens"])
            log(f"source {src.index} {src.name}: {entry['train']['tokens']:,} train tokens, {targets:,} of them "
                "loss targets")
        entries.append(entry)
    files = [name for entry in entries for split in SPLITS if split in entry for shard in entry[split]["shards"]
             for name in (shard["file"], shard.get("mask")) if name]
    files += [entry["heldout"]["file"] for entry in entries if "heldout" in entry]
    if not cfg.sources:
        return {"corpus": cfg.corpus, "splits": entries[0]}, files
    return {"sources": [{"kind": src.kind, "name": src.name, "weight": src.config.weight, **entry}
                        for src, entry in zip(planned_sources(cfg), entries)]}, files


def _joined(splits: list[dict[str, Any]]) -> dict[str, Any]:
    joined: dict[str, Any] = {"documents": sum(s["documents"] for s in splits),
                              "tokens": sum(s["tokens"] for s in splits),
                              "shards": [shard for s in splits for shard in s["shards"]]}
    if "loss_tokens" in splits[0]:
        joined["loss_tokens"] = sum(s["loss_tokens"] for s in splits)
    return joined


def _one_count(found: dict[int, dict[int, dict[str, Any]]], staging: Path) -> tuple[int, dict[int, dict[str, Any]]]:
    if len(found) > 1:
        raise FlmError(f"{staging} holds parts of {' and of '.join(map(str, sorted(found)))}: keep one split (delete "
                       "the other part-*.json files) or prepare again with --force")
    return next(iter(found.items()))


def _missing(manifests: dict[int, Any], parts: int) -> str:
    missing = [i for i in range(parts) if i not in manifests]
    return "part" + "s" * (len(missing) > 1) + " " + ", ".join(map(str, missing[:10])) + " ..." * (len(missing) > 10)


def _workers(cfg: DataConfig, workers: int | None) -> int:
    """`workers`, else data.workers, where 0 means one per core this process may run on."""
    chosen = cfg.workers if workers is None else workers
    if chosen > 0:
        return chosen
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def config_fingerprint(cfg: DataConfig) -> str:
    """Hash of everything that decides the prepared data; `dir` and `workers` are left out (where the bytes go,
    how fast), and so is the number of parts: a folder prepared in parts holds the same documents and tokens."""
    fields = {"format_version": FORMAT_VERSION, "corpus": cfg.corpus, "tokenizer": cfg.tokenizer,
              "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None, "val_fraction": cfg.val_fraction,
              "shard_tokens": cfg.shard_tokens, "max_chars": cfg.max_chars, "salt": SPLIT_SALT.decode()}
    if cfg.tokenizer == "bpe" and cfg.bpe_sample_chars != _DEFAULT_BPE_SAMPLE:  # left out at the default, so
        fields["bpe_sample_chars"] = cfg.bpe_sample_chars                       # older folders keep theirs
    if cfg.sources:  # left out when empty, so a plain corpus keeps its fingerprint
        fields["sources"] = [dataclasses.asdict(s) for s in cfg.sources]
        fields["teacher_bundled"] = BUNDLED_VERSION
        # An edited JSONL file must be read again: its size and modification time count too.
        fields["files"] = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for s in cfg.sources
                           if s.kind != "text" and s.path != BUNDLED for f in jsonl_files(Path(s.path))]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint_of(directory: Path) -> str | None:
    try:
        return json.loads((directory / META).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
