"""Deterministic, resumable batches of fixed-length windows over memory-mapped shards, mixed from weighted sources.

Each source's token stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and targets shifted by
one; neighbouring windows share one boundary token), so documents are packed back to back. Where a source has loss
masks, targets whose mask is 0 become -100, which the model's loss ignores.

Global sample k goes to source pattern[k % P] of a fixed pattern of P slots in which each source holds a share of
slots proportional to its weight, spread evenly (`mixture_pattern`): every batch carries the configured proportions,
there are no phases. It is that source's sample j = (k // P) * n_s + (its slots before k % P), which reads window
perm_e[j % n_windows] of the source's epoch e = j // n_windows, where perm_e is drawn from the seed, the source and e.
Everything therefore follows from one integer, the number of global samples consumed, which is all a checkpoint has
to store; and since no position depends on the number of ranks, changing the data-parallel degree keeps the order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flm.data.shards import read_mask, read_shard
from flm.errors import FlmError

IGNORE = -100  # target id the model's loss skips
# Slots in one period of the mixture pattern: long-run shares are within 1 / (2 P) of the weights.
MIX_PERIOD = 10_000


class TokenStream:
    """Shards read as one concatenated token sequence, without copying them into memory.

    `masks` (one per shard; None for a shard without one) marks which tokens are loss targets.
    """

    def __init__(self, shards: Sequence[str | Path], masks: Sequence[str | Path | None] | None = None):
        self.parts = [read_shard(p) for p in shards]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        masks = list(masks) if masks is not None else [None] * len(shards)
        if len(masks) != len(shards):
            raise ValueError("one mask entry per shard is needed")
        self.masks = [read_mask(m) if m is not None else None for m in masks]
        for shard, tokens, mask in zip(shards, self.parts, self.masks):
            if mask is not None and len(mask) != len(tokens):
                raise FlmError(f"loss mask of {shard} has {len(mask)} entries for {len(tokens)} tokens: "
                               "run `flm prepare --force`")
        self.has_masks = any(m is not None for m in self.masks)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int, masks: bool = False) -> np.ndarray:
        """Tokens [start, start + length) as int64 (or with `masks`, their 0/1 loss mask), across shards."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        part = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - int(self.starts[part])
            n = min(length - filled, len(self.parts[part]) - offset)
            if not masks:
                out[filled:filled + n] = self.parts[part][offset:offset + n]
            elif self.masks[part] is None:
                out[filled:filled + n] = 1
            else:
                out[filled:filled + n] = self.masks[part][offset:offset + n]
            filled += n
            part += 1
        return out

    def windows(self, indices: Sequence[int] | np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for the given window indices, as int64 tensors of shape [len(indices), seq_len]."""
        rows = np.stack([self.read(int(w) * seq_len, seq_len + 1) for w in indices])
        targets = rows[:, 1:].copy()
        if self.has_masks:
            masks = np.stack([self.read(int(w) * seq_len + 1, seq_len, masks=True) for w in indices])
            targets[masks == 0] = IGNORE
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(targets)


def count_windows(n_tokens: int, seq_len: int) -> int:
    return max(n_tokens - 1, 0) // seq_len


@dataclass
class LoaderSource:
    """One source of a mixture: its training stream and its weight."""

    name: str
    stream: TokenStream
    weight: float = 1.0


def mixture_pattern(weights: Sequence[float], period: int = MIX_PERIOD) -> np.ndarray:
    """Source index of each of `period` slots: source s gets n_s slots (largest-remainder rounding of its share),
    spread evenly by interleaving the slot midpoints (j + 1/2) / n_s of all sources in order.

    Any run of m consecutive slots then holds m * share_s of source s to within about 2 slots, so every batch
    has the configured mixture, not just the run as a whole.
    """
    total = float(sum(weights))
    exact = [period * w / total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda s: (counts[s] - exact[s], s))
    for s in by_remainder[:period - sum(counts)]:
        counts[s] += 1
    if min(counts) == 0:
        raise FlmError(f"a mixture weight is too small: each source needs at least 1/{period} of the total weight")
    keys = [((j + 0.5) / n, s) for s, n in enumerate(counts) for j in range(n)]
    return np.array([s for _, s in sorted(keys)], dtype=np.int64)


class MixtureLoader:
    """Training batches for one rank of `world_size`, mixed from `sources`; see the module docstring for the order.

    Each call consumes one global batch of batch_size * world_size samples, of which this rank takes the
    contiguous slice [rank * batch_size, (rank + 1) * batch_size). `samples_seen` counts global samples, so a
    saved state resumes exactly as long as the global batch size is unchanged.
    """

    def __init__(self, sources: Sequence[LoaderSource], batch_size: int, seq_len: int, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size <= 0 or seq_len <= 0:
            raise FlmError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise FlmError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise FlmError(f"the data seed must be non-negative, got {seed}")
        if not sources:
            raise FlmError("a data loader needs at least one source")
        self.sources = list(sources)
        self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.source_windows = [count_windows(len(s.stream), seq_len) for s in self.sources]
        for src, n in zip(self.sources, self.source_windows):
            if n == 0:
                raise FlmError(f"training data of source {src.name} too small: {len(src.stream)} tokens make no "
                               f"window of seq_len {seq_len}")
        if len(self.sources) == 1:
            if self.source_windows[0] < batch_size * world_size:
                raise FlmError(f"training data too small: {len(self.sources[0].stream)} tokens make "
                               f"{self.source_windows[0]} windows of seq_len {seq_len}, fewer than one global batch "
                               f"of {batch_size * world_size}")
            self.pattern = np.zeros(1, dtype=np.int64)
        else:
            self.pattern = mixture_pattern([s.weight for s in self.sources])
        self.per_period = np.bincount(self.pattern, minlength=len(self.sources))
        # rank of each slot among the earlier slots of its source
        self.slot_rank = np.zeros(len(self.pattern), dtype=np.int64)
        seen = np.zeros(len(self.sources), dtype=np.int64)
        for slot, s in enumerate(self.pattern):
            self.slot_rank[slot] = seen[s]
            seen[s] += 1
        self.samples_seen = 0
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.samples_seen + self.rank * self.batch_size
        picks = [self.locate(k) for k in range(first, first + self.batch_size)]
        self.samples_seen += self.batch_size * self.world_size
        rows = [self.sources[s].stream.windows([w], self.seq_len) for s, w in picks]
        return torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])

    def locate(self, sample: int) -> tuple[int, int]:
        """(source, window) that global sample `sample` reads."""
        period, slot = divmod(sample, len(self.pattern))
        s = int(self.pattern[slot])
        j = period * int(self.per_period[s]) + int(self.slot_rank[slot])
        epoch, pos = divmod(j, self.source_windows[s])
        if not self.shuffle:
            return s, pos
        cached = self._perms.get(s)
        if cached is None or cached[0] != epoch:
            # A single source keeps the key (seed, epoch), so a plain corpus reads the order it always did.
            key = [self.seed, epoch] if len(self.sources) == 1 else [self.seed, epoch, s]
            cached = (epoch, np.random.default_rng(key).permutation(self.source_windows[s]))
            self._perms[s] = cached
        return s, int(cached[1][pos])

    def _identity(self) -> dict[str, Any]:
        """What a saved position is only valid for: same data, windows and mixture."""
        ident: dict[str, Any] = {"seed": self.seed, "seq_len": self.seq_len, "shuffle": self.shuffle}
        if len(self.sources) == 1:
            ident["n_windows"] = self.source_windows[0]
        else:
            ident["n_windows"] = list(self.source_windows)
            ident["weights"] = [s.weight for s in self.sources]
        return ident

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state["samples_seen"]`; refuse a state taken over different data or sampling settings."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise FlmError(f"cannot resume the data loader: {key} was {state.get(key)!r} in the checkpoint but is "
                               f"{value!r} now (the data or config changed since)")
        self.samples_seen = int(state["samples_seen"])


class TokenLoader(MixtureLoader):
    """The loader of a single unmasked source (a plain corpus): windows of `shards` in a per-epoch shuffle."""

    def __init__(self, shards: Sequence[str | Path], batch_size: int, seq_len: int, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__([LoaderSource("train", TokenStream(shards))], batch_size, seq_len, seed, shuffle,
                         rank, world_size)

    @property
    def n_windows(self) -> int:
        return self.source_windows[0]


def iter_eval_batches(shards: Sequence[str | Path], batch_size: int, seq_len: int, max_batches: int,
                      masks: Sequence[str | Path | None] | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches: windows in file order, full batches only, up to `max_batches`.

    When there are fewer windows than one batch, they come as a single smaller batch, so a small validation split
    still gets evaluated.
    """
    stream = TokenStream(shards, masks)
    n_windows = count_windows(len(stream), seq_len)
    if n_windows == 0:
        raise FlmError(f"validation split too small: {len(stream)} tokens, need at least {seq_len + 1} "
                       f"for one window of seq_len {seq_len}")
    n_batches = min(max(n_windows // batch_size, 1), max_batches)
    for b in range(n_batches):
        yield stream.windows(range(b * batch_size, min((b + 1) * batch_size, n_windows)), seq_len)
