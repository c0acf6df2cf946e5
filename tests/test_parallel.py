"""3-D parallel training under torchrun on CPU (gloo), checked against one process on the same global batch.

What a user relies on is compared, each with a bound that holds on any x86-64 CPU and that a real bug
breaks by orders of magnitude (`test_the_bounds_catch_broken_runs` shows each bound failing on broken runs):
- the loss at every step, relative 1e-5: a parallel run adds the same numbers in another order (gradients
  summed over ranks and shards, norms per mesh), which moves fp32 results in the last bits (observed
  <= 8.3e-8 on an AMD EPYC). Dropping one data-parallel rank's gradient moves the loss by 1e-2, leaving one
  tensor-parallel slice of a grown tensor at zero by 6.6e-5 (its effect on the loss enters through the ramp).
- the final models' logits on a fixed batch, max |difference| relative to max |logit|, 1e-4: rounding
  differences in the weights change them by <= 2.8e-6 of their size; the broken runs by 0.64 and 0.014.
- the weights, as the RMS difference of each tensor in units of one optimizer step (lr), 0.02 (observed
  <= 8.8e-5; the broken runs 1.3 and 2.2). Adam divides
  each gradient entry by its own running RMS, so on the rare entries whose gradient is near zero, a
  reduction-order change of the gradient can flip the sign of the update: single entries legitimately differ
  by a sizeable fraction of lr (up to 2.1e-4 = 0.07 lr seen on an Intel Xeon, 323 of 49,152 entries above
  1e-6), which is why no bound is put on single entries. Such entries are a tiny share, so the RMS stays
  < 0.005 lr; a real error (a wrong shard, a missing reduction, an ungrown slice) moves most entries by ~lr.
- the gradient norm of every step (metrics.jsonl), relative 1e-4: the same gradients reduced over shards and
  meshes in another order move it by <= 8e-7; after a few steps the weights themselves differ (single entries by
  a sizeable fraction of lr, see above), and the gradient at those weights more than the loss: 1.6e-5 seen at
  step 8 of the growth run. The broken runs below are off by 0.37 and 0.13.
The one-process reference runs with one thread, like each rank.
"""

import contextlib
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flm.config import ModelConfig, load_config
from flm.errors import FlmError
from flm.model import build_model, generate
from flm.parallel.pipeline import check_pipeline
from flm.train.transforms import apply_activation_checkpointing
from flm.parallel.tensor import check_tensor_parallel
from flm.train import Trainer
from flm.train.placement import OneProcess
from flm.inference import load_for_inference
from flm.train.metrics import read_metrics

STEPS = 4
LR = 3e-3  # train.lr below: the size of one Adam step
LOSS_RTOL, LOGITS_RTOL, STEP_RMS, GRAD_NORM_RTOL = 1e-5, 1e-4, 0.02, 1e-4


# The tiny run (conftest) with two micro-batches per step, STEPS steps, a checkpoint every 2 steps.
PARALLEL = ("train.grad_accum=2", f"train.max_steps={STEPS}", f"train.lr={LR}", f"train.eval_every={STEPS}",
            "train.ckpt_every=2", "train.keep_last=5")


def settings(tiny, run_dir, *extra):
    return tiny.settings(run_dir, *PARALLEL, *extra)


def cli_args(tiny, run_dir, *extra):
    return ["train", *tiny.args(run_dir, *PARALLEL, *extra)]


@contextlib.contextmanager
def one_thread():
    """Run the one-process reference with one thread, as each torchrun rank runs (conftest's `torchrun`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_one_process(config, run, tiny) -> Path:
    with one_thread(), Trainer(load_config(config, settings(tiny, run)), log=lambda _: None) as trainer:
        trainer.train()
    return run


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One process, same global batch: 4 sequences x 2 micro-batches per step."""
    return train_one_process(None, tmp_path_factory.mktemp("ref") / "run", tiny)


def train_losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]


def train_grad_norms(run):
    return [(r["step"], r["grad_norm"]) for r in read_metrics(run) if r["kind"] == "train"]


