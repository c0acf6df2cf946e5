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
BUNDLED_VERSION = 2
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
_LIMIT = 20  # numbers compared are below this; summands are single digits


def bundled_items() -> list[TeacherItem]:
    """Every distinct statement of four kinds about small numbers, half of them true, in a seeded order.

    Comparisons of two different numbers below 20 in English ("14 is greater than 9.") and Chinese ("14比9大。"),
    both relations for every ordered pair; for every pair of digits the true sum and one wrong one ("3 plus 4
    equals 7." / "3 plus 4 equals 9."); and for every pair of digits a two-option question ("3 + 4 = " + "7" /
    "9"). Judging them needs the order of the numbers and the addition table, which the corpus does not
    teach, and held-out statements are ones never seen in training: accuracy on them measures what the model took
    from the teacher signal.
    """
    rng = random.Random(_BUNDLED_SEED)
    items = []
    for a in range(_LIMIT):
        for b in range(_LIMIT):
            if a != b:
                items += [TeacherItem(f"{a} is greater than {b}.", label=a > b),
                          TeacherItem(f"{a} is less than {b}.", label=a < b),
                          TeacherItem(f"{a}比{b}大。", label=a > b), TeacherItem(f"{a}比{b}小。", label=a < b)]
    for a in range(10):
        for b in range(10):
            wrong = rng.choice([c for c in range(max(a + b - 3, 0), a + b + 4) if c != a + b])
            items += [TeacherItem(f"{a} plus {b} equals {a + b}.", label=True),
                      TeacherItem(f"{a} plus {b} equals {wrong}.", label=False)]
            options = [a + b, rng.choice([c for c in range(max(a + b - 3, 0), a + b + 4) if c != a + b])]
            if rng.random() < 0.5:
                options.reverse()
            items.append(TeacherItem(f"{a} + {b} = ", options=tuple(map(str, options)), answer=options.index(a + b)))
    rng.shuffle(items)
    return items
