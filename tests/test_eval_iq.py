"""The IQ benchmark: item generators are right by construction, deterministic, and scored correctly."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
import torch

from flm.config import ModelConfig, config_to_dict
from flm.data.tokenizer import train_bpe
from flm.errors import FlmError
from flm.eval.iq import ABILITIES, SUBTASKS, Settings, SubtaskResult, build_items, resolve_tasks, run_iq, summarize
from flm.eval.iq.items import Item
from flm.eval.iq.symbolic import FORMATS
from flm.model import FLM
from flm.checkpoint import save_checkpoint

CLOSED = [n for n, s in SUBTASKS.items() if s.closed]
OPEN = [n for n, s in SUBTASKS.items() if not s.closed]


def items_of(name: str, **kw) -> list[Item]:
    return build_items(SUBTASKS[name], Settings(**{"items": 20, **kw}))


class Oracle:
    """Knows every item's answer: the highest likelihood for it, and generates it."""

    name = "oracle"

    def __init__(self, items: list[Item]):
        self.answers = {item.prompt: item for item in items}

    def loglikelihood(self, context: str, continuation: str) -> float:
        item = self.answers[context]
        return 0.0 if continuation == item.lead + item.answer else -5.0

    def greedy(self, context: str, max_new_tokens: int, stop=("\n",)) -> str:
        return " " + self.answers[context].answer


class Guesser:
    """Scores continuations at random and answers with a random word."""

    name = "random"

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def loglikelihood(self, context: str, continuation: str) -> float:
        return self.rng.random()

    def greedy(self, context: str, max_new_tokens: int, stop=("\n",)) -> str:
        return self.rng.choice(["red", "7", "meadow", "<a1b>", "yes"])


def test_registry_covers_the_papers_rows():
    assert [SUBTASKS[n].title for n in OPEN] == [
        "Counting", "Replace-Lowercase", "Replace-Word", "Head & Tail", "Full Repeating", "Head Slicing",
        "Multiple Key Retrieval", "Single Supporting Fact", "Two Supporting Facts"]
    assert {SUBTASKS[n].title for n in CLOSED} == {f.title for f in FORMATS.values()}
    assert {s.ability for s in SUBTASKS.values()} == set(ABILITIES)
    assert {SUBTASKS[n].shots for n in ("counting",)} == {0}
    assert {SUBTASKS[n].shots for n in ("replace_lowercase", "replace_word")} == {4}
    assert {SUBTASKS[n].shots for n in ("head_tail", "full_repeating", "head_slicing")} == {5}
    assert resolve_tasks("clue_iq,counting") == [n for n in SUBTASKS if n.startswith("clue_iq")] + ["counting"]
    assert resolve_tasks("pattern_mining") == ["head_tail", "full_repeating", "head_slicing"]
    assert len(resolve_tasks("all")) == 17
    with pytest.raises(FlmError, match="unknown IQ task"):
        resolve_tasks("counting,reading")


def test_oracle_scores_100_everywhere():
    settings = Settings(items=12)
    items = [i for name in SUBTASKS for i in build_items(SUBTASKS[name], settings)]
    results = run_iq(Oracle(items), list(SUBTASKS), settings)
    assert [r.accuracy for r in results] == [100.0] * len(SUBTASKS)
    summary = summarize(results)
    assert [a["average"] for a in summary] == [100.0] * 4
    assert [g["accuracy"] for g in summary[0]["groups"]] == [100.0, 100.0]


def test_random_model_scores_near_chance():
    settings = Settings(items=100, seed=3)
    results = {r.subtask.name: r for r in run_iq(Guesser(0), list(SUBTASKS), settings)}
    binary = [r for n, r in results.items() if n in CLOSED and n != "clue_iq_ocnli"]
    # 700 two-way guesses: sd 1.9 points, so +-7 is over 3.5 sd.
    assert abs(sum(r.correct for r in binary) / sum(r.total for r in binary) - 0.5) < 0.07
    assert abs(results["clue_iq_ocnli"].accuracy - 100 / 3) < 15  # 100 three-way guesses: sd 4.7 points
    assert all(results[n].correct == 0 for n in OPEN)


