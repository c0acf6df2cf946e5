"""Part 3 of `make gpu-check`: training throughput and MFU of a ~1B FLM against Hugging Face GPT-2 of the same shape,
and of flm's llama arch against Hugging Face `LlamaForCausalLM` of the same shape, in one process, with the GPU's
own bf16 matmul rate measured as a second ceiling.

    python benchmarks/gpu_throughput.py --data PREPARED --json out.json          # 16 x 2048 x 16, seq 2048, on CUDA
    python benchmarks/gpu_throughput.py --data PREPARED --json out.json --tiny   # seconds, on whatever device there is
    python benchmarks/gpu_throughput.py ... --arch flm                           # the FLM-vs-GPT-2 line only

Both models train with bf16 autocast, compiled per block (flm's `train.compile`; the same for GPT-2), fused AdamW and
gradient clipping at 1.0. flm runs its real step, `Trainer.train_step` (its loader on a prepared folder, the step
guard, its AdamW); GPT-2 the same loop on random tokens, with SDPA attention. MFU = tokens/s x FLOPs per token /
peak, with FLOPs per token from flm.model.counting.flops_per_token (the shapes are equal, so the count is too), once
against the datasheet's dense bf16 peak and once against an 8192^3 bf16 matmul timed here with CUDA events. One flm
step is then profiled (the top kernels by GPU time) and run with torch's sync debug mode (the host-device
synchronisations it makes).

The llama line (`--arch llama` or `both`, the default) goes last, under the JSON's "llama" key: flm's
`model.arch = "llama"` through the same `Trainer.train_step`, against transformers' `LlamaForCausalLM` in the same loop
as GPT-2, both of the same layers, width and heads as the FLM shape, `n_kv_heads` = heads (or `--kv-heads`),
RoPE θ = 10000, a tied head, and a SwiGLU FFN sized so that the block's matmul weights match the FLM block's
(LLAMA_FFN below; the parameter counts then differ by the biases and the rounding, and the JSON says by how much).
Its two lines must have the same parameter count (flops_per_token of the llama config then holds for both);
`flm_over_hf` is flm's tokens/s over HF's, also without CUDA.

The JSON is rewritten after each measurement: a run stopped by its time limit keeps what it had measured.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from flm.config import load_config
from flm.files import write_json_report
from flm.model import flops_per_token, param_count
from flm.train import Trainer
from flm.train.metrics import peak_bf16_flops

FULL = dict(shape="16x2048x16", vocab=100352, seq=2048, batch=8, warmup=3, steps=10, matmul=8192, compile=True)
TINY = dict(shape="2x64x2", vocab=1024, seq=64, batch=4, warmup=1, steps=3, matmul=256, compile=False)
FORMULA = ("flops_per_token = 6 * N_matmul + 12 * L * attn_dim * seq (flm.model.counting), "
           "N_matmul = L * (3 * d * attn_dim + attn_dim * d + 2 * d * ffn) + d * vocab")
LLAMA_FORMULA = ("flops_per_token = 6 * N_matmul + 12 * L * attn_dim * seq (flm.model.counting), "
                 "N_matmul = L * (2 * d * attn_dim + 2 * d * kv_dim + 3 * d * d_ff) + d * vocab")
# The llama line's SwiGLU width: the FLM block's matmul weights (4·d·a + 2·d·f, a = attn_dim, f = 4·d) equal the
# llama block's (2·d·a + 2·d·kv + 3·d·d_ff) at d_ff = (2·a + 2·f − 2·kv) / 3 (8·d/3 with kv = a = d), rounded to the
# nearest multiple of 64: 5,440 at 16 x 2048 x 16 (8·2048/3 = 5,461.3), 192 in the tiny shape (170.7).
LLAMA_FFN = "d_ff = 64 * round((2 * attn_dim + 2 * ffn - 2 * kv_dim) / (3 * 64)), ffn = 4 * d (the FLM shape's)"
LLAMA_ROPE_THETA = 10000.0


def llama_ffn(attn_dim: int, kv_dim: int, ffn: int) -> int:
    """The SwiGLU width whose three matrices hold (nearly) the FLM block's two FFN and the attention weights that
    grouped-query attention saves: LLAMA_FFN."""
    return 64 * round((2 * attn_dim + 2 * ffn - 2 * kv_dim) / (3 * 64))


def llama_shape(args) -> dict:
    """The llama line's shape: the FLM shape's layers, width, heads and head dim, `--kv-heads` key/value heads (default
    the heads), the SwiGLU width of LLAMA_FFN, RoPE θ = 10000, tied head."""
    layers, width, heads = (int(v) for v in args.shape.split("x"))
    head_dim = width // heads
    kv_heads = args.kv_heads or heads
    return {"n_layers": layers, "d_model": width, "n_heads": heads, "n_kv_heads": kv_heads, "head_dim": head_dim,
            "d_ff": llama_ffn(heads * head_dim, kv_heads * head_dim, 4 * width), "d_ff_formula": LLAMA_FFN,
            "rope_theta": LLAMA_ROPE_THETA, "tie_embeddings": True}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(n: int, device: torch.device, repeats: int = 10) -> dict:
    """bf16 n x n x n products on random data: the median time of `repeats` after 3 warm-ups, as TFLOP/s."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"size": n, "dtype": "bf16", "median_ms": 1e3 * t, "tflops": 2 * n ** 3 / t / 1e12}