def mismatch(run, reference) -> dict[str, float]:
    """How far `run` is from `reference`, in the three measures of the module docstring."""
    got, want = train_losses(run), train_losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want]
    model, _, _ = load_for_inference(run)  # a sharded DCP checkpoint is read by one process
    ref_model, _, _ = load_for_inference(reference)
    tokens = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, ref_logits = model(tokens)[0], ref_model(tokens)[0]
    weights, ref_weights = model.state_dict(), ref_model.state_dict()
    assert weights.keys() == ref_weights.keys()
    norms = zip(train_grad_norms(run), train_grad_norms(reference))
    return {"loss": max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(got, want)),
            "grad_norm": max(abs(a - b) / b for (_, a), (_, b) in norms),
            "logits": ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item(),
            "weights": max(((weights[k] - ref_weights[k]).pow(2).mean().sqrt() / LR).item() for k in weights)}


BOUNDS = {"loss": LOSS_RTOL, "logits": LOGITS_RTOL, "weights": STEP_RMS, "grad_norm": GRAD_NORM_RTOL}


def assert_same_run(run, reference, steps=STEPS):
    assert [s for s, _ in train_losses(run)] == list(range(1, steps + 1))
    found = mismatch(run, reference)
    assert all(found[k] <= BOUNDS[k] for k in BOUNDS), found
    _, _, meta = load_for_inference(run)
    assert meta["step"] == steps