@pytest.mark.parametrize("name", list(SUBTASKS))
def test_generators_are_deterministic_per_seed(name):
    a, b, c = items_of(name, items=8), items_of(name, items=8), items_of(name, items=8, seed=1)
    assert a == b
    assert [i.prompt for i in a] != [i.prompt for i in c]
    assert len({i.query for i in a}) == 8  # distinct test questions within a run


@pytest.mark.parametrize("name", list(SUBTASKS))
def test_every_item_has_one_answer_and_no_demo_is_the_test(name):
    for item in items_of(name):
        assert item.query not in item.demos and len(set(item.demos)) == len(item.demos)
        assert item.prompt.endswith(item.query + "\n" + item.prompt.rsplit("\n", 1)[1])
        if item.choices:
            assert item.choices.count(item.answer) == 1
        else:
            assert item.answer and "\n" not in item.answer


@pytest.mark.parametrize("name", CLOSED)
def test_symbolic_mapping_items(name):
    fmt = FORMATS[name.split("_iq_")[1]]
    for shots in (1, 2):
        for item in items_of(name, shots=shots):
            symbols = item.facts["symbols"]
            assert list(symbols) == list(fmt.labels) and len(set(symbols.values())) == len(fmt.labels)
            assert item.choices == tuple(symbols.values()) and item.answer == symbols[item.facts["label"]]
            assert Counter(item.facts["demo_labels"]) == {label: shots for label in fmt.labels}
            answers = re.findall(re.escape(fmt.tag) + r" ?(<...>)", item.prompt)
            assert Counter(answers) == {s: shots for s in symbols.values()}  # demos show each symbol shots times
            assert not any(f"{fmt.tag}{fmt.lead}{label}" in item.prompt for label in fmt.labels)  # no label leaks


@pytest.mark.parametrize("name", CLOSED)
def test_symbolic_demos_never_include_the_test_record(name):
    # Half of each label's records as demonstrations: the test record would be drawn often if it were allowed.
    assert all(item.query not in item.demos for item in items_of(name, items=10, shots=50))
    with pytest.raises(FlmError, match="demonstrations"):
        items_of(name, items=1, shots=199)


def demo_pairs(item: Item) -> list[tuple[str, str]]:
    return re.findall(r"Input: (.*)\nOutput: (.*)", item.prompt)


def test_counting_answers_recomputed():
    for item in items_of("counting", items=50):
        pattern = r"Count (down )?from (\d+) to (\d+)(?: in steps of (\d+))?\."
        down, a, b, step = re.fullmatch(pattern, item.query).groups()
        a, b, step = int(a), int(b), int(step or 1)
        numbers = [a]
        while numbers[-1] != b:
            numbers.append(numbers[-1] + (-step if down else step))
        assert item.answer == ", ".join(map(str, numbers)) and len(numbers) >= 3


@pytest.mark.parametrize("name", ["replace_lowercase", "replace_word"])
def test_replace_tasks_follow_the_stated_rule(name):
    for item in items_of(name):
        rule = r'Rule: replace every (?:lowercase letter|word) "(\w+)" with "(\w+)"\.'
        src, dst = re.match(rule, item.prompt).groups()
        test_input = item.query.removeprefix("Input: ")
        pairs = demo_pairs(item) + [(test_input, item.answer)]
        assert len(pairs) == 5
        for given, expected in pairs:
            if name == "replace_lowercase":
                assert src in given and expected == "".join(dst if ch == src else ch for ch in given)
            else:
                assert src in given.split() and expected.split() == [dst if w == src else w for w in given.split()]


