"""`flm eval iq|harness|export-iq|teacher`: argument parsing only; the work happens in flm.eval's modules.

`register(subparsers)` adds the `eval` command to the flm command line; each leaf sets `func(args)`, which raises
FlmError for user mistakes like every other flm command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flm.errors import FlmError, require_module
from flm.files import write_json_report


def _data_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected DATASET=PATH.jsonl, got {text!r}")
    return name.strip().lower(), path


def _settings(args: argparse.Namespace):
    from flm.eval.iq import Settings
    from flm.eval.iq.symbolic import FORMATS

    data = dict(args.data)
    unknown = sorted(set(data) - set(FORMATS))
    if unknown:
        raise FlmError(f"--data for unknown dataset {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    for path in data.values():
        if not Path(path).is_file():
            raise FlmError(f"--data file not found: {path}")
    return Settings(items=args.items, seed=args.seed, shots=args.shots, context_length=args.context_length, data=data)


def cmd_iq(args: argparse.Namespace) -> None:
    from flm.eval.iq import format_table, resolve_tasks, run_iq, summarize, to_json
    from flm.eval.scorer import load_scorer

    names, settings = resolve_tasks(args.tasks), _settings(args)
    model = load_scorer(args.model, args.device, args.trust_remote_code)
    results = run_iq(model, names, settings, progress=lambda r: print(
        f"  {r.subtask.name}: {r.accuracy:.2f}% ({r.correct}/{r.total}) in {r.seconds:.1f}s", flush=True))
    summary = summarize(results)
    print(format_table(summary, model.name, settings))
    if args.json:
        write_json_report(args.json, to_json(summary, results, model.name, settings))
        print(f"wrote {args.json}")


def cmd_harness(args: argparse.Namespace) -> None:
    require_module("lm_eval", "eval")
    from lm_eval.utils import make_table

    from flm.eval.harness import evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate(args.model, tasks, args.include_path, args.limit, args.num_fewshot, args.device, args.json,
                       trust_remote_code=args.trust_remote_code)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.json:
        print(f"wrote {args.json}")


def cmd_export_iq(args: argparse.Namespace) -> None:
    from flm.eval.iq import resolve_tasks
    from flm.eval.yaml_export import export_iq

    tasks = export_iq(args.out, resolve_tasks(args.tasks), _settings(args))
    print(f"wrote {len(tasks)} lm-eval tasks (group flm_iq) to {args.out}; run them with "
          f"`flm eval harness --model PATH --include-path {args.out} --tasks flm_iq`")


def cmd_teacher(args: argparse.Namespace) -> None:
    from flm.data import load_prepared
    from flm.device import resolve_device
    from flm.eval.teacher import read_heldout, teacher_accuracy
    from flm.inference import load_for_inference

    if args.batch_size <= 0:
        raise FlmError(f"--batch-size must be positive, got {args.batch_size}")
    model, tok, meta = load_for_inference(args.model, resolve_device(args.device))
    paths = args.data
    if not paths:
        data_dir = meta.get("config", {}).get("data", {}).get("dir")
        paths = load_prepared(data_dir).teacher_heldout if data_dir else []
        if not paths:
            raise FlmError(f"{args.model} was not trained with teacher-signal sources (or its prepared data in "
                           f"{data_dir} is gone): give the propositions with --data FILE.jsonl")
    result = teacher_accuracy(model, tok, read_heldout(paths), args.batch_size)
    print(f"{', '.join(map(str, paths))}: {result.summary()}")
    if args.json:
        report = {"model": args.model, "data": [str(p) for p in paths], "propositions": result.propositions,
                  "accuracy": result.accuracy, "true_share": result.true_share, "questions": result.questions,
                  "mc_accuracy": result.mc_accuracy}
        write_json_report(args.json, report)
        print(f"wrote {args.json}")


def _item_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="all",
                   help="comma list of subtasks, suites (superglue_iq, clue_iq) or abilities (symbolic_mapping, "
                        "rule_understanding, pattern_mining, anti_interference); default all")
    p.add_argument("--items", type=int, default=100, help="items per subtask (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", type=int, help="demonstrations for every subtask (per label for symbolic mapping); "
                                             "default: the paper's setting per subtask")
    p.add_argument("--context-length", type=int, metavar="SENTENCES",
                   help="anti-interference story length in sentences, facts and distractors together "
                        "(default 20 / 10 / 12 for key retrieval / one / two supporting facts)")
    p.add_argument("--data", type=_data_arg, action="append", default=[], metavar="DATASET=PATH.jsonl",
                   help="symbolic mapping: use a local SuperGLUE/CLUE JSONL for DATASET (boolq, wic, rte, wsc, "
                        "afqmc, csl, ocnli, cluewsc2020) instead of the built-in set; repeatable")


def _trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the modeling code a Hugging Face folder ships (config.json auto_map); off by default, "
                        "as in transformers. Folders written by `flm export hf` never need it: flm reads them "
                        "with its own model code")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` with its sub-commands to the flm command line."""
    p_eval = subparsers.add_parser("eval", help="evaluate a model: IQ benchmark, lm-evaluation-harness tasks, "
                                                    "teacher-signal accuracy")
    sub = p_eval.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("iq", help="run the IQ benchmark (FLM-101B §5) on a checkpoint or a local HF model")
    p.add_argument("--model", required=True, help="checkpoint or run folder, or a local Hugging Face model folder")
    _item_args(p)
    p.add_argument("--json", metavar="OUT", help="also write the results (and every item's prediction) as JSON")
    p.add_argument("--device", default="auto")
    _trust_arg(p)
    p.set_defaults(func=cmd_iq)

    p = sub.add_parser("harness", help="run lm-evaluation-harness tasks on a checkpoint or a local HF model")
    p.add_argument("--model", required=True, help="checkpoint or run folder, or a local Hugging Face model folder")
    p.add_argument("--tasks", required=True, help="comma list of lm-eval task or group names")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="folder of extra lm-eval task YAMLs (e.g. from `flm eval export-iq`); repeatable")
    p.add_argument("--limit", type=float, help="at most this many documents per task (< 1: a fraction)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--json", metavar="OUT", help="also write lm-eval's results as JSON")
    p.add_argument("--device", default="auto")
    _trust_arg(p)
    p.set_defaults(func=cmd_harness)

    p = sub.add_parser("teacher", help="accuracy on true/false propositions from the two label tokens' probabilities")
    p.add_argument("--model", required=True, help="checkpoint or run folder trained with a teacher source")
    p.add_argument("--data", action="append", default=[], metavar="FILE.jsonl",
                   help="teacher-signal JSONL (docs/data.md), or 'bundled'; repeatable; default: the held-out "
                        "records of the run's teacher sources")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", metavar="OUT", help="also write the accuracy as JSON")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("export-iq", help="write the IQ subtasks as lm-eval task YAMLs with local JSONL data")
    p.add_argument("out", help="output folder")
    _item_args(p)
    p.set_defaults(func=cmd_export_iq)
