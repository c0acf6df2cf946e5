"""Symbolic mapping: any labelled classification set becomes a few-shot task whose labels are random symbols.

Per item, every label gets a fresh random symbol such as `<k@2>` (distinct within the item), `shots` demonstrations
are drawn for each label (never the test record), shuffled, and followed by the test record. The model must name
the test record's symbol; the symbols are the closed answer set, ranked by log-likelihood. Symbols carry no
meaning, so the model can only succeed by mapping the demonstrated examples onto the test one.

    Premise: Elena, a pilot from Oslo, published a novel in 2004.
    Hypothesis: Elena is from Lima.
    Answer: <T7#>

    ... (2 demonstrations per label, shuffled)

    Premise: Hiro, a baker from Perth, won a chess tournament in 1999.
    Hypothesis: Hiro is a baker.
    Answer:

Records use the SuperGLUE / CLUE JSONL field layouts (labels as in those files, or 0/1 as on the HF hub where the
mapping is unambiguous); records without a usable label (CLUE test files, OCNLI's "-") are skipped. The built-in
sets (`labelled.py`) are used unless a local JSONL is given for a dataset.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from flm.errors import FlmError
from flm.eval.iq.items import Example, Item, Settings, few_shot
from flm.eval.iq.labelled import builtin_records

SYMBOL_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789@#$%&*+=?"


def _boolean(value: Any) -> str | None:
    """SuperGLUE booleans: true/false, "true"/"false", or 1/0 (HF hub)."""
    if isinstance(value, bool) or value in (0, 1):
        return "true" if value else "false"
    return value.lower() if isinstance(value, str) and value.lower() in ("true", "false") else None


def _digit(value: Any) -> str | None:
    """CLUE binary labels: "1"/"0" (also as ints)."""
    return str(value) if str(value) in ("0", "1") else None


def _rte(value: Any) -> str | None:
    if value in ("entailment", "not_entailment"):
        return value
    return {0: "entailment", 1: "not_entailment"}.get(value) if isinstance(value, int) else None


def _ocnli(value: Any) -> str | None:
    return value if value in ("entailment", "neutral", "contradiction") else None


@dataclass(frozen=True)
class Format:
    """How one dataset's records read as a question, and which label values they carry."""

    name: str
    title: str
    group: str
    labels: tuple[str, ...]
    render: Callable[[dict], str]
    label: Callable[[Any], str | None]
    tag: str = "Answer:"
    lead: str = " "


def _wsc_question(r: dict, zh: bool) -> str:
    t = r["target"]
    if zh:
        return f"文本：{r['text']}\n问题：文中的“{t['span2_text']}”指的是“{t['span1_text']}”吗？"
    return f"Text: {r['text']}\nQuestion: In the text above, does \"{t['span2_text']}\" refer to \"{t['span1_text']}\"?"


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("boolq", "BoolQ", "superglue_iq", ("true", "false"),
           lambda r: f"Passage: {r['passage']}\nQuestion: {r['question']}?", _boolean),
    Format("wic", "WiC", "superglue_iq", ("true", "false"),
           lambda r: (f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\n"
                      f"Question: Is the word \"{r['word']}\" used with the same meaning in both sentences?"),
           _boolean),
    Format("rte", "RTE", "superglue_iq", ("entailment", "not_entailment"),
           lambda r: f"Premise: {r['premise']}\nHypothesis: {r['hypothesis']}", _rte),
    Format("wsc", "WSC", "superglue_iq", ("true", "false"), lambda r: _wsc_question(r, zh=False), _boolean),
    Format("afqmc", "AFQMC", "clue_iq", ("1", "0"),
           lambda r: f"句子一：{r['sentence1']}\n句子二：{r['sentence2']}\n问题：两个句子问的是同一件事吗？",
           _digit, "答案：", ""),
    Format("csl", "CSL", "clue_iq", ("1", "0"),
           lambda r: f"摘要：{r['abst']}\n关键词：{'，'.join(r['keyword'])}\n问题：这些关键词都属于这篇摘要吗？",
           _digit, "答案：", ""),
    Format("ocnli", "OCNLI", "clue_iq", ("entailment", "neutral", "contradiction"),
           lambda r: f"前提：{r['sentence1']}\n假设：{r['sentence2']}\n问题：前提和假设是什么关系？",
           _ocnli, "答案：", ""),
    Format("cluewsc2020", "CLUEWSC2020", "clue_iq", ("true", "false"), lambda r: _wsc_question(r, zh=True),
           _boolean, "答案：", ""),
)}


def read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise FlmError(f"cannot read {path}: {e.strerror or e}") from e
    records = []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FlmError(f"{path}:{lineno}: not JSON ({e.msg})") from e
    return records


def to_examples(fmt: Format, records: list[dict] | tuple[dict, ...], source: str) -> list[Example]:
    """Records -> examples whose answer is the normalised label; unlabelled records are skipped."""
    out = []
    for i, record in enumerate(records, 1):
        label = fmt.label(record.get("label"))
        if label is None:
            continue
        try:
            question = fmt.render(record)
        except (KeyError, TypeError) as e:
            raise FlmError(f"{source}: record {i} lacks the {fmt.title} field {e} (expected the "
                           f"{'CLUE' if fmt.group == 'clue_iq' else 'SuperGLUE'} JSONL layout)") from e
        out.append(Example(question, label))
    return out


@cache
def dataset(name: str, path: str | None) -> dict[str, tuple[Example, ...]]:
    """A dataset's examples grouped by label: the built-in set, or the local JSONL at `path`."""
    fmt = FORMATS[name]
    source = path or f"built-in {fmt.title}-like set"
    examples = to_examples(fmt, read_jsonl(Path(path)) if path else builtin_records(name), source)
    by_label = {label: tuple(e for e in examples if e.answer == label) for label in fmt.labels}
    if any(len(v) < 2 for v in by_label.values()):
        counts = ", ".join(f"{k}: {len(v)}" for k, v in by_label.items())
        raise FlmError(f"{source} has too few labelled {fmt.title} records per label ({counts})")
    return by_label


def random_symbols(rng: random.Random, n: int) -> list[str]:
    symbols: list[str] = []
    while len(symbols) < n:
        s = "<" + "".join(rng.choice(SYMBOL_CHARS) for _ in range(3)) + ">"
        if s not in symbols:
            symbols.append(s)
    return symbols


def symbolic_item(task: str, name: str, rng: random.Random, shots: int, settings: Settings) -> Item:
    fmt = FORMATS[name]
    by_label = dataset(name, settings.data.get(name))
    test = rng.choice(rng.choice(list(by_label.values())))
    mapping = dict(zip(fmt.labels, random_symbols(rng, len(fmt.labels))))
    demos: list[Example] = []
    for label, examples in by_label.items():
        others = [e for e in examples if e.question != test.question]
        if len(others) < shots:
            raise FlmError(f"{task}: only {len(others)} {label!r} records to draw {shots} demonstrations from")
        demos += rng.sample(others, shots)
    rng.shuffle(demos)

    def relabel(e: Example) -> Example:
        return Example(e.question, mapping[e.answer], {"label": e.answer})

    item = few_shot(task, "", [relabel(d) for d in demos], relabel(test), tag=fmt.tag, lead=fmt.lead,
                    choices=list(mapping.values()))
    facts = {"label": test.answer, "symbols": mapping, "demo_labels": [d.answer for d in demos]}
    return replace(item, facts=facts)
