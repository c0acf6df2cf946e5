"""Text to training batches: corpora, tokenizers, binary token shards, `prepare`, and the resumable loader."""

from flm.data.corpus import iter_documents
from flm.data.loader import TokenLoader, iter_eval_batches
from flm.data.prepare import PreparedData, load_prepared, prepare
from flm.data.shards import read_shard, write_shard
from flm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "Tokenizer", "train_bpe", "load_tokenizer", "iter_documents", "write_shard", "read_shard",
    "prepare", "load_prepared", "PreparedData", "TokenLoader", "iter_eval_batches",
]
