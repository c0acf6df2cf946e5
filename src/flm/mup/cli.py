"""`flm mup coord-check`, `flm sweep` and `flm predict [--holdout]`: each reads a config, runs, and writes PNG + table + JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


def register(subparsers: argparse._SubParsersAction, config_args: Callable[..., None]) -> None:
    """The μP commands; `config_args` adds flm's --config and --set (flm.cli.main's, passed in: flm.cli imports
    this package, not the other way round)."""

    def tool_args(p: argparse.ArgumentParser) -> None:
        config_args(p, "TOML config: [model], [data], [train] and [mup] (e.g. configs/mup_proxy.toml)",
                    "'mup.widths=[64,128]'")
        p.add_argument("--out", metavar="DIR", help="output folder (default: mup.out_dir)")

    mup = subparsers.add_parser("mup", help="μP tools (coordinate check)")
    tools = mup.add_subparsers(dest="mup_command", required=True)
    p = tools.add_parser("coord-check", help="activation scale per layer vs width, under μP and SP",
                         description="Train each of mup.widths for mup.coord_steps steps under μP and under standard "
                                     "parametrization; plot and tabulate each layer's mean |activation| against width.")
    tool_args(p)
    p.set_defaults(func=lambda args: _run(args, "coord"))

    p = subparsers.add_parser("sweep", help="search lr, init std and output_mult on a narrow proxy",
                              description="Grid or random search over mup.lrs x mup.init_stds x mup.output_mults at "
                                          "each of mup.sweep_widths, under each of mup.parametrizations.")
    tool_args(p)
    p.set_defaults(func=lambda args: _run(args, "sweep"))

    p = subparsers.add_parser("predict", help="fit L(N, D) on a ladder of widths x token counts, with intervals",
                              description="Train each width of mup.ladder with the config's hyperparameters, evaluated "
                                          "at each of mup.branch_steps (WSD: decays branched off one run per width); "
                                          "fit the forms of mup.forms, choose one by leave-one-width-out "
                                          "cross-validation, bootstrap intervals (mup.interval); with mup.growth_widths, fit "
                                          "the growth model's eta. Finished runs are reused from the output folder. "
                                          "The JSON it writes is what `flm plan --predict` reads.")
    tool_args(p)
    p.add_argument("--holdout", action="store_true",
                   help="also train the held-out checks: widths at mup.holdout_factors x the widest fitted N, "
                        "mup.longer_steps at the widest fitted width, held-out growth runs and the config's [[stages]]; "
                        "report the errors")
    p.add_argument("--plan", action="store_true",
                   help="print the runs, their steps and the time projected from 3 measured steps per shape; no training")
    p.add_argument("--from", dest="source", metavar="PREDICT_JSON",
                   help="refit the runs measured in an earlier predict.json (no training): other mup.forms, "
                        "mup.bootstrap or mup.interval on a finished measurement; the config must be the one it "
                        "was measured with")
    p.set_defaults(func=lambda args: _run(args, "predict"))


def _run(args: argparse.Namespace, tool: str) -> None:
    from flm.config import load_config
    from flm.data import prepare
    from flm.errors import FlmError

    overrides = list(args.overrides) + ([f"mup.out_dir='{args.out}'"] if args.out else [])
    cfg = load_config(args.config, overrides)
    prepare(cfg.data)  # reuses the shards when they are already there
    out = Path(cfg.mup.out_dir)
    if tool == "coord":
        from flm.mup.coord import coord_check, write_report

        result = coord_check(cfg)
        for p, slopes in result["slopes"].items():
            print(f"{p}: slope of log scale vs log width: " + ", ".join(f"{k} {v:+.2f}" for k, v in slopes.items()))
    elif tool == "sweep":
        from flm.mup.sweep import write_report, sweep

        result = sweep(cfg)
        for key, best in result["best"].items():
            if best is not None:
                print(f"best at {key}: validation loss {best['val_loss']:.4f} with --set train.lr={best['lr']:g} "
                      f"--set model.init_std={best['init_std']:g} --set model.output_mult={best['output_mult']:g}")
        for p, t in result["transfer"].items():
            if "grid_steps" in t:
                print(f"{p}: best lr by width {t['best_lr']}: {t['grid_steps']} grid step(s) apart")
    else:
        from flm.mup.predict import predict, projection, summary_lines, write_report

        if args.plan:
            if args.source:
                raise FlmError("--plan projects the time of training; --from trains nothing")
            projection(cfg, holdout=args.holdout)
            return
        result = predict(cfg, holdout=args.holdout, source=Path(args.source) if args.source else None)
        for line in summary_lines(result):
            print(line)
    paths = write_report(result, out)
    print("wrote " + ", ".join(str(p) for p in paths))
