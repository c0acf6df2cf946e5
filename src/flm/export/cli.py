"""`flm export hf` and `flm import hf`: argument parsing only; the work happens in flm.export.hf.

`register(subparsers)` adds both commands to the flm command line; each leaf sets `func(args)`, which raises
FlmError for user mistakes like every other flm command.
"""

from __future__ import annotations

import argparse


def cmd_export_hf(args: argparse.Namespace) -> None:
    from flm.export.hf import export_hf

    out = export_hf(args.checkpoint, args.out_dir, args.max_shard_size, args.dtype)
    remote = ", trust_remote_code=True" if (out / "modeling_flm.py").is_file() else ""  # not for stock Llama-family
    print(f"exported to {out}; load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}"
          f"{remote}) and AutoTokenizer.from_pretrained({str(out)!r})")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from flm.export.hf import import_hf

    from flm.checkpoint import read_meta
    from flm.export.llama_hf import IMPORT_CONFIG

    path = import_hf(args.dir, args.out_run_dir)
    if read_meta(path)["model"].get("arch") == "llama":
        config = f"{args.out_run_dir}/{IMPORT_CONFIG}"
        print(f"imported into {path} (fresh optimizer state); generate or evaluate it, or continue training with "
              f"`flm train -c {config} --resume auto` (set data.corpus in {config} first)")
        return
    print(f"imported into {path} (fresh optimizer state); generate, evaluate, `flm grow` it, or continue training "
          f"with `flm train -c CONFIG --set train.run_dir={args.out_run_dir} --resume auto`")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint for another ecosystem")
    formats = p.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a Hugging Face folder (transformers, lm-eval): with its modeling code "
                                       "(arch flm), or a stock Llama/Mistral/Qwen2 folder (arch llama)")
    hf.add_argument("checkpoint", help="checkpoint folder, or a run folder (its newest checkpoint)")
    hf.add_argument("out_dir", help="new folder to write (must not exist or be empty)")
    hf.add_argument("--max-shard-size", default="5GB",
                    help="split the weights into shards of at most this size (default 5GB; 500MB, 2GiB, bytes)")
    hf.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="weight precision (fp32 is exact; bf16 halves the size)")
    hf.set_defaults(func=cmd_export_hf)

    p = subparsers.add_parser("import", help="turn an exported or Llama-family model into a checkpoint")
    formats = p.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a folder written by `flm export hf`, or a local LlamaForCausalLM, "
                                       "MistralForCausalLM or Qwen2ForCausalLM folder (safetensors, tokenizer.json)")
    hf.add_argument("dir", help="the Hugging Face folder")
    hf.add_argument("out_run_dir", help="run folder to write the checkpoint into (under checkpoints/)")
    hf.set_defaults(func=cmd_import_hf)
