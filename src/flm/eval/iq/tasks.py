"""The IQ benchmark's registry: every subtask, the ability it measures, its defaults and the paper's numbers.

The paper (REFERENCE.md §7) reports eleven rows under four abilities: three subtasks each for rule understanding,
pattern mining and anti-interference, and two suites for symbolic mapping (SuperGLUE-IQ, CLUE-IQ), each the
average of four datasets. Here each of those eight datasets is its own subtask and the suite averages are group
rows, so one can run a single dataset or a whole suite.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from flm.errors import FlmError
from flm.eval.iq import interference, pattern, rule
from flm.eval.iq.items import Item, Settings, task_rng
from flm.eval.iq.symbolic import FORMATS, symbolic_item

Paper = tuple[float | None, float | None, float | None]  # accuracy (%) of GPT-3, GLM-130B, FLM-101B
PAPER_MODELS = ("GPT-3", "GLM-130B", "FLM-101B")

ABILITIES = {  # name -> (title, the paper's average over the ability's subtasks)
    "symbolic_mapping": ("Symbolic mapping", None),
    "rule_understanding": ("Rule understanding", (86.03, 71.49, 76.42)),
    "pattern_mining": ("Pattern mining", (70.00, 53.00, 64.67)),
    "anti_interference": ("Anti-interference", (70.11, 53.56, 60.11)),
}
GROUPS = {  # symbolic-mapping suites: name -> (title, paper average)
    "superglue_iq": ("SuperGLUE-IQ", (47.60, 48.19, 46.76)),
    "clue_iq": ("CLUE-IQ", (None, 39.96, 42.07)),
}


@dataclass(frozen=True)
class Subtask:
    name: str
    ability: str
    title: str
    shots: int  # default number of demonstrations (per label for symbolic mapping)
    make: Callable[[str, random.Random, int, Settings], Item]
    group: str | None = None
    paper: Paper | None = None
    closed: bool = False  # answers come from a closed set (ranked by log-likelihood)


def _symbolic(name: str) -> Subtask:
    fmt = FORMATS[name]
    return Subtask(f"{fmt.group}_{name}", "symbolic_mapping", fmt.title, 2,
                   lambda task, rng, shots, settings: symbolic_item(task, name, rng, shots, settings),
                   group=fmt.group, closed=True)


SUBTASKS: dict[str, Subtask] = {s.name: s for s in (
    *(_symbolic(name) for name in FORMATS),
    Subtask("counting", "rule_understanding", "Counting", 0, rule.counting, paper=(82.43, 60.81, 69.59)),
    Subtask("replace_lowercase", "rule_understanding", "Replace-Lowercase", 4, rule.replace_lowercase,
            paper=(80.67, 69.67, 64.00)),
    Subtask("replace_word", "rule_understanding", "Replace-Word", 4, rule.replace_word_task,
            paper=(95.00, 84.00, 95.67)),
    Subtask("head_tail", "pattern_mining", "Head & Tail", 5, pattern.head_and_tail, paper=(61.0, 38.0, 52.0)),
    Subtask("full_repeating", "pattern_mining", "Full Repeating", 5, pattern.full_repeating,
            paper=(92.0, 70.0, 79.0)),
    Subtask("head_slicing", "pattern_mining", "Head Slicing", 5, pattern.head_slicing, paper=(57.0, 51.0, 63.0)),
    Subtask("multiple_key_retrieval", "anti_interference", "Multiple Key Retrieval", 0,
            interference.multiple_key_retrieval, paper=(92.67, 77.67, 89.00)),
    Subtask("single_supporting_fact", "anti_interference", "Single Supporting Fact", 0,
            interference.single_supporting_fact, paper=(78.33, 56.33, 59.00)),
    Subtask("two_supporting_facts", "anti_interference", "Two Supporting Facts", 0,
            interference.two_supporting_facts, paper=(39.33, 26.67, 32.33)),
)}


def resolve_tasks(spec: str) -> list[str]:
    """A comma list of subtask, suite (superglue_iq, clue_iq) or ability names, or "all" -> subtasks in table order."""
    wanted: set[str] = set()
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        matches = [s.name for s in SUBTASKS.values() if word in ("all", s.name, s.ability, s.group)]
        if not matches:
            choices = ", ".join(["all", *ABILITIES, *GROUPS, *SUBTASKS])
            raise FlmError(f"unknown IQ task {word!r}; choose from {choices}")
        wanted.update(matches)
    if not wanted:
        raise FlmError("no IQ task given")
    return [name for name in SUBTASKS if name in wanted]


def build_items(subtask: Subtask, settings: Settings) -> list[Item]:
    """`settings.items` items with distinct test questions, the same ones for the same seed."""
    if settings.items < 1:
        raise FlmError(f"the number of items must be positive, got {settings.items}")
    shots = subtask.shots if settings.shots is None else settings.shots
    if shots < 0:
        raise FlmError(f"the number of demonstrations cannot be negative, got {shots}")
    rng = task_rng(subtask.name, settings.seed)
    items: list[Item] = []
    seen: set[str] = set()
    for _ in range(20 * settings.items + 100):
        item = subtask.make(subtask.name, rng, shots, settings)
        if item.query not in seen:
            seen.add(item.query)
            items.append(item)
            if len(items) == settings.items:
                return items
    raise FlmError(f"{subtask.name}: only {len(items)} distinct items exist for these settings; ask for fewer")
