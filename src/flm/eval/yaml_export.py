"""The IQ subtasks as lm-evaluation-harness tasks: one YAML per subtask plus its items as a local JSONL.

The exported items are exactly what `flm eval iq` scores for the same settings (prompts already hold their
demonstrations, so lm-eval runs them 0-shot), and the scoring matches: closed sets as `multiple_choice` (acc:
the choice with the highest log-likelihood), open answers as `generate_until` up to a line break, stripped, with
`exact_match`. The YAMLs name their data files by absolute path; export again after moving the folder.

Layout of OUT/:  flm_iq.yaml (group of all exported tasks), flm_iq_<subtask>.yaml, data/<subtask>.jsonl
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from flm.errors import FlmError
from flm.eval.iq.items import Item, Settings
from flm.eval.iq.tasks import SUBTASKS, build_items

GROUP = "flm_iq"


def _doc(item: Item) -> dict[str, Any]:
    if item.choices:
        return {"prompt": item.prompt, "choices": list(item.choices), "label": item.choices.index(item.answer),
                "answer": item.answer}
    return {"prompt": item.prompt, "answer": item.answer}


def task_config(name: str, items: Sequence[Item], data_file: Path, settings: Settings) -> dict[str, Any]:
    """The lm-eval task config for one subtask whose items are in `data_file`."""
    leads = {item.lead for item in items}
    if len(leads) != 1:
        raise RuntimeError(f"{name}: items disagree on the answer separator, lm-eval needs one per task")
    config: dict[str, Any] = {
        "task": f"{GROUP}_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "num_fewshot": 0,
        "doc_to_text": "prompt",
        "target_delimiter": leads.pop(),
    }
    if SUBTASKS[name].closed:
        config |= {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "label",
                   "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    else:
        config |= {"output_type": "generate_until", "doc_to_target": "answer",
                   "generation_kwargs": {"until": ["\n"], "do_sample": False,
                                         "max_gen_toks": max(item.max_new_tokens for item in items)},
                   "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                                {"function": "take_first"}]}],
                   "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    config["metadata"] = {"version": 1.0, "seed": settings.seed, "shots": settings.shots,
                          "context_length": settings.context_length}
    return config


def export_iq(out_dir: str | Path, names: Sequence[str], settings: Settings) -> list[str]:
    """Write the YAMLs and data for `names` under `out_dir`; returns the lm-eval task names."""
    out = Path(out_dir).resolve()
    try:
        (out / "data").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlmError(f"cannot create {out}: {e.strerror or e}") from e
    tasks = []
    for name in names:
        items = build_items(SUBTASKS[name], settings)
        data_file = out / "data" / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(_doc(i), ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
        config = task_config(name, items, data_file, settings)
        _write_yaml(out / f"{config['task']}.yaml", config)
        tasks.append(config["task"])
    _write_yaml(out / f"{GROUP}.yaml", {"group": GROUP, "task": tasks, "metadata": {"version": 1.0}})
    return tasks


def _write_yaml(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
