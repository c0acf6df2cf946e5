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
BUNDLED_VERSION = 1
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
def bundled_items(n: int = 24_000) -> list[TeacherItem]:
    """A seeded set of true/false statements about small numbers, in English and Chinese, half of them true.

    Kinds (in turn): comparisons of two numbers below 100 ("41 is greater than 17."), sums of two numbers below 10
    ("3 plus 4 equals 8."), the Chinese comparison ("41比17大。"), and two-option multiple-choice sums
    ("3 plus 4 equals ", options "7." / "9."). Judging them needs the order of numbers and the addition table, which the corpus
    does not teach: what the model learns here comes from the teacher signal.
    """
    rng = random.Random(_BUNDLED_SEED)
    makers = (_comparison, _sum, _comparison_zh, _sum_choice)
    return [makers[i % len(makers)](rng, truth=(i // len(makers)) % 2 == 0) for i in range(n)]


def _pair(rng: random.Random, high: int) -> tuple[int, int]:
    a, b = rng.sample(range(high), 2)
    return a, b


def _comparison(rng: random.Random, truth: bool) -> TeacherItem:
    a, b = _pair(rng, 100)
    relation = rng.choice(("greater", "less"))
    holds = a > b if relation == "greater" else a < b
    if holds != truth:
        a, b = b, a
    return TeacherItem(text=f"{a} is {relation} than {b}.", label=truth)


def _comparison_zh(rng: random.Random, truth: bool) -> TeacherItem:
    a, b = _pair(rng, 100)
    relation = rng.choice("大小")
    holds = a > b if relation == "大" else a < b
    if holds != truth:
        a, b = b, a
    return TeacherItem(text=f"{a}比{b}{relation}。", label=truth)


def _wrong_sum(rng: random.Random, total: int) -> int:
    return rng.choice([c for c in range(max(total - 3, 0), total + 4) if c != total])


def _sum(rng: random.Random, truth: bool) -> TeacherItem:
    a, b = rng.randrange(10), rng.randrange(10)
    c = a + b if truth else _wrong_sum(rng, a + b)
    return TeacherItem(text=f"{a} plus {b} equals {c}.", label=truth)


def _sum_choice(rng: random.Random, truth: bool) -> TeacherItem:
    """Two options, one true, so the set's propositions stay half true (chance is 50% for both measures)."""
    a, b = rng.randrange(10), rng.randrange(10)
    options = [a + b, _wrong_sum(rng, a + b)]
    if not truth:  # the true option comes first in half of the questions
        options.reverse()
    return TeacherItem(text=f"{a} plus {b} equals ", options=tuple(f"{c}." for c in options),
                       answer=options.index(a + b))
