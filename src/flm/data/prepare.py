"""`flm prepare`: corpus -> train/validation split -> tokenizer -> token shards + meta.json.

meta.json is written last and atomically: a folder with a meta.json is complete, one without is not prepared,
whatever happened in between. Its fingerprint of the data config lets a repeated prepare return at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flm.config.schema import DataConfig
from flm.data.corpus import describe_corpus, iter_documents
from flm.data.shards import atomic_write, read_shard_header, write_shard
from flm.data.tokenizer import Tokenizer, load_tokenizer, load_tokenizer_dir, train_bpe
from flm.errors import FlmError

FORMAT_VERSION = 1
META = "meta.json"
SPLITS = ("train", "val")
# Salt of the split hash: changing it reshuffles which documents are held out.
_SPLIT_SALT = b"flm-split-v1"
# Characters per encode_batch call: large enough to keep the tokenizer's threads busy, small enough for memory.
_CHUNK_CHARS = 1 << 22


@dataclass
class PreparedData:
    """A prepared data folder, as described by its meta.json."""

    dir: Path
    vocab_size: int
    eot_id: int
    train_shards: list[Path]
    val_shards: list[Path]
    train_tokens: int
    val_tokens: int
    meta: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer_dir(self.dir)


def prepare(cfg: DataConfig, log: Callable[[str], None] = print) -> PreparedData:
    """Prepare `cfg.dir` from `cfg.corpus`, or reuse it if it was prepared from the same data config."""
    cfg.validate()
    out = Path(cfg.dir)
    fingerprint = config_fingerprint(cfg)
    if _fingerprint_of(out) == fingerprint:
        try:
            data = load_prepared(out)
            log(f"reusing prepared data in {out} (same data config)")
            return data
        except FlmError as e:
            log(f"cannot reuse {out} ({e}); preparing again")
    started = time.perf_counter()
    _forget_previous(out)
    log(f"reading {describe_corpus(cfg.corpus)}")
    train_docs, val_docs = split_documents(list(iter_documents(cfg.corpus, cfg.max_chars)), cfg.val_fraction)
    tok = _build_tokenizer(cfg, train_docs, log)
    splits = {name: _write_split(out, name, docs, tok, cfg.shard_tokens)
              for name, docs in zip(SPLITS, (train_docs, val_docs))}
    tok.save(out)
    meta = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "corpus": cfg.corpus,
            "tokenizer": cfg.tokenizer, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "splits": splits, "config": dataclasses.asdict(cfg)}
    atomic_write(out / META, [(json.dumps(meta, indent=2) + "\n").encode()])
    log(f"prepared {out} in {time.perf_counter() - started:.1f}s: "
        + ", ".join(f"{n} {s['documents']} docs / {s['tokens']:,} tokens" for n, s in splits.items()))
    return load_prepared(out)


def load_prepared(directory: str | Path) -> PreparedData:
    """Read `directory`/meta.json and check that every shard it lists is there and agrees with it."""
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.is_file():
        raise FlmError(f"no prepared data in {directory}: run `flm prepare` first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["format_version"] != FORMAT_VERSION:
            raise FlmError(f"{meta_path} has format version {meta['format_version']}, this flm reads "
                           f"{FORMAT_VERSION}: run `flm prepare` again")
        shards = {name: [(directory / s["file"], int(s["tokens"])) for s in meta["splits"][name]["shards"]]
                  for name in SPLITS}
        vocab_size, eot_id = int(meta["vocab_size"]), int(meta["eot_id"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise FlmError(f"corrupt {meta_path} ({type(e).__name__}: {e}): run `flm prepare` again") from e
    for path, tokens in shards["train"] + shards["val"]:
        header = read_shard_header(path)
        if (header.vocab_size, header.token_count) != (vocab_size, tokens):
            raise FlmError(f"shard {path} does not match {meta_path} (vocab {header.vocab_size} vs {vocab_size}, "
                           f"tokens {header.token_count} vs {tokens}): run `flm prepare` again")
    return PreparedData(dir=directory, vocab_size=vocab_size, eot_id=eot_id,
                        train_shards=[p for p, _ in shards["train"]], val_shards=[p for p, _ in shards["val"]],
                        train_tokens=sum(t for _, t in shards["train"]), val_tokens=sum(t for _, t in shards["val"]),
                        meta=meta)


def config_fingerprint(cfg: DataConfig) -> str:
    """Hash of everything that decides the prepared bytes; `dir` is left out, since it is only where they go."""
    fields = {"format_version": FORMAT_VERSION, "corpus": cfg.corpus, "tokenizer": cfg.tokenizer,
              "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None, "val_fraction": cfg.val_fraction,
              "shard_tokens": cfg.shard_tokens, "max_chars": cfg.max_chars, "salt": _SPLIT_SALT.decode()}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out documents whose salted content hash falls below `val_fraction`.

    Hashing the content (not the position) keeps duplicates in one split and keeps each document's split when
    others are added. If chance leaves a side empty, the lowest-hash document is held out (or the highest kept).
    """
    if len(docs) < 2:
        raise FlmError(f"the corpus has {len(docs)} document(s); at least 2 are needed to split off validation "
                       "(split a single .txt into several files, or use .jsonl with one document per line)")
    scores = [_split_score(d) for d in docs]
    held = [s < val_fraction for s in scores]
    if not any(held):
        held[scores.index(min(scores))] = True
    if all(held):
        held[scores.index(max(scores))] = False
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def _split_score(doc: str) -> float:
    digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8, salt=_SPLIT_SALT).digest()
    return int.from_bytes(digest, "little") / 2**64


