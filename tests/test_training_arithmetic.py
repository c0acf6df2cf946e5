"""Training arithmetic checked against independent references, never against flm's own code.

Each test computes what flm should produce from the documented formulas by hand, or with a second
implementation that flm does not use (plain autograd, `torch.optim.AdamW`, `torch.nn.utils.clip_grad_norm_`):
- the learning-rate schedule of a staged run (flm.train.schedule's docstring), value by value;
- one full `Trainer.train_step` (uneven micro-batches, active clipping, decay on matrices only);
- the `tokens` and `flops` fields of metrics.jsonl (flm.model.counting's formula, written out here);
- Adam state through growth while the masks ramp (c > 0), under μP, and through `flm grow` + resume.
Every tolerance says what rounding it absorbs, and each test's docstring names the bugs it was shown to catch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flm.config import ModelConfig, load_config
from flm.data import load_prepared
from flm.data.loader import IGNORE
from flm.growth import apply_masks, grow_training
from flm.model import FLM
from flm.train import Trainer
from flm.train.optim import adam_state_by_name, build_optimizer
from flm.train.schedule import lr_at, plan_stages

V = 512  # the tiny corpus's tokenizer has 512 entries, already a multiple of 128: the model's vocabulary


def quiet(*_):
    pass


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and does not slow to a crawl when other processes load the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the learning-rate schedule, by hand ------------------------------------------------------------------

# Three stages of the tiny run (train.batch_size 4 x seq_len 32 = 128 tokens per micro-batch):
#   stage 1: 1280 tokens / 128 = 10 steps, train.warmup_steps = 3, starts at train.lr;
#   stage 2: batch_size 8 (2 micro-batches, 256 tokens a step): ceil(1000 / 256) = 4 steps, its own start LR
#            2e-3 and a 2-step re-warmup;
#   stage 3: ceil(700 / 128) = 6 steps, no start LR (inherits the run's cosine), no warmup.
STAGES = """
[[stages]]
tokens = 1280
[[stages]]
n_layers = 3
d_model = 96
n_heads = 3
tokens = 1000
batch_size = 8
lr = 2e-3
warmup_steps = 2
ramp_steps = 2
[[stages]]
d_ff = 512
tokens = 700
ramp_steps = 3
"""
LR, MIN_LR, TOTAL = 3e-3, 3e-4, 10 + 4 + 6


def staged_config(tiny, tmp_path, *extra):
    path = tmp_path / "stages.toml"
    path.write_text(STAGES)
    return tiny.config(tmp_path / "run", "train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=3",
                       "train.eval_every=100", "train.ckpt_every=100", *extra, path=path)


def run_cosine(step):
    """The run's cosine from train.lr to train.min_lr over all 20 steps (schedule docstring)."""
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * step / TOTAL))


def stage_cosine(start_lr, end_lr, local, steps):
    """A stage decays from its start LR to the run's cosine value at its end, as a half cosine."""
    return end_lr + 0.5 * (start_lr - end_lr) * (1 + math.cos(math.pi * local / steps))


def hand_lrs():
    """The LR of optimizer steps 0..19 of STAGES, from the documented formulas."""
    s1_end, s2_end, s3_end = run_cosine(10), run_cosine(14), run_cosine(20)
    assert s1_end == pytest.approx(MIN_LR + 0.5 * (LR - MIN_LR))  # cos(π/2) = 0: halfway
    assert s3_end == MIN_LR  # cos(π) = -1 exactly: the floor
    lrs = [stage_cosine(LR, s1_end, k, 10) * min(1, (k + 1) / 3) for k in range(10)]  # warmup 1/3, 2/3, 1
    lrs += [stage_cosine(2e-3, s2_end, k, 4) * min(1, (k + 1) / 2) for k in range(4)]  # re-warmup 1/2, 1
    lrs += [stage_cosine(s2_end, s3_end, k, 6) for k in range(6)]  # stage 3 starts where stage 2 ends
    return lrs


