"""The teacher-signal objective, unified (the label token predicted by the LM head) or separate (a head of its own at
the same position): the losses against hand computations, where the marker sits, resume, growth of the head, the
accuracy `flm eval teacher` reports, and the one-line errors (docs/data.md, "Unified or separate objective")."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flm.config import ModelConfig
from flm.data import load_prepared
from flm.data.loader import IGNORE, TokenStream
from flm.data.shards import write_mask, write_shard
from flm.data.sources import encode
from flm.data.teacher import TeacherItem, read_items
from flm.errors import FlmError
from flm.growth import grow_model
from flm.model import build_model, param_count
from flm.model.flm import SeparateTeacher
from flm.train import Trainer
from flm.train.metrics import read_metrics

# The mixture of test_data_sources (text and the bundled propositions, 3 : 1; a fifth of the propositions held out),
# the same settings, so a session prepares it once.
MIXED = ("data.corpus=kjv", "data.max_chars=60000", "data.vocab_size=400", "data.val_fraction=0.05",
         "data.sources=[{kind='text', weight=3}, {kind='teacher', path='bundled', val_fraction=0.2}]")
RUN = ("model.d_model=32", "model.head_dim=16", "model.max_seq_len=32", "train.grad_accum=2", "train.max_steps=8",
       "train.eval_every=4", "train.ckpt_every=3")
SEPARATE = ("train.teacher_objective='separate'", "train.teacher_loss_weight=2.5")


@pytest.fixture
def mixed(tiny_on):
    return tiny_on(*MIXED)


def _trainer(mixed, run_dir, *extra, path=None) -> Trainer:
    return Trainer(mixed.config(run_dir, *RUN, *extra, path=path), log=lambda *_: None)


def _propositions(tok, items: list[TeacherItem], tmp_path, seq_len: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The window of `items` as training reads it: encoded as `flm prepare` encodes a teacher source, written as a
    shard and its mask, read back by the loader's stream (x, y of one window of `seq_len`, default: all of it)."""
    tokens, mask = encode(items, "teacher", tok)
    seq_len = seq_len or len(tokens) - 1
    assert len(tokens) > seq_len
    write_shard(tmp_path / "t.bin", tokens, tok.vocab_size)
    write_mask(tmp_path / "t.mask", mask)
    x, y = TokenStream([tmp_path / "t.bin"], [tmp_path / "t.mask"]).windows([0], seq_len)
    return x, y


# --- where the marker is, and the losses by hand --------------------------------------------------------------


def test_the_marker_is_the_last_token_of_each_proposition(mixed, tmp_path):
    tok = load_prepared(mixed.data).tokenizer()
    items = [TeacherItem("Genesis is the first book of the Bible.", label=True),
             TeacherItem("Ruth is found in the New Testament.", label=False),
             TeacherItem("Of Ruth and Mark, the Old Testament book is ", options=("Ruth.", "Mark."), answer=0)]
    x, y = _propositions(tok, items, tmp_path)
    texts = [text for item in items for text, _ in item.propositions()]
    ends, start = [], 0
    for text in texts:  # each proposition is <text><label><eot>; y is x shifted by one
        start += len(tok.encode(text))
        ends.append(start - 1)
        start += 2
    markers = torch.nonzero(y[0] != IGNORE).flatten().tolist()
    assert markers == ends  # the loss falls where the last text token predicts the label, and nowhere else
    assert [x[0, e].item() for e in ends] == [tok.encode(t)[-1] for t in texts]
    true_id, false_id = tok.label_ids
    assert y[0, markers].tolist() == [true_id if truth else false_id for item in items for _, truth in item.propositions()]


def test_unified_loss_is_cross_entropy_at_the_label_positions_only(mixed, tmp_path):
    tok = load_prepared(mixed.data).tokenizer()
    items = [TeacherItem(f"{b} is a book of the Old Testament.", label=b in ("Ruth", "Job")) for b in
             ("Ruth", "Mark", "Job", "Luke")]
    x, y = _propositions(tok, items, tmp_path, seq_len=31)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, vocab_size=512, max_seq_len=32))
    assert model.cls_head is None
    logits, loss = model(x, y)
    at = y[0] != IGNORE
    logp = logits[0, at].double().log_softmax(-1)
    expected = -logp[torch.arange(int(at.sum())), y[0, at]].mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


def _head_model(weight: float = 2.5, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, vocab_size=128, max_seq_len=16,
                      teacher_head=True, **changes)
    model = build_model(cfg)
    model.teacher = SeparateTeacher(true_id=100, false_id=101, weight=weight)
    return model