@pytest.mark.parametrize("name", ["head_tail", "full_repeating", "head_slicing"])
def test_pattern_tasks_follow_their_pattern(name):
    for item in items_of(name):
        pairs = [(i.split(), o.split()) for i, o in demo_pairs(item)] + [
            (item.query.removeprefix("Input: ").split(), item.answer.split())]
        assert len(pairs) == 6
        heads = {len(out) for _, out in pairs}
        for seq, out in pairs:
            if name == "head_tail":
                assert len(seq) >= 3 and out == [seq[0], seq[-1]]
            elif name == "full_repeating":
                assert out == seq + seq
            else:
                assert len(heads) == 1 and len(seq) > len(out) and out == seq[:len(out)]


@pytest.mark.parametrize("length", [7, 30])
def test_key_retrieval_hides_one_asked_key_among_distractors(length):
    for item in items_of("multiple_key_retrieval", context_length=length):
        story, question = item.query.split("\nQuestion: ")
        sentences = re.findall(r"\w[^.]*\.", story)
        assert len(sentences) == length == len(item.facts["sentences"])
        key = re.fullmatch(r"What is the pass key of (\w+)\?", question).group(1)
        assert [s for s in sentences if key in s] == [f"The pass key of {key} is {item.answer}."]
        distractors = length - len(item.facts["supporting"])
        assert distractors == length - 1 and sum("pass key" in s for s in sentences) == min(4, length)


def simulate(sentences: list[str]) -> tuple[dict, dict]:
    """Replay a bAbI story: where each person is, and where each object is."""
    person_at, holder, lying = {}, {}, {}
    for s in sentences:
        if m := re.fullmatch(r"(\w+) (?:went|moved|travelled|journeyed|went back) to the (\w+)\.", s):
            person_at[m[1]] = m[2]
        elif m := re.fullmatch(r"(\w+) picked up the (\w+)\.", s):
            holder[m[2]] = m[1]
            lying.pop(m[2], None)
        elif m := re.fullmatch(r"(\w+) dropped the (\w+)\.", s):
            lying[m[2]] = person_at[holder.pop(m[2])]
        else:
            raise AssertionError(f"unexpected sentence {s!r}")
    objects = {**lying, **{o: person_at[p] for o, p in holder.items()}}
    return person_at, objects


@pytest.mark.parametrize("length", [3, 25])
def test_babi_answers_recomputed_from_the_story(length):
    for name in ("single_supporting_fact", "two_supporting_facts"):
        for item in items_of(name, context_length=length):
            story, question = item.query.split("\nQuestion: ")
            sentences = re.findall(r"\w[^.]*\.", story)
            assert len(sentences) == length
            people, objects = simulate(sentences)
            if name == "single_supporting_fact":
                assert people[re.fullmatch(r"Where is (\w+)\?", question)[1]] == item.answer
                assert len(item.facts["supporting"]) == 1
            else:
                assert objects[re.fullmatch(r"Where is the (\w+)\?", question)[1]] == item.answer
                assert len(item.facts["supporting"]) in (2, 3)
                assert all(item.answer in sentences[i] or "picked up" in sentences[i] or "dropped" in sentences[i]
                           for i in item.facts["supporting"])
    with pytest.raises(FlmError, match="at least 2"):
        items_of("two_supporting_facts", context_length=1)


