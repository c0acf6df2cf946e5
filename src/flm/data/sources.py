"""The sources of a data mixture: read and check every record, then encode them into tokens with loss masks.

Three kinds (docs/data.md): plain text (every token is a loss target, no mask stored), instruction data (JSONL
prompt/response; the loss on the response and its end-of-text, or on everything) and teacher-signal propositions
(flm.data.teacher; the loss on the label token only). Text and instruction sources are read as streams, one record
at a time; a malformed record is an FlmError naming file:line.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Union

import numpy as np

from flm.config.schema import DataConfig, SourceConfig
from flm.data.corpus import iter_documents
from flm.data.jsonl import iter_jsonl
from flm.data.split import SPLIT_SALT, split_documents
from flm.data.teacher import TeacherItem, read_items
from flm.data.tokenizer import Tokenizer
from flm.errors import FlmError


@dataclass(frozen=True)
class Instruction:
    prompt: str
    response: str


Document = Union[str, Instruction, TeacherItem]


@dataclass(frozen=True)
class Source:
    """One source as `prepare` sees it: its config and position, name, held-out share and shard-name prefix."""

    index: int
    config: SourceConfig
    name: str
    val_fraction: float
    prefix: str  # "" for a plain corpus ("train_00000.bin"), "s{index}_" in a mixture

    @property
    def kind(self) -> str:
        return self.config.kind


def planned_sources(cfg: DataConfig) -> list[Source]:
    """The sources of `cfg`; a plain corpus is one text source, written under the names it had before mixtures."""
    if not cfg.sources:
        text = SourceConfig(kind="text")
        return [Source(0, text, source_name(text, cfg), cfg.val_fraction, "")]
    return [Source(i, src, source_name(src, cfg), src.val_fraction if src.val_fraction is not None
                   else cfg.val_fraction, f"s{i}_") for i, src in enumerate(cfg.sources)]


def source_name(src: SourceConfig, cfg: DataConfig) -> str:
    """How logs and metrics name a source, e.g. "text:bundled" or "teacher:bundled"."""
    return f"{src.kind}:{text_corpus(src, cfg) if src.kind == 'text' else src.path}"


def text_corpus(src: SourceConfig, cfg: DataConfig) -> str:
    return src.path or cfg.corpus


def iter_source(src: SourceConfig, cfg: DataConfig) -> Iterator[Document]:
    """The documents of one source, one at a time, in a fixed order."""
    if src.kind == "text":
        return iter_documents(text_corpus(src, cfg), cfg.max_chars)
    if src.kind == "instruct":
        return iter_jsonl(Path(src.path), _parse_instruction)
    return iter(read_items(src.path))


def teacher_split(src: Source) -> tuple[list[TeacherItem], list[TeacherItem]]:
    """A teacher source, read whole: (training propositions, one item each in a seeded shuffle; held-out records).

    The shuffle matters: packed windows hold several propositions, and neighbours that share a label or a question
    (the options of one question) would let the model read the answer off its context.
    """
    items = read_items(src.config.path)
    train, held = split_documents(items, src.val_fraction, keys=[split_key(item) for item in items])
    singles = [TeacherItem(text=text, label=truth) for item in train for text, truth in item.propositions()]
    random.Random(SPLIT_SALT).shuffle(singles)
    return singles, held


def read_instructions(path: str | Path) -> list[Instruction]:
    """Instruction records ({"prompt": ..., "response": ...}) of a .jsonl file or folder; errors name file:line."""
    return list(iter_jsonl(Path(path), _parse_instruction))


def split_key(doc: Document) -> str:
    """The string whose hash decides a document's split: its content, so duplicates share a split."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, Instruction):
        return doc.prompt + "\0" + doc.response
    return json.dumps(doc.to_json(), ensure_ascii=False, sort_keys=True)


def training_text(doc: Document) -> Iterator[str]:
    """The text a document contributes to tokenizer training."""
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, Instruction):
        yield from (doc.prompt, doc.response)
    else:
        yield from (text for text, _ in doc.propositions())


def encode(docs: Sequence[Document], kind: str, tok: Tokenizer, loss_on: str = "all"
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Tokens of `docs`, each followed by end-of-text, and for instruct/teacher sources the 0/1 loss mask beside
    them (mask[i] = 1: token i is a loss target, i.e. the model is trained to predict it)."""
    if kind == "text":
        ids = tok.encode_batch(list(docs))
        eot = (tok.eot_id,)
        flat = chain.from_iterable(chain.from_iterable((doc, eot) for doc in ids))
        return np.fromiter(flat, dtype=np.uint32, count=sum(map(len, ids)) + len(ids)), None
    if kind == "instruct":
        n = len(docs)
        ids = tok.encode_batch([d.prompt for d in docs] + [d.response for d in docs])
        pieces = [(p, r + [tok.eot_id]) for p, r in zip(ids[:n], ids[n:])]
        return _concat([(p + r, [int(loss_on == "all")] * len(p) + [1] * len(r)) for p, r in pieces])
    if tok.label_ids is None:
        raise FlmError("teacher-signal data needs the label tokens in the tokenizer")
    true_id, false_id = tok.label_ids
    props = [p for item in docs for p in item.propositions()]
    ids = tok.encode_batch([text for text, _ in props])
    return _concat([(t + [true_id if truth else false_id, tok.eot_id], [0] * len(t) + [1, 0])
                    for t, (_, truth) in zip(ids, props)])


def _concat(pieces: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.array([t for ids, _ in pieces for t in ids], dtype=np.uint32)
    mask = np.array([bit for _, bits in pieces for bit in bits], dtype=np.uint8)
    return tokens, mask


def _parse_instruction(record: Any) -> Instruction:
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not (isinstance(response, str) and response.strip()):
        raise ValueError('expected a string "prompt" and a non-empty string "response"')
    extra = sorted(set(record) - {"prompt", "response"})
    if extra:
        raise ValueError(f"unexpected field {extra[0]!r} (allowed: prompt, response)")
    return Instruction(prompt, response)