def test_separate_loss_by_hand():
    model = _head_model(weight=2.5)
    x = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(2))
    y[0, :4] = IGNORE  # a masked stretch (a proposition's text)
    y[0, 4], y[0, 9], y[1, 2] = 100, 101, 100  # labels: true, false, true
    logits, loss = model(x, y)
    labels = (y == 100) | (y == 101)
    lm_targets = torch.where(labels, IGNORE, y)
    lm = F.cross_entropy(logits.reshape(-1, 128), lm_targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():  # the head by hand: final LayerNorm of the last block's output, then the head's matrix
        h = F.layer_norm(model.trunk(x), (32,), model.ln_f.weight, model.ln_f.bias, model.ln_f.eps)
        head_logits = h[labels] @ model.cls_head.weight.T
    head = F.cross_entropy(head_logits, (y[labels] == 100).long(), reduction="sum")  # class 1: true
    n_lm, n_labels = int((lm_targets != IGNORE).sum()), int(labels.sum())
    assert (n_lm, n_labels) == (2 * 12 - 4 - 3, 3)
    torch.testing.assert_close(loss, (lm + 2.5 * head) / (n_lm + n_labels), rtol=1e-6, atol=0)
    # The label is no target of the LM head: its logits at the label positions get no gradient.
    logits.retain_grad()
    loss.backward()
    assert torch.count_nonzero(logits.grad[labels]) == 0 and torch.count_nonzero(logits.grad[~labels]) > 0
    assert torch.count_nonzero(model.cls_head.weight.grad) > 0
    # Without labels it is the plain LM loss, and a model with a head needs its label ids to take a loss.
    plain = torch.where(labels, 7, y)
    logits, loss = model(x, plain)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 128), plain.reshape(-1), ignore_index=IGNORE),
                               rtol=1e-6, atol=0)
    model.teacher = None
    with pytest.raises(FlmError, match="needs model.teacher"):
        model(x, y)


# --- training: default unchanged, resume, growth ---------------------------------------------------------------


def test_the_default_trains_as_before_and_separate_differs(mixed, tmp_path):
    with _trainer(mixed, tmp_path / "default", "train.max_steps=3") as default:
        default.train()
    with _trainer(mixed, tmp_path / "unified", "train.max_steps=3", "train.teacher_objective='unified'") as unified:
        unified.train()
    with _trainer(mixed, tmp_path / "separate", "train.max_steps=3", *SEPARATE) as separate:
        separate.train()
    losses = lambda run: [r["loss"] for r in read_metrics(tmp_path / run) if r["kind"] == "train"]
    assert losses("default") == losses("unified") and losses("separate") != losses("default")
    assert default.model.cls_head is None and "teacher_head" not in json.dumps(default.checkpoint_meta()["model"])
    assert separate.model.cls_head is not None and separate.model.cfg.teacher_head
    assert param_count(separate.model.cfg) == sum(p.numel() for p in separate.model.parameters())
    # The same init for every weight the two share (the head is drawn last).
    torch.manual_seed(0)
    plain = dict(build_model(default.stages[0].model).named_parameters())
    torch.manual_seed(0)
    headed = dict(build_model(separate.stages[0].model).named_parameters())
    assert set(headed) == set(plain) | {"cls_head.weight"}
    assert all(torch.equal(plain[n], headed[n]) for n in plain)


GROWN = """
[[stages]]
tokens = 1024          # 4 steps of 4 x 2 x 32 tokens

[[stages]]
d_model = 64
n_heads = 4
tokens = 1536          # 6 steps, the masks ramping over 4
ramp_steps = 4
"""