def timed(step, warmup: int, steps: int, tokens_per_step: int, device: torch.device) -> dict:
    """Run `step` warmup times (the first compiles), then `steps` timed ones between two synchronisations."""
    t0 = time.perf_counter()
    first_loss = float(step())
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"first_step_s": first_s, "step_ms": 1e3 * elapsed / steps,
            "tokens_per_s": steps * tokens_per_step / elapsed,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
            "loss_first": first_loss, "loss_last": float(loss)}


def mfu(data: dict, device: torch.device, lines: dict | None = None, names: tuple[str, str] = ("flm", "peer")) -> dict:
    """Model FLOPs utilisation of each timed model, against the datasheet peak and against the measured matmul rate
    (both from `data`), and flm's speed over the peer's. `lines` holds the timed models and their flops_per_token
    (default `data` itself: the FLM line; the llama line passes its section and ("flm", "hf"))."""
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    lines = data if lines is None else lines
    ceilings = {"datasheet": data.get("datasheet_peak_tflops"), "matmul": (data.get("matmul") or {}).get("tflops")}
    out = {name: {ceiling: lines[name]["tokens_per_s"] * lines["flops_per_token"] / (tflops * 1e12) if tflops else None
                  for ceiling, tflops in ceilings.items()} for name in names if lines.get(name)}
    if lines.get(names[0]) and lines.get(names[1]):
        out[f"flm_over_{names[1]}"] = lines[names[0]]["tokens_per_s"] / lines[names[1]]["tokens_per_s"]
    return out


def model_sets(args, arch: str = "flm") -> list[str]:
    """The `[model]` settings of the FLM shape (arch "flm") or of the llama line's (arch "llama", llama_shape)."""
    layers, width, heads = (int(v) for v in args.shape.split("x"))
    sets = [f"model.n_layers={layers}", f"model.d_model={width}", f"model.n_heads={heads}",
            f"model.head_dim={width // heads}", f"model.vocab_size={args.vocab}", f"model.max_seq_len={args.seq}",
            "model.tie_embeddings=true"]
    if arch == "llama":
        shape = llama_shape(args)
        sets += ["model.arch='llama'", f"model.n_kv_heads={shape['n_kv_heads']}", f"model.d_ff={shape['d_ff']}",
                 f"model.rope_theta={shape['rope_theta']}"]
    return sets


def model_config(args, arch: str = "flm"):
    """flm's ModelConfig of model_sets(args, arch), without a trainer."""
    return load_config(None, [*model_sets(args, arch), f"train.seq_len={args.seq}"]).model


