"""A prepared data folder, as its meta.json describes it: shards per split (and per source), loss masks, held-out
teacher records and the tokenizer, each checked against meta.json when the folder is loaded."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flm.data.shards import read_mask_header, read_shard_header
from flm.data.staging import META
from flm.data.tokenizer import Tokenizer, load_tokenizer_dir
from flm.errors import FlmError

if TYPE_CHECKING:
    from flm.data.loader import MixtureLoader

FORMAT_VERSION = 1
SPLITS = ("train", "val")


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
        from flm.data.loader import LoaderSource, MixtureLoader, TokenStream  # torch, only when training

        if not self.sources:
            sources = [LoaderSource("train", TokenStream(self.train_shards))]
        else:
            sources = [LoaderSource(s.name, TokenStream(s.train_shards, s.train_masks), s.weight)
                       for s in self.sources]
        return MixtureLoader(sources, batch_size, seq_len, seed, rank=rank, world_size=world_size)


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
    try:
        counts = _checked_counts(directory, meta, shards["train"] + shards["val"])
        for src in sources:
            if src.heldout is not None and not src.heldout.is_file():
                raise FlmError(f"held-out records {src.heldout} are missing")
    except FlmError as e:
        # meta.json still matches the config, so a plain `flm prepare` would reuse the folder
        raise FlmError(f"{e}: run `flm prepare --force` to prepare {directory} again") from e
    return PreparedData(dir=directory, vocab_size=vocab_size, eot_id=eot_id,
                        train_shards=[p for p, _ in shards["train"]], val_shards=[p for p, _ in shards["val"]],
                        train_tokens=sum(counts[p] for p, _ in shards["train"]),
                        val_tokens=sum(counts[p] for p, _ in shards["val"]),
                        meta=meta, val_masks=[m for _, m in shards["val"]], sources=sources)


def _checked_counts(directory: Path, meta: dict[str, Any], shards: list[tuple[Path, Path | None]]
                    ) -> dict[Path, int]:
    """Token count of each shard, from its header, checked against meta.json and against its mask."""
    counts = {}
    for path, mask in shards:
        header = read_shard_header(path)
        if header.vocab_size != int(meta["vocab_size"]):
            raise FlmError(f"shard {path} does not match {META} (vocab {header.vocab_size} vs {meta['vocab_size']})")
        if mask is not None and read_mask_header(mask).token_count != header.token_count:
            raise FlmError(f"loss mask {mask} does not match shard {path} ({read_mask_header(mask).token_count} vs "
                           f"{header.token_count} tokens)")
        counts[path] = header.token_count
    for name, tokens in _listed_counts(meta):
        if counts.get(directory / name) != tokens:
            raise FlmError(f"shard {directory / name} does not match {META} (tokens {counts.get(directory / name)} "
                           f"vs {tokens})")
    return counts


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
