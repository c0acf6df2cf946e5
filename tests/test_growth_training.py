"""Growth inside training: the c = 0 invariant of a step, staged runs, resume mid-ramp, offline growth then
resume, and the stage settings refused before training (AdamW's per-entry counts: test_adamw.py)."""

import dataclasses

import pytest
import torch

from flm.config import ModelConfig, load_config
from flm.growth import grow_tensor, grow_training
from flm.model import FLM
from flm.train import Trainer
from flm.train.metrics import read_metrics
from flm.train.optim import adam_state_by_name, build_optimizer
from flm.train.schedule import plan_stages


def test_step_at_c0_moves_old_entries_as_plain_training_and_new_entries_only_by_decay():
    """The invariant: at c = 0 every new entry gets exactly zero gradient (it only feeds masked paths),
    so one step of the grown model updates the old block exactly as the old model's step would, and
    the new entries change only by the weight-decay factor (1 - lr·wd)."""
    torch.manual_seed(0)
    old_cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, vocab_size=97, max_seq_len=64)
    train_cfg = load_config(None).train
    old = FLM(old_cfg)
    opt = build_optimizer(old, train_cfg)
    x, y = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 24))
    for _ in range(3):  # give the old model an Adam history
        old(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    new_cfg = dataclasses.replace(old_cfg, d_model=48, n_heads=3, d_ff=160, n_layers=3)
    grown, ramp, state = grow_training(old, adam_state_by_name(opt), new_cfg, "stack", ramp_steps=10)
    gopt = build_optimizer(grown, train_cfg, state)
    before = {n: p.detach().clone() for n, p in grown.named_parameters()}
    old(x, y)[1].backward()
    grown(x, y)[1].backward()
    for n, p in grown.named_parameters():
        if n.startswith("blocks.2."):
            assert p.grad.abs().max() == 0, n  # the new layer: gate 0
    opt.step()
    gopt.step()
    decay = 1 - train_cfg.lr * train_cfg.weight_decay
    old_params = dict(old.named_parameters())
    for name, p in grown.named_parameters():
        region = torch.zeros_like(p, dtype=torch.bool)
        if name in old_params and not name.startswith("blocks.2."):
            # Where the mapping puts the old tensor (its exact slices are checked in test_growth.py).
            placed = grow_tensor(name, old_params[name].detach(), torch.zeros_like(p), old_cfg, new_cfg)
            region = grow_tensor(name, torch.ones_like(old_params[name]), torch.zeros_like(p), old_cfg,
                                 new_cfg, readout_power=0).bool()
            assert torch.allclose(p.detach()[region], placed[region], atol=1e-6, rtol=0), name
        wd = decay if p.dim() >= 2 else 1.0
        assert torch.allclose(p.detach()[~region], before[name][~region] * wd, atol=1e-7, rtol=0), name


# The tiny run (conftest) at 2 layers x 32 with dropout (its RNG state must resume too), in three stages.
GROWTH_RUN = ("model.d_model=32", "model.head_dim=16", "model.dropout=0.1", "train.eval_every=5")
STAGES = """
[[stages]]
tokens = 768
[[stages]]
n_layers = 3
d_model = 48
n_heads = 3
tokens = 1280
ramp_steps = 4
warmup_steps = 2
batch_size = 8
[[stages]]
d_ff = 256
tokens = 512
ramp_steps = 2
new_layers = "insert"
"""


def staged(tiny, run_dir, *extra):
    path = run_dir.parent / f"{run_dir.name}.toml"
    path.write_text(STAGES)
    return tiny.config(run_dir, *GROWTH_RUN, *extra, path=path)


def test_staged_run_grows_and_resumes_bit_exactly_mid_ramp(tiny, tmp_path):
    quiet = lambda *_: None
    with Trainer(staged(tiny, tmp_path / "a"), log=quiet) as a:
        assert [(s.start, s.end, s.grad_accum) for s in a.stages] == [(0, 6, 1), (6, 11, 2), (11, 15, 1)]
        a.train()
    b_cfg = staged(tiny, tmp_path / "b")
    with Trainer(b_cfg, log=quiet) as first:
        first.train(until_step=8)  # stage 2, mask ramp at c = 2/4
        assert first.ramp is not None and first.ramp.c == 0.5
    with Trainer(b_cfg, log=quiet) as second:
        assert second.resume("auto") and second.step == 8
        assert second.ramp.c == 0.5 and second.model.hidden_mask is not None
        second.train()
    assert a.model.cfg.d_model == 48 and a.model.cfg.ffn_dim == 256 and second.ramp is None
    for (name, p), (_, q) in zip(a.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(p, q), name
    for p, q in zip(a.model.parameters(), second.model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a.optimizer.state[p][key], second.optimizer.state[q][key])
    records = read_metrics(tmp_path / "a")
    growths = [r for r in records if r["kind"] == "growth"]
    assert [g["step"] for g in growths] == [6, 11]
    for g in growths:
        # A mean of float32 token losses; width growth may move logits in the last bits (test_growth.py). Seen equal.
        assert g["loss_after"] == pytest.approx(g["loss_before"], rel=1e-6)
        assert g["params_after"] > g["params_before"]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 16))
    assert [r["step"] for r in read_metrics(tmp_path / "b") if r["kind"] == "train"] == list(range(1, 16))