def test_staged_lr_schedule_equals_the_documented_formulas_by_hand(tiny, tmp_path):
    """Every step's LR of a three-stage schedule equals the value worked out from flm.train.schedule's docstring:
    linear (re-)warmup from lr/warmup, a stage's own start LR, the cosine reaching min_lr at the end. The expected
    values are computed here from the formulas, not with flm's functions. Catches: warmup off by one, a cosine
    without its min_lr floor, a stage's start LR ignored, a stage inheriting the wrong cosine value.

    Tolerance: 1e-12 relative, the rounding of a few double-precision operations (~1e-16 each), written in another
    order here than in flm."""
    cfg = staged_config(tiny, tmp_path)
    stages = plan_stages(cfg, dataclasses.replace(cfg.model, vocab_size=V))
    assert [(s.start, s.steps, s.grad_accum, s.warmup) for s in stages] == [(0, 10, 1, 3), (10, 4, 2, 2),
                                                                           (14, 6, 1, 0)]
    want = hand_lrs()
    got = [lr_at(k, stages) for k in range(TOTAL)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    # Anchors worth reading on their own: the first warmup step is lr / warmup; stage 2's first step is its own
    # start LR over its own warmup; stage 3 has no warmup and starts on the run's cosine; the end is min_lr.
    assert got[0] == pytest.approx(3e-3 / 3, rel=1e-12)
    assert got[2] == pytest.approx(stage_cosine(LR, run_cosine(10), 2, 10), rel=1e-12)  # warmup over
    assert got[10] == pytest.approx(2e-3 / 2, rel=1e-12)
    assert got[14] == pytest.approx(run_cosine(14), rel=1e-12)
    assert lr_at(TOTAL, stages) == pytest.approx(MIN_LR, rel=1e-12)  # where the last step's cosine lands


# --- one optimizer step against plain autograd, torch's clipping and torch.optim.AdamW ---------------------


# Text and the bundled teacher propositions (loss on the label token only), 3 : 1: the micro-batches of a step hold
# different numbers of loss tokens.
MIXED = ("data.corpus=kjv", "data.max_chars=60000", f"data.vocab_size={V}", "data.val_fraction=0.05",
         "data.sources=[{kind='text', weight=3}, {kind='teacher', path='bundled'}]")


BATCH, ACCUM, SEQ, STEPS, WARMUP, CLIP, WD, BETAS, EPS = 2, 3, 32, 10, 2, 0.5, 0.1, (0.9, 0.95), 1e-8


def hand_lr(step):
    """Single-stage schedule: cosine 3e-3 -> 3e-4 over 10 steps, times the linear warmup (k + 1) / 2."""
    return (3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + math.cos(math.pi * step / STEPS))) * min(1.0, (step + 1) / WARMUP)


def ulp(t):
    """The spacing of float32 numbers at |t|."""
    return torch.nextafter(t.abs(), torch.tensor(math.inf)) - t.abs()


def adam_rounding(before, want, lr):
    """How far two correct AdamW implementations may differ after one step from `before` (float32). Each rounds the
    decayed weight (half an ulp of `before`) and the new weight (half an ulp of the result), in either direction:
    together up to ulp(before) + ulp(after). The update itself (|m̂| / sqrt(v̂) is at most a few, so a few lr) comes
    from ~10 float32 operations in another order, 2^-24 relative each: 4e-6 lr covers that with room."""
    return ulp(before) + ulp(want) + 4e-6 * lr


def used_share(got, want, bound):
    """The largest |got - want| as a share of its bound (<= 1 passes)."""
    return ((got - want).abs() / bound).max().item()