def _fingerprint_of(directory: Path) -> str | None:
    try:
        return json.loads((directory / META).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _forget_previous(directory: Path) -> None:
    """Unprepare the folder before writing anything: meta.json first, so no crash can pair it with new shards."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META).unlink(missing_ok=True)
    for pattern in ("train_?????.bin", "val_?????.bin", "*.bin.tmp", f"{META}.tmp"):
        for path in directory.glob(pattern):
            path.unlink()


def _build_tokenizer(cfg: DataConfig, train_docs: list[str], log: Callable[[str], None]) -> Tokenizer:
    if cfg.tokenizer != "bpe":
        tok = load_tokenizer(cfg.tokenizer)
        log(f"tokenizer {tok.name}")
        return tok
    started = time.perf_counter()
    tok = train_bpe(train_docs, cfg.vocab_size)
    log(f"trained byte-level BPE, {tok.vocab_size} ids, in {time.perf_counter() - started:.1f}s")
    return tok


def _write_split(out: Path, split: str, docs: list[str], tok: Tokenizer, shard_tokens: int) -> dict[str, Any]:
    """Tokenise `docs` (each followed by the end-of-text id) into shards of at most `shard_tokens` tokens."""
    writer = _ShardWriter(out, split, shard_tokens, tok.vocab_size)
    for chunk in _chunks(docs, _CHUNK_CHARS):
        flat: list[int] = []
        for ids in tok.encode_batch(chunk):
            flat.extend(ids)
            flat.append(tok.eot_id)
        writer.add(np.array(flat, dtype=np.uint32))
    shards = writer.close()
    return {"documents": len(docs), "tokens": sum(s["tokens"] for s in shards), "shards": shards}


def _chunks(docs: list[str], max_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _ShardWriter:
    """Buffers token arrays and writes `{split}_NNNNN.bin` files of exactly `limit` tokens (the last: the rest)."""

    def __init__(self, out: Path, split: str, limit: int, vocab_size: int):
        self.out, self.split, self.limit, self.vocab_size = out, split, limit, vocab_size
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        if self.pending_tokens < self.limit:
            return
        buf = np.concatenate(self.pending)
        full = len(buf) - len(buf) % self.limit
        for start in range(0, full, self.limit):
            self._write(buf[start:start + self.limit])
        self.pending, self.pending_tokens = [buf[full:]], len(buf) - full

    def close(self) -> list[dict[str, Any]]:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        return self.shards

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        write_shard(self.out / name, tokens, self.vocab_size)
        self.shards.append({"file": name, "tokens": int(len(tokens))})
