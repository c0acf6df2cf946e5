"""`python -m flm.eval.harness_cli ARGS`: lm-eval's own command line, with the "flm" model type registered.

Takes exactly the options of `lm_eval` / `lm-eval run`, e.g.
`python -m flm.eval.harness_cli --model flm --model_args pretrained=runs/demo --tasks arc_easy --limit 50`.
"""

from __future__ import annotations

import sys

from flm.errors import FlmError, require_module


def main() -> None:
    try:
        require_module("lm_eval", "eval")
        import flm.eval.harness  # noqa: F401  (registers the "flm" model type)
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    except FlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
