"""Training-step throughput: flm's FLM vs Hugging Face `transformers` GPT-2 of the same shape.

Both models get the same width, depth, heads, vocabulary (tied head), sequence length and batch,
the same AdamW, and the same precision; each timed step is forward + backward + optimizer step.
Runs alternate between the two models so that machine noise hits both alike. Prints tokens/s for
each and the ratio ours / peer (> 1 means flm is faster).

    python benchmarks/train_throughput.py                  # CPU, fp32, two small shapes
    python benchmarks/train_throughput.py --device cuda --dtype bf16 --shape 12x768x12 --batch 16 --seq 1024
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch

from flm.files import write_json_report


def build_ours(layers: int, width: int, heads: int, vocab: int, seq: int):
    from flm.config import ModelConfig
    from flm.model import FLM

    cfg = ModelConfig(n_layers=layers, d_model=width, n_heads=heads, head_dim=width // heads,
                      vocab_size=vocab, max_seq_len=seq, tie_embeddings=True)
    model = FLM(cfg)
    return model, lambda x, y: model(x, y)[1]


def build_peer(layers: int, width: int, heads: int, vocab: int, seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=seq,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new")
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg)
    # GPT-2 shifts labels internally, so it gets the same (inputs + 1 token) window as targets.
    return model, lambda x, y: model(input_ids=x, labels=x).loss


def time_steps(step_fn, model, batches, device, dtype) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def one(x, y):
        with autocast:
            loss = step_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one(*batches[0])  # warm-up (allocations, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x, y in batches:
        one(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_shape(layers, width, heads, args, device) -> dict:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device),
                torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device))
               for _ in range(args.steps)]
    tokens = args.batch * args.seq * args.steps
    results = {"ours": [], "peer": []}
    for _ in range(args.repeats):
        for name, build in (("ours", build_ours), ("peer", build_peer)):
            torch.manual_seed(0)
            model, step_fn = build(layers, width, heads, args.vocab, args.seq)
            model.to(device).train()
            if args.compile:
                step_fn = torch.compile(step_fn)
            results[name].append(tokens / time_steps(step_fn, model, batches, device, args.dtype))
            del model
    ours, peer = statistics.median(results["ours"]), statistics.median(results["peer"])
    return {"shape": f"{layers}x{width}x{heads}", "vocab": args.vocab, "seq": args.seq, "batch": args.batch,
            "ours_tok_s": round(ours, 1), "peer_tok_s": round(peer, 1), "ratio": round(ours / peer, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="LAYERSxWIDTHxHEADS (repeatable); default 4x256x4 and 8x512x8")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per model; the median is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    shapes = args.shape or ["4x256x4", "8x512x8"]
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}, {args.dtype}{', compiled' if args.compile else ''}")
    rows = []
    for shape in shapes:
        layers, width, heads = (int(v) for v in shape.split("x"))
        row = bench_shape(layers, width, heads, args, device)
        rows.append(row)
        print(f"{row['shape']:>10}  vocab {row['vocab']}  seq {row['seq']}  batch {row['batch']}:  "
              f"flm {row['ours_tok_s']:>9,.0f} tok/s   HF GPT-2 {row['peer_tok_s']:>9,.0f} tok/s   "
              f"ratio {row['ratio']:.3f}")
    if args.json:
        write_json_report(args.json, {"device": str(device), "dtype": args.dtype, "torch": torch.__version__,
                                      "rows": rows})


if __name__ == "__main__":
    main()
