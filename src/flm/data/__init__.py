"""Text to training batches: corpora, tokenizers, binary token shards, `prepare`, and the resumable loader.

The loader's names are imported on first use, so that `flm prepare` and its tokenising worker processes, which
never touch the loader, do not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

from flm.data.corpus import iter_documents
from flm.data.prepare import prepare
from flm.data.prepared import PreparedData, load_prepared
from flm.data.shards import read_shard, write_shard
from flm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "Tokenizer", "train_bpe", "load_tokenizer", "iter_documents", "write_shard", "read_shard",
    "prepare", "load_prepared", "PreparedData", "TokenLoader", "iter_eval_batches",
]


def __getattr__(name: str) -> Any:
    if name in ("TokenLoader", "iter_eval_batches"):
        from flm.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'flm.data' has no attribute {name!r}")
