"""Symmetry-breaking noise on copied layers (stages' copy_noise, `flm grow --copy-noise`): its size, what it leaves
alone, its seeding, and that exact families stay exact with it."""

import dataclasses

import pytest
import torch

from flm.config import ModelConfig, load_config
from flm.errors import FlmError
from flm.growth import grow_model
from flm.growth.fresh import fresh_parameter
from flm.model import build_model
from flm.train.schedule import plan_stages

OLD = ModelConfig(n_layers=2, d_model=64, n_heads=2, head_dim=32, vocab_size=101, max_seq_len=64)
RTOL = 2e-6  # as test_growth_families.py: exact growth within BLAS regrouping of sums lengthened by zeros


def old_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(OLD).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def grown(old, family, copy_noise, seed=3, **change):
    cfg = dataclasses.replace(old.cfg, **(change or dict(n_layers=4)))
    model, _ = grow_model(old, cfg, "stack", ramp_steps=10, operator=family, seed=seed, copy_noise=copy_noise)
    return model.eval()


def test_copies_get_noise_of_the_asked_size_on_matrices_only():
    """stack 2 -> 4 layers: layers 2 and 3 copy layers 0 and 1. Their matrices move by copy_noise x their RMS (a
    sample of 4,096+ Gaussian draws: the measured ratio is within 3 standard errors, ~3.3%, of 0.2); vectors and
    the old layers are untouched; noise 0 gives exact copies."""
    old = old_model()
    noisy, exact = grown(old, "stack", 0.2), grown(old, "stack", 0.0)
    o, n, e = (dict(m.named_parameters()) for m in (old, noisy, exact))
    matrices = 0
    for name, value in o.items():
        if not name.startswith("blocks."):
            assert torch.equal(n[name], value)
            continue
        layer, rest = name.split(".", 2)[1:]
        assert torch.equal(n[name], value)  # the old layers keep their place and values
        copy = f"blocks.{int(layer) + 2}.{rest}"
        assert torch.equal(e[copy], value)
        if value.dim() < 2:
            assert torch.equal(n[copy], value)
        else:
            matrices += 1
            ratio = ((n[copy] - value).pow(2).mean().sqrt() / value.pow(2).mean().sqrt()).item()
            assert ratio == pytest.approx(0.2, rel=0.033)
    assert matrices == 8  # qkv, proj, fc1, fc2 of each copied layer


def test_noise_follows_the_growth_seed():
    old = old_model()
    a, b, c = grown(old, "stack", 0.2, seed=3), grown(old, "stack", 0.2, seed=3), grown(old, "stack", 0.2, seed=4)
    name = "blocks.2.attn.qkv.weight"
    assert torch.equal(dict(a.named_parameters())[name], dict(b.named_parameters())[name])
    assert not torch.equal(dict(a.named_parameters())[name], dict(c.named_parameters())[name])


def test_each_copied_matrix_and_each_growth_draws_noise_of_its_own():
    """Noise is drawn per tensor and per growth: the two copied layers' qkv (same shape), the same copy at growth 1
    and 2, and the noise against the fresh values a growth would draw for that name are uncorrelated (|r| < 0.1
    over 12,288 draws, where the standard error is 0.009); a shared or reused stream gives r = 1."""
    old = old_model()

    def noise(model, name, copy_of):
        return (dict(model.named_parameters())[name] - dict(old.named_parameters())[copy_of]).detach().flatten()

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].abs().item()

    def grown_at(index):
        cfg = dataclasses.replace(old.cfg, n_layers=4)
        return grow_model(old, cfg, "stack", ramp_steps=10, operator="stack", seed=3, index=index,
                          copy_noise=0.2)[0]

    first, second = grown_at(1), grown_at(2)
    a = noise(first, "blocks.2.attn.qkv.weight", "blocks.0.attn.qkv.weight")
    b = noise(first, "blocks.3.attn.qkv.weight", "blocks.1.attn.qkv.weight")
    c = noise(second, "blocks.2.attn.qkv.weight", "blocks.0.attn.qkv.weight")
    assert a.numel() == 12_288 and corr(a, b) < 0.1 and corr(a, c) < 0.1
    fresh = fresh_parameter(old.cfg, "blocks.2.attn.qkv.weight", torch.Size([192, 64]), 3, 1).flatten()
    assert corr(a, fresh) < 0.1


@pytest.mark.parametrize("family", ["msg", "zero"])
@pytest.mark.parametrize("change", [dict(n_layers=4), dict(n_layers=4, d_model=128, n_heads=4, d_ff=512)])
def test_exact_families_stay_exact_with_noisy_copies(family, change):
    """The new layers are gated at c = 0 (msg) or write zeros (zero), so noise in them changes nothing yet — also in
    one hop that grows width and depth together."""
    old = old_model()
    x = torch.randint(0, 101, (2, 24))
    before = old(x)[0]
    after = grown(old, family, 0.5, **change)(x)[0]
    assert ((after - before).abs().max() / before.abs().max()).item() <= RTOL


def test_stack_copies_with_noise_change_the_function_more():
    old = old_model()
    x = torch.randint(0, 101, (2, 24))
    before = old(x)[0]
    plain = (grown(old, "stack", 0.0)(x)[0] - before).abs().max()
    noisy = (grown(old, "stack", 0.5)(x)[0] - before).abs().max()
    assert noisy > plain > 0


def test_copy_noise_is_a_stage_setting(tmp_path):
    path = tmp_path / "stages.toml"
    path.write_text("[[stages]]\ntokens = 128\n[[stages]]\nn_layers = 4\ntokens = 128\noperator = 'stack'\n"
                    "copy_noise = 0.2\n")
    base = ["model.vocab_size=128", "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.head_dim=32",
            "model.max_seq_len=64", "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=0"]
    cfg = load_config(path, base)
    assert [s.copy_noise for s in plan_stages(cfg, cfg.model)] == [0.0, 0.2]
    with pytest.raises(FlmError, match=r"stages\[1\]\.copy_noise must be >= 0, got -0\.1$"):
        load_config(path, [*base, "stages.1.copy_noise=-0.1"])
