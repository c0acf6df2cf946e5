"""3-D parallel training under torchrun on CPU (gloo), checked against one process on the same global batch.

Tolerances. Parallel runs add the same numbers in another order (gradients summed over ranks and
shards, norms per mesh), so results differ from one process in the last bits of fp32, never more:
- per-step losses: relative 1e-5 (after 3 steps we observe < 1e-6);
- final weights: every entry within 1e-4 (3% of one Adam step at lr 3e-3), and at most 0.1% of the
  entries further apart than 1e-6. Adam divides each gradient entry by its own running RMS, so for the
  rare entries whose gradient is near zero a 1e-7 relative change of the gradient moves the update
  by a visible fraction of the step: after 4 steps we observe <= 1.2e-5 on a handful of entries, after
  9 steps with two growths <= 4.6e-5 on 5 of 600k entries and > 1e-6 on 0.05%, while every other entry
  agrees to < 1e-6. A real error (a wrong shard, a missing reduction, a skipped sample) moves most
  entries by ~lr = 3e-3.
"""

import shutil
from dataclasses import replace

import pytest
import torch

from flm.config import ModelConfig, load_config
from flm.data import prepare
from flm.errors import FlmError
from flm.model import FLM
from flm.parallel.pipeline import check_pipeline
from flm.parallel.recompute import apply_activation_checkpointing
from flm.parallel.tensor import check_tensor_parallel
from flm.train import Trainer
from flm.train.checkpoint import load_for_inference
from flm.train.metrics import read_metrics
from flm_torchrun import flm_cli, torchrun

STEPS = 4
LOSS_RTOL, WEIGHT_ATOL, CLOSE, MOST = 1e-5, 1e-4, 1e-6, 0.999


def settings(data_dir, run_dir, *extra):
    return [f"data.dir='{data_dir}'", "data.corpus=kjv", "data.max_chars=150000", "data.vocab_size=512",
            "data.val_fraction=0.05", f"train.run_dir='{run_dir}'",
            "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.head_dim=32", "model.max_seq_len=64",
            "train.batch_size=4", "train.grad_accum=2", "train.seq_len=32", f"train.max_steps={STEPS}",
            "train.warmup_steps=2", "train.lr=3e-3", f"train.eval_every={STEPS}", "train.eval_batches=2",
            "train.ckpt_every=2", "train.keep_last=5", "train.log_every=1", "train.progress=false",
            "train.tensorboard=false", "train.sample_tokens=0", *extra]


