"""`flm prepare`: corpus (or a mixture of sources) -> train/validation split -> tokenizer -> shards + meta.json.

Everything is read, checked and tokenised before the output folder is touched, so a bad input line or tokenizer
leaves a previously prepared folder as it was. meta.json is written last and atomically: a folder with a meta.json
is complete, one without is not prepared, whatever happened in between. Its fingerprint of the data config lets a
repeated prepare return at once.

With [[data.sources]], each source i gets its own shards `s{i}_{split}_NNNNN.bin`, loss masks `.mask` beside them
for instruction and teacher data, and a teacher source's held-out records as `s{i}_heldout.jsonl` (its validation
measure is accuracy on them, not a loss).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from flm.config.schema import DataConfig
from flm.data.corpus import describe_corpus, iter_documents
from flm.data.loader import LoaderSource, MixtureLoader, TokenStream
from flm.data.shards import atomic_write, read_mask_header, read_shard_header, write_mask, write_shard
from flm.data.jsonl import jsonl_files
from flm.data.sources import Document, encode, read_source, source_name, split_key, training_text
from flm.data.teacher import BUNDLED, BUNDLED_VERSION, TeacherItem, items_jsonl
from flm.data.tokenizer import Tokenizer, load_tokenizer, load_tokenizer_dir, train_bpe
from flm.errors import FlmError

FORMAT_VERSION = 1
META = "meta.json"
SPLITS = ("train", "val")
# Salt of the split hash: changing it reshuffles which documents are held out.
_SPLIT_SALT = b"flm-split-v1"
# Characters per encode_batch call: large enough to keep the tokenizer's threads busy, small enough for memory.
_CHUNK_CHARS = 1 << 22
T = TypeVar("T")


@dataclass
class PreparedSource:
    """One source of a prepared mixture. Masks are None for shards without one (plain text)."""

    kind: str
    name: str
    weight: float
    train_shards: list[Path]
    train_masks: list[Path | None]
    val_shards: list[Path]
    val_masks: list[Path | None]
    heldout: Path | None  # teacher sources: held-out records (JSONL), scored by accuracy


@dataclass
class PreparedData:
    """A prepared data folder, as described by its meta.json.

    `train_shards`/`val_shards` cover all sources; the validation loss reads the text and instruction sources'
    validation shards with `val_masks`. `sources` is empty for a plain corpus.
    """

    dir: Path
    vocab_size: int
    eot_id: int
    train_shards: list[Path]
    val_shards: list[Path]
    train_tokens: int
    val_tokens: int
    meta: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)
    val_masks: list[Path | None] = dataclasses.field(default_factory=list)
    sources: list[PreparedSource] = dataclasses.field(default_factory=list)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer_dir(self.dir)

    @property
    def teacher_heldout(self) -> list[Path]:
        return [s.heldout for s in self.sources if s.heldout is not None]

    def train_loader(self, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                     world_size: int = 1) -> MixtureLoader:
        """The training loader: the plain corpus, or every source at its weight in every batch."""
        if not self.sources:
            sources = [LoaderSource("train", TokenStream(self.train_shards))]
        else:
            sources = [LoaderSource(s.name, TokenStream(s.train_shards, s.train_masks), s.weight)
                       for s in self.sources]
        return MixtureLoader(sources, batch_size, seq_len, seed, rank=rank, world_size=world_size)


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
    tok, layout = (_prepare_mixture if cfg.sources else _prepare_corpus)(cfg, out, log)
    tok.save(out)
    meta = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, **layout, "tokenizer": cfg.tokenizer,
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "config": dataclasses.asdict(cfg)}
    atomic_write(out / META, [(json.dumps(meta, indent=2) + "\n").encode()])
    log(f"prepared {out} in {time.perf_counter() - started:.1f}s")
    return load_prepared(out)


def _prepare_corpus(cfg: DataConfig, out: Path, log: Callable[[str], None]) -> tuple[Tokenizer, dict[str, Any]]:
    """A plain corpus: `{split}_NNNNN.bin` shards, no masks (the layout from before mixtures existed)."""
    log(f"reading {describe_corpus(cfg.corpus)}")
    train_docs, val_docs = split_documents(list(iter_documents(cfg.corpus, cfg.max_chars)), cfg.val_fraction)
    tok = _build_tokenizer(cfg, train_docs, log)
    _forget_previous(out)
    splits = {name: _write_docs(out, name, docs, "text", tok, cfg.shard_tokens)
              for name, docs in zip(SPLITS, (train_docs, val_docs))}
    log(", ".join(f"{n} {s['documents']} docs / {s['tokens']:,} tokens" for n, s in splits.items()))
    return tok, {"corpus": cfg.corpus, "splits": splits}


def _prepare_mixture(cfg: DataConfig, out: Path, log: Callable[[str], None]) -> tuple[Tokenizer, dict[str, Any]]:
    """Read and split every source, build the tokenizer (with the label tokens if there is teacher data), then
    write each source's shards, masks and held-out records. Returns the mixture's part of meta.json."""
    read: list[tuple[str, list[Document], list[Document]]] = []
    for i, src in enumerate(cfg.sources):
        name = source_name(src, cfg)
        docs = read_source(src, cfg)
        fraction = src.val_fraction if src.val_fraction is not None else cfg.val_fraction
        train, val = split_documents(docs, fraction, keys=[split_key(d) for d in docs])
        if src.kind == "teacher":
            train = _scatter_propositions(train)
        log(f"source {i} {name} (weight {src.weight:g}): {len(train)} train / {len(val)} held-out records")
        read.append((name, train, val))
    tok = _build_tokenizer(cfg, [t for _, train, _ in read for d in train for t in training_text(d)], log)
    if any(src.kind == "teacher" for src in cfg.sources):
        tok.add_label_tokens()
        log(f"label tokens {tok.decode([tok.label_ids[0]])} / {tok.decode([tok.label_ids[1]])} = ids {tok.label_ids}")
    _forget_previous(out)
    entries = []
    for i, (src, (name, train, val)) in enumerate(zip(cfg.sources, read)):
        entry: dict[str, Any] = {"kind": src.kind, "name": name, "weight": src.weight,
                                 "train": _write_docs(out, f"s{i}_train", train, src.kind, tok, cfg.shard_tokens,
                                                      src.loss_on)}
        if src.kind == "teacher":
            entry["heldout"] = {"file": f"s{i}_heldout.jsonl", "records": len(val)}
            atomic_write(out / entry["heldout"]["file"], [items_jsonl(val)])
        else:
            entry["val"] = _write_docs(out, f"s{i}_val", val, src.kind, tok, cfg.shard_tokens, src.loss_on)
        entries.append(entry)
        targets = entry["train"].get("loss_tokens", entry["train"]["tokens"])
        log(f"source {i} {name}: {entry['train']['tokens']:,} train tokens, {targets:,} of them loss targets")
    return tok, {"sources": entries}


def _scatter_propositions(items: list[TeacherItem]) -> list[TeacherItem]:
    """One item per proposition, in a seeded shuffle: packed windows hold several propositions, and neighbours that
    share a label or a question (the options of one question) would let the model read the answer off its context.
    """
    singles = [TeacherItem(text=text, label=truth) for item in items for text, truth in item.propositions()]
    random.Random(_SPLIT_SALT).shuffle(singles)
    return singles


def load_prepared(directory: str | Path) -> PreparedData:
    """Read `directory`/meta.json and check that every shard and mask it lists is there and agrees with it."""
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.is_file():
        raise FlmError(f"no prepared data in {directory}: run `flm prepare` first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["format_version"] != FORMAT_VERSION:
            raise FlmError(f"{meta_path} has format version {meta['format_version']}, this flm reads "
                           f"{FORMAT_VERSION}: run `flm prepare` again")
        vocab_size, eot_id = int(meta["vocab_size"]), int(meta["eot_id"])
        if "sources" in meta:
            sources = [_source_from_meta(directory, entry) for entry in meta["sources"]]
        else:
            shards = {name: _shards_from_meta(directory, meta["splits"][name]) for name in SPLITS}
            sources = []
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise FlmError(f"corrupt {meta_path} ({type(e).__name__}: {e}): run `flm prepare` again") from e
    if sources:
        shards = {"train": [x for s in sources for x in zip(s.train_shards, s.train_masks)],
                  "val": [x for s in sources for x in zip(s.val_shards, s.val_masks)]}
    counts = {}
    for path, mask in shards["train"] + shards["val"]:
        header = read_shard_header(path)
        if header.vocab_size != vocab_size:
            raise FlmError(f"shard {path} does not match {meta_path} (vocab {header.vocab_size} vs {vocab_size}): "
                           "run `flm prepare` again")
        if mask is not None and read_mask_header(mask).token_count != header.token_count:
            raise FlmError(f"loss mask {mask} does not match shard {path} ({read_mask_header(mask).token_count} vs "
                           f"{header.token_count} tokens): run `flm prepare` again")
        counts[path] = header.token_count
    for path, tokens in _listed_counts(meta):
        if counts.get(directory / path) != tokens:
            raise FlmError(f"shard {directory / path} does not match {meta_path} (tokens {counts.get(directory / path)}"
                           f" vs {tokens}): run `flm prepare` again")
    for src in sources:
        if src.heldout is not None and not src.heldout.is_file():
            raise FlmError(f"held-out records {src.heldout} are missing: run `flm prepare` again")
    return PreparedData(dir=directory, vocab_size=vocab_size, eot_id=eot_id,
                        train_shards=[p for p, _ in shards["train"]], val_shards=[p for p, _ in shards["val"]],
                        train_tokens=sum(counts[p] for p, _ in shards["train"]),
                        val_tokens=sum(counts[p] for p, _ in shards["val"]),
                        meta=meta, val_masks=[m for _, m in shards["val"]], sources=sources)


def _shards_from_meta(directory: Path, split: dict[str, Any]) -> list[tuple[Path, Path | None]]:
    return [(directory / s["file"], directory / s["mask"] if s.get("mask") else None) for s in split["shards"]]


def _source_from_meta(directory: Path, entry: dict[str, Any]) -> PreparedSource:
    train = _shards_from_meta(directory, entry["train"])
    val = _shards_from_meta(directory, entry["val"]) if "val" in entry else []
    return PreparedSource(kind=entry["kind"], name=entry["name"], weight=float(entry["weight"]),
                          train_shards=[p for p, _ in train], train_masks=[m for _, m in train],
                          val_shards=[p for p, _ in val], val_masks=[m for _, m in val],
                          heldout=directory / entry["heldout"]["file"] if "heldout" in entry else None)


def _listed_counts(meta: dict[str, Any]) -> list[tuple[str, int]]:
    """(file, tokens) of every shard meta.json lists."""
    splits = ([meta["splits"][n] for n in SPLITS] if "splits" in meta
              else [e[n] for e in meta["sources"] for n in SPLITS if n in e])
    return [(s["file"], int(s["tokens"])) for split in splits for s in split["shards"]]


def config_fingerprint(cfg: DataConfig) -> str:
    """Hash of everything that decides the prepared bytes; `dir` is left out, since it is only where they go."""
    fields = {"format_version": FORMAT_VERSION, "corpus": cfg.corpus, "tokenizer": cfg.tokenizer,
              "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None, "val_fraction": cfg.val_fraction,
              "shard_tokens": cfg.shard_tokens, "max_chars": cfg.max_chars, "salt": _SPLIT_SALT.decode()}
    if cfg.sources:  # left out when empty, so a plain corpus keeps its fingerprint
        fields["sources"] = [dataclasses.asdict(s) for s in cfg.sources]
        fields["teacher_bundled"] = BUNDLED_VERSION
        # An edited JSONL file must be read again: its size and modification time count too.
        fields["files"] = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for s in cfg.sources
                           if s.kind != "text" and s.path != BUNDLED for f in jsonl_files(Path(s.path))]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def split_documents(docs: Sequence[T], val_fraction: float, keys: Sequence[str] | None = None
                    ) -> tuple[list[T], list[T]]:
    """Hold out documents whose salted content hash falls below `val_fraction`.

    Hashing the content (not the position) keeps duplicates in one split and keeps each document's split when
    others are added. `keys` (default: the documents themselves) are the strings hashed. If chance leaves a side
    empty, the lowest-hash document is held out (or the highest kept).
    """
    if len(docs) < 2:
        raise FlmError(f"the corpus has {len(docs)} document(s); at least 2 are needed to split off validation "
                       "(split a single .txt into several files, or use .jsonl with one document per line)")
    scores = [_split_score(k) for k in (keys if keys is not None else docs)]
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
    for pattern in ("train_?????.bin", "val_?????.bin", "s*_train_?????.*", "s*_val_?????.*", "s*_heldout.jsonl",
                    "*.tmp"):
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


def _write_docs(out: Path, prefix: str, docs: Sequence[Document], kind: str, tok: Tokenizer, shard_tokens: int,
                loss_on: str = "all") -> dict[str, Any]:
    """Tokenise `docs` (each followed by the end-of-text id) into `{prefix}_NNNNN.bin` shards of at most
    `shard_tokens` tokens, with `.mask` files beside them for instruct and teacher sources."""
    writer = _ShardWriter(out, prefix, shard_tokens, tok.vocab_size)
    for chunk in _chunks(docs, _CHUNK_CHARS):
        writer.add(*encode(chunk, kind, tok, loss_on))
    shards = writer.close()
    summary = {"documents": len(docs), "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    if kind != "text":
        summary["loss_tokens"] = writer.loss_tokens
    return summary


def _chunks(docs: Sequence[Document], max_chars: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += sum(len(t) for t in training_text(doc))
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _ShardWriter:
    """Buffers token arrays (and their masks) and writes `{prefix}_NNNNN.bin` files (with `.mask` beside) of
    exactly `limit` tokens (the last: the rest)."""

    def __init__(self, out: Path, prefix: str, limit: int, vocab_size: int):
        self.out, self.prefix, self.limit, self.vocab_size = out, prefix, limit, vocab_size
        self.pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.pending_tokens = 0
        self.loss_tokens = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        self.pending.append((tokens, mask))
        self.pending_tokens += len(tokens)
        if mask is not None:
            self.loss_tokens += int(mask.sum())
        if self.pending_tokens < self.limit:
            return
        buf, masks = self._joined()
        full = len(buf) - len(buf) % self.limit
        for start in range(0, full, self.limit):
            self._write(buf[start:start + self.limit], None if masks is None else masks[start:start + self.limit])
        self.pending = [(buf[full:], None if masks is None else masks[full:])]
        self.pending_tokens = len(buf) - full

    def close(self) -> list[dict[str, Any]]:
        if self.pending_tokens:
            self._write(*self._joined())
        return self.shards

    def _joined(self) -> tuple[np.ndarray, np.ndarray | None]:
        tokens = np.concatenate([t for t, _ in self.pending])
        if self.pending[0][1] is None:
            return tokens, None
        return tokens, np.concatenate([m for _, m in self.pending])

    def _write(self, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        name = f"{self.prefix}_{len(self.shards):05d}.bin"
        write_shard(self.out / name, tokens, self.vocab_size)
        entry = {"file": name, "tokens": int(len(tokens))}
        if mask is not None:
            entry["mask"] = name[:-len(".bin")] + ".mask"
            write_mask(self.out / entry["mask"], mask)
        self.shards.append(entry)