def flm_step(args, data: Path, run_dir: Path, arch: str = "flm"):
    """flm's own training step on the prepared folder `data`, for the FLM shape or (arch "llama") the llama line's:
    (step function, trainer)."""
    cfg = load_config(None, [
        f"data.dir='{data}'", f"train.run_dir='{run_dir}'", *model_sets(args, arch), f"train.batch_size={args.batch}",
        f"train.seq_len={args.seq}", f"train.max_steps={args.warmup + args.steps + 10}", "train.warmup_steps=1",
        "train.lr=1e-4", "train.min_lr=1e-5", "train.dtype='bf16'", f"train.compile={str(args.compile).lower()}",
        f"parallel.activation_checkpointing={str(args.activation_checkpointing).lower()}", "train.progress=false",
        "train.tensorboard=false"])
    trainer = Trainer(cfg, log=lambda _: None)
    return (lambda: trainer.train_step()[0]), trainer


def peer_step(args, device: torch.device):
    """Hugging Face GPT-2 of the same shape (tied head, GeLU-tanh, SDPA, no dropout, no KV cache), compiled per block,
    with torch's fused AdamW and clipping, on random tokens: (step function, model)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width, heads = (int(v) for v in args.shape.split("x"))
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=args.vocab, n_positions=args.seq,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                     use_cache=False, attn_implementation="sdpa", bos_token_id=0, eos_token_id=0)
    with torch.device(device):  # initialised where it trains: a billion values drawn on a CPU take half a minute
        model = GPT2LMHeadModel(cfg).train()
    return hf_step(args, device, model, model.transformer.h)


def hf_llama_step(args, device: torch.device, ln_eps: float):
    """Hugging Face LlamaForCausalLM of the llama line's shape (llama_shape: tied head, SwiGLU, RoPE θ, SDPA, no
    dropout, no KV cache, RMSNorm eps `ln_eps` as flm's), compiled per decoder layer, in GPT-2's loop:
    (step function, model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = llama_shape(args)
    cfg = LlamaConfig(num_hidden_layers=s["n_layers"], hidden_size=s["d_model"], num_attention_heads=s["n_heads"],
                      num_key_value_heads=s["n_kv_heads"], head_dim=s["head_dim"], intermediate_size=s["d_ff"],
                      vocab_size=args.vocab, max_position_embeddings=args.seq, rope_theta=s["rope_theta"],
                      rms_norm_eps=ln_eps, tie_word_embeddings=s["tie_embeddings"], attention_dropout=0.0,
                      hidden_act="silu", use_cache=False, attn_implementation="sdpa", bos_token_id=0, eos_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).train()
    return hf_step(args, device, model, model.model.layers)


def hf_rope_theta(config) -> float | None:
    """RoPE θ as a transformers config holds it (transformers 5: rope_parameters; 4: rope_theta)."""
    rope = getattr(config, "rope_parameters", None)
    return (rope or {}).get("rope_theta", getattr(config, "rope_theta", None))


def hf_step(args, device: torch.device, model: torch.nn.Module, blocks):
    """A transformers causal LM's training step, its `blocks` compiled one by one (as flm's `train.compile`), bf16
    autocast, torch's fused AdamW and clipping at 1.0, on four random batches in turn: (step function, model)."""
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if args.compile:
        for block in blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(0)
    batches = itertools.cycle([torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
                               for _ in range(4)])

    def step() -> torch.Tensor:
        x = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x, use_cache=False).loss  # the model shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model


