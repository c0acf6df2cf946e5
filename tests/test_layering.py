"""The package layering of docs/architecture.md: no import cycle between flm's packages, lazy imports included,
and the single-process path free of flm.parallel."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import flm

SRC = Path(flm.__file__).parent


def unit_of(module: str) -> str:
    """flm.train.trainer -> 'train'; top-level modules (flm.errors, flm.inference) are units of their own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "flm"


def import_graph() -> dict[str, set[str]]:
    """Which units each unit imports, from every import statement in the source (also inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        if "hf_code" in path.parts:  # the exported folder's code imports transformers only
            continue
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        here = unit_of(module)
        targets = graph.setdefault(here, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("flm.") and unit_of(name) != here:
                    targets.add(unit_of(name))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_packages():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_single_process_run_does_not_import_flm_parallel(tiny, tmp_path):
    code = ("import sys; from flm.cli.main import main; "
            f"code = main(['train', *{tiny.args(tmp_path / 'run', 'train.max_steps=2')!r}]); "
            "print(sorted(m for m in sys.modules if m.startswith('flm.parallel'))); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
