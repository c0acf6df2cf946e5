"""One part of a prepare: read every source as a stream, keep the part's own documents, split, tokenise and write
them into the staging folder, then write the part's manifest.

A document belongs to part `hash % N` (flm.data.split), so every part reads the whole corpus but tokenises and
writes only its share, in corpus order; any machine can prepare any part. Teacher sources are small and shuffled
as a whole, so part 0 prepares them whole. Every part counts every document, so each one knows whether a split
came out empty and which document has to move (`SplitCounts.forced`); the part that owns that document writes its
source again with the document moved (a corpus of few documents is the only case).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flm.config.schema import DataConfig
from flm.data.encoding import Chunk, EncodePool
from flm.data.shards import ShardFile
from flm.data.sources import Document, Source, iter_source, planned_sources, split_key, teacher_split, training_text
from flm.data.split import Forced, SplitCounts, split_hash
from flm.data.staging import clear_part, shard_name, staged_tokenizer, write_manifest
from flm.data.teacher import items_jsonl
from flm.data.tokenizer import Tokenizer
from flm.errors import FlmError
from flm.files import atomic_write

SPLITS = ("train", "val")
# Characters of text per chunk handed to a worker: a fraction of a second of tokenising; its ids as Python lists
# (about 40 bytes a token) are what the workers hold at a time.
_CHUNK_CHARS = 1 << 18
_TEACHER_CHUNK = 4096  # propositions
_PROGRESS_SECONDS = 60.0


def write_part(cfg: DataConfig, staging: Path, fingerprint: str, part: int, parts: int, workers: int,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Write part `part` of `parts` into `staging` (whose tokenizer must be in place); returns its manifest."""
    tok = staged_tokenizer(staging)
    if tok is None:
        raise FlmError(f"no tokenizer in {staging}: it is made before the parts (`flm prepare --tokenizer-only`)")
    clear_part(staging, part, parts)
    writer = _PartWriter(cfg, staging, part, parts, tok, log)
    with EncodePool(staging, workers) as pool:
        entries = [writer.teacher(src, pool) if src.kind == "teacher" else writer.stream(src, pool)
                   for src in planned_sources(cfg)]
    manifest = {"fingerprint": fingerprint, "part": part, "parts": parts, "tokenizer": tokenizer_digest(staging, tok),
                "sources": entries}
    write_manifest(staging, part, parts, manifest)
    return manifest


def tokenizer_digest(staging: Path, tok: Tokenizer) -> str:
    """What the parts compare to know they encoded with the same tokenizer."""
    digest = hashlib.sha256()
    for name in tok.files:
        digest.update((staging / name).read_bytes())
    return digest.hexdigest()[:16]


