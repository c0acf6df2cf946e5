"""Pattern mining: a transformation shown only through five demonstrations, never stated.

Each item draws one kind of element (numbers, capital letters or words) for all its sequences.

Head & Tail: keep the first and the last element.
    Input: 7 42 13 8
    Output: 7 8
Full Repeating: write the whole sequence twice.
    Input: fox lamp kite
    Output: fox lamp kite fox lamp kite
Head Slicing: keep the first k elements (k in 2..4, fixed within an item, longer sequences than k).
    Input: Q D M A K
    Output: Q D M
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from flm.eval.iq.items import Example, Item, Settings, draw_distinct, few_shot
from flm.eval.iq.lexicon import ANIMALS, THINGS

ELEMENTS: tuple[tuple[str, ...], ...] = (
    tuple(str(n) for n in range(100)),
    tuple(string.ascii_uppercase),
    ANIMALS + THINGS,
)


def head_tail(seq: list[str]) -> list[str]:
    return [seq[0], seq[-1]]


def full_repeat(seq: list[str]) -> list[str]:
    return seq + seq


def head_slice(seq: list[str], k: int) -> list[str]:
    return seq[:k]


def _pattern_item(task: str, rng: random.Random, shots: int, lengths: tuple[int, int],
                  rule: Callable[[list[str]], list[str]], facts: dict) -> Item:
    elements = rng.choice(ELEMENTS)

    def draw(r: random.Random) -> Example:
        seq = [r.choice(elements) for _ in range(r.randint(*lengths))]
        return Example(f"Input: {' '.join(seq)}", " ".join(rule(seq)), facts)

    test, *demos = draw_distinct(rng, draw, shots + 1)
    return few_shot(task, "", demos, test, tag="Output:")


def head_and_tail(task: str, rng: random.Random, shots: int, settings: Settings) -> Item:
    return _pattern_item(task, rng, shots, (3, 8), head_tail, {})


def full_repeating(task: str, rng: random.Random, shots: int, settings: Settings) -> Item:
    return _pattern_item(task, rng, shots, (2, 5), full_repeat, {})


def head_slicing(task: str, rng: random.Random, shots: int, settings: Settings) -> Item:
    k = rng.randint(2, 4)
    return _pattern_item(task, rng, shots, (k + 2, k + 5), lambda seq: head_slice(seq, k), {"k": k})
