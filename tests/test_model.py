"""The FLM decoder: causality, xPos, KV cache, counts, readout, and that it can learn."""

import math

import pytest
import torch

from flm.config import ModelConfig, model_config_from_dict
from flm.model import FLM, KVCache, filter_logits, flops_per_token, generate, param_count, rotary_tables
from flm.model.xpos import apply_rotary


def model_cfg(**kw) -> ModelConfig:
    """A small model config (2 layers x 64, 4 heads x 16, 97 tokens) with changes `kw`."""
    base = dict(n_layers=2, d_model=64, n_heads=4, head_dim=16, vocab_size=97, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def test_changing_future_tokens_never_changes_past_logits():
    torch.manual_seed(0)
    model = FLM(model_cfg()).eval()
    x = torch.randint(0, 97, (2, 40))
    y = x.clone()
    y[:, 25:] = torch.randint(0, 97, (2, 15))
    a, b = model(x)[0], model(y)[0]
    assert torch.allclose(a[:, :25], b[:, :25], atol=1e-6)
    assert not torch.allclose(a[:, 25:], b[:, 25:], atol=1e-3)


def test_xpos_scores_depend_only_on_relative_position():
    cfg = model_cfg(head_dim=32, max_seq_len=512)
    cos_q, sin_q, cos_k, sin_k = rotary_tables(cfg)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float32), torch.randn(1, 1, 1, 32)

    def score(n, m):
        qn = apply_rotary(q, cos_q[n:n + 1], sin_q[n:n + 1])
        km = apply_rotary(k, cos_k[m:m + 1], sin_k[m:m + 1])
        return (qn * km).sum().item()

    for n, m in [(10, 3), (100, 0), (300, 299), (40, 40)]:
        for shift in (1, 57, 200):
            assert score(n, m) == pytest.approx(score(n + shift, m + shift), rel=1e-4, abs=1e-5)
    # Per pair i the query/key factors combine to cos((n-m)θ_i) · ζ_i^((n-m)/B): REFERENCE.md §1.
    i = torch.arange(16, dtype=torch.float64)
    theta = 10000.0 ** (-2 * i / 32)
    zeta = (2 * i + 0.4 * 32) / (1.4 * 32)
    n, m = 300, 41
    combined = cos_q[n, :16] * cos_k[m, :16] + sin_q[n, :16] * sin_k[m, :16]
    expected = torch.cos((n - m) * theta) * zeta ** ((n - m) / 512)
    assert torch.allclose(combined.double(), expected, atol=1e-6)


def test_qkv_rows_are_laid_out_head_by_head_as_documented():
    """docs/export.md: head h owns rows 3·h·d .. 3·(h+1)·d - 1 of the fused QKV, its q rows, then k, then v.
    Attention written from that description alone (plain softmax, explicit causal mask) equals the module's."""
    cfg = model_cfg(n_heads=3, head_dim=8, d_model=32)
    torch.manual_seed(0)
    model = FLM(cfg).eval()
    attn, T, d = model.blocks[0].attn, 12, cfg.head_dim
    x = torch.randn(2, T, cfg.d_model)
    w, b = attn.qkv.weight, attn.qkv.bias
    heads = []
    for h in range(cfg.n_heads):
        rows = [slice(3 * h * d + j * d, 3 * h * d + (j + 1) * d) for j in range(3)]
        q, k, v = (x @ w[r].T + b[r] for r in rows)
        q = apply_rotary(q[:, None], model.cos_q[:T], model.sin_q[:T])[:, 0]
        k = apply_rotary(k[:, None], model.cos_k[:T], model.sin_k[:T])[:, 0]
        scores = (q @ k.transpose(-1, -2)) / d ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v)
    by_hand = attn.proj(torch.cat(heads, dim=-1))
    with torch.no_grad():
        assert torch.allclose(attn(x, model.rope(0, T)), by_hand, atol=1e-6)


def test_xpos_centred_scales_fit_in_fp16_at_long_context():
    cfg = model_cfg(head_dim=128, max_seq_len=8192)
    for t in rotary_tables(cfg):
        assert t.abs().max().item() < torch.finfo(torch.float16).max
    # Uncentred, the key scale at 8192 would be ~5e8: the centre is what keeps it small.
    zeta_min = 0.4 / 1.4
    assert zeta_min ** (-8192 / 512) > torch.finfo(torch.float16).max


