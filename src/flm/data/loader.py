"""Deterministic, resumable batches of fixed-length windows over memory-mapped shards.

The training stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and targets shifted by one;
neighbouring windows share one boundary token). Global sample k reads window perm_e[k % n_windows] of epoch
e = k // n_windows, where perm_e is drawn from (seed, e). Everything therefore follows from one integer, the
number of global samples consumed, which is all a checkpoint has to store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flm.data.shards import read_shard
from flm.errors import FlmError


class TokenStream:
    """Shards read as one concatenated token sequence, without copying them into memory."""

    def __init__(self, shards: Sequence[str | Path]):
        self.parts = [read_shard(p) for p in shards]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries where needed."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        part = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - int(self.starts[part])
            chunk = self.parts[part][offset:offset + length - filled]
            out[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
            part += 1
        return out

    def windows(self, indices: Sequence[int] | np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for the given window indices, as int64 tensors of shape [len(indices), seq_len]."""
        rows = np.stack([self.read(int(w) * seq_len, seq_len + 1) for w in indices])
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


def count_windows(n_tokens: int, seq_len: int) -> int:
    return max(n_tokens - 1, 0) // seq_len


class TokenLoader:
    """Training batches for one rank of `world_size`; see the module docstring for the sample order.

    Each call consumes one global batch of batch_size * world_size samples, of which this rank takes the
    contiguous slice [rank * batch_size, (rank + 1) * batch_size). `samples_seen` counts global samples, so a
    saved state resumes exactly as long as the global batch size is unchanged.
    """

    def __init__(self, shards: Sequence[str | Path], batch_size: int, seq_len: int, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size <= 0 or seq_len <= 0:
            raise FlmError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise FlmError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise FlmError(f"the data seed must be non-negative, got {seed}")
        self.stream = TokenStream(shards)
        self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.n_windows = count_windows(len(self.stream), seq_len)
        if self.n_windows < batch_size * world_size:
            raise FlmError(f"training data too small: {len(self.stream)} tokens make {self.n_windows} windows of "
                           f"seq_len {seq_len}, fewer than one global batch of {batch_size * world_size}")
        self.samples_seen = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.samples_seen + self.rank * self.batch_size
        windows = [self._window(k) for k in range(first, first + self.batch_size)]
        self.samples_seen += self.batch_size * self.world_size
        return self.stream.windows(windows, self.seq_len)

    def _window(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.n_windows)
        if not self.shuffle:
            return pos
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state["samples_seen"]`; refuse a state taken over different data or sampling settings."""
        for key in ("seed", "seq_len", "n_windows", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise FlmError(f"cannot resume the data loader: {key} was {state.get(key)!r} in the checkpoint but is "
                               f"{getattr(self, key)!r} now (the data or config changed since)")
        self.samples_seen = int(state["samples_seen"])


def iter_eval_batches(shards: Sequence[str | Path], batch_size: int, seq_len: int,
                      max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches: windows in file order, full batches only, up to `max_batches`.

    When there are fewer windows than one batch, they come as a single smaller batch, so a small validation split
    still gets evaluated.
    """
    stream = TokenStream(shards)
    n_windows = count_windows(len(stream), seq_len)
    if n_windows == 0:
        raise FlmError(f"validation split too small: {len(stream)} tokens, need at least {seq_len + 1} "
                       f"for one window of seq_len {seq_len}")
    n_batches = min(max(n_windows // batch_size, 1), max_batches)
    for b in range(n_batches):
        yield stream.windows(range(b * batch_size, min((b + 1) * batch_size, n_windows)), seq_len)