def test_local_jsonl_in_superglue_and_clue_layouts(tmp_path):
    rte = tmp_path / "rte.jsonl"
    rows = [{"premise": f"Premise number {i}.", "hypothesis": f"Claim {i}.", "idx": i,
             "label": "entailment" if i % 2 else "not_entailment"} for i in range(8)]
    rte.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ocnli = tmp_path / "ocnli.jsonl"
    labels = ["entailment", "neutral", "contradiction", "-"]
    zh = [{"sentence1": f"前提{i}", "sentence2": f"假设{i}", "label": labels[i % 4]} for i in range(12)]
    ocnli.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in zh))
    settings = dict(data={"rte": str(rte), "ocnli": str(ocnli)}, items=5, shots=1)
    for item in items_of("superglue_iq_rte", **settings):
        n = int(re.search(r"Premise number (\d+)", item.query)[1])
        assert item.facts["label"] == rows[n]["label"]
    for item in items_of("clue_iq_ocnli", **settings):
        assert "前提3" not in item.prompt and "前提7" not in item.prompt  # "-" labels are skipped
        assert item.lead == "" and item.prompt.endswith("答案：")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"premise": "p", "label": "entailment"}\n' * 3
                   + '{"premise": "q", "label": "not_entailment"}\n' * 3)
    with pytest.raises(FlmError, match="lacks the RTE field"):
        items_of("superglue_iq_rte", data={"rte": str(bad)})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random FLM saved as a real checkpoint, for the command line."""
    torch.manual_seed(0)
    texts = ["Count from 1 to 5. Answer: 1, 2, 3, 4, 5", "Input: red fox\nOutput: red", "前提 假设 答案"] * 20
    tok = train_bpe(texts, vocab_size=300)
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, head_dim=16, vocab_size=tok.vocab_size + 4, max_seq_len=96)
    model = FLM(cfg)
    opt = torch.optim.SGD([{"params": list(model.parameters()), "names": [n for n, _ in model.named_parameters()]}])
    root = tmp_path_factory.mktemp("run") / "checkpoints"
    save_checkpoint(root, 1, model, opt, {"model": config_to_dict(cfg), "ramp": None}, keep_last=1, write_extra=tok.save)
    return root.parent


def test_cli_iq_prints_the_table_and_writes_json(checkpoint, tmp_path, cli):
    out = tmp_path / "iq.json"
    result = cli("eval", "iq", "--model", checkpoint, "--tasks", "superglue_iq_rte,counting,head_tail",
                 "--items", "4", "--json", out, "--device", "cpu")
    assert result.status == 0
    table = result.out
    for row in ("Symbolic mapping", "RTE", "SuperGLUE-IQ (avg)", "Rule understanding", "Counting", "Head & Tail",
                "cut from the left"):
        assert row in table
    report = json.loads(out.read_text())
    assert [a["name"] for a in report["abilities"]] == ["symbolic_mapping", "rule_understanding", "pattern_mining"]
    assert report["settings"]["items"] == 4 and len(report["items"]["counting"]) == 4
    assert report["abilities"][1]["paper"]["FLM-101B"] == 76.42
    bad = cli("eval", "iq", "--model", checkpoint, "--data", "mnli=x.jsonl")
    assert bad.status == 2 and re.search("unknown dataset", bad.err)  # an FlmError


def test_symbolic_mapping_averages_its_suites_not_its_datasets():
    """Three SuperGLUE-IQ datasets and one CLUE-IQ dataset: each suite is the mean of its datasets, and the
    ability the mean of the two suites, as the paper reports it; an ability without suites averages its rows."""
    scores = {"superglue_iq_boolq": (8, 10), "superglue_iq_wic": (1, 4), "superglue_iq_rte": (3, 5),
              "clue_iq_afqmc": (9, 10), "multiple_key_retrieval": (1, 2), "single_supporting_fact": (3, 4)}
    summary = summarize([SubtaskResult(SUBTASKS[n], correct=c, total=t) for n, (c, t) in scores.items()])
    symbolic, anti = summary
    assert [(g["name"], g["accuracy"], g["total"]) for g in symbolic["groups"]] == [
        ("superglue_iq", (80 + 25 + 60) / 3, 19), ("clue_iq", 90.0, 10)]
    assert symbolic["average"] == (55.0 + 90.0) / 2  # not (80 + 25 + 60 + 90) / 4 = 63.75, nor 21 / 29 pooled
    assert (anti["name"], anti["groups"], anti["average"]) == ("anti_interference", [], (50.0 + 75.0) / 2)
