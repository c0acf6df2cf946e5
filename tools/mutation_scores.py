"""Per-module mutation scores from mutmut's result files (mutants/**/*.meta), as a Markdown table.

`mutmut results` lists the surviving mutants one by one; docs/testing.md needs the score of each module: killed
over checked, with what is not checked yet said separately (an interrupted run is a sample, not a score of 0).

    python tools/mutation_scores.py [MUTANTS_DIR]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# mutmut's exit codes (mutmut.stats.status_by_exit_code): 1 and 3 a failing test, 0 none; None not run yet.
KILLED, SURVIVED, NOT_CHECKED = {1, 3}, {0}, {None}


def scores(root: Path) -> list[tuple[str, Counter]]:
    rows = []
    for meta in sorted(root.glob("src/**/*.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {}).values()
        c = Counter("killed" if v in KILLED else "survived" if v in SURVIVED else "not checked" if v in NOT_CHECKED
                    else "other" for v in codes)
        rows.append((str(meta.relative_to(root / "src")).removesuffix(".meta"), c))
    return rows


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "mutants")
    rows = scores(root)
    if not rows:
        sys.exit(f"error: no mutmut results under {root}/src (run `make mutation` first)")
    print("| module | mutants | checked | killed | survived | other | not checked | score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, c in rows + [("**all**", sum((c for _, c in rows), Counter()))]:
        checked = c["killed"] + c["survived"] + c["other"]
        score = f"{c['killed'] / checked:.0%}" if checked else "-"
        print(f"| {name} | {sum(c.values())} | {checked} | {c['killed']} | {c['survived']} | {c['other']} | "
              f"{c['not checked']} | {score} |")


if __name__ == "__main__":
    main()