def test_separate_resume_is_bit_exact_through_growth(mixed, tmp_path):
    stages = tmp_path / "stages.toml"
    stages.write_text(GROWN)
    with _trainer(mixed, tmp_path / "a", *SEPARATE, "model.dropout=0.1", path=stages) as straight:
        straight.train()
    with _trainer(mixed, tmp_path / "b", *SEPARATE, "model.dropout=0.1", path=stages) as first:
        first.train(until_step=6)  # in the middle of the ramp after growing at step 4
    with _trainer(mixed, tmp_path / "b", *SEPARATE, "model.dropout=0.1", path=stages) as second:
        assert second.resume("auto") and second.step == 6 and second.ramp is not None
        second.train()
    assert straight.model.cls_head.weight.shape == (2, 64)
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    for p_a, p_b in zip(straight.model.parameters(), second.model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(straight.optimizer.state[p_a][key], second.optimizer.state[p_b][key])
    records = lambda run, kind: [r for r in read_metrics(tmp_path / run) if r["kind"] == kind]
    assert [r["loss"] for r in records("a", "train")] == [r["loss"] for r in records("b", "train")]
    evals = records("a", "eval")
    assert len(evals) == 3 and all(0 <= r["teacher_acc"] <= 1 and 0 <= r["teacher_mc_acc"] <= 1 for r in evals)


def test_flm_grow_of_a_separate_checkpoint_continues_as_the_run_would(mixed, cli, tmp_path):
    stages = tmp_path / "stages.toml"
    stages.write_text(GROWN)
    with _trainer(mixed, tmp_path / "a", *SEPARATE, path=stages) as straight:
        straight.train()
    with _trainer(mixed, tmp_path / "b", *SEPARATE, path=stages) as first:
        first.train(until_step=4)  # the end of stage 1
    result = cli("grow", tmp_path / "b", "--to", "d_model=64,n_heads=4", "--out", tmp_path / "c")
    assert result.status == 0, result.err
    with _trainer(mixed, tmp_path / "c", *SEPARATE, path=stages) as grown:
        assert grown.resume("auto") and grown.stage == 1 and grown.model.cls_head.weight.shape == (2, 64)
        grown.train()
    for (name, a), b in zip(straight.model.state_dict().items(), grown.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("operator,mup", [("msg", False), ("msg", True), ("zero", False), ("clone", False),
                                          ("clone", True)])
def test_growth_keeps_the_head_logits(operator, mup):
    extra = {"mup": True, "base_width": 32} if mup else {}
    model = _head_model(**extra)
    with torch.no_grad():  # a head that is not at its init, so that a wrong column would show
        model.cls_head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
        model.ln_f.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(4))
        model.ln_f.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    wider = dataclasses.replace(model.cfg, d_model=64, n_heads=4, d_ff=256)
    deeper = dataclasses.replace(wider, n_layers=4)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(6))
    before = model.teacher_logits(x)
    for new in (wider, deeper) if operator != "clone" else (wider,):
        grown, ramp = grow_model(model, new, operator=operator, ramp_steps=10, seed=7, noise=0.0)
        assert grown.cls_head.weight.shape == (2, new.d_model)
        torch.testing.assert_close(grown.teacher_logits(x), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grown(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)
        if operator == "msg":  # its new columns are anything: the masked hidden state is 0 there
            assert grown.cls_head.weight[:, 32:].abs().sum() > 0


# --- evaluation -----------------------------------------------------------------------------------------------


def test_eval_teacher_on_a_separate_checkpoint_equals_a_hand_count(mixed, cli, tmp_path):
    with _trainer(mixed, tmp_path / "run", *SEPARATE, "train.max_steps=6", "train.lr=1e-2") as trainer:
        trainer.train()
    result = cli("eval", "teacher", "--model", tmp_path / "run", "--json", tmp_path / "t.json")
    assert result.status == 0, result.err
    report = json.loads((tmp_path / "t.json").read_text())
    held = read_items(load_prepared(mixed.data).teacher_heldout[0])
    model, tok = trainer.model.eval(), trainer.tokenizer
    correct = answered = questions = total = 0
    with torch.no_grad():
        for item in held:  # each proposition alone, read at its last token: argmax of the head (1 = true)
            scores = []
            for text, truth in item.propositions():
                ids = tok.encode(text)[-model.cfg.max_seq_len:]  # cut from the left to the context, as scored
                logits = model.teacher_logits(torch.tensor([ids]))[0, -1]
                correct += int((logits[1] > logits[0]).item() == truth)
                total += 1
                scores.append((logits[1] - logits[0]).item())
            if item.multiple_choice:
                questions += 1
                answered += int(int(np.argmax(scores)) == item.answer)
    assert (report["propositions"], questions) == (total, report["questions"]) and questions > 0
    assert report["accuracy"] == correct / total and report["mc_accuracy"] == answered / questions
    last_eval = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"][-1]
    assert last_eval["teacher_acc"] == report["accuracy"]  # the trainer logs the same measure

    result = cli("export", "hf", tmp_path / "run", tmp_path / "hf")
    assert result.status == 2 and result.err.count("\n") == 1 and "teacher-signal head" in result.err


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings,message", [
    (("train.teacher_objective='joint'",), "train.teacher_objective must be one of"),
    (("train.teacher_objective='separate'", "train.teacher_loss_weight=0"), "teacher_loss_weight must be positive"),
    (("train.teacher_loss_weight=2",), "teacher_loss_weight weighs the separate head"),
    (("train.teacher_objective='separate'", "data.sources=[]"), "needs a teacher source"),
    (("train.teacher_objective='separate'", "parallel.dp=2"), "trains in one process"),
    (("model.teacher_head=true",), "model.teacher_head is not set by hand"),
])
def test_config_errors_are_one_line(mixed, cli, tmp_path, settings, message):
    result = cli("train", *mixed.args(tmp_path / "run", *RUN, *settings))
    assert result.status == 2 and result.err.count("\n") == 1 and message in result.err, result.err