def cli_args(data_dir, run_dir, *extra):
    return ["train", *(a for s in settings(data_dir, run_dir, *extra) for a in ("--set", s))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pdata") / "prepared"
    prepare(load_config(None, settings(root, "unused")).data)
    return root


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One process, same global batch: 4 sequences x 2 micro-batches per step."""
    run = tmp_path_factory.mktemp("ref") / "run"
    trainer = Trainer(load_config(None, settings(data_dir, run)), log=lambda _: None)
    trainer.train()
    return run, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def train_losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]


def assert_same_run(run, reference):
    ref_run, ref_weights = reference
    got, want = train_losses(run), train_losses(ref_run)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=LOSS_RTOL)
    model, _, meta = load_for_inference(run)  # the sharded DCP checkpoint, read by one process
    assert meta["step"] == STEPS
    assert_weights_match(model.state_dict(), ref_weights)


def assert_weights_match(got, want):
    """See the module docstring: all entries within WEIGHT_ATOL, nearly all within CLOSE."""
    assert got.keys() == want.keys()
    close = total = 0
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], atol=WEIGHT_ATOL, rtol=0, msg=name)
        close += int(((tensor - want[name]).abs() <= CLOSE).sum())
        total += tensor.numel()
    assert close >= MOST * total, (close, total)


@pytest.mark.parametrize("nproc, layout", [
    (2, ["parallel.dp=2"]),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.activation_checkpointing=true"]),
    (4, ["parallel.dp=2", "parallel.tp=2"]),
    (4, ["parallel.dp=4", "parallel.dp_replicate=2"]),
    (2, ["parallel.pp=2", "parallel.pp_schedule='1f1b'"]),
    (8, ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule='gpipe'"]),
], ids=["dp2", "tp2-sp-ac", "dp2xtp2", "hsdp2x2", "pp2-1f1b", "dp2xtp2xpp2-gpipe"])
def test_layout_matches_one_process(data_dir, reference, tmp_path, nproc, layout):
    run = tmp_path / "run"
    torchrun(nproc, *cli_args(data_dir, run, *layout))
    assert_same_run(run, reference)


def test_resume_on_the_same_and_other_layouts_and_one_process(data_dir, reference, tmp_path):
    """Saved at dp2 x tp2 after 2 steps; resumed at dp2 x tp2, at dp4 (4 ranks, other slices of each batch)
    and in one process without torchrun; and one process's checkpoint resumed at dp2 x tp2: all continue on
    the same samples and end where one process ends."""
    first = tmp_path / "first"
    torchrun(4, *cli_args(data_dir, first, "parallel.dp=2", "parallel.tp=2"), "--until-step", "2")
    for name, layout in (("same", ["parallel.dp=2", "parallel.tp=2"]), ("dp4", ["parallel.dp=4"]), ("single", [])):
        run = tmp_path / name
        shutil.copytree(first, run)
        args = [*cli_args(data_dir, run, *layout), "--resume", "auto"]
        proc = torchrun(4, *args) if layout else flm_cli(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resumed from" in proc.stdout and "step 2" in proc.stdout
        assert_same_run(run, reference)
    # And the other way: one process's checkpoint (step 2 of the reference run) resumed at dp2 x tp2.
    run = tmp_path / "from_single"
    shutil.copytree(reference[0], run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")
    proc = torchrun(4, *cli_args(data_dir, run, "parallel.dp=2", "parallel.tp=2"), "--resume", "auto")
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    assert_same_run(run, reference)
    # The sharded checkpoint also exports to a Hugging Face folder with the same logits.
    from transformers import AutoModelForCausalLM

    from flm.export.hf import export_hf

    out = export_hf(first, tmp_path / "hf")
    ours, _, _ = load_for_inference(first)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, local_files_only=True).eval()
    tokens = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens)[0], rtol=0, atol=1e-5)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


def test_layout_that_does_not_match_the_processes_is_one_line(data_dir, tmp_path):
    proc = torchrun(2, *cli_args(data_dir, tmp_path / "run", "parallel.tp=4"), check=False)
    assert proc.returncode != 0
    line = "error: [parallel]: layout dp1 x tp4 x pp1 needs 4 processes, but torchrun started 2"
    assert proc.stderr.count(line) == 2  # one line from each process (then torchrun's own report)
    assert "FlmError" not in proc.stderr
    proc = flm_cli(*cli_args(data_dir, tmp_path / "run", "parallel.dp=2"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: [parallel] asks for 2 processes (dp2 x tp1 x pp1): launch with "
        "`torchrun --nproc-per-node 2 -m flm.cli.main train ...`"]


@pytest.mark.parametrize("bad, message", [
    ("parallel.dp_replicate=3", "parallel.dp_replicate (3) must divide parallel.dp (1)"),
    ("parallel.pp_schedule='zigzag'", "parallel.pp_schedule must be one of"),
    ("parallel.tp=0", "parallel.tp must be positive"),
])
def test_bad_parallel_settings(bad, message):
    with pytest.raises(FlmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [bad])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, vocab_size=64, max_seq_len=16, dropout=0.1)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = FLM(cfg)
        if checkpointing:
            apply_activation_checkpointing(model)
        calls = []
        for block in model.blocks:
            block.mlp.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)  # the same dropout masks, replayed during recomputation
        loss = model(x, y)[1]
        loss.backward()
        assert len(calls) == cfg.n_layers * (2 if checkpointing else 1)  # each block ran again in backward
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_growth_inside_a_run_reshards_and_matches_one_process(data_dir, tmp_path):
    """Three stages on 4 processes, the layout changing at each growth as FLM-101B's did: dp2 x tp2, then
    tp2 x pp2, then tp4. Growth (depth, width, heads, FFN) happens inside the run, one tensor at a time:
    the probe loss is unchanged by each growth, and every step and the final weights match the same
    schedule in one process (new entries get exactly the fresh values single-process growth gives them)."""
    stages = """
[[stages]]
tokens = 768
{0}
[[stages]]
n_layers = 3
d_model = 96
n_heads = 4
tokens = 768
ramp_steps = 2
{1}
[[stages]]
n_layers = 4
d_model = 128
tokens = 768
ramp_steps = 2
{2}
"""
    layouts = {"parallel": ("tp = 2\ndp = 2", "tp = 2\npp = 2\ndp = 1", "tp = 4\ndp = 1"), "single": ("", "", "")}
    runs = {}
    for name, layout in layouts.items():
        config = tmp_path / f"{name}.toml"
        config.write_text(stages.format(*layout))
        runs[name] = tmp_path / name
        if name == "parallel":
            torchrun(4, "train", "-c", str(config), *(a for s in settings(data_dir, runs[name]) for a in ("--set", s)))
        else:
            Trainer(load_config(config, settings(data_dir, runs[name])), log=lambda _: None).train()
    growth = {name: [r for r in read_metrics(run) if r["kind"] == "growth"] for name, run in runs.items()}
    assert [r["step"] for r in growth["parallel"]] == [3, 6]
    for grown, reference in zip(growth["parallel"], growth["single"]):
        assert grown["params_after"] > grown["params_before"]
        assert grown["loss_after"] == pytest.approx(grown["loss_before"], rel=1e-6)  # the function is preserved
        assert grown["loss_after"] == pytest.approx(reference["loss_after"], rel=LOSS_RTOL)
    got, want = train_losses(runs["parallel"]), train_losses(runs["single"])
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 10))
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=LOSS_RTOL)
    single, _, _ = load_for_inference(runs["single"])
    parallel, _, meta = load_for_inference(runs["parallel"])
    assert meta["layout"] == {"tp": 4, "pp": 1, "dp": 1, "dp_replicate": 1, "world_size": 4}
    assert_weights_match(parallel.state_dict(), single.state_dict())


def test_plan_reports_memory_per_gpu_for_the_parallel_layout(tmp_path, capsys):
    from flm.cli.main import main
    from flm.plan.hardware import get_gpu
    from flm.plan.memory import GIB, Layout, estimate_memory

    config = tmp_path / "run.toml"
    config.write_text('[model]\npreset = "flm-1b"\nvocab_size = 50304\n[train]\nseq_len = 2048\n'
                      '[plan]\ngpu = "H100-SXM"\nn_gpus = 16\n[parallel]\ntp = 2\npp = 2\ndp = 4\n')
    assert main(["plan", str(config), "--memory"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model ") and "TP" in line)
    cfg = load_config(config)
    want = estimate_memory(cfg.model, 2048, Layout(tp=2, pp=2, dp=4), get_gpu("H100-SXM"), cfg.plan.memory_margin)
    assert row.split()[1:5] == ["TP2", "PP2", "DP4", "16"]
    assert row.split()[9] == f"{want.total / GIB:.1f}"


@pytest.mark.parametrize("check, message", [
    (lambda cfg: check_tensor_parallel(cfg, 2, 32, False), "tensor parallelism tp=2 must divide model.n_heads (3)"),
    (lambda cfg: check_tensor_parallel(replace(cfg, n_heads=4), 4, 30, True),
     "sequence parallelism needs tp=4 to divide train.seq_len (30)"),
    (lambda cfg: check_pipeline(replace(cfg, tie_embeddings=True), 2, 4, 2), "a tied embedding and head cannot sit"),
    (lambda cfg: check_pipeline(cfg, 4, 4, 2), "pp=4 needs at least one block per stage; model.n_layers is 2"),
    (lambda cfg: check_pipeline(cfg, 2, 3, 2), "parallel.pp_microbatches (2) must divide"),
])
def test_layouts_the_model_cannot_take_are_one_line(check, message):
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=3, head_dim=32, vocab_size=512)
    with pytest.raises(FlmError) as e:
        check(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
