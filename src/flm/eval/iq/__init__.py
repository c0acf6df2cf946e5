"""An IQ-style benchmark (FLM-101B paper §5): symbolic mapping, rule understanding, pattern mining and
anti-interference, generated deterministically from a seed and scored with any `flm.eval.scorer.LanguageModel`."""

from flm.eval.iq.items import Item, Settings
from flm.eval.iq.report import format_table, summarize, to_json
from flm.eval.iq.runner import SubtaskResult, run_iq, score_item
from flm.eval.iq.tasks import ABILITIES, GROUPS, SUBTASKS, Subtask, build_items, resolve_tasks

__all__ = ["ABILITIES", "GROUPS", "SUBTASKS", "Item", "Settings", "Subtask", "SubtaskResult", "build_items",
           "format_table", "resolve_tasks", "run_iq", "score_item", "summarize", "to_json"]