def test_kv_cache_decoding_equals_full_recomputation():
    torch.manual_seed(0)
    cfg = model_cfg()
    model = FLM(cfg).eval()
    x = torch.randint(0, 97, (2, 50))
    full = model(x)[0]
    cache = KVCache(cfg, 2, torch.device("cpu"), torch.float32)
    parts = [model(x[:, :20], cache=cache)[0]]
    for t in range(20, 30):
        parts.append(model(x[:, t:t + 1], cache=cache)[0])
    parts.append(model(x[:, 30:], cache=cache)[0])
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    prompt = x[0, :5].tolist()
    assert generate(model, prompt, 40) == generate(model, prompt, 40, use_cache=False)


def test_sampling_is_seeded_and_respects_vocab_limit():
    torch.manual_seed(0)
    model = FLM(model_cfg())
    g = lambda: torch.Generator().manual_seed(7)
    a = generate(model, [1, 2, 3], 30, temperature=1.5, generator=g(), vocab_limit=50)
    b = generate(model, [1, 2, 3], 30, temperature=1.5, generator=g(), vocab_limit=50)
    assert a == b and max(a) < 50


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, 2, None)).sum().item() == 2
    probs = torch.softmax(logits, -1)[0]
    # The nucleus is the smallest prefix of sorted tokens whose mass reaches top_p.
    p = (probs[0] + probs[1] + 0.5 * probs[2]).item()
    kept = torch.isfinite(filter_logits(logits, None, p))[0].tolist()
    assert kept == [True, True, True, False, False]
    assert torch.isfinite(filter_logits(logits, None, 1e-6)).sum().item() == 1


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"n_heads": 3, "head_dim": 24, "d_ff": 100}])
def test_param_count_matches_the_module(kw):
    cfg = model_cfg(**kw)
    model = FLM(cfg)
    unique = {id(p): p for p in model.parameters()}
    assert param_count(cfg) == sum(p.numel() for p in unique.values())


def test_paper_101b_shape_builds_on_meta_and_counts():
    cfg = model_config_from_dict({"preset": "flm-101b"})
    with torch.device("meta"):
        model = FLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
    assert param_count(cfg) / 1e9 == pytest.approx(102.73, abs=0.01)  # untied head
    tied = model_config_from_dict({"preset": "flm-101b", "tie_embeddings": True})
    assert param_count(tied) / 1e9 == pytest.approx(101.70, abs=0.01)


def test_flops_per_token_matches_the_narayanan_formula():
    # 72·B·s·L·d²·(1 + s/(6d) + V/(12·L·d)) per batch of B sequences, divided by B·s tokens.
    cfg = model_config_from_dict({"preset": "flm-101b"})
    L, d, V, s = cfg.n_layers, cfg.d_model, cfg.vocab_size, 2048
    narayanan = 72 * L * d**2 * (1 + s / (6 * d) + V / (12 * L * d))
    assert flops_per_token(cfg, s) == pytest.approx(narayanan, rel=1e-12)


def test_mup_readout_scales_logits_by_base_width_over_d_model():
    torch.manual_seed(0)
    sp = FLM(model_cfg(output_mult=2.0))
    mu = FLM(model_cfg(output_mult=2.0, mup=True, base_width=16))
    mu.load_state_dict(sp.state_dict())
    x = torch.randint(0, 97, (1, 10))
    assert torch.allclose(mu(x)[0], sp(x)[0] * 16 / 64, atol=1e-6)


def test_meta_init_then_materialise_gives_a_working_model():
    with torch.device("meta"):
        model = FLM(model_cfg())
    model.to_empty(device="cpu")
    model.init_weights()
    logits, loss = model(torch.randint(0, 97, (1, 8)), torch.randint(0, 97, (1, 8)))
    assert torch.isfinite(logits).all()
    assert loss.item() == pytest.approx(math.log(97), abs=0.5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = FLM(model_cfg(vocab_size=64))
    x = torch.randint(0, 64, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_ignored_targets_do_not_count():
    torch.manual_seed(0)
    model = FLM(model_cfg())
    x, y = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    masked = y.clone()
    masked[:, :6] = -100
    logits, loss = model(x, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 6:].reshape(-1, 97), y[:, 6:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