def test_train_step_equals_autograd_clip_and_torch_adamw(tiny_on, tmp_path):
    """Four `Trainer.train_step`s, each against a reference step from the same weights: the gradient of the mean
    loss over ALL the step's loss tokens (3 micro-batches with different numbers of them) by plain autograd on a
    copy of the model, clipped by `torch.nn.utils.clip_grad_norm_` (the norm is above train.grad_clip, so clipping
    acts), then `torch.optim.AdamW` with decay on matrices only (dim >= 2; LayerNorm and biases none), the same
    betas and eps, and the LR computed here from the schedule's formula. The reference keeps its own Adam moments
    over the steps; its weights are re-aligned to flm's after each comparison, so that a last-bit difference
    cannot grow through the following gradients.

    The objective is written as each micro-batch's mean times its share n_i / N of the step's N loss tokens (the
    mean over all of them). As one sum over all tokens it is the same number, but its gradient differs in the last
    bits; and where a gradient is zero in exact arithmetic (the key bias: softmax ignores a shift shared by all
    keys), float32 leaves pure rounding noise, which Adam scales to up to ~0.3 lr. So the reference groups the sum
    as the definition does micro-batch by micro-batch, and its gradients equal flm's bit for bit when flm is right;
    the loss value is checked against one plain sum in double precision.

    Catches: clipping switched off, micro-batch means averaged with equal weights (or summed) instead of by their
    loss tokens, weight decay on vectors, a wrong LR or warmup.

    Tolerances:
    - weights: `adam_rounding` per entry, ulp(before) + ulp(after) + 4e-6 lr. flm runs torch's fused AdamW kernel,
      the reference the foreach implementation: the same formula in another order of operations. Observed: up to
      0.28 of the bound (entries 1 ulp apart). A bug moves entries by 1e-5 lr or more (eps-sized gradients) and
      most by a sizeable share of lr.
    - loss: relative 1e-6, float32 rounding of a mean over ~160 token losses (flm adds the micro-batch means
      weighted by their counts; here one sum over all tokens in double precision);
    - gradient norm: relative 1e-6, float32 rounding of a sum of ~10^5 squares (computed here in double)."""
    cfg = tiny_on(*MIXED).config(
        tmp_path, "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.head_dim=16",
        "model.max_seq_len=32", f"train.seq_len={SEQ}", f"train.batch_size={BATCH}", f"train.grad_accum={ACCUM}",
        f"train.max_steps={STEPS}", f"train.warmup_steps={WARMUP}", "train.lr=3e-3", "train.min_lr=3e-4",
        f"train.grad_clip={CLIP}", f"train.weight_decay={WD}", f"train.beta1={BETAS[0]}", f"train.beta2={BETAS[1]}",
        f"train.adam_eps={EPS}")
    with Trainer(cfg, log=quiet) as trainer:
        loader = load_prepared(cfg.data.dir).train_loader(BATCH, SEQ, seed=cfg.train.seed)  # the same batches
        ref = copy.deepcopy(trainer.model)
        named = list(ref.named_parameters())
        decay = [p for _, p in named if p.dim() >= 2]
        assert {n for n, p in named if p.dim() < 2} >= {"blocks.0.ln1.weight", "blocks.0.attn.qkv.bias", "ln_f.weight"}
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                                 {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}],
                                lr=1.0, betas=BETAS, eps=EPS, foreach=True)
        uneven = False
        for step in range(4):
            batches = [loader.next_batch() for _ in range(ACCUM)]
            counts = [int((y != IGNORE).sum()) for _, y in batches]
            uneven |= len(set(counts)) > 1
            total = sum(counts)
            loss_sum = 0.0
            for (x, y), n in zip(batches, counts):
                logits = ref(x)[0].flatten(0, 1)
                mean = F.cross_entropy(logits, y.flatten(), ignore_index=IGNORE)  # over this micro-batch's n targets
                (mean * (n / total)).backward()  # the step's objective: the mean over all its loss tokens
                loss_sum += F.cross_entropy(logits.double(), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
            norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for _, p in named))
            assert norm > CLIP  # clipping acts on this step
            torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
            for group in opt.param_groups:
                group["lr"] = hand_lr(step)
            opt.step()
            opt.zero_grad(set_to_none=True)

            before = [p.detach().clone() for p in trainer.model.parameters()]
            loss, grad_norm = trainer.train_step()
            assert loss.item() == pytest.approx(loss_sum / total, rel=1e-6), step
            assert grad_norm.item() == pytest.approx(norm, rel=1e-6), step
            for (name, want), got, was in zip(named, trainer.model.parameters(), before):
                share = used_share(got.detach(), want.detach(), adam_rounding(was, want.detach(), hand_lr(step)))
                assert share <= 1, (step, name, share)
            with torch.no_grad():  # the next step starts from the same weights (Adam moments stay the reference's)
                for (_, want), got in zip(named, trainer.model.parameters()):
                    want.copy_(got)
        assert uneven  # the data did exercise the weighting by loss tokens


