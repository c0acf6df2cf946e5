"""Rule understanding: the rule is stated in words and the model must follow it exactly.

Counting (0-shot):
    Count as instructed, separating the numbers with commas.

    Count down from 20 to 14 in steps of 2.
    Answer: 20, 18, 16, 14

Replace-Lowercase (4-shot): one lowercase letter is replaced everywhere in a few words.
    Rule: replace every lowercase letter "a" with "u".

    Input: banana market
    Output: bununu murket
    ... (4 demos, then the test input)

Replace-Word (4-shot): one word is replaced everywhere in a sentence.
    Rule: replace every word "blue" with "green".

    Input: the blue fox follows the small blue kite
    Output: the green fox follows the small green kite
"""

from __future__ import annotations

import random
import string

from flm.eval.iq.items import Example, Item, Settings, draw_distinct, few_shot
from flm.eval.iq.lexicon import ANIMALS, COLOURS, NOUNS, SIZES, THINGS, VERBS


def count_sequence(start: int, end: int, step: int) -> list[int]:
    """Numbers from start to end inclusive, `step` apart, counting down when end < start."""
    return list(range(start, end + (1 if end >= start else -1), step if end >= start else -step))


def _counting_example(rng: random.Random) -> Example:
    step, length, down = rng.choice((1, 1, 2)), rng.randint(3, 10), rng.random() < 0.3
    span = step * (length - 1)
    start = rng.randint(span + 1, 99) if down else rng.randint(1, 99 - span)
    end = start - span if down else start + span
    words = f"Count {'down ' if down else ''}from {start} to {end}{f' in steps of {step}' if step > 1 else ''}."
    numbers = count_sequence(start, end, step)
    return Example(words, ", ".join(map(str, numbers)), {"start": start, "end": end, "step": step})


def counting(task: str, rng: random.Random, shots: int, settings: Settings) -> Item:
    test, *demos = draw_distinct(rng, _counting_example, shots + 1)
    return few_shot(task, "Count as instructed, separating the numbers with commas.", demos, test)


def replace_letter(text: str, src: str, dst: str) -> str:
    return text.replace(src, dst)


def replace_word(text: str, src: str, dst: str) -> str:
    return " ".join(dst if w == src else w for w in text.split(" "))


def replace_lowercase(task: str, rng: random.Random, shots: int, settings: Settings) -> Item:
    src = rng.choice("aeilnorst")
    dst = rng.choice([c for c in string.ascii_lowercase if c != src])
    pool = [w for w in NOUNS if src in w]

    def draw(r: random.Random) -> Example:
        words = [r.choice(pool)] + r.sample(NOUNS, r.randint(1, 3))
        r.shuffle(words)
        text = " ".join(words)
        return Example(f"Input: {text}", replace_letter(text, src, dst), {"src": src, "dst": dst})

    test, *demos = draw_distinct(rng, draw, shots + 1)
    return few_shot(task, f'Rule: replace every lowercase letter "{src}" with "{dst}".', demos, test, tag="Output:")


def _sentence(rng: random.Random, adjectives: tuple[str, ...], nouns: tuple[str, ...]) -> list[str]:
    return ["the", rng.choice(adjectives), rng.choice(nouns), rng.choice(VERBS), "the", rng.choice(adjectives),
            rng.choice(nouns)]


def replace_word_task(task: str, rng: random.Random, shots: int, settings: Settings) -> Item:
    adjectives, nouns = COLOURS + SIZES, ANIMALS + THINGS
    category = rng.choice((adjectives, nouns))
    src, dst = rng.sample(category, 2)
    slots = (1, 5) if category is adjectives else (2, 6)

    def draw(r: random.Random) -> Example:
        words = _sentence(r, adjectives, nouns)
        words[r.choice(slots)] = src  # the rule must apply at least once
        text = " ".join(words)
        return Example(f"Input: {text}", replace_word(text, src, dst), {"src": src, "dst": dst})

    test, *demos = draw_distinct(rng, draw, shots + 1)
    return few_shot(task, f'Rule: replace every word "{src}" with "{dst}".', demos, test, tag="Output:")
