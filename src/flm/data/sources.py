"""The sources of a data mixture: read and check every record, then encode them into tokens with loss masks.

Three kinds (docs/data.md): plain text (every token is a loss target, no mask stored), instruction data (JSONL
prompt/response; the loss on the response and its end-of-text, or on everything) and teacher-signal propositions
(flm.data.teacher; the loss on the label token only). `prepare` reads every source completely before it touches its
output folder, so a malformed line is reported (file:line) while an already prepared folder is still intact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from flm.config.schema import DataConfig, SourceConfig
from flm.data.corpus import iter_documents
from flm.data.jsonl import read_jsonl
from flm.data.teacher import TeacherItem, read_items
from flm.data.tokenizer import Tokenizer
from flm.errors import FlmError

@dataclass(frozen=True)
class Instruction:
    prompt: str
    response: str


Document = Union[str, Instruction, TeacherItem]


def source_name(src: SourceConfig, cfg: DataConfig) -> str:
    """How logs and metrics name a source, e.g. "text:bundled" or "teacher:bundled"."""
    return f"{src.kind}:{text_corpus(src, cfg) if src.kind == 'text' else src.path}"


def text_corpus(src: SourceConfig, cfg: DataConfig) -> str:
    return src.path or cfg.corpus


def read_source(src: SourceConfig, cfg: DataConfig) -> list[Document]:
    """Every document of one source, in a fixed order; any malformed record is an FlmError naming file:line."""
    if src.kind == "text":
        return list(iter_documents(text_corpus(src, cfg), cfg.max_chars))
    if src.kind == "instruct":
        return read_instructions(src.path)
    return read_items(src.path)


def read_instructions(path: str | Path) -> list[Instruction]:
    """Instruction records ({"prompt": ..., "response": ...}) of a .jsonl file or folder; errors name file:line."""
    return read_jsonl(Path(path), _parse_instruction)


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
        flat: list[int] = []
        for ids in tok.encode_batch(list(docs)):
            flat.extend(ids)
            flat.append(tok.eot_id)
        return np.array(flat, dtype=np.uint32), None
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
