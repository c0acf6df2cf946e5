"""The trainer: bit-exact resume, atomic checkpoints, metrics, and learning on real text."""

import json
import shutil

import pytest
import torch

import flm.checkpoint.whole as ckpt_mod
from flm.errors import FlmError
from flm.checkpoint import list_checkpoints
from flm.train import Trainer
from flm.inference import load_for_inference
from flm.train.metrics import read_metrics


# The tiny run (conftest) with dropout (the RNG state must resume too), two micro-batches a step, a 3-step warmup and
# a checkpoint every 6 steps.
TRAIN = ("model.dropout=0.1", "train.grad_accum=2", "train.warmup_steps=3", "train.ckpt_every=6")


def quiet(*_):
    pass


def test_resume_is_bit_exact(tiny, tmp_path):
    with Trainer(tiny.config(tmp_path / "a", *TRAIN), log=quiet) as straight:
        straight.train()
    cfg_b = tiny.config(tmp_path / "b", *TRAIN)
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


def test_training_lowers_validation_loss(tiny, tmp_path):
    with Trainer(tiny.config(tmp_path, *TRAIN, "train.max_steps=40", "train.eval_every=40", "model.dropout=0.0"),
                 log=quiet) as trainer:
        before = trainer.evaluate()
        after = trainer.train()["val_loss"]
    assert after < before - 1.0, (before, after)


def test_crash_while_writing_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    with Trainer(tiny.config(tmp_path, *TRAIN), log=quiet) as trainer:
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
    with Trainer(tiny.config(tmp_path, *TRAIN), log=quiet) as resumed:
        assert resumed.resume("auto") and resumed.step == 6
        resumed.train()
    assert [p.name for p in list_checkpoints(trainer.ckpt_root)] == ["step_00000006", "step_00000012"]
    assert not list(trainer.ckpt_root.glob(".step_*"))  # the crash's leftovers are cleaned


def test_keep_last_prunes_oldest(tiny, tmp_path):
    with Trainer(tiny.config(tmp_path, *TRAIN, "train.ckpt_every=2", "train.keep_last=2"), log=quiet) as trainer:
        trainer.train()
    assert [p.name for p in list_checkpoints(trainer.ckpt_root)] == ["step_00000010", "step_00000012"]


def test_corrupt_or_mismatched_checkpoints_are_refused(tiny, tmp_path):
    with Trainer(tiny.config(tmp_path, *TRAIN), log=quiet) as trainer:
        trainer.train(until_step=6)
    path = list_checkpoints(trainer.ckpt_root)[-1]
    with Trainer(tiny.config(tmp_path, *TRAIN, "model.d_model=128", "model.n_heads=4"), log=quiet) as other:
        with pytest.raises(FlmError, match="different model config"):
            other.resume("auto")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with Trainer(tiny.config(tmp_path, *TRAIN), log=quiet) as trainer:
        with pytest.raises(FlmError, match="cannot read"):
            trainer.resume(str(broken))
    meta = json.loads((broken / "meta.json").read_text())
    meta["format"] = 99
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FlmError, match="format 99"):
        load_for_inference(broken)


def test_checkpoint_is_self_contained_for_inference(tiny, tmp_path):
    with Trainer(tiny.config(tmp_path, *TRAIN, "model.dropout=0.0"), log=quiet) as trainer:
        trainer.train(until_step=6)
    moved = tmp_path / "elsewhere"
    shutil.copytree(list_checkpoints(trainer.ckpt_root)[-1], moved)
    model, tok, meta = load_for_inference(moved)
    x = torch.randint(0, 500, (1, 16))
    trainer.model.eval()
    assert torch.equal(model(x)[0], trainer.model(x)[0])
    assert tok.decode(tok.encode("And God said")) == "And God said" and meta["step"] == 6
