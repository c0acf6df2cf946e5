"""Which documents are held out for validation, and which part of a parallel prepare writes each one: both follow
from one salted hash of the document's content, so any process reading the corpus decides alike.

Hashing the content (not the position) keeps duplicates together and keeps each document's split when others are
added. If chance leaves a side empty, the lowest-hash document is held out (or the highest kept); in a stream that
is only known at the end, which `SplitCounts` tells.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from flm.errors import FlmError

# Salt of the split hash: changing it reshuffles which documents are held out.
SPLIT_SALT = b"flm-split-v1"
T = TypeVar("T")


def split_hash(key: str) -> tuple[float, int]:
    """(score in [0, 1), part bits): the document is held out when score < val_fraction, and belongs to part
    `bits % parts`. The score reads the hash as a whole, the part its low 32 bits, so the two are independent."""
    value = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8, salt=SPLIT_SALT).digest(), "little")
    return value / 2**64, value & 0xFFFF_FFFF


def split_documents(docs: Sequence[T], val_fraction: float, keys: Sequence[str] | None = None
                    ) -> tuple[list[T], list[T]]:
    """Hold out documents whose hash score falls below `val_fraction`; `keys` (default: the documents themselves)
    are the strings hashed. The in-memory form of what `SplitCounts` does for a stream."""
    counts = SplitCounts(val_fraction)
    held = [counts.add(split_hash(k)[0]) for k in (keys if keys is not None else docs)]
    forced = counts.forced()
    if forced is not None:
        held[forced.ordinal] = forced.held_out
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


@dataclass(frozen=True)
class Forced:
    """The document moved to the other side so that neither is empty: `held_out` is its new side, `owner` what the
    caller passed with it to `SplitCounts.add` (the part that writes it)."""

    ordinal: int
    held_out: bool
    owner: int = 0


class SplitCounts:
    """Counts a stream of document scores (in reading order) and finds the document to move if a side is empty."""

    def __init__(self, val_fraction: float):
        self.val_fraction = val_fraction
        self.documents = 0
        self.held_out = 0
        # (score, ordinal, owner) of the lowest and highest score; the first of equal scores wins
        self.lowest: tuple[float, int, int] | None = None
        self.highest: tuple[float, int, int] | None = None

    def add(self, score: float, owner: int = 0) -> bool:
        """Count the next document; True if its score holds it out."""
        ordinal = self.documents
        self.documents += 1
        if self.lowest is None or score < self.lowest[0]:
            self.lowest = (score, ordinal, owner)
        if self.highest is None or score > self.highest[0]:
            self.highest = (score, ordinal, owner)
        held = score < self.val_fraction
        self.held_out += held
        return held

    def forced(self) -> Forced | None:
        """After the last document: the one to move (None if both sides have documents)."""
        if self.documents < 2:
            raise FlmError(f"the corpus has {self.documents} document(s); at least 2 are needed to split off "
                           "validation (split a single .txt into several files, or use .jsonl with one document per "
                           "line)")
        if self.held_out == 0:
            assert self.lowest is not None
            return Forced(self.lowest[1], held_out=True, owner=self.lowest[2])
        if self.held_out == self.documents:
            assert self.highest is not None
            return Forced(self.highest[1], held_out=False, owner=self.highest[2])
        return None

    def summary(self) -> dict[str, int]:
        """What every part of a parallel prepare must have seen alike (the merge compares them)."""
        return {"documents": self.documents, "held_out": self.held_out}
