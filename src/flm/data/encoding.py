"""Tokenising chunks of documents in worker processes, with the results handed back in the order the chunks came.

Order is what makes the prepared bytes independent of the number of workers: each chunk's tokens depend only on
its documents, and the caller writes results in submission order. Each worker encodes on a single thread (HF
tokenizers: TOKENIZERS_PARALLELISM=false; tiktoken: one thread), so `workers` is the number of cores tokenising.
At most two chunks per worker are in flight, which bounds memory whatever the corpus size. With one worker
everything runs in the calling process, and so do the first few chunks with more.

Workers are spawned (nothing of this process, its threads or its imports, is shared), so, as always with spawned
processes, a script that calls `prepare` with more than one worker needs the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flm.data.shards import shard_dtype
from flm.data.sources import Document, encode
from flm.data.tokenizer import Tokenizer, load_tokenizer_dir
from flm.errors import FlmError

_PARALLELISM = "TOKENIZERS_PARALLELISM"
_IN_FLIGHT_PER_WORKER = 2
_CHUNKS_HERE = 4  # encoded before any worker starts (about 1 MB of text)


@dataclass(frozen=True)
class Chunk:
    """Documents of one source to encode together; `tag` says where the caller writes them (e.g. "train")."""

    tag: str
    kind: str
    loss_on: str
    docs: list[Document]


@dataclass(frozen=True)
class Encoded:
    """A chunk's tokens (in the shard dtype, each document followed by end-of-text) and loss mask (None: text)."""

    tag: str
    tokens: np.ndarray
    mask: np.ndarray | None


def encode_chunk(chunk: Chunk, tok: Tokenizer) -> Encoded:
    tokens, mask = encode(chunk.docs, chunk.kind, tok, chunk.loss_on)
    return Encoded(chunk.tag, tokens.astype(shard_dtype(tok.vocab_size), copy=False), mask)


class EncodePool:
    """`map` encodes chunks with the tokenizer saved in `tokenizer_dir`, in `workers` processes (spawned, so nothing
    of this process is shared), yielding results in chunk order. Use as a context manager.

    The first chunks are encoded in this process, and the workers start only if more come: a small corpus (a test,
    a teacher set) does not wait for processes to start.
    """

    def __init__(self, tokenizer_dir: Path, workers: int):
        self.tokenizer_dir, self.workers = tokenizer_dir, workers
        self._pool: ProcessPoolExecutor | None = None
        self._tok: Tokenizer | None = None
        self._env: str | None = None
        self._here = 0  # chunks encoded in this process

    def __enter__(self) -> EncodePool:
        self._env = os.environ.get(_PARALLELISM)
        self._tok = _single_threaded(load_tokenizer_dir(self.tokenizer_dir))
        return self

    def __exit__(self, *_: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._env is None:
            os.environ.pop(_PARALLELISM, None)
        else:
            os.environ[_PARALLELISM] = self._env

    def map(self, chunks: Iterable[Chunk]) -> Iterator[Encoded]:
        assert self._tok is not None, "use EncodePool as a context manager"
        pending: deque[Future[Encoded]] = deque()
        try:
            for chunk in chunks:
                if self.workers == 1 or self._here < _CHUNKS_HERE:  # never once workers run: order is kept
                    self._here += 1
                    yield encode_chunk(chunk, self._tok)
                    continue
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=_start_worker, initargs=(str(self.tokenizer_dir),))
                pending.append(self._pool.submit(_encode_in_worker, chunk))
                if len(pending) >= _IN_FLIGHT_PER_WORKER * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as e:
            raise FlmError(f"the tokenising worker processes stopped ({e}); if a script of yours calls prepare(), "
                           "call it under `if __name__ == \"__main__\":`, or use one worker") from e


def _single_threaded(tok: Tokenizer) -> Tokenizer:
    os.environ[_PARALLELISM] = "false"  # read by HF tokenizers at every batch call
    tok.threads = 1
    return tok


_worker_tok: Tokenizer | None = None


def _start_worker(tokenizer_dir: str) -> None:
    global _worker_tok
    _worker_tok = _single_threaded(load_tokenizer_dir(tokenizer_dir))


def _encode_in_worker(chunk: Chunk) -> Encoded:
    assert _worker_tok is not None
    return encode_chunk(chunk, _worker_tok)
