"""The trainer: bit-exact resume, atomic checkpoints, metrics, and learning on real text."""

import json
import shutil

import pytest
import torch

import flm.checkpoint.whole as ckpt_mod
from flm.config import load_config
from flm.errors import FlmError
from flm.checkpoint import list_checkpoints
from flm.train import Trainer
from flm.inference import load_for_inference
from flm.train.metrics import read_metrics


def make_cfg(tiny_data, run_dir, *extra):
    return load_config(None, [
        f"data.dir='{tiny_data}'", "data.corpus=kjv", "data.max_chars=150000", "data.vocab_size=512",
        "data.val_fraction=0.05", f"train.run_dir='{run_dir}'",
        "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.head_dim=32", "model.max_seq_len=64",
        "model.dropout=0.1",  # exercises the RNG state on resume
        "train.batch_size=4", "train.grad_accum=2", "train.seq_len=32", "train.max_steps=12",
        "train.warmup_steps=3", "train.lr=3e-3", "train.min_lr=3e-4", "train.eval_every=6", "train.eval_batches=2",
        "train.ckpt_every=6", "train.log_every=1", "train.progress=false", "train.tensorboard=false", *extra])


def quiet(*_):
    pass


def test_resume_is_bit_exact(tiny_data, tmp_path):
    with Trainer(make_cfg(tiny_data, tmp_path / "a"), log=quiet) as straight:
        straight.train()
    cfg_b = make_cfg(tiny_data, tmp_path / "b")
    with Trainer(cfg_b, log=quiet) as first:
        first.train(until_step=6)
    del first
    with Trainer(cfg_b, log=quiet) as second:
        assert second.resume("auto") and second.step == 6
        second.train()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    for p_a, p_b in zip(straight.model.parameters(), second.model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(straight.optimizer.state[p_a][key], second.optimizer.state[p_b][key])
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # and no duplicated steps after resume
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000


def test_training_lowers_validation_loss(tiny_data, tmp_path):
    with Trainer(make_cfg(tiny_data, tmp_path, "train.max_steps=40", "train.eval_every=40", "model.dropout=0.0"),
                 log=quiet) as trainer:
        before = trainer.evaluate()
        after = trainer.train()["val_loss"]
    assert after < before - 1.0, (before, after)


def test_crash_while_writing_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    with Trainer(make_cfg(tiny_data, tmp_path), log=quiet) as trainer:
        trainer.train(until_step=6)
        good = list_checkpoints(trainer.ckpt_root)
        assert [p.name for p in good] == ["step_00000006"]
        real_save = ckpt_mod.save_file

        def failing_save(tensors, path):
            if path.endswith("train_state.safetensors"):
                raise OSError("disk full")
            real_save(tensors, path)

        monkeypatch.setattr(ckpt_mod, "save_file", failing_save)
        with pytest.raises(FlmError, match=f"could not write checkpoint step 12 .*disk full; the last good "
                                           f"checkpoint is {good[0]}$"):
            trainer.train()  # fails writing the step-12 checkpoint
        monkeypatch.undo()
    assert list_checkpoints(trainer.ckpt_root) == good
    assert not list(trainer.ckpt_root.glob(".step_*"))  # the partial checkpoint is gone
    with Trainer(make_cfg(tiny_data, tmp_path), log=quiet) as resumed:
        assert resumed.resume("auto") and resumed.step == 6
        resumed.train()
    assert [p.name for p in list_checkpoints(trainer.ckpt_root)] == ["step_00000006", "step_00000012"]
    assert not list(trainer.ckpt_root.glob(".step_*"))  # the crash's leftovers are cleaned


def test_keep_last_prunes_oldest(tiny_data, tmp_path):
    with Trainer(make_cfg(tiny_data, tmp_path, "train.ckpt_every=2", "train.keep_last=2"), log=quiet) as trainer:
        trainer.train()
    assert [p.name for p in list_checkpoints(trainer.ckpt_root)] == ["step_00000010", "step_00000012"]


def test_corrupt_or_mismatched_checkpoints_are_refused(tiny_data, tmp_path):
    with Trainer(make_cfg(tiny_data, tmp_path), log=quiet) as trainer:
        trainer.train(until_step=6)
    path = list_checkpoints(trainer.ckpt_root)[-1]
    with Trainer(make_cfg(tiny_data, tmp_path, "model.d_model=128", "model.n_heads=4"), log=quiet) as other:
        with pytest.raises(FlmError, match="different model config"):
            other.resume("auto")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with Trainer(make_cfg(tiny_data, tmp_path), log=quiet) as trainer:
        with pytest.raises(FlmError, match="cannot read"):
            trainer.resume(str(broken))
    meta = json.loads((broken / "meta.json").read_text())
    meta["format"] = 99
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FlmError, match="format 99"):
        load_for_inference(broken)


def test_checkpoint_is_self_contained_for_inference(tiny_data, tmp_path):
    with Trainer(make_cfg(tiny_data, tmp_path, "model.dropout=0.0"), log=quiet) as trainer:
        trainer.train(until_step=6)
    moved = tmp_path / "elsewhere"
    shutil.copytree(list_checkpoints(trainer.ckpt_root)[-1], moved)
    model, tok, meta = load_for_inference(moved)
    x = torch.randint(0, 500, (1, 16))
    trainer.model.eval()
    assert torch.equal(model(x)[0], trainer.model(x)[0])
    assert tok.decode(tok.encode("And God said")) == "And God said" and meta["step"] == 6