@pytest.mark.parametrize("nproc, layout", [
    (2, ["parallel.dp=2"]),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.activation_checkpointing=true"]),
    (4, ["parallel.dp=2", "parallel.tp=2"]),
    (4, ["parallel.dp=4", "parallel.dp_replicate=2"]),
    (2, ["parallel.pp=2", "parallel.pp_schedule='1f1b'"]),
    (8, ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule='gpipe'"]),
], ids=["dp2", "tp2-sp-ac", "dp2xtp2", "hsdp2x2", "pp2-1f1b", "dp2xtp2xpp2-gpipe"])
def test_layout_matches_one_process(tiny, reference, tmp_path, nproc, layout, torchrun):
    run = tmp_path / "run"
    torchrun(nproc, *cli_args(tiny, run, *layout))
    assert_same_run(run, reference)


def test_resume_on_the_same_and_other_layouts_and_one_process(tiny, reference, tmp_path, torchrun, cli_process):
    """Saved at dp2 x tp2 after 2 steps; resumed at dp2 x tp2, at dp4 (4 ranks, other slices of each batch)
    and in one process without torchrun; and one process's checkpoint resumed at dp2 x tp2: all continue on
    the same samples and end where one process ends."""
    first = tmp_path / "first"
    torchrun(4, *cli_args(tiny, first, "parallel.dp=2", "parallel.tp=2"), "--until-step", "2")
    for name, layout in (("same", ["parallel.dp=2", "parallel.tp=2"]), ("dp4", ["parallel.dp=4"]), ("single", [])):
        run = tmp_path / name
        shutil.copytree(first, run)
        args = [*cli_args(tiny, run, *layout), "--resume", "auto"]
        proc = torchrun(4, *args) if layout else cli_process(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resumed from" in proc.stdout and "step 2" in proc.stdout
        assert_same_run(run, reference)
    # And the other way: one process's checkpoint (step 2 of the reference run) resumed at dp2 x tp2.
    run = tmp_path / "from_single"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")
    proc = torchrun(4, *cli_args(tiny, run, "parallel.dp=2", "parallel.tp=2"), "--resume", "auto")
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


def test_sharded_resume_with_dropout_is_bit_exact(tiny, tmp_path, torchrun):
    """dp2 with dropout 0.1 (each rank draws its own masks): 4 steps straight, and the same run resumed by a new
    torchrun from its sharded step-2 checkpoint (what `--until-step 2` writes) for steps 3 and 4. Every rank must
    restore its own RNG state, the data position and the sharded Adam state: the final sharded checkpoints hold
    equal weights (torch.equal), and steps 3 and 4 have the same loss and gradient norm to the last bit.
    Catches: the RNG not restored, the data position or the sharded Adam state not restored. (Data-parallel ranks
    start from the same seed and draw alike, so whose saved state a dp rank restores cannot show here.)"""
    layout = ["parallel.dp=2", "model.dropout=0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(2, *cli_args(tiny, straight, *layout))
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")
    proc = torchrun(2, *cli_args(tiny, resumed, *layout), "--resume", "auto")
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    records = {run: [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run) if r["kind"] == "train"]
               for run in (straight, resumed)}
    assert [r[0] for r in records[resumed]] == list(range(1, STEPS + 1))
    assert records[resumed] == records[straight]
    a, _, meta_a = load_for_inference(straight)
    b, _, meta_b = load_for_inference(resumed)
    assert meta_a["step"] == meta_b["step"] == STEPS and meta_b["layout"]["dp"] == 2
    weights_a, weights_b = a.state_dict(), b.state_dict()
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


def test_a_torchrun_job_samples_the_model_it_trained(tiny, tmp_path, torchrun):
    """`flm train` ends with a sample under torchrun as in one process: the main process samples the model gathered
    from its tensor- and pipeline-parallel pieces, which is exactly the final checkpoint's model, so the text is what
    one process samples from that checkpoint with the trainer's settings."""
    run, tokens = tmp_path / "run", 16
    proc = torchrun(4, *cli_args(tiny, run, "parallel.tp=2", "parallel.pp=2", f"train.sample_tokens={tokens}"))
    shown = [line for line in proc.stdout.splitlines() if line.startswith("sample: ")]
    prompt = load_config(None, settings(tiny, run)).train.sample_prompt
    model, tok, _ = load_for_inference(run)
    with one_thread():
        out = generate(model, tok.encode(prompt), tokens, temperature=0.8, top_k=50, eot_id=tok.eot_id,
                       generator=torch.Generator().manual_seed(0), vocab_limit=tok.vocab_size)
    assert shown == [f"sample: {prompt + tok.decode([t for t in out if t != tok.eot_id])!r}"]


def test_layout_that_does_not_match_the_processes_is_one_line(tiny, tmp_path, torchrun, cli_process):
    proc = torchrun(2, *cli_args(tiny, tmp_path / "run", "parallel.tp=4"), check=False)
    assert proc.returncode != 0
    line = "error: [parallel]: layout dp1 x tp4 x pp1 needs 4 processes, but torchrun started 2"
    assert proc.stderr.count(line) == 2  # one line from each process (then torchrun's own report)
    assert "FlmError" not in proc.stderr
    proc = cli_process(*cli_args(tiny, tmp_path / "run", "parallel.dp=2"))
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
        model = build_model(cfg)
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


GROWTH_STAGES = """
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
GROWTH_STEPS = 9


def growth_config(path: Path, *layouts: str) -> Path:
    path.write_text(GROWTH_STAGES.format(*(layouts or ("", "", ""))))
    return path


@pytest.fixture(scope="module")
def growth_reference(tiny, tmp_path_factory):
    """The three-stage schedule of the growth test, in one process."""
    root = tmp_path_factory.mktemp("growth-ref")
    return train_one_process(growth_config(root / "single.toml"), root / "run", tiny)


def test_growth_inside_a_run_reshards_and_matches_one_process(tiny, growth_reference, tmp_path, torchrun):
    """Three stages on 4 processes, the layout changing at each growth as FLM-101B's did: dp2 x tp2, then
    tp2 x pp2, then tp4. Growth (depth, width, heads, FFN) happens inside the run, one tensor at a time:
    the probe loss is unchanged by each growth, and every step and the final weights match the same
    schedule in one process (new entries get exactly the fresh values single-process growth gives them)."""
    config = growth_config(tmp_path / "parallel.toml", "tp = 2\ndp = 2", "tp = 2\npp = 2\ndp = 1", "tp = 4\ndp = 1")
    run = tmp_path / "parallel"
    torchrun(4, "train", "-c", str(config), *tiny.args(run, *PARALLEL))
    growth = {name: [r for r in read_metrics(r_) if r["kind"] == "growth"]
              for name, r_ in (("parallel", run), ("single", growth_reference))}
    assert [r["step"] for r in growth["parallel"]] == [3, 6]
    for grown, reference in zip(growth["parallel"], growth["single"]):
        assert grown["params_after"] > grown["params_before"]
        assert grown["loss_after"] == pytest.approx(grown["loss_before"], rel=1e-6)  # the function is preserved
        assert grown["loss_after"] == pytest.approx(reference["loss_after"], rel=LOSS_RTOL)
    _, _, meta = load_for_inference(run)
    assert meta["layout"] == {"tp": 4, "pp": 1, "dp": 1, "dp_replicate": 1, "world_size": 4}
    assert_same_run(run, growth_reference, steps=GROWTH_STEPS)


GROW_AT_BOUNDARY = """
import sys

from flm.config import load_config
from flm.launch import make_trainer

with make_trainer(load_config(sys.argv[1], sys.argv[2:]), prepare=lambda _: None, log=lambda _: None) as trainer:
    trainer.train(until_step=3)
    trainer.grow()  # the growth into stage 2, then a checkpoint of the grown model before any step
    trainer.save()
"""

def stages_changing_layout(growth: str, then: str = "") -> str:
    """[[stages]] TOML: tp2 x dp2, then a growth into 3 layers x 128 x 4 heads made by `growth` (one TOML line)
    on tp4 x dp1, then the stages in `then`."""
    return f"""
[[stages]]
tokens = 768
tp = 2
dp = 2
[[stages]]
n_layers = 3
d_model = 128
n_heads = 4
{growth}
tokens = 768
ramp_steps = 2
tp = 4
dp = 1
{then}"""


PATHS_STAGES = stages_changing_layout('new_layers = "random"')


def fresh_region(name: str, old_cfg, new_cfg, shape) -> torch.Tensor:
    """Where tensor `name` of the grown model holds new entries (everything, for a layer added fresh)."""
    from flm.growth import grow_tensor
    from flm.growth.routine import parameter_shapes

    old_shapes = parameter_shapes(old_cfg)
    if name not in old_shapes:
        return torch.ones(shape, dtype=torch.bool)
    old = torch.ones(old_shapes[name])
    return ~grow_tensor(name, old, torch.zeros(shape), old_cfg, new_cfg, readout_power=0).bool()


def test_growth_gives_the_same_new_entries_in_every_entry_point(tiny, tmp_path, torchrun, cli_process):
    """The one growth routine: one process, four torchrun processes (dp2 x tp2 growing into tp4) and `flm grow`
    on the boundary checkpoint give the new entries (wider tensors, more heads and FFN units, a fresh layer)
    exactly the same values; `flm grow` also the same old ones and Adam state as the trainer, and resuming from
    it continues bit for bit as the uninterrupted run."""
    from safetensors.torch import load_file

    from flm.checkpoint import load_model, persistent_tensors

    config = tmp_path / "stages.toml"
    config.write_text(PATHS_STAGES)
    single_cfg = load_config(config, settings(tiny, tmp_path / "single", "stages.0.tp=1", "stages.0.dp=1",
                                               "stages.1.tp=1"))
    with one_thread(), Trainer(single_cfg, log=lambda _: None) as trainer:
        trainer.train(until_step=3)  # writes the boundary checkpoint (step 3, before growing)
        trainer.grow()
    single = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    single_adam = {k: {f: v.clone() for f, v in trainer.optimizer.state[p].items()}
                   for group in trainer.optimizer.param_groups for k, p in zip(group["names"], group["params"])
                   if p in trainer.optimizer.state}
    old_cfg, new_cfg = trainer.stages[0].model, trainer.model.cfg

    grown_dir = tmp_path / "grown"
    proc = cli_process("grow", str(tmp_path / "single" / "checkpoints" / "step_00000003"), "--to",
                   "n_layers=3,d_model=128,n_heads=4", "--new-layers", "random", "--out", str(grown_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = grown_dir / "checkpoints" / "step_00000003"
    offline = load_file(str(ckpt / "model.safetensors"))
    state = load_file(str(ckpt / "train_state.safetensors"))
    assert offline.keys() == single.keys() and all(torch.equal(offline[k], single[k]) for k in single)
    for name, fields in single_adam.items():
        assert all(torch.equal(state[f"opt.{name}.{f}"], v) for f, v in fields.items()), name

    script = tmp_path / "grow_at_boundary.py"
    script.write_text(GROW_AT_BOUNDARY)
    run = tmp_path / "parallel"
    torchrun(4, str(config), *settings(tiny, run), script=str(script))
    parallel = build_model(new_cfg)
    load_model(run / "checkpoints" / "step_00000003", persistent_tensors(parallel))
    fresh = 0
    for name, p in parallel.named_parameters():
        region = fresh_region(name, old_cfg, new_cfg, p.shape)
        assert torch.equal(p.detach()[region], single[name][region]), name
        fresh += int(region.sum())
    assert fresh > 10_000  # the comparison covers the new structure, not a handful of entries

    # flm grow + resume continues exactly as the uninterrupted one-process run.
    straight = tmp_path / "straight"
    resumed_cfg = load_config(config, settings(tiny, grown_dir, "stages.0.tp=1", "stages.0.dp=1",
                                                "stages.1.tp=1"))
    straight_cfg = load_config(config, settings(tiny, straight, "stages.0.tp=1", "stages.0.dp=1",
                                                 "stages.1.tp=1"))
    with one_thread():
        with Trainer(straight_cfg, log=lambda _: None) as trainer:
            trainer.train()
        with Trainer(resumed_cfg, log=lambda _: None) as resumed:
            assert resumed.resume("auto") and resumed.step == 3 and resumed.stage == 1
            resumed.train()
    final = load_file(str(grown_dir / "checkpoints" / "step_00000006" / "model.safetensors"))
    want = load_file(str(straight / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert all(torch.equal(final[k], want[k]) for k in want)


FAMILY_STAGES = stages_changing_layout('operator = "zero"', """[[stages]]
n_heads = 8
d_ff = 1024
operator = "clone"
tokens = 768
tp = 2
dp = 2
""")


def test_growth_families_preserve_the_function_under_torchrun(tiny, tmp_path, torchrun):
    """The families run in the sharded growth too (flm.parallel.grow calls the one routine): four processes grow
    by `zero` (width, heads, a layer; dp2 x tp2 into tp4, its LayerNorm statistics ramping on every rank) and then by
    `clone` (heads and FFN x2; tp4 into dp2 x tp2), and the validation-batch loss is the same right before and right
    after each growth, as the trainer measures it under each layout (relative 1e-6, as one process's growth tests:
    the two sides are reduced over different shards; observed equal)."""
    config = tmp_path / "stages.toml"
    config.write_text(FAMILY_STAGES)
    run = tmp_path / "families"
    torchrun(4, "train", "-c", str(config), *tiny.args(run, *PARALLEL))
    growths = [r for r in read_metrics(run) if r["kind"] == "growth"]
    assert [g["operator"] for g in growths] == ["zero", "clone"]
    for g in growths:
        assert g["loss_after"] == pytest.approx(g["loss_before"], rel=1e-6), g


def drop_second_rank(monkeypatch):
    """dp2 with rank 1's gradient lost: each micro-batch's gradient comes from its first half only."""
    original = OneProcess.forward_backward

    def first_half(self, model, x, y, n, n_step):
        half = x.shape[0] // 2
        return original(self, model, x[:half], y[:half], int((y[:half] != -100).sum()), n_step)

    monkeypatch.setattr(OneProcess, "forward_backward", first_half)


def leave_one_slice_ungrown(monkeypatch):
    """tp4 where one rank's slice of a grown tensor keeps zeros instead of fresh values: the first quarter of
    blocks.0.mlp.fc1's new rows (the function is still preserved at growth, only training shows it)."""
    import flm.train.placement as placement_module

    original = placement_module.grow_training

    def grow(model, adam, new_cfg, *args, **kwargs):
        grown, ramp, state = original(model, adam, new_cfg, *args, **kwargs)
        old, new = model.cfg.ffn_dim, new_cfg.ffn_dim
        with torch.no_grad():
            grown.blocks[0].mlp.fc1.weight[old:old + (new - old) // 4] = 0
        return grown, ramp, state

    monkeypatch.setattr(placement_module, "grow_training", grow)


@pytest.mark.parametrize("variant", ["dp-rank-gradient-dropped", "tp-slice-not-grown"])
def test_the_bounds_catch_broken_runs(variant, tiny, reference, growth_reference, tmp_path, monkeypatch):
    """Each of the three bounds above fails on a realistic bug, simulated in one process."""
    if variant == "dp-rank-gradient-dropped":
        drop_second_rank(monkeypatch)
        run, want = train_one_process(None, tmp_path / "run", tiny), reference
    else:
        leave_one_slice_ungrown(monkeypatch)
        run = train_one_process(growth_config(tmp_path / "g.toml"), tmp_path / "run", tiny)
        want = growth_reference
    found = mismatch(run, want)
    assert all(found[k] > 3 * BOUNDS[k] for k in BOUNDS), found


def test_plan_reports_memory_per_gpu_for_the_parallel_layout(tmp_path, cli):
    from flm.plan.hardware import get_gpu
    from flm.plan.memory import GIB, Layout, estimate_memory

    config = tmp_path / "run.toml"
    config.write_text('[model]\npreset = "flm-1b"\nvocab_size = 50304\n[train]\nseq_len = 2048\n'
                      '[plan]\ngpu = "H100-SXM"\nn_gpus = 16\n[parallel]\ntp = 2\npp = 2\ndp = 4\n')
    result = cli("plan", config, "--memory")
    assert result.status == 0
    row = next(line for line in result.out.splitlines() if line.startswith("model ") and "TP" in line)
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