# --- tokens and FLOPs in metrics.jsonl ----------------------------------------------------------------------


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def flops_per_token(n_layers, d_model, n_heads, head_dim, ffn, seq_len):
    """counting.py's accounting, written out: 6 FLOPs per weight that multiplies (QKV d x 3a, output projection
    a x d, two FFN matrices d x f per layer, the LM head d x V; not the embedding lookup, biases or norms), plus
    attention's QK^T and AV, 2 x 2 x s x a forward per layer and x3 with backward: 12 L a s."""
    a = n_heads * head_dim
    matmul_weights = n_layers * (d_model * 3 * a + a * d_model + 2 * d_model * ffn) + d_model * V
    return 6 * matmul_weights + 12 * n_layers * a * seq_len


def test_metrics_tokens_and_flops_equal_the_config_arithmetic(tiny, cli, tmp_path):
    """`tokens` and `flops` of every train and eval record after N steps equal arithmetic from the config:
    tokens = steps x batch_size x grad_accum x seq_len, FLOPs = tokens x (6 N_matmul + 12 L a s) summed stage by
    stage with each stage's own shape and batch. A plain run through the CLI with grad_accum 3 (and attention
    width 96 != d_model 64), and the three-stage growth run of STAGES (1, 2, then 1 micro-batch per step; 2 -> 3
    layers, width 64 -> 96, FFN 384 -> 512), whose records' `lr` is also checked against the hand schedule.
    Catches: grad_accum (a stage's batch) left out of the count, the wrong stage's shape (the last one for all
    steps), the embedding counted as a matmul, attention FLOPs left out or taken with d_model for the attention
    width, the record's LR taken one step late.

    Exact: the numbers are integers below 2^53 in both flm and here, held as Python floats."""
    plain = tmp_path / "plain"
    # Three heads of 32: the attention width (96) differs from d_model (64), so the two cannot be confused.
    assert cli("train", *tiny.args(plain, "model.n_heads=3", "train.grad_accum=3", "train.max_steps=3",
                                   "train.eval_every=2")).status == 0
    per_token = flops_per_token(2, 64, 3, 32, 4 * 64, 32)
    assert per_token == 6 * (2 * (64 * 288 + 96 * 64 + 2 * 64 * 256) + 64 * 512) + 12 * 2 * 96 * 32 == 958_464
    train = records(plain, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert r["tokens"] == r["step"] * 4 * 3 * 32
        assert r["flops"] == r["tokens"] * per_token
    assert [(r["step"], r["flops"]) for r in records(plain, "eval")] == [(2, 2 * 384 * per_token),
                                                                        (3, 3 * 384 * per_token)]

    with Trainer(staged_config(tiny, tmp_path), log=quiet) as trainer:
        assert trainer.model.cfg.vocab_size == V
        trainer.train()
    stage_tokens = [4 * 32, 8 * 32, 4 * 32]  # tokens per step: stage 2 reads 8 sequences a step
    stage_flops = [flops_per_token(2, 64, 2, 32, 256, 32), flops_per_token(3, 96, 3, 32, 384, 32),
                   flops_per_token(3, 96, 3, 32, 512, 32)]
    assert stage_flops == [835_584, 6 * (3 * (96 * 288 + 96 * 96 + 2 * 96 * 384) + 96 * 512) + 12 * 3 * 96 * 32,
                           6 * (3 * (96 * 288 + 96 * 96 + 2 * 96 * 512) + 96 * 512) + 12 * 3 * 96 * 32]
    train = records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == list(range(1, 21))
    lrs = hand_lrs()
    for r in train:
        done = [max(0, min(r["step"], end) - start) for start, end in ((0, 10), (10, 14), (14, 20))]  # per stage
        assert r["tokens"] == sum(n * t for n, t in zip(done, stage_tokens)), r
        assert r["flops"] == sum(n * t * f for n, t, f in zip(done, stage_tokens, stage_flops)), r
        assert r["lr"] == pytest.approx(lrs[r["step"] - 1], rel=1e-12)  # the LR of the step just taken
    assert train[-1]["tokens"] == 10 * 128 + 4 * 256 + 6 * 128


# --- Adam state through growth ------------------------------------------------------------------------------


def old_block(old_shape):
    """Where growth puts an old tensor when heads do not change: its leading block (growth.md)."""
    return tuple(slice(0, n) for n in old_shape)


def test_steps_during_the_ramp_equal_separate_adamw_for_old_and_new_entries():
    """Three optimizer steps of a grown model while the masks ramp in (c = 1/4, 2/4, 3/4: new entries get gradients)
    against torch.optim.AdamW run separately on each tensor's old block and on its new entries, given the same
    gradients. The old block's reference carries the old optimizer's own moments and step count (3) as they were
    before growth, read from the old optimizer; the new entries' reference starts fresh (step 0, zero moments),
    and so do whole new layers. Growth: width 32 -> 48, FFN 128 -> 160, 2 -> 3 layers (heads fixed, so every old
    tensor sits in the leading block of its grown tensor). Decay on matrices only, as flm's groups.

    Catches: grown tensors given one step count (new entries bias-corrected with the old count, so their first
    updates are (1 - β1)/sqrt(1 - β2) = 0.45 of their size), old moments not carried over
    (dropped or zeroed), the per-element bias correction off by one step, new layers given the old state.

    Tolerance: `adam_rounding` per entry, as in the train_step test: grown tensors take flm's written-out
    per-element update, the others torch's fused kernel; the reference is torch's foreach implementation, the same
    formula in another order. Observed: up to 0.48 of the bound (entries 2 ulp apart: the two rounded the decay
    and the result in opposite directions)."""
    torch.manual_seed(0)
    old_cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, vocab_size=97, max_seq_len=64)
    train_cfg = load_config(None).train
    lr, wd, betas, eps = train_cfg.lr, train_cfg.weight_decay, (train_cfg.beta1, train_cfg.beta2), train_cfg.adam_eps
    old = FLM(old_cfg)
    opt = build_optimizer(old, train_cfg)
    for _ in range(3):  # an Adam history of 3 steps
        x = torch.randint(0, 97, (2, 24))
        old(x, torch.roll(x, -1, 1))[1].backward()
        opt.step()
        opt.zero_grad()
    history = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in old.named_parameters()}
    assert all(h["step"].item() == 3 for h in history.values())
    new_cfg = dataclasses.replace(old_cfg, d_model=48, d_ff=160, n_layers=3)
    grown, ramp, grown_state = grow_training(old, adam_state_by_name(opt), new_cfg, "stack", ramp_steps=4)
    gopt = build_optimizer(grown, train_cfg, grown_state)

    def reference(p, state=None):
        q = torch.nn.Parameter(p.detach().clone())
        ref = torch.optim.AdamW([q], lr=lr, betas=betas, eps=eps, weight_decay=wd if p.dim() >= 2 else 0.0,
                                foreach=True)
        if state is not None:
            ref.state[q] = {k: v.clone() for k, v in state.items()}
        return q, ref

    refs = {}  # name -> (old block or None, (param, optimizer) of the old block, (param, optimizer) of the rest)
    for name, p in grown.named_parameters():
        new_layer = name.startswith("blocks.2.")
        block = None if new_layer else old_block(history[name]["exp_avg"].shape)
        refs[name] = (block, None if new_layer else reference(p[block], history[name]), reference(p))
    grew = [n for n, p in grown.named_parameters() if refs[n][0] is not None and p[refs[n][0]].shape != p.shape]
    assert len(grew) == 2 * 11 + 4  # the old layers' tensors but QKV's bias (heads are fixed), and the top level

    for _ in range(3):
        ramp.steps_done += 1  # c = 1/4, 2/4, 3/4
        apply_masks(grown, ramp)
        x = torch.randint(0, 97, (2, 24))
        grown(x, torch.roll(x, -1, 1))[1].backward()
        fc1 = grown.blocks[0].mlp.fc1.weight.grad
        assert fc1[128:].abs().min() > 0  # c > 0: the new FFN units learn
        for name, p in grown.named_parameters():
            block, old_ref, new_ref = refs[name]
            new_ref[0].grad = p.grad.clone()
            new_ref[1].step()
            if block is not None:
                old_ref[0].grad = p.grad[block].clone()
                old_ref[1].step()
        before = {name: p.detach().clone() for name, p in grown.named_parameters()}
        gopt.step()
        gopt.zero_grad()
        for name, p in grown.named_parameters():
            block, old_ref, new_ref = refs[name]
            want = new_ref[0].detach().clone()
            if block is not None:
                want[block] = old_ref[0].detach()
            share = used_share(p.detach(), want, adam_rounding(before[name], want, lr))
            assert share <= 1, (ramp.steps_done, name, share)