def test_separate_is_refused_under_torchrun(mixed, tmp_path, monkeypatch):
    import flm.launch

    monkeypatch.setattr(flm.launch, "torchrun_world", lambda: 2)
    with pytest.raises(FlmError, match="trains in one process"):
        flm.launch.make_trainer(mixed.config(tmp_path / "run", *RUN, *SEPARATE), prepare=lambda _: None)


# --- the benchmark's sweep (benchmarks/objective_ablation.py), on made-up results ---------------------------------


def test_the_ablation_sweep_extends_to_divergence_then_runs_the_second_seed():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import objective_ablation as oa

    def drive(diverges_above: float, best: float) -> tuple[oa.Sweep, list[tuple]]:
        """Run a sweep on made-up results: a rate above `diverges_above` diverges; the loss is lowest at `best`."""
        sweep = oa.Sweep(["s"], ["unified"], (0.005, 0.01, 0.02), (1, 2))
        ready, asked = sweep.start(), []
        while ready:
            key = ready.pop(0)
            asked.append(key)
            lr, seed = key[2], key[3]
            loss = None if lr > diverges_above else 3 + abs(math.log2(lr / best))
            sweep.results[key] = {"diverged": loss is None, "final_val_loss": loss, "seed": seed, "lr": lr}
            ready += sweep.after(key, set(ready))
        return sweep, asked

    sweep, asked = drive(0.05, 0.02)
    assert [k[2] for k in asked if k[3] == 1] == [0.005, 0.01, 0.02, 0.04, 0.08]  # extended until one diverged
    assert sorted(k[2] for k in asked if k[3] == 2) == [0.02, 0.04]  # the second seed: best and largest stable
    assert (sweep.best[("s", "unified")], sweep.stable[("s", "unified")]) == (0.02, 0.04)
    assert oa.largest_stable({0.01: {"diverged": False}, 0.02: {"diverged": True}, 0.04: {"diverged": False}}) == 0.01

    # The best at the grid's bottom edge: the grid goes down until the best is inside.
    sweep, asked = drive(0.03, 0.0025)
    assert [k[2] for k in asked if k[3] == 1] == [0.005, 0.01, 0.02, 0.04, 0.0025, 0.00125]
    assert sweep.best[("s", "unified")] == 0.0025 and sorted(k[2] for k in asked if k[3] == 2) == [0.0025, 0.02]
    # LR sensitivity by hand: best 3.0; min(L, L0 = 5) - 3 over the grid = (0.5 + 0 + 1.5 + 2 [diverged: L0]) / 4,
    # a diverged run recorded as run_one records it (no final loss); a loss above L0 counts as L0.
    assert oa.lr_sensitivity({0.01: 3.5, 0.02: 3.0, 0.04: 4.5, 0.08: None}, 5.0) == pytest.approx(1.0)
    assert oa.lr_sensitivity({0.01: 3.5, 0.02: 3.0, 0.04: 4.5, 0.08: 7.0}, 5.0) == pytest.approx(1.0)
    assert oa.lr_sensitivity({0.01: 3.0, 0.02: 3.0}, 5.0) == 0.0
    assert oa.lr_sensitivity({0.01: None, 0.02: None}, 5.0) is None

    run = {"diverged": False, "ramp_steps": 4, "growth": {"step": 10, "loss_before": 5.0, "loss_after": 5.0},
           "evals": [{"step": s, "val_loss": v, "teacher_acc": a} for s, v, a in
                     ((5, 6.0, 0.5), (10, 5.0, 0.8), (12, 5.3, 0.6), (14, 4.9, 0.7), (16, 4.0, 0.9))]}
    event = oa.growth_event(run)
    assert event["val_rise"] == pytest.approx(0.3) and event["acc_fall"] == pytest.approx(0.2)
    assert event["probe_jump"] == 0.0
