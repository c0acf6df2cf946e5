"""Teacher-signal accuracy: does the model put more probability on the TRUE label token than on the FALSE one?

A proposition is judged true when p(<|true|>) > p(<|false|>) right after its text, the position where training put
its label; a model trained with the separate objective (a teacher head, model.teacher_head) is read at the same
position, by its head's two logits instead (argmax). A multiple-choice question counts as answered when its true
option has the highest p(true) / (p(true) + p(false)) of its options (the head's p(true) for a separate model).
Both the trainer (at every evaluation, on the held-out records of its teacher sources) and `flm eval teacher` use
`teacher_accuracy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flm.data.teacher import TeacherItem, read_items
from flm.data.tokenizer import Tokenizer
from flm.errors import FlmError


@dataclass(frozen=True)
class TeacherAccuracy:
    propositions: int
    correct: int  # propositions judged right
    true_share: float  # fraction of true propositions: the accuracy of always answering the majority label
    questions: int  # multiple-choice records
    answered: int  # of them answered right

    @property
    def accuracy(self) -> float:
        return self.correct / self.propositions

    @property
    def mc_accuracy(self) -> float | None:
        return self.answered / self.questions if self.questions else None

    def summary(self) -> str:
        text = (f"teacher accuracy {100 * self.accuracy:.1f}% ({self.correct}/{self.propositions} propositions; "
                f"majority label {100 * max(self.true_share, 1 - self.true_share):.1f}%)")
        if self.questions:
            text += f", multiple choice {100 * self.answered / self.questions:.1f}% ({self.answered}/{self.questions})"
        return text


def read_heldout(paths: Sequence[str | Path]) -> list[TeacherItem]:
    return [item for path in paths for item in read_items(path)]


@torch.no_grad()
def label_margins(model: torch.nn.Module, tok: Tokenizer, texts: Sequence[str], batch_size: int = 64
                  ) -> torch.Tensor:
    """log p(TRUE) - log p(FALSE) at the label position after each text, as a float32 CPU tensor: from the two label
    tokens' logits, or from the teacher head's two logits where the model has one (separate objective).

    Texts are encoded as in training, cut from the left to the model's context, right-padded in batches of similar
    length (causal attention: padding after a text cannot change its positions).
    """
    head = getattr(model, "cls_head", None) is not None
    if tok.label_ids is None and not head:
        raise FlmError("this model's tokenizer has no label tokens: it was not trained with teacher-signal data "
                       "(add a [[data.sources]] entry with kind = \"teacher\")")
    true_id, false_id = (1, 0) if head else tok.label_ids  # the head's logits are (false, true)
    context = model.cfg.max_seq_len
    device = next(model.parameters()).device
    ids = [(tok.encode(t) or [tok.eot_id])[-context:] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    margins = torch.empty(len(ids))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        batch = torch.full((len(chunk), width), tok.eot_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            batch[row, :len(ids[i])] = torch.tensor(ids[i])
        logits = model.teacher_logits(batch.to(device)) if head else model(batch.to(device))[0]
        last = torch.tensor([len(ids[i]) - 1 for i in chunk], device=device)
        logprobs = F.log_softmax(logits[torch.arange(len(chunk), device=device), last].float(), dim=-1)
        margins[chunk] = (logprobs[:, true_id] - logprobs[:, false_id]).cpu()
    model.train(was_training)
    return margins


def teacher_accuracy(model: torch.nn.Module, tok: Tokenizer, items: Sequence[TeacherItem],
                     batch_size: int = 64) -> TeacherAccuracy:
    """Score every proposition of `items` (multiple-choice records: each option, and the question as a whole)."""
    if not items:
        raise FlmError("no teacher-signal records to evaluate")
    props = [prop for item in items for prop in item.propositions()]
    margins = label_margins(model, tok, [text for text, _ in props], batch_size)
    correct = sum(int((m > 0) == truth) for m, (_, truth) in zip(margins.tolist(), props))
    answered = questions = 0
    first = 0
    for item in items:
        n = len(item.options) if item.multiple_choice else 1
        if item.multiple_choice:
            questions += 1
            # p(true) / (p(true) + p(false)) is monotone in the margin, so the largest margin wins.
            answered += int(int(margins[first:first + n].argmax()) == item.answer)
        first += n
    trues = sum(truth for _, truth in props)
    return TeacherAccuracy(propositions=len(props), correct=correct, true_share=trues / len(props),
                           questions=questions, answered=answered)
