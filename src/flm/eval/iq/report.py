"""The IQ results as the paper lays them out: a row per subtask, suite averages, and an average per ability.

An ability's average is the mean of its reported rows, as in the paper: for symbolic mapping those are the suite
averages (SuperGLUE-IQ, CLUE-IQ), each the mean of its datasets that were run. The paper's numbers sit alongside.
"""

from __future__ import annotations

from dataclasses import asdict
from statistics import mean
from typing import Any

from flm.eval.iq.items import Settings
from flm.eval.iq.runner import SubtaskResult
from flm.eval.iq.tasks import ABILITIES, GROUPS, PAPER_MODELS, Paper


def _paper(numbers: Paper | None) -> dict[str, float | None]:
    return dict(zip(PAPER_MODELS, numbers or (None, None, None)))


def summarize(results: list[SubtaskResult]) -> list[dict[str, Any]]:
    """One entry per ability that was run: its subtask rows, suite rows and average."""
    out = []
    for ability, (title, paper) in ABILITIES.items():
        mine = [r for r in results if r.subtask.ability == ability]
        if not mine:
            continue
        rows = [{"name": r.subtask.name, "title": r.subtask.title, "group": r.subtask.group,
                 "accuracy": r.accuracy, "correct": r.correct, "total": r.total, "truncated": r.truncated,
                 "paper": _paper(r.subtask.paper)} for r in mine]
        groups = []
        for name, (group_title, group_paper) in GROUPS.items():
            members = [row for row in rows if row["group"] == name]
            if members:
                groups.append({"name": name, "title": f"{group_title} (avg)",
                               "accuracy": mean(m["accuracy"] for m in members),
                               "total": sum(m["total"] for m in members), "paper": _paper(group_paper)})
        units = groups + [row for row in rows if row["group"] is None]
        out.append({"name": ability, "title": title, "subtasks": rows, "groups": groups,
                    "average": mean(u["accuracy"] for u in units), "paper": _paper(paper)})
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(summary: list[dict[str, Any]], model: str, settings: Settings) -> str:
    header = ("ability", "subtask", "acc %", "n", *PAPER_MODELS)
    lines: list[tuple[str, ...]] = []
    for ability in summary:
        label = ability["title"]
        for row in ability["subtasks"] + ability["groups"]:
            lines.append((label, row["title"], _num(row["accuracy"]), str(row["total"]),
                          *(_num(v) for v in row["paper"].values())))
            label = ""
        lines.append(("", "average", _num(ability["average"]), "", *(_num(v) for v in ability["paper"].values())))
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    cut = sum(row["truncated"] for a in summary for row in a["subtasks"])
    notes = [f"IQ benchmark: {model} (seed {settings.seed}, {settings.items} items per subtask)", fmt(header),
             fmt(tuple("-" * w for w in widths)), *map(fmt, lines),
             "Chance: 50% on two-label symbolic mapping, 33% on OCNLI, about 0% on the open-answer subtasks. "
             "Paper numbers are for 100B-scale models on the original datasets and prompts."]
    if cut:
        notes.append(f"{cut} prompts were longer than the model's context and were cut from the left.")
    return "\n".join(notes)


def to_json(summary: list[dict[str, Any]], results: list[SubtaskResult], model: str,
            settings: Settings) -> dict[str, Any]:
    """Everything needed to compare runs: settings, the summary, and each item's answer and prediction."""
    return {"model": model, "settings": asdict(settings), "abilities": summary,
            "items": {r.subtask.name: r.records for r in results},
            "seconds": {r.subtask.name: round(r.seconds, 3) for r in results}}