def profile_step(step, device: torch.device, top: int = 15) -> dict:
    """One step under torch.profiler: on CUDA the kernels by GPU time (their sum over the step's wall time says how
    busy the GPU was), on a CPU the operators by self time."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - t0
    times, calls = defaultdict(float), Counter()
    if cuda:
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                times[e.name] += e.time_range.elapsed_us()
                calls[e.name] += 1
    else:
        for e in prof.key_averages():
            times[e.key], calls[e.key] = e.self_cpu_time_total, e.count
    busy = sum(times.values())
    rows = [{"name": name[:160], "ms": times[name] / 1e3, "share": times[name] / busy if busy else None,
             "calls": calls[name]} for name in sorted(times, key=times.get, reverse=True)[:top]]
    return {"of": "CUDA kernels" if cuda else "CPU operators (self time)", "step_ms": 1e3 * wall,
            "busy_ms": busy / 1e3, "top": rows}


def host_waits(step) -> dict:
    """The host-device synchronisations of one step, by where Python made them (torch.cuda.set_sync_debug_mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"count": sum(where.values()), "where": dict(where)}


def measure_flm(args, device: torch.device, results: "Results") -> dict | None:
    """flm's step timed, then profiled and searched for host waits; returns the timing (None if it failed)."""
    counters.clear()
    try:
        step, trainer = flm_step(args, args.data, args.work)
    except Exception as e:  # the peer still runs
        results.fail("flm", e)
        return None
    cfg = trainer.model.cfg
    results.data.update({"flops_per_token": flops_per_token(cfg, args.seq), "flops_formula": FORMULA,
                         "params": param_count(cfg)})
    flm = results.run("flm", lambda: {**timed(step, args.warmup, args.steps, args.batch * args.seq, device),
                                      "graphs_compiled": int(counters["stats"]["unique_graphs"])})
    if flm is not None:
        results.run("profile", lambda: profile_step(step, device))
        if device.type == "cuda":
            results.run("host_waits", lambda: host_waits(step))
    trainer.close()
    return flm