def test_offline_grow_then_resume_continues_from_the_same_function(tiny, tmp_path, cli_process):
    from flm.inference import load_for_inference

    cfg = staged(tiny, tmp_path / "small")
    cfg.stages = []
    cfg.train.max_steps, cfg.train.warmup_steps = 4, 1
    with Trainer(cfg, log=lambda *_: None) as trainer:
        trainer.train()
    out = tmp_path / "big"
    proc = cli_process("grow", tmp_path / "small", "--to", "d_model=64,n_heads=4,n_layers=3", "--out", out,
                       "--ramp-steps", "3")
    assert proc.returncode == 0, proc.stderr
    small, _, _ = load_for_inference(tmp_path / "small")
    big, _, meta = load_for_inference(out)
    assert meta["ramp"]["steps_done"] == 0 and big.cfg.d_model == 64
    from flm.growth import Ramp, apply_masks

    apply_masks(big, Ramp.from_dict(meta["ramp"]))
    x = torch.randint(0, 400, (2, 20))
    after, before = big(x)[0], small(x)[0]
    assert (after - before).abs().max() <= 2e-6 * before.abs().max()  # as test_growth.py's; observed 2.3e-7
    grown_cfg = staged(tiny, out, "model.d_model=64", "model.n_heads=4", "model.n_layers=3")
    grown_cfg.stages = []
    grown_cfg.train.max_steps, grown_cfg.train.warmup_steps = 8, 1
    with Trainer(grown_cfg, log=lambda *_: None) as trainer:
        assert trainer.resume("auto") and trainer.step == 4 and trainer.ramp.c == 0
        trainer.train()
    assert trainer.ramp is None and trainer.step == 8
    bad = cli_process("grow", tmp_path / "small", "--to", "d_model=16", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "cannot shrink d_model" in bad.stderr


def test_a_ramp_longer_than_its_stage_is_a_config_error(tiny, tmp_path):
    from flm.errors import FlmError

    cfg = staged(tiny, tmp_path / "r")
    cfg.stages[1].ramp_steps = 50  # the stage has 5 steps: a next growth would land mid-ramp
    with pytest.raises(FlmError, match=r"stages\[1\]\.ramp_steps \(50\) is longer than the stage \(5 steps\): "
                                       r"the masks must reach 1 before the next growth or the end$"):
        with Trainer(cfg, log=lambda *_: None):
            pass
    cfg.stages[1].ramp_steps = 5  # as long as the stage: the masks reach 1 at its last step
    assert [s.ramp_steps for s in plan_stages(cfg, dataclasses.replace(cfg.model, vocab_size=97))] [:2] == [0, 5]


def test_a_stage_that_would_shrink_is_refused_before_training(tiny, tmp_path):
    from flm.errors import FlmError

    cfg = staged(tiny, tmp_path / "s", "model.n_layers=5")  # stage 2 asks for 3 layers
    with pytest.raises(FlmError, match=r"stages\[1\]: growth cannot shrink n_layers \(5 -> 3\)"):
        with Trainer(cfg, log=lambda *_: None):
            pass
