"""Teacher-signal propositions (REFERENCE.md §4): records, their JSONL format, and the bundled generated set.

A proposition is a statement with a truth label; it is trained as `<text><label token>` with the loss on the label
token only, so the model learns to judge statements in its ordinary language-model form. A multiple-choice question
becomes one proposition per option (question + option, concatenated as written), exactly one of them true.

JSONL, one record per line (docs/data.md):
    {"text": "7 is greater than 3.", "label": true}
    {"question": "2 plus 3 equals ", "options": ["4.", "5.", "6."], "answer": 1}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flm.data.jsonl import read_jsonl

BUNDLED = "bundled"
# Part of the prepared-data fingerprint: bump when `bundled_items` changes what it generates.
BUNDLED_VERSION = 5
_BUNDLED_SEED = 20240901


@dataclass(frozen=True)
class TeacherItem:
    """One record: a single proposition (`label` set) or a multiple-choice question (`options` and `answer` set)."""

    text: str  # the proposition, or the question that each option completes
    label: bool | None = None
    options: tuple[str, ...] = ()
    answer: int | None = None

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)

    def propositions(self) -> list[tuple[str, bool]]:
        """(text, truth) of each proposition the record stands for."""
        if self.multiple_choice:
            return [(self.text + option, i == self.answer) for i, option in enumerate(self.options)]
        assert self.label is not None
        return [(self.text, self.label)]

    def to_json(self) -> dict[str, Any]:
        if self.multiple_choice:
            return {"question": self.text, "options": list(self.options), "answer": self.answer}
        return {"text": self.text, "label": self.label}


def parse_item(record: Any) -> TeacherItem:
    """A JSON value -> TeacherItem; a ValueError says what is wrong (the caller adds file and line)."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "question" in record or "options" in record:
        question, options, answer = record.get("question"), record.get("options"), record.get("answer")
        if not isinstance(question, str):
            raise ValueError('a multiple-choice record needs a string "question"')
        if not (isinstance(options, list) and len(options) >= 2
                and all(isinstance(o, str) and o.strip() for o in options)):
            raise ValueError('"options" must be a list of at least 2 non-empty strings')
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options)):
            raise ValueError(f'"answer" must be the index of the true option, an integer in [0, {len(options)})')
        _no_extra(record, {"question", "options", "answer"})
        return TeacherItem(text=question, options=tuple(options), answer=answer)
    text, label = record.get("text"), record.get("label")
    if not (isinstance(text, str) and text.strip()):
        raise ValueError('expected a non-empty string "text" (or "question" with "options" and "answer")')
    if not isinstance(label, bool):
        raise ValueError('"label" must be true or false')
    _no_extra(record, {"text", "label"})
    return TeacherItem(text=text, label=label)


def _no_extra(record: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(record) - allowed)
    if extra:
        raise ValueError(f"unexpected field {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")


def read_items(path: str | Path) -> list[TeacherItem]:
    """Read a teacher JSONL file, or "bundled" for the generated set; a bad line is an FlmError with file:line."""
    if str(path) == BUNDLED:
        return bundled_items()
    return read_jsonl(Path(path), parse_item)


def items_jsonl(items: list[TeacherItem]) -> bytes:
    """The JSONL bytes of `items` (the same format `read_items` reads)."""
    return "".join(json.dumps(item.to_json(), ensure_ascii=False) + "\n" for item in items).encode()


# ---- the bundled set ----------------------------------------------------------------------------------------------
_OLD_TESTAMENT_BOOKS = 39  # KJV_BOOKS lists the Old Testament first
# The first 27 Old Testament books (Genesis..Daniel) and the 27 of the New: half of the statements are true.
_BOOKS = 27
_TEMPLATES = ("{book} is a book of the Old Testament.", "The book of {book} belongs to the Old Testament.",
              "In the Bible, {book} is part of the Old Testament.", "{book} is found in the Old Testament.",
              "The Old Testament contains the book of {book}.", "One book of the Old Testament is {book}.",
              "{book} was written before the time of Jesus.", "《{book}》属于旧约。")


def book_title(stem: str) -> str:
    """"1Samuel" -> "1 Samuel", "SongofSolomon" -> "Song of Solomon": the file stems of the bundled KJV."""
    if stem == "SongofSolomon":
        return "Song of Solomon"
    return f"{stem[0]} {stem[1:]}" if stem[0].isdigit() else stem


def bundled_items() -> list[TeacherItem]:
    """Statements that a book of the bundled King James Bible belongs to the Old Testament, in a seeded order.

    27 books of each testament (Genesis..Daniel, Matthew..Revelation), eight phrasings each ("Ruth is a book of
    the Old Testament.", "The Old Testament contains the book of Ruth.", ..., "《Ruth》属于旧约。"), so half of the
    statements are true; and 27 two-option questions pairing an Old with a New Testament book ("Of Ruth and Mark,
    the Old Testament book is " + "Ruth." / "Mark."). The corpus never says which testament a book is in, so the
    fact comes from the teacher signal, and a held-out statement is a phrasing the model never saw for its book.
    """
    from flm.data.corpus import KJV_BOOKS

    rng = random.Random(_BUNDLED_SEED)
    old, new = ([book_title(s) for s in books] for books in (KJV_BOOKS[:_BOOKS], KJV_BOOKS[_OLD_TESTAMENT_BOOKS:]))
    items = [TeacherItem(template.format(book=book), label=book in old) for book in old + new for template in _TEMPLATES]
    for i, (a, b) in enumerate(zip(old, rng.sample(new, len(new)))):
        options = (a, b) if i % 2 == 0 else (b, a)
        items.append(TeacherItem(f"Of {options[0]} and {options[1]}, the Old Testament book is ",
                                 options=tuple(f"{o}." for o in options), answer=options.index(a)))
    rng.shuffle(items)
    return items