def release(device: torch.device) -> None:
    """Let the last model's memory go before the next one's: compiled code holds on to its model."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_llama(args, device: torch.device, results: "Results") -> dict | None:
    """The llama line, under the JSON's "llama": flm's llama arch in its real training step, then (unless --no-peer)
    HF LlamaForCausalLM of the same shape; their parameter counts, MFU and flm / HF. Returns flm's timing (None if it
    failed)."""
    section = results.data["llama"] = {**llama_shape(args), "flops_formula": LLAMA_FORMULA}
    results.save()
    counters.clear()
    try:
        cfg, reference = model_config(args, "llama"), param_count(model_config(args, "flm"))
        section.update({"flops_per_token": flops_per_token(cfg, args.seq), "params": param_count(cfg),
                        "params_of_flm_shape": reference, "params_over_flm_shape": param_count(cfg) / reference})
        results.save()
        step, trainer = flm_step(args, args.data, args.work.with_name(args.work.name + "-llama"), arch="llama")
    except Exception as e:  # the HF line still runs
        results.fail("llama.flm", e)
        step = trainer = None
    flm = hf = None
    if trainer is not None:
        model = trainer.model
        flm = results.run("flm", lambda: {**timed(step, args.warmup, args.steps, args.batch * args.seq, device),
                                          "graphs_compiled": int(counters["stats"]["unique_graphs"]),
                                          "params": sum(p.numel() for p in model.parameters())}, section="llama")
        trainer.close()
        del step, trainer, model
        release(device)
    if args.peer:
        counters.clear()

        def peer() -> dict:
            peer_fn, model = hf_llama_step(args, device, model_config(args, "llama").ln_eps)
            return {**timed(peer_fn, args.warmup, args.steps, args.batch * args.seq, device),
                    "graphs_compiled": int(counters["stats"]["unique_graphs"]),
                    "params": sum(p.numel() for p in model.parameters()),
                    "attention": model.config._attn_implementation, "rope_theta": hf_rope_theta(model.config)}

        hf = results.run("hf", peer, section="llama")
    if flm is not None and hf is not None:
        section["params_equal"] = flm["params"] == hf["params"]
        section["flm_over_hf"] = flm["tokens_per_s"] / hf["tokens_per_s"]
    results.run("mfu", lambda: mfu(results.data, device, section, ("flm", "hf")), section="llama")
    return flm


class Results:
    """The JSON being built, written out after every change."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data
        self.save()

    def save(self) -> None:
        write_json_report(self.path, self.data)

    def run(self, name: str, measure, section: str | None = None) -> object:
        """`measure()` stored under `name` (in the dictionary `section` when given), or its error, named `name` or
        `section.name` (the rest goes on); returns the value or None."""
        try:
            value = measure()
        except Exception as e:  # a failed measurement is a result too: record it and go on
            self.fail(f"{section}.{name}" if section else name, e)
            return None
        (self.data[section] if section else self.data)[name] = value
        self.save()
        return value

    def fail(self, name: str, error: Exception) -> None:
        traceback.print_exception(error)
        self.data.setdefault("errors", {})[name] = "".join(traceback.format_exception_only(error)).strip()[-2000:]
        self.save()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a prepared folder (flm prepare) for flm's loader")
    p.add_argument("--json", type=Path, required=True, help="where the results go")
    p.add_argument("--work", type=Path, default=Path("runs/gpu-throughput"), help="flm's run folder (its lock)")
    p.add_argument("--tiny", action="store_true", help="a tiny shape, no compile: a check that the code runs")
    p.add_argument("--shape", help=f"LAYERSxWIDTHxHEADS (default {FULL['shape']}; head dim = width / heads)")
    for name in ("vocab", "seq", "batch", "warmup", "steps", "matmul"):
        p.add_argument(f"--{name}", type=int, help=f"default {FULL[name]} ({TINY[name]} with --tiny)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile per block (default on; "
                   "off with --tiny)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="also time HF GPT-2 (and HF "
                   "Llama for the llama line)")
    p.add_argument("--arch", choices=("flm", "llama", "both"), default="both", help="which lines: FLM vs HF GPT-2 "
                   "(flm), flm's llama arch vs HF LlamaForCausalLM (llama), or both, in that order (default)")
    p.add_argument("--kv-heads", type=int, help="the llama line's key/value heads (default: the heads)")
    args = p.parse_args()
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers, width, heads = (int(v) for v in args.shape.split("x"))
    config = {k: getattr(args, k) for k in ("shape", "vocab", "seq", "batch", "warmup", "steps", "compile",
                                            "activation_checkpointing")}
    peak = peak_bf16_flops(device)
    results = Results(args.json, {"device": str(device), "config": {**config, "head_dim": width // heads,
                                                                     "dtype": "bf16 autocast"},
                                  "datasheet_peak_tflops": peak / 1e12 if peak else None})
    results.run("matmul", lambda: matmul_rate(args.matmul, device))
    ok = True
    if args.arch in ("flm", "both"):
        ok = measure_flm_line(args, device, results)
    if args.arch in ("llama", "both"):
        ok = measure_llama(args, device, results) is not None and ok
    return 0 if ok else 1


def measure_flm_line(args, device: torch.device, results: Results) -> bool:
    """The FLM line: flm's FLM shape, then HF GPT-2 (unless --no-peer), MFU; whether flm's step was measured."""
    flm = measure_flm(args, device, results)
    results.run("mfu", lambda: mfu(results.data, device))  # now, in case the peer does not finish in time
    release(device)  # compiled code holds on to flm's model: let its memory go before the peer's
    if args.peer:
        counters.clear()

        def peer() -> dict:
            peer_fn, model = peer_step(args, device)
            return {**timed(peer_fn, args.warmup, args.steps, args.batch * args.seq, device),
                    "graphs_compiled": int(counters["stats"]["unique_graphs"]),
                    "params": sum(p.numel() for p in model.parameters()),
                    "attention": model.config._attn_implementation}

        results.run("peer", peer)
    results.run("mfu", lambda: mfu(results.data, device))
    release(device)
    return flm is not None


if __name__ == "__main__":
    sys.exit(main())
