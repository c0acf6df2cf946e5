"""The item schema every IQ subtask produces, and the few-shot layout they share.

An `Item` is everything needed to score one question, independent of any model:

    prompt   the full text the model reads; it ends exactly where the answer starts (e.g. "...\\nOutput:")
    answer   the one correct answer, without the leading separator
    lead     the text joining prompt and answer: " " for English prompts, "" for Chinese ones
    choices  the closed answer set (ranked by log-likelihood of `lead + choice`); empty for open generation,
             which is scored by exact match of the first generated line, stripped
    query    the test question's own text, and `demos` each demonstration's question text, so that anyone
             can check that no demonstration is the test question
    facts    what the generator drew to build the item (numbers, rules, supporting sentences), for checks

Layout of a few-shot prompt (blank lines between blocks; no header for pattern mining):

    <header>

    <demo question>
    <tag> <demo answer>

    <test question>
    <tag>
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Settings:
    """How to build a run's items; `None` means each subtask's own default."""

    items: int = 100
    seed: int = 0
    shots: int | None = None  # demonstrations (per label for symbolic mapping)
    context_length: int | None = None  # anti-interference: sentences per story, facts and distractors together
    data: Mapping[str, str] = field(default_factory=dict)  # symbolic mapping: dataset name -> local JSONL


@dataclass(frozen=True)
class Example:
    """One solved question: `question` is the text unique to it, `answer` its one correct answer."""

    question: str
    answer: str
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    task: str
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    lead: str = " "
    query: str = ""
    demos: tuple[str, ...] = ()
    facts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def max_new_tokens(self) -> int:
        """Generation budget: the answer's UTF-8 byte count bounds its token count for byte-level and character
        tokenizers; the slack lets a model write the answer and a line break, so a longer line is never cut down
        to a lucky match."""
        return len(self.answer.encode("utf-8")) + 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_rng(task: str, seed: int) -> random.Random:
    """A generator private to (subtask, seed): string seeds hash the same way in every Python process."""
    return random.Random(f"flm-iq/{task}/{seed}")


def draw_distinct(rng: random.Random, draw: Callable[[random.Random], Example], n: int) -> list[Example]:
    """`n` examples with pairwise different questions (the first is used as the test, the rest as demos)."""
    out: list[Example] = []
    seen: set[str] = set()
    for _ in range(100 * n + 100):
        ex = draw(rng)
        if ex.question not in seen:
            seen.add(ex.question)
            out.append(ex)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not draw {n} distinct examples: the generator's space is too small")


def few_shot(task: str, header: str, demos: Sequence[Example], test: Example, *, tag: str = "Answer:",
             lead: str = " ", choices: Sequence[str] = ()) -> Item:
    """Lay out demos and the test question (see the module docstring) as one Item."""
    blocks = [f"{d.question}\n{tag}{lead}{d.answer}" for d in demos] + [f"{test.question}\n{tag}"]
    prompt = "\n\n".join(([header] if header else []) + blocks)
    return Item(task=task, prompt=prompt, answer=test.answer, choices=tuple(choices), lead=lead,
                query=test.question, demos=tuple(d.question for d in demos), facts=dict(test.facts))
