"""`flm export hf` and `flm import hf`: argument parsing only; the work happens in flm.export.hf.

`register(subparsers)` adds both commands to the flm command line; each leaf sets `func(args)`, which raises
FlmError for user mistakes like every other flm command.
"""

from __future__ import annotations

import argparse


def cmd_export_hf(args: argparse.Namespace) -> None:
    from flm.export.hf import export_hf

    out = export_hf(args.checkpoint, args.out_dir, args.max_shard_size, args.dtype)
    print(f"exported to {out}; load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          f"trust_remote_code=True) and AutoTokenizer.from_pretrained({str(out)!r})")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from flm.export.hf import import_hf

    path = import_hf(args.dir, args.out_run_dir)
    print(f"imported into {path} (fresh optimizer state); generate, evaluate, `flm grow` it, or continue training "
          f"with `flm train -c CONFIG --set train.run_dir={args.out_run_dir} --resume auto`")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint for another ecosystem")
    formats = p.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a Hugging Face folder (transformers, lm-eval) with its modeling code")
    hf.add_argument("checkpoint", help="checkpoint folder, or a run folder (its newest checkpoint)")
    hf.add_argument("out_dir", help="new folder to write (must not exist or be empty)")
    hf.add_argument("--max-shard-size", default="5GB",
                    help="split the weights into shards of at most this size (default 5GB; 500MB, 2GiB, bytes)")
    hf.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="weight precision (fp32 is exact; bf16 halves the size)")
    hf.set_defaults(func=cmd_export_hf)

    p = subparsers.add_parser("import", help="turn an exported model back into a checkpoint")
    formats = p.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a folder written by `flm export hf`")
    hf.add_argument("dir", help="the exported Hugging Face folder")
    hf.add_argument("out_run_dir", help="run folder to write the checkpoint into (under checkpoints/)")
    hf.set_defaults(func=cmd_import_hf)