def test_mup_width_growth_scales_the_head_and_its_moments_by_hand():
    """μP width growth 32 -> 64 (r = d'/d = 2): the readout multiplier base_width/d halves, so the LM head's old
    block doubles (logits unchanged), its gradient halves, and Adam's moments follow the gradient: exp_avg x r^-1
    = 1/2, exp_avg_sq x r^-2 = 1/4 (grow_tensor's docstring). Checked with hand arithmetic on the old optimizer's
    own tensors, exactly (powers of two), and the gradient's halving is checked on the grown model itself. Other
    tensors' moments are copied unscaled. Catches: a sign or power mixed up in the readout rule for moments (e.g.
    exp_avg x 2, exp_avg_sq x 1/2), the rule applied to the embedding too, the head's weight not rescaled.

    Tolerance of the gradient check: 1e-6 of the largest entry. The grown model's mask-weighted LayerNorm sums over
    64 entries (32 of them zero) where the old one's fused kernel sums over 32, which moves float32 results in the
    last bits: observed 1.1e-7. A wrong power of r moves the gradient by 50% or more."""
    torch.manual_seed(0)
    old_cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, vocab_size=97, max_seq_len=64, mup=True,
                          base_width=32, output_mult=2.0)
    train_cfg = load_config(None).train
    old = FLM(old_cfg)
    opt = build_optimizer(old, train_cfg)
    x = torch.randint(0, 97, (2, 24))
    y = torch.roll(x, -1, 1)
    for _ in range(2):
        old(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    head, embed = old.lm_head.weight, old.embed.weight
    m, v, m_embed = (opt.state[head]["exp_avg"].clone(), opt.state[head]["exp_avg_sq"].clone(),
                     opt.state[embed]["exp_avg"].clone())
    grown, ramp, grown_state = grow_training(old, adam_state_by_name(opt), dataclasses.replace(old_cfg, d_model=64,
                                                                                               n_heads=4), ramp_steps=4)
    gopt = build_optimizer(grown, train_cfg, grown_state)
    state = gopt.state[grown.lm_head.weight]
    assert torch.equal(grown.lm_head.weight.detach()[:, :32], head.detach() * 2)
    assert torch.equal(state["exp_avg"][:, :32], m * 0.5)
    assert torch.equal(state["exp_avg_sq"][:, :32], v * 0.25)
    assert not state["exp_avg"][:, 32:].any() and not state["exp_avg_sq"][:, 32:].any()
    # Step counts by age class: each entry's count is its class's (old block 2 steps, new entries 0).
    assert state["age"].dtype == torch.uint8
    assert torch.equal(state["step"][state["age"].long()], torch.cat([torch.full((97, 32), 2.0),
                                                                      torch.zeros(97, 32)], 1))
    assert torch.equal(gopt.state[grown.embed.weight]["exp_avg"][:, :32], m_embed)  # a vector-like input: as is
    # Why: at c = 0 the grown head's gradient on the old block is half the old head's gradient.
    old(x, y)[1].backward()
    grown(x, y)[1].backward()
    diff = (grown.lm_head.weight.grad[:, :32] - head.grad * 0.5).abs().max() / head.grad.abs().max()
    assert diff <= 1e-6, diff


def test_flm_grow_then_resume_continues_with_the_old_moments(tiny, cli, tmp_path):
    """`flm grow` of a trained checkpoint (width 64 -> 96, FFN 256 -> 384, 2 -> 3 layers, heads fixed) writes Adam
    moments equal to the original checkpoint's in each tensor's leading block and zero elsewhere, step counts of 4
    there and 0 on new entries, no state for the new layer; and `flm train --resume` of the grown run loads exactly
    those. Both are read from train_state.safetensors with safetensors, compared with torch.equal (a copy).
    Catches: moments or step counts dropped or misplaced by offline growth or by the resume of a grown run."""
    small, big = tmp_path / "small", tmp_path / "big"
    assert cli("train", *tiny.args(small, "train.max_steps=4", "train.ckpt_every=4")).status == 0
    grown = cli("grow", small, "--to", "d_model=96,n_layers=3", "--out", big, "--ramp-steps", "3")
    assert grown.status == 0, grown.err
    before = load_file(str(small / "checkpoints" / "step_00000004" / "train_state.safetensors"))
    after = load_file(str(big / "checkpoints" / "step_00000004" / "train_state.safetensors"))
    names = sorted(k[len("opt."):-len(".exp_avg")] for k in before if k.endswith(".exp_avg"))
    assert len(names) == 2 * 12 + 4 and not any(k.startswith("opt.blocks.2.") for k in after)
    grew = 0
    for name in names:
        old_m = before[f"opt.{name}.exp_avg"]
        block = old_block(old_m.shape)
        for field in ("exp_avg", "exp_avg_sq"):
            old_t, new_t = before[f"opt.{name}.{field}"], after[f"opt.{name}.{field}"]
            assert torch.equal(new_t[block], old_t), (name, field)
            rest = torch.ones_like(new_t, dtype=torch.bool)
            rest[block] = False
            assert not new_t[rest].any(), (name, field)
        step = after[f"opt.{name}.step"]
        if after[f"opt.{name}.exp_avg"].shape == old_m.shape:  # not grown (QKV's bias, heads fixed): scalar count
            assert step.dim() == 0 and step.item() == 4 and f"opt.{name}.age" not in after, name
        else:  # one count per age class, one byte per entry naming its class
            grew += 1
            age = after[f"opt.{name}.age"]
            want = torch.zeros(age.shape)
            want[block] = 4
            assert age.dtype == torch.uint8 and torch.equal(step[age.long()], want), name

    assert grew == len(names) - 2  # all but the two QKV biases grew
    with Trainer(tiny.config(big, "model.d_model=96", "model.n_layers=3", "train.max_steps=7"), log=quiet) as trainer:
        assert trainer.resume("auto") and trainer.step == 4 and trainer.ramp.c == 0
        loaded = adam_state_by_name(trainer.optimizer)
        assert sorted(loaded) == names
        for name in names:
            assert sorted(loaded[name]) == sorted(k.rsplit(".", 1)[1] for k in after if k.startswith(f"opt.{name}."))
            for field in loaded[name]:
                assert torch.equal(loaded[name][field], after[f"opt.{name}.{field}"]), (name, field)
        trainer.train()
    assert trainer.step == 7 and trainer.ramp is None  # 3 more steps: the ramp of 3 is done


def test_an_unstaged_run_is_one_stage_of_the_train_settings(tiny, tmp_path):
    """No [[stages]]: one stage, index 0, from step 0 for max_steps, with train's lr, min_lr, warmup and
    accumulation, and nothing to ramp."""
    cfg = tiny.config(tmp_path / "run", "train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=3",
                      "train.max_steps=12", "train.grad_accum=2")
    (stage,) = plan_stages(cfg, dataclasses.replace(cfg.model, vocab_size=V))
    assert (stage.index, stage.start, stage.steps, stage.grad_accum, stage.lr_start, stage.lr_end, stage.warmup,
            stage.ramp_steps) == (0, 0, 12, 2, 3e-3, 3e-4, 3, 0)
    assert lr_at(0, [stage]) == pytest.approx(1e-3, rel=1e-12)  # the first warmup step: lr / warmup


def test_the_optimizer_holds_each_parameter_once_with_the_configured_settings():
    """A tied head is the embedding: one tensor, one entry (torch refuses a parameter in two groups, and a loop
    that stopped at the tie would leave the parameters after it untrained); betas and eps as configured."""
    model = FLM(ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, vocab_size=V, max_seq_len=16,
                            tie_embeddings=True))
    train = dataclasses.replace(load_config(None).train, beta1=0.8, beta2=0.99, adam_eps=1e-6)
    opt = build_optimizer(model, train)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) == len(list(model.parameters()))
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in opt.param_groups)
