"""`flm plan CONFIG`: cost, memory and schedule search from a config; command-line flags override [plan]."""

from __future__ import annotations

import argparse
from dataclasses import replace

from flm.config import Config, ModelConfig, PRESETS, PlanConfig, load_config, model_config_from_dict
from flm.errors import FlmError
from flm.files import write_json_report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="FLOPs, days, GPU-hours, dollars and memory of a growth schedule",
                              description="Cost a config's growth schedule against training its final shape "
                                          "from scratch; optionally check memory and search for a schedule.")
    p.add_argument("config", help="TOML config with [[stages]] and [plan] (e.g. configs/flm101b.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set plan.goodput=0.9 (repeatable)")
    p.add_argument("--gpu", help="GPU type, e.g. A800-80G, H100-SXM, H200, B200")
    p.add_argument("--n-gpus", type=int, help="number of GPUs")
    p.add_argument("--tflops", metavar="T[,T...]", help="achieved TFLOP/s per GPU: one value, or one per stage")
    p.add_argument("--utilization", type=float, help="fraction of the bf16 peak achieved (replaces plan.tflops_per_gpu)")
    p.add_argument("--price", type=float, help="dollars per GPU-hour")
    p.add_argument("--json", metavar="PATH", help="also write everything as JSON")
    p.add_argument("--png", metavar="PATH", help="also draw parameters vs tokens (the paper's Figure 1)")
    p.add_argument("--memory", action="store_true", help="memory per GPU for each stage's tp/pp/dp, and whether it fits")
    p.add_argument("--search", action="store_true", help="propose a growth schedule for a budget")
    p.add_argument("--budget-dollars", type=float, metavar="USD", help="search budget in dollars")
    p.add_argument("--budget-gpu-days", type=float, metavar="DAYS", help="search budget in GPU-days")
    p.add_argument("--final-preset", metavar="NAME", help="final shape for --search (default: the config's last stage)")
    p.add_argument("--predict", metavar="FIT.json",
                   help="with a law written by `flm predict`: the predicted final loss (and interval) of training the "
                        "final shape from scratch and of each schedule the search considers, within the budget "
                        "(--budget-*, else plan.budget_flops, else the config's schedule's FLOPs); which to choose")
    p.add_argument("--eta", type=float, metavar="ETA",
                   help="with --predict: the growth model's eta instead of the fitted one (1: every token counts)")
    p.set_defaults(func=cmd_plan)


def parse_tflops(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise FlmError(f"--tflops must be numbers separated by commas, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise FlmError(f"--tflops values must be positive, got {text!r}")
    return values


def plan_from_args(plan: PlanConfig, args: argparse.Namespace) -> PlanConfig:
    """Apply the hardware flags to [plan] and validate the result (one-line errors)."""
    changes = {k: v for k, v in (("gpu", args.gpu), ("n_gpus", args.n_gpus), ("utilization", args.utilization),
                                  ("price_per_gpu_hour", args.price)) if v is not None}
    if args.utilization is not None:
        changes["tflops_per_gpu"] = []
    if args.tflops is not None:
        changes["tflops_per_gpu"] = parse_tflops(args.tflops)
    plan = replace(plan, **changes)
    plan.validate()
    return plan


def final_shape(cfg: Config, preset: str | None) -> ModelConfig:
    """--final-preset, taking the config's vocabulary when the preset has none; else the last stage's shape."""
    if preset is None:
        return cfg.stage_models()[-1] if cfg.stages else cfg.model
    if preset in PRESETS and "vocab_size" not in PRESETS[preset] and cfg.model.vocab_size:
        return model_config_from_dict({"preset": preset, "vocab_size": cfg.model.vocab_size})
    return model_config_from_dict({"preset": preset})


def cmd_plan(args: argparse.Namespace) -> None:
    # Imported here: they load torch (through the model's counting functions), which `flm --help` should not.
    from flm.plan.cost import plan_costs
    from flm.plan.hardware import get_gpu
    from flm.plan.memory import stage_memory
    from flm.plan.report import (format_memory, format_plan, format_search, memory_to_dict, plan_to_dict,
                                 save_png, search_to_dict)
    from flm.plan.predict import choose, compare, flops_to_gpu_hours, format_comparison, load_law
    from flm.plan.predict import to_dict as predict_to_dict
    from flm.plan.search import budget_gpu_hours, search_schedule, search_tflops

    cfg = load_config(args.config, args.overrides)
    cfg.plan = plan_from_args(cfg.plan, args)
    gpu = get_gpu(cfg.plan.gpu)
    if not (args.search or args.predict) and (args.budget_dollars is not None or args.budget_gpu_days is not None):
        raise FlmError("--budget-dollars / --budget-gpu-days need --search or --predict")
    if args.eta is not None and not args.predict:
        raise FlmError("--eta needs --predict")
    result = plan_costs(cfg)
    doc: dict = {"plan": plan_to_dict(result)}
    print(format_plan(result))
    if args.memory:
        rows = stage_memory(cfg, gpu)
        print()
        print(format_memory(rows, gpu, cfg.plan.n_gpus))
        doc["memory"] = memory_to_dict(rows)
    hours = None
    if args.budget_dollars is not None or args.budget_gpu_days is not None:
        hours = budget_gpu_hours(cfg.plan, args.budget_dollars, args.budget_gpu_days)
    elif cfg.plan.budget_flops is not None:
        hours = flops_to_gpu_hours(cfg.plan.budget_flops, cfg.plan, search_tflops(cfg.plan, gpu))
    if args.search or args.predict:
        if hours is None and args.search:
            hours = budget_gpu_hours(cfg.plan, None, None)  # the one-line error: no budget given
        if hours is None:  # --predict alone: the budget the config's schedule spends
            hours = flops_to_gpu_hours(result.total_flops, cfg.plan, search_tflops(cfg.plan, gpu))
        final = final_shape(cfg, args.final_preset)
        found = search_schedule(final, cfg.plan, gpu, cfg.train.seq_len, hours)
    if args.search:
        print()
        print(format_search(found, gpu))
        doc["search"] = search_to_dict(found)
    if args.predict:
        law = load_law(args.predict)
        candidates = [("from scratch", [(found.scratch.model, found.scratch.tokens)])]
        candidates += [(f"search, {len(o.stages)} stages", [(st.model, st.tokens) for st in o.stages])
                       for o in found.options if len(o.stages) > 1]
        if len(result.stages) > 1:
            candidates.append((f"config ({result.total_flops:.3g} FLOPs)", [(st.model, st.tokens) for st in result.stages]))
        if len(candidates) > 1 and not law.get("growth") and args.eta is None:
            raise FlmError(f"{args.predict} has no growth model (eta): fit one with mup.growth_widths in `flm predict`, "
                           "or give --eta (1: every token counts as the final model's)")
        rows = compare(law, candidates, cfg.train.seq_len, args.eta)
        print()
        print(format_comparison(law, rows, hours, final, cfg.train.seq_len,
                                None if args.eta is None else f"eta = {args.eta:g} given on the command line"))
        doc["predict"] = predict_to_dict(rows, choose(rows)[1])
    if args.json:
        write_json_report(args.json, doc)
    if args.png:
        save_png(result, args.png)
