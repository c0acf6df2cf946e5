"""Anti-interference: the few sentences that matter are hidden among distractors.

`context_length` is the number of sentences in a story, relevant ones and distractors together, so the number of
distractors is `context_length` minus the supporting facts (recorded in each item's facts).

Multiple Key Retrieval: four "pass key" facts (three of them distractors) among filler sentences.
    Read the text and answer the question.

    The pass key of Elena is 48213. The lamp is quiet. ... The pass key of Sven is 90412. ...
    Question: What is the pass key of Sven?
    Answer: 90412
Single Supporting Fact (bAbI task 1): people move around; where is one of them now?
    Mary went to the kitchen. John moved to the garden. Mary travelled to the office. ...
    Question: Where is Mary?
    Answer: office
Two Supporting Facts (bAbI task 2): people move and pick up or drop objects; where is an object now?
    John went to the garden. John picked up the football. John moved to the office. ...
    Question: Where is the football?
    Answer: office
"""

from __future__ import annotations

import random

from flm.errors import FlmError
from flm.eval.iq.items import Example, Item, Settings, draw_distinct, few_shot
from flm.eval.iq.lexicon import COLOURS, NAMES, NOUNS, OBJECTS, PEOPLE, PLACES, SIZES

HEADER = "Read the text and answer the question."
MOVES = ("went to", "moved to", "travelled to", "journeyed to", "went back to")
N_KEYS = 4
ACTORS, ROOMS, CARRIED = PEOPLE[:4], PLACES[:6], OBJECTS[:3]  # bAbI-sized worlds


def _context_length(settings: Settings, default: int, minimum: int, task: str) -> int:
    n = default if settings.context_length is None else settings.context_length
    if n < minimum:
        raise FlmError(f"{task} needs a context length of at least {minimum} sentences, got {n}")
    return n


def _filler(rng: random.Random) -> str:
    return f"The {rng.choice(NOUNS)} is {rng.choice(COLOURS + SIZES)}."


def _key_example(rng: random.Random, length: int) -> Example:
    names = rng.sample(NAMES, min(N_KEYS, length))
    values = rng.sample(range(10000, 100000), len(names))
    keys = [f"The pass key of {n} is {v}." for n, v in zip(names, values)]
    sentences = keys + [_filler(rng) for _ in range(length - len(keys))]
    rng.shuffle(sentences)
    asked = rng.randrange(len(names))
    story = " ".join(sentences)
    return Example(f"{story}\nQuestion: What is the pass key of {names[asked]}?", str(values[asked]),
                   {"key": names[asked], "sentences": sentences, "supporting": [sentences.index(keys[asked])]})


def multiple_key_retrieval(task: str, rng: random.Random, shots: int, settings: Settings) -> Item:
    length = _context_length(settings, 20, 1, task)
    test, *demos = draw_distinct(rng, lambda r: _key_example(r, length), shots + 1)
    return few_shot(task, HEADER, demos, test)


def _move(rng: random.Random, person: str, place: str) -> str:
    return f"{person} {rng.choice(MOVES)} the {place}."


def _single_example(rng: random.Random, length: int) -> Example:
    where: dict[str, str] = {}
    last: dict[str, int] = {}
    sentences = []
    for i in range(length):
        person = rng.choice(ACTORS)
        where[person] = rng.choice([p for p in ROOMS if p != where.get(person)])
        last[person] = i
        sentences.append(_move(rng, person, where[person]))
    asked = rng.choice(sorted(where))
    return Example(f"{' '.join(sentences)}\nQuestion: Where is {asked}?", where[asked],
                   {"person": asked, "sentences": sentences, "supporting": [last[asked]]})


def single_supporting_fact(task: str, rng: random.Random, shots: int, settings: Settings) -> Item:
    length = _context_length(settings, 10, 1, task)
    test, *demos = draw_distinct(rng, lambda r: _single_example(r, length), shots + 1)
    return few_shot(task, HEADER, demos, test)


class _World:
    """bAbI task 2 state: where people are, who holds what, where dropped objects lie, and which sentences say so."""

    def __init__(self) -> None:
        self.at: dict[str, str] = {}  # person -> place
        self.moved: dict[str, int] = {}  # person -> index of their last move
        self.holder: dict[str, str] = {}  # object -> person carrying it
        self.lying: dict[str, str] = {}  # object -> place where it was dropped
        self.support: dict[str, list[int]] = {}  # object -> sentences its current place follows from
        self.sentences: list[str] = []

    def step(self, rng: random.Random) -> None:
        i = len(self.sentences)
        free = [o for o in CARRIED if o not in self.holder]
        held = sorted(self.holder)
        placed = [p for p in ACTORS if p in self.at]
        roll = rng.random()
        if held and roll < 0.15:
            obj = rng.choice(held)
            person = self.holder.pop(obj)
            self.lying[obj] = self.at[person]
            self.support[obj] = self.support[obj] + [self.moved[person], i]
            self.sentences.append(f"{person} dropped the {obj}.")
        elif free and placed and roll < 0.45:
            obj, person = rng.choice(free), rng.choice(placed)
            self.holder[obj] = person
            self.lying.pop(obj, None)
            self.support[obj] = [i]
            self.sentences.append(f"{person} picked up the {obj}.")
        else:
            person = rng.choice(ACTORS)
            self.at[person] = rng.choice([p for p in ROOMS if p != self.at.get(person)])
            self.moved[person] = i
            self.sentences.append(_move(rng, person, self.at[person]))

    def place_of(self, obj: str) -> tuple[str, list[int]]:
        """Where `obj` is now and the sentences that establish it (pick-up, the carrier's last move, drop)."""
        if obj in self.holder:
            person = self.holder[obj]
            return self.at[person], sorted({self.support[obj][0], self.moved[person]})
        return self.lying[obj], sorted(set(self.support[obj]))


def _two_example(rng: random.Random, length: int) -> Example:
    for _ in range(1000):
        world = _World()
        for _ in range(length):
            world.step(rng)
        known = sorted(set(world.holder) | set(world.lying))
        if known:
            obj = rng.choice(known)
            place, support = world.place_of(obj)
            return Example(f"{' '.join(world.sentences)}\nQuestion: Where is the {obj}?", place,
                           {"object": obj, "sentences": world.sentences, "supporting": support})
    raise RuntimeError(f"no story of {length} sentences placed an object")


def two_supporting_facts(task: str, rng: random.Random, shots: int, settings: Settings) -> Item:
    length = _context_length(settings, 12, 2, task)
    test, *demos = draw_distinct(rng, lambda r: _two_example(r, length), shots + 1)
    return few_shot(task, HEADER, demos, test)
