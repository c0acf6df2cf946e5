"""The text a BPE tokenizer is trained on: all training text up to `limit` characters, a hash-chosen sample beyond.

Training needs one pass over the corpus before anything is tokenised. Up to `data.bpe_sample_chars` characters
the trainer sees every training document (in corpus order, exactly as before streaming). Past that, it sees the
training documents with the lowest split hashes whose text reaches the limit: a uniform sample, in memory bounded
by the limit, that does not depend on file order, so every machine of a parallel prepare would pick the same one.
Teacher propositions (a small set, read whole) are always all in it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from flm.config.schema import DataConfig
from flm.data.sources import Source, iter_source, planned_sources, split_key, teacher_split, training_text
from flm.data.split import SplitCounts, split_hash


class BpeSample:
    """Documents offered with a hash score; keeps the lowest-scoring ones until their text reaches `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.chars = 0
        self.left_out = 0
        # max-heap on score: (-score, (source, ordinal), texts, chars)
        self._heap: list[tuple[float, tuple[int, int], tuple[str, ...], int]] = []

    def offer(self, score: float, key: tuple[int, int], texts: tuple[str, ...]) -> None:
        chars = sum(map(len, texts))
        heapq.heappush(self._heap, (-score, key, texts, chars))
        self.chars += chars
        while len(self._heap) > 1 and self.chars - self._heap[0][3] >= self.limit:
            self.chars -= heapq.heappop(self._heap)[3]
            self.left_out += 1

    def drop(self, key: tuple[int, int]) -> None:
        """Take a document out again (it turned out to be held out)."""
        kept = [entry for entry in self._heap if entry[1] != key]
        self.chars = sum(entry[3] for entry in kept)
        self._heap = kept
        heapq.heapify(self._heap)

    def texts(self) -> list[str]:
        """The sample in corpus order (source, then position)."""
        return [text for _, _, texts, _ in sorted(self._heap, key=lambda entry: entry[1]) for text in texts]


def bpe_training_text(cfg: DataConfig, log: Callable[[str], None]) -> list[str]:
    """One pass over every source: the training text of the sample, in corpus order."""
    sample = BpeSample(cfg.bpe_sample_chars)
    for src in planned_sources(cfg):
        if src.kind == "teacher":
            train, _ = teacher_split(src)
            for position, item in enumerate(train):  # below every hash score: never left out
                sample.offer(-1.0, (src.index, position), tuple(training_text(item)))
        else:
            _offer_source(sample, src, cfg)
    if sample.left_out:
        log(f"BPE trains on a sample: {sample.chars:,} characters of training text (data.bpe_sample_chars = "
            f"{cfg.bpe_sample_chars:,}), {sample.left_out:,} documents left out")
    return sample.texts()


def _offer_source(sample: BpeSample, src: Source, cfg: DataConfig) -> None:
    counts = SplitCounts(src.val_fraction)
    highest: tuple[str, ...] = ()
    for ordinal, doc in enumerate(iter_source(src.config, cfg)):
        score = split_hash(split_key(doc))[0]
        if counts.highest is None or score > counts.highest[0]:
            highest = tuple(training_text(doc))
        if not counts.add(score):
            sample.offer(score, (src.index, ordinal), tuple(training_text(doc)))
    forced = counts.forced()
    if forced is not None and forced.held_out:
        sample.drop((src.index, forced.ordinal))
    elif forced is not None:
        assert counts.highest is not None
        sample.offer(counts.highest[0], (src.index, forced.ordinal), highest)