class _PartWriter:
    def __init__(self, cfg: DataConfig, staging: Path, part: int, parts: int, tok: Tokenizer,
                 log: Callable[[str], None]):
        self.cfg, self.staging, self.part, self.parts, self.tok, self.log = cfg, staging, part, parts, tok, log

    def stream(self, src: Source, pool: EncodePool, forced: Forced | None = None) -> dict[str, Any]:
        """A text or instruct source: this part's documents, read, split and written as they come."""
        counts = SplitCounts(src.val_fraction)
        documents = dict.fromkeys(SPLITS, 0)
        series = {split: self._series(src, split) for split in SPLITS}
        started = last_report = time.monotonic()

        def chunks() -> Iterator[Chunk]:
            nonlocal last_report
            pending: dict[str, list[Document]] = {split: [] for split in SPLITS}
            size = dict.fromkeys(SPLITS, 0)
            for ordinal, doc in enumerate(iter_source(src.config, self.cfg)):
                score, bits = split_hash(split_key(doc))
                held = counts.add(score, owner=bits % self.parts)
                if forced is not None and ordinal == forced.ordinal:
                    held = forced.held_out
                if bits % self.parts != self.part:
                    continue
                split = SPLITS[held]
                pending[split].append(doc)
                documents[split] += 1
                size[split] += sum(map(len, training_text(doc)))
                if size[split] >= _CHUNK_CHARS:
                    yield Chunk(split, src.kind, src.config.loss_on, pending[split])
                    pending[split], size[split] = [], 0
                if time.monotonic() - last_report > _PROGRESS_SECONDS:
                    last_report = time.monotonic()
                    tokens = sum(s.tokens for s in series.values())
                    self.log(f"{self._where(src)}: {counts.documents:,} documents read, {tokens:,} tokens written, "
                             f"{tokens / (last_report - started):,.0f} tokens/s")
            for split in SPLITS:
                if pending[split]:
                    yield Chunk(split, src.kind, src.config.loss_on, pending[split])

        try:
            for encoded in pool.map(chunks()):
                series[encoded.tag].add(encoded.tokens, encoded.mask)
        except BaseException:
            for s in series.values():
                s.abort()
            raise
        splits = {split: series[split].close(documents[split]) for split in SPLITS}
        move = counts.forced()
        if move is not None and forced is None and move.owner == self.part:
            side = "held out" if move.held_out else "kept for training"
            self.log(f"{self._where(src)}: no document fell on one side of the split, so document {move.ordinal} "
                     f"(the {'lowest' if move.held_out else 'highest'} hash) is {side}; writing the source again")
            for entry in splits.values():
                for shard in entry["shards"]:
                    for name in (shard["file"], shard.get("mask")):
                        if name:
                            (self.staging / name).unlink()
            return self.stream(src, pool, forced=move)
        self.log(f"{self._where(src)}: " + ", ".join(
            f"{split} {splits[split]['documents']:,} docs / {splits[split]['tokens']:,} tokens" for split in SPLITS))
        return {**splits, "seen": counts.summary(), "moved": None if move is None else [move.ordinal, move.held_out]}

    def teacher(self, src: Source, pool: EncodePool) -> dict[str, Any] | None:
        """A teacher source, whole, in part 0: training propositions in their shuffle, held-out records as JSONL."""
        if self.part != 0:
            return None
        train, held = teacher_split(src)
        series = self._series(src, "train")
        try:
            for encoded in pool.map(Chunk("train", "teacher", src.config.loss_on, train[i:i + _TEACHER_CHUNK])
                                    for i in range(0, len(train), _TEACHER_CHUNK)):
                series.add(encoded.tokens, encoded.mask)
        except BaseException:
            series.abort()
            raise
        heldout = f"{src.prefix}heldout.jsonl"
        atomic_write(self.staging / heldout, [items_jsonl(held)])
        self.log(f"{self._where(src)}: {len(train)} train propositions / {len(held)} held-out records")
        return {"train": series.close(len(train)), "heldout": {"file": heldout, "records": len(held)}}

    def _series(self, src: Source, split: str) -> ShardSeries:
        return ShardSeries(self.staging, lambda index: shard_name(src.prefix, split, self.part, self.parts, index),
                           self.cfg.shard_tokens, self.tok.vocab_size, masked=src.kind != "text")

    def _where(self, src: Source) -> str:
        part = "" if self.parts == 1 else f"part {self.part}/{self.parts}, "
        return f"{part}source {src.index} {src.name}"


class ShardSeries:
    """Token arrays (and loss masks) in; files of exactly `limit` tokens out (the last: the rest), each written as
    it fills, so memory holds no shard, whatever `limit` is. A `.mask` file sits beside each shard if `masked`."""

    def __init__(self, folder: Path, name_of: Callable[[int], str], limit: int, vocab_size: int, masked: bool):
        self.folder, self.name_of, self.limit, self.vocab_size, self.masked = folder, name_of, limit, vocab_size, masked
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.loss_tokens = 0
        self._open: tuple[str, ShardFile, ShardFile | None] | None = None

    def add(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        start = 0
        while start < len(tokens):
            if self._open is None:
                name = self.name_of(len(self.shards))
                self._open = (name, ShardFile(self.folder / name, self.vocab_size),
                              ShardFile(self.folder / _mask_name(name), 2, mask=True) if self.masked else None)
            _, shard, mask_file = self._open
            end = start + min(self.limit - shard.count, len(tokens) - start)
            shard.write(tokens[start:end])
            if mask_file is not None:
                assert mask is not None
                mask_file.write(mask[start:end])
                self.loss_tokens += int(mask[start:end].sum())
            self.tokens += end - start
            start = end
            if shard.count == self.limit:
                self._finish()

    def close(self, documents: int) -> dict[str, Any]:
        """Finish the last shard; the split's entry in meta.json."""
        if self._open is not None:
            self._finish()
        entry: dict[str, Any] = {"documents": documents, "tokens": self.tokens, "shards": self.shards}
        if self.masked:
            entry["loss_tokens"] = self.loss_tokens
        return entry

    def abort(self) -> None:
        if self._open is not None:
            for f in self._open[1:]:
                if f is not None:
                    f.abort()
            self._open = None

    def _finish(self) -> None:
        assert self._open is not None
        name, shard, mask_file = self._open
        shard.close()
        entry: dict[str, Any] = {"file": name, "tokens": shard.count}
        if mask_file is not None:
            mask_file.close()
            entry["mask"] = _mask_name(name)
        self.shards.append(entry)
        self._open = None


def _mask_name(shard: str) -> str:
    return shard[:-len(".bin")] + ".mask"
