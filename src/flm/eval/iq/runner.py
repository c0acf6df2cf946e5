"""Scoring IQ items with any `LanguageModel`: log-likelihood ranking for closed answer sets, else greedy exact match."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flm.eval.iq.items import Item, Settings
from flm.eval.iq.tasks import SUBTASKS, Subtask, build_items
from flm.eval.scorer import LanguageModel


@dataclass
class SubtaskResult:
    subtask: Subtask
    correct: int = 0
    total: int = 0
    truncated: int = 0  # prompts the model had to cut from the left
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)  # per item: answer, prediction, correct

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total if self.total else 0.0


def score_item(model: LanguageModel, item: Item) -> tuple[str, bool]:
    """(the model's answer, whether it is the correct one).

    Closed sets: the choice whose `lead + choice` has the highest log-likelihood (ties go to the first). Open
    answers: the first generated line, stripped, must equal the answer.
    """
    if item.choices:
        scores = [model.loglikelihood(item.prompt, item.lead + c) for c in item.choices]
        prediction = item.choices[max(range(len(scores)), key=scores.__getitem__)]
    else:
        prediction = model.greedy(item.prompt, item.max_new_tokens, stop=("\n",)).strip()
    return prediction, prediction == item.answer


def run_subtask(model: LanguageModel, subtask: Subtask, items: Sequence[Item]) -> SubtaskResult:
    result = SubtaskResult(subtask)
    cut_before, start = getattr(model, "truncated", 0), time.perf_counter()
    for item in items:
        prediction, ok = score_item(model, item)
        result.correct += ok
        result.total += 1
        result.records.append({"answer": item.answer, "prediction": prediction, "correct": ok})
    result.truncated = getattr(model, "truncated", 0) - cut_before
    result.seconds = time.perf_counter() - start
    return result


def run_iq(model: LanguageModel, names: Sequence[str], settings: Settings,
           progress: Callable[[SubtaskResult], None] | None = None) -> list[SubtaskResult]:
    """Build and score each named subtask in turn; `progress` sees each result as it finishes."""
    results = []
    for name in names:
        result = run_subtask(model, SUBTASKS[name], build_items(SUBTASKS[name], settings))
        if progress is not None:
            progress(result)
        results.append(result)
    return results
