"""`flm <command>`: parses arguments and calls the packages; holds no logic of its own.

User mistakes (FlmError) print one line and exit 2, a run halted by its step guard or a stuck rank
(TrainingHalted) exits 3; Ctrl-C exits 130 and leaves the last checkpoint intact (checkpoints are
written atomically).
"""

from __future__ import annotations

import argparse
import json
import sys

from flm.config.growth import NEW_LAYER_MODES, OPERATORS
from flm.errors import FlmError


def config_args(p: argparse.ArgumentParser, config_help: str = "TOML config file (default: built-in defaults)",
                example: str = "train.lr=1e-3") -> None:
    """--config and --set, for every command that reads a config."""
    p.add_argument("--config", "-c", help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override one config value, e.g. --set {example} (repeatable)")


def cmd_prepare(args: argparse.Namespace) -> None:
    from flm.config import load_config
    from flm.data.prepare import merge, prepare, prepare_part, prepare_tokenizer

    cfg = load_config(args.config, args.overrides)
    if args.tokenizer_only:
        tok = prepare_tokenizer(cfg.data)
        print(f"tokenizer ready ({tok.vocab_size} ids); next, on any machines: flm prepare --part I/N (I = 0..N-1), "
              "then flm prepare --merge")
        return
    if args.part:
        prepare_part(cfg.data, *args.part, workers=args.workers, force=args.force)
        return
    if args.merge:
        data = merge(cfg.data)
    else:
        data = prepare(cfg.data, workers=args.workers, force=args.force, parts=args.parts)
    print(f"prepared {data.train_tokens:,} train and {data.val_tokens:,} validation tokens "
          f"(vocab {data.vocab_size}) in {data.dir}")


def _part(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N)."""
    try:
        part, parts = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 3/16, got {text!r}") from None
    if not 0 <= part < parts:
        raise argparse.ArgumentTypeError(f"part {part} of {parts}: I must be in [0, N)")
    return part, parts


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_train(args: argparse.Namespace) -> None:
    from flm.config import load_config
    from flm.data import prepare
    from flm.launch import make_trainer

    cfg = load_config(args.config, args.overrides)
    with make_trainer(cfg, prepare=prepare) as trainer:  # under torchrun, the first process prepares the data
        say = trainer.log
        if args.resume:
            if not trainer.resume(args.resume):
                say(f"no checkpoint in {trainer.ckpt_root}: starting from scratch")
        say(trainer.describe())
        summary = trainer.train(until_step=args.until_step)
        if trainer.step >= trainer.max_steps and cfg.train.sample_tokens:
            say(f"sample: {trainer.sample(cfg.train.sample_prompt, cfg.train.sample_tokens)!r}")
        say(f"validation loss {summary['val_loss']:.4f} at step {summary['step']}; "
            f"run folder {trainer.run_dir} (checkpoint {summary['checkpoint']}, metrics.jsonl, loss.png)")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from flm.device import resolve_device
    from flm.model import generate
    from flm.inference import load_for_inference

    device = resolve_device(args.device)
    model, tok, _ = load_for_inference(args.checkpoint, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, tok.encode(args.prompt), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eot_id=tok.eot_id, generator=gen,
                   vocab_limit=tok.vocab_size)
    print(args.prompt + tok.decode([t for t in out if t != tok.eot_id]))


def cmd_grow(args: argparse.Namespace) -> None:
    from flm.offline_growth import grow_checkpoint

    path = grow_checkpoint(args.checkpoint, args.to, args.out, args.new_layers, args.ramp_steps, args.operator,
                           args.clone_noise, args.copy_noise)
    print(f"grown checkpoint written to {path}; continue training with "
          f"`flm train -c CONFIG --set train.run_dir={args.out} --set model.<key>=<value> ... --resume auto`")


def cmd_info(args: argparse.Namespace) -> None:
    from flm.config import load_config, model_config_from_dict
    from flm.model import flops_per_token, param_count

    if args.preset:
        model = model_config_from_dict({"preset": args.preset})
        seq_len = args.seq_len or model.max_seq_len
    else:
        cfg = load_config(args.config, args.overrides)
        model, seq_len = cfg.model, args.seq_len or cfg.train.seq_len
    if model.vocab_size is None:
        raise FlmError("the model's vocab_size comes from the prepared data; set model.vocab_size to count it")
    info = {"n_layers": model.n_layers, "d_model": model.d_model, "n_heads": model.n_heads,
            "head_dim": model.head_dim, "ffn_dim": model.ffn_dim, "vocab_size": model.vocab_size,
            "parameters": param_count(model), "parameters_without_embedding": param_count(model, False),
            "seq_len": seq_len, "train_flops_per_token": flops_per_token(model, seq_len)}
    if model.arch != "flm":  # the llama arch: grouped-query attention
        info = {"arch": model.arch, **info, "n_kv_heads": model.kv_heads}
    print(json.dumps(info, indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flm", description="Grow language models on a budget.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenise a corpus into binary shards")
    config_args(p)
    p.add_argument("--workers", type=_positive, metavar="N",
                   help="tokenising processes (default: data.workers, 0 there meaning one per CPU core)")
    p.add_argument("--force", action="store_true", help="prepare again even if the folder (or part) is prepared")
    p.add_argument("--parts", type=_positive, default=1, metavar="N",
                   help="write the folder as N parts, here, one after another (a killed run resumes at its part)")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--tokenizer-only", action="store_true",
                      help="only train (or install) the tokenizer, before the parts run on other machines")
    step.add_argument("--part", type=_part, metavar="I/N", help="prepare part I of N (I = 0..N-1), on any machine")
    step.add_argument("--merge", action="store_true", help="merge the N prepared parts: writes meta.json")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train (prepares the data first if needed)")
    config_args(p)
    p.add_argument("--resume", metavar="auto|CHECKPOINT", help="continue from the newest checkpoint of the run, or a given one")
    p.add_argument("--until-step", type=int, metavar="N", help="stop after step N (the schedule still spans max_steps)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--prompt", "-p", default="In the beginning")
    p.add_argument("--max-new-tokens", "-n", type=int, default=64)
    p.add_argument("--temperature", "-t", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("grow", help="grow a saved checkpoint (weights and optimizer state) to a bigger shape")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--to", required=True, metavar="SHAPE", help="a preset name, or KEY=INT pairs: d_model=256,n_layers=8")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write the grown checkpoint into")
    p.add_argument("--new-layers", choices=NEW_LAYER_MODES, default="stack")
    p.add_argument("--operator", choices=OPERATORS, default=None,
                   help="growth family (docs/growth.md); default: the next stage's of the run's config when it has "
                        "that shape, else msg")
    p.add_argument("--clone-noise", type=float, default=None,
                   help="clone: relative std of the symmetry-breaking noise; default as --operator, else 0.3")
    p.add_argument("--copy-noise", type=float, default=None,
                   help="copied layers: relative std of noise on their weight matrices; default as the next stage, "
                        "else 0")
    p.add_argument("--ramp-steps", type=int, default=None,
                   help="K: steps for the masks to reach 1 (0: no ramp); default: the next stage's of the run's "
                        "config when it has that shape, else 100")
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("info", help="parameter and FLOP counts of a config or preset")
    config_args(p)
    p.add_argument("--preset", help="a named shape, e.g. flm-101b")
    p.add_argument("--seq-len", type=int)
    p.set_defaults(func=cmd_info)

    from flm.eval.cli import register as register_eval
    from flm.export.cli import register as register_export
    from flm.mup.cli import register as register_mup
    from flm.plan.cli import register as register_plan

    register_eval(sub)
    register_export(sub)
    register_mup(sub, config_args)
    register_plan(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted; checkpoints already written are intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
