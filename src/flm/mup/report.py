"""Writing a tool's outputs: JSON, a markdown table and a PNG, each atomically, into one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flm.files import DurableFile, atomic_write, write_json_report

NAMES = {"mup": "μP", "sp": "SP"}  # how the reports spell each parametrization


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def figure():
    """A fresh matplotlib pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_outputs(out_dir: Path, name: str, data: dict[str, Any], markdown: str, fig: Any) -> list[Path]:
    """Write out_dir/name.{json,md,png}; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    write_json_report(paths[0], data)
    atomic_write(paths[1], [markdown.encode()])
    with DurableFile(paths[2]) as f:
        fig.savefig(f, format="png")
    figure().close(fig)
    return paths
