"""What only a GPU runs: bf16 autocast, the flash attention kernel, torch.compile, growth, resume, the KV cache, a
step that never waits for the device, and NCCL under torchrun (the fused AdamW kernel on CUDA: test_adamw.py). Each
is checked against a reference computed another way. Skipped without CUDA; `make gpu-check` runs them first
(docs/results/gpu.md).

The data is flm's own source code (a glob over src/flm), so nothing here needs a corpus package or the network.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

import flm
from flm.checkpoint import is_sharded, list_checkpoints, step_of
from flm.config import ModelConfig
from flm.growth import grow_model
from flm.inference import load_for_inference
from flm.model import FLM, KVCache, generate
from flm.train import Trainer
from flm.train.transforms import compile_blocks

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
CODE = Path(flm.__file__).parent  # the corpus: flm's own .py files
CORPUS = (f"data.corpus='{CODE}/**/*.py'", "data.tokenizer='bpe'", "data.vocab_size=512", "data.max_chars=300000",
          "data.val_fraction=0.05", "data.workers=1")
ON_CUDA = ("train.device='cuda'", "train.ckpt_every=6")  # the tiny run (conftest) on the GPU
SMALL = ModelConfig(n_layers=2, d_model=64, n_heads=2, head_dim=32, vocab_size=512, max_seq_len=64)


def quiet(*_):
    pass


@pytest.fixture
def code_run(tiny_on):
    """The small run's builder on flm's own source code (2 layers x 64, batches of 4 x 32 tokens)."""
    return tiny_on(*CORPUS)


def staged_config(code_run, run_dir: Path, *extra: str):
    """Two stages: 3 steps of 2 x 64, then growth in depth, width and heads with a 6-step ramp."""
    path = run_dir.parent / f"{run_dir.name}.toml"
    path.write_text("[[stages]]\ntokens = 384\n\n[[stages]]\nn_layers = 3\nd_model = 96\nn_heads = 3\n"
                    "tokens = 1024\nramp_steps = 6\n")
    return code_run.config(run_dir, *ON_CUDA, *extra, path=path)


def tokens(n: int, length: int, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed)).to(CUDA)


def test_bf16_training_computes_the_fp32_loss_and_lowers_it(code_run, tmp_path):
    """bf16 autocast computes the fp32 function to bf16 precision, and 40 steps of it lower the validation loss (by
    0.8 nats on the CPU)."""
    cfg = code_run.config(tmp_path, *ON_CUDA, "train.dtype='bf16'", "train.max_steps=40")
    with Trainer(cfg, log=quiet) as trainer:
        x, y = tokens(4, 32), tokens(4, 32, seed=1)
        with torch.no_grad():
            fp32 = trainer.model(x, y)[1].item()
            with trainer.autocast:
                logits, bf16 = trainer.model(x, y)
        assert logits.dtype == torch.bfloat16 and abs(bf16.item() - fp32) <= 1e-2 * fp32, (bf16.item(), fp32)
        before = trainer.evaluate()
        for _ in range(40):
            trainer.train_step()
        after = trainer.evaluate()
    assert after < before - 0.5, (before, after)


def test_training_attention_runs_the_flash_or_cudnn_kernel():
    """At training shapes (head dim 128, 2,048 positions, bf16) scaled_dot_product_attention picks a flash kernel
    (its own or cuDNN's), forward and backward, not the memory-efficient or the math fallback: the profiler names
    the ATen operator each call dispatched to."""
    cfg = ModelConfig(n_layers=1, d_model=512, n_heads=4, head_dim=128, vocab_size=1024, max_seq_len=2048)
    model = FLM(cfg).to(CUDA)
    x = tokens(2, 2048, vocab=1024)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
    ops = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    forward = {f"aten::_scaled_dot_product_{kind}_attention" for kind in ("flash", "cudnn")}
    assert ops & forward and ops & {op + "_backward" for op in forward}, ops
    assert not any("efficient" in op or "math" in op for op in ops), ops


def test_blocks_compile_without_graph_breaks_once_for_all_layers():
    """A block traces into one graph with no break, also with growth masks in it; compiling a model per block
    (`train.compile`) compiles one graph that every layer reuses, and computes the eager logits and gradients."""
    torch.manual_seed(0)
    model = FLM(dataclasses.replace(SMALL, n_layers=4)).to(CUDA)
    grown, _ = grow_model(model, dataclasses.replace(SMALL, n_layers=5, d_model=96, n_heads=3), ramp_steps=4)
    for m, hidden_mask in ((model, None), (grown, grown.hidden_mask)):
        h = torch.randn(2, 32, m.cfg.d_model, device=CUDA)
        explained = torch._dynamo.explain(m.blocks[-1])(h, m.rope(0, 32), hidden_mask)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model)
    x, y = tokens(2, 32), tokens(2, 32, seed=1)
    logits = []
    for m in (eager, model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, loss = m(x, y)
        loss.backward()
        logits.append(out.float())
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # Fused kernels round to bf16 at other places than eager ops: bf16-sized differences (on the CPU, 0.7% at most).
    assert relative_error(logits[1], logits[0]) <= 2e-2
    for (name, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        assert relative_error(a.grad, b.grad) <= 5e-2, name


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def test_growth_on_cuda_preserves_the_function():
    """At c = 0 the grown model computes the old function: fp32 logits within 1e-5, and the bf16 loss within bf16
    rounding (2^-8 of the loss)."""
    torch.manual_seed(0)
    old = FLM(SMALL).to(CUDA).eval()
    with torch.no_grad():
        for p in old.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))  # non-trivial LayerNorm parameters, as after training
    new_cfg = dataclasses.replace(SMALL, n_layers=3, d_model=96, n_heads=3, d_ff=320, init_std=0.5)
    grown, _ = grow_model(old, new_cfg, ramp_steps=10)
    grown.eval()
    x, y = tokens(4, 64), tokens(4, 64, seed=1)
    with torch.no_grad():
        assert (grown(x)[0] - old(x)[0]).abs().max().item() <= 1e-5
        with torch.autocast("cuda", dtype=torch.bfloat16):
            before, after = old(x, y)[1].item(), grown(x, y)[1].item()
    assert abs(after - before) <= 2 ** -8 * before, (before, after)


@contextlib.contextmanager
def deterministic():
    """Deterministic kernels where torch has a choice (a warning where it has none)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def test_save_and_resume_on_cuda_is_bit_exact(code_run, tmp_path):
    """6 steps, a checkpoint, a new process's worth of trainer resuming, 6 more steps: bit for bit the 12
    uninterrupted steps (bf16, dropout drawing from the CUDA generator)."""
    extra = (*ON_CUDA, "train.dtype='bf16'", "model.dropout=0.1")
    with deterministic():
        with Trainer(code_run.config(tmp_path / "a", *extra), log=quiet) as straight:
            straight.train()
        cfg = code_run.config(tmp_path / "b", *extra)
        with Trainer(cfg, log=quiet) as first:
            first.train(until_step=6)
        with Trainer(cfg, log=quiet) as second:
            assert second.resume("auto") and second.step == 6
            second.train()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), second.model.state_dict().items()):
        assert a.device.type == "cuda" and torch.equal(a, b), name
    for p_a, p_b in zip(straight.model.parameters(), second.model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(straight.optimizer.state[p_a][key], second.optimizer.state[p_b][key]), key


def test_kv_cache_decoding_on_cuda_equals_full_recomputation():
    torch.manual_seed(0)
    model = FLM(SMALL).to(CUDA).eval()
    x = tokens(2, 50)
    with torch.no_grad():
        full = model(x)[0]
        cache = KVCache(SMALL, 2, CUDA, torch.float32)
        parts = [model(x[:, :20], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(20, 30)]
        parts.append(model(x[:, 30:], cache=cache)[0])
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    prompt = x[0, :5].tolist()
    assert generate(model, prompt, 40) == generate(model, prompt, 40, use_cache=False)


@contextlib.contextmanager
def sync_is_an_error():
    """Any CUDA call that makes the host wait for the device raises (torch.cuda.set_sync_debug_mode)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_training_step_never_waits_for_the_gpu(code_run, tmp_path):
    """Steps with the step guard armed (its window full), and steps in a growth ramp (masks set every step, grown
    tensors' Adam counts per age class), launch their work without one host-device synchronisation. Growing itself,
    and the first step after it (one read of every grown tensor's counts), may wait."""
    with Trainer(staged_config(code_run, tmp_path / "run", "train.spike_window=2"), log=quiet) as trainer:
        trainer.train_step()  # creates the Adam state
        with sync_is_an_error():
            trainer.train_step()
            trainer.train_step()
        assert trainer.step == trainer.stages[0].end
        trainer.grow()
        trainer.train_step()
        with sync_is_an_error():
            for _ in range(3):
                trainer.train_step()
        assert trainer.ramp is not None and any("age" in s for s in trainer.optimizer.state.values())


def test_the_parallel_trainer_runs_and_checkpoints_under_torchrun_with_nccl(code_run, tmp_path, torchrun):
    """`torchrun --nproc-per-node 1` trains on the GPU through NCCL and writes sharded checkpoints that load back."""
    run = tmp_path / "run"
    proc = torchrun(1, "train", *code_run.args(run, *ON_CUDA, "train.max_steps=6", "train.ckpt_every=3"))
    assert "steps on cuda (bf16 autocast)" in proc.stdout and "parallel: 1 processes" in proc.stdout, proc.stdout
    found = list_checkpoints(run / "checkpoints")
    assert [step_of(p) for p in found] == [3, 6] and all(is_sharded(p) for p in found)
    assert json.loads((found[-1] / "meta.json").read_text())["layout"]["world_size"] == 1
    model, _, _ = load_for_inference(run)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(32)[None])[0]).all()
