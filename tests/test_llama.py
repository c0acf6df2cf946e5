"""The llama arch against transformers' own classes: stock Llama, Mistral and Qwen2 folders built here with
transformers (random tiny models, saved with save_pretrained, sharded or not) are imported, compared with
transformers' forward and greedy generation, trained on, and exported back to folders stock transformers loads.

Tolerances (each shown to fail on a broken variant in `test_the_tolerances_catch_broken_variants`):
- fp32 logits: max |difference| / max |logit| <= 1e-5. flm's llama arch runs transformers' operations in the same
  order (RMSNorm in fp32, the rotary tables computed as LlamaRotaryEmbedding does), so the difference observed is
  0; the bound leaves room for a BLAS that orders sums differently. A wrong RMSNorm eps (1e-6 for 1e-5) moves the
  logits by 4e-4 to 8e-4 of their size, key/value heads repeated in the wrong order by 1.2 to 1.3.
- fp64: 1e-12 (observed 0). transformers normalises in fp32 even in fp64, and so does flm (the same function).
- generation: token for token; round trip and exported folder: tensors bit for bit, logits equal.
"""

from __future__ import annotations

import os

# Before transformers reads them: nothing here may touch the network.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)
from transformers.utils import logging as hf_logging

from flm.checkpoint import read_meta, save_checkpoint
from flm.cli.main import main
from flm.config import Config, ModelConfig, TrainConfig, config_to_dict, load_config
from flm.data.tokenizer import Tokenizer, load_tokenizer_dir
from flm.errors import FlmError
from flm.export import export_hf, import_hf
from flm.export.llama_hf import IMPORT_CONFIG, flm_name, hf_name
from flm.inference import load_for_inference
from flm.model import build_model, flops_per_token, generate, matmul_params, non_embedding_params, param_count
from flm.model import llama as llama_module
from flm.model import decoder as decoder_module
from flm.parallel.tensor import check_tensor_parallel
from flm.train import Trainer

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Question: What is two plus two?\nAnswer: four",
         "In the beginning God created the heaven and the earth.", "hello world, hello flm"] * 10
FP32_RTOL, FP64_RTOL = 1e-5, 1e-12
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16, intermediate_size=96,
             max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0, initializer_range=0.2)
KINDS = {  # name -> (config class, model class, settings): every kind with random gains and biases
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-tied-gqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=None)),
    # Qwen2 with q/k/v biases and 6 embedding rows past the tokenizer's vocabulary (as Qwen2 pads its own).
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=1, tie_word_embeddings=False, padded=6)),
}


@pytest.fixture(scope="module")
def hf_tokenizer() -> HFTokenizer:
    return train_tokenizer()


def train_tokenizer() -> HFTokenizer:
    """A small byte-level BPE with Llama's specials <s> (0) and </s> (1)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return tok


def make_folder(root: Path, kind: str, tokenizer: HFTokenizer, shard: str | None = None, seed: int = 0,
                **changes) -> tuple[Path, torch.nn.Module]:
    """A random stock folder of `kind` (weights, config.json, tokenizer files) and the transformers model in it."""
    config_class, model_class, settings = KINDS[kind]
    settings = {**settings, **changes}
    padded = settings.pop("padded", 0)
    config = config_class(**SHAPE, **settings, vocab_size=tokenizer.get_vocab_size() + padded, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # gains and biases away from their init (1 and 0), so that a misplaced one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    folder = root / kind
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module", params=list(KINDS))
def imported(request, hf_tokenizer, tmp_path_factory):
    """(kind, the stock folder, transformers' model, the imported checkpoint); the untied llama sharded."""
    root = tmp_path_factory.mktemp(request.param)
    shard = "40KB" if request.param == "llama" else None
    folder, model = make_folder(root, request.param, hf_tokenizer, shard=shard)
    return request.param, folder, model, import_hf(folder, root / "run")


@pytest.fixture(scope="module")
def tied_gqa(hf_tokenizer, tmp_path_factory):
    """The same for one kind, for tests whose path does not depend on it."""
    root = tmp_path_factory.mktemp("one")
    folder, model = make_folder(root, "llama-tied-gqa", hf_tokenizer)
    return "llama-tied-gqa", folder, model, import_hf(folder, root / "run")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))


def test_import_reads_the_folder(imported):
    kind, folder, hf, ckpt = imported
    cfg = load_for_inference(ckpt)[0].cfg
    assert (cfg.arch, cfg.n_kv_heads, cfg.qkv_bias, cfg.tie_embeddings) == (
        "llama", hf.config.num_key_value_heads, kind == "qwen2", hf.config.tie_word_embeddings)
    assert (cfg.ln_eps, cfg.rope_theta, cfg.hf_class) == (1e-5, 5000.0, type(hf).__name__)
    assert kind != "llama" or len(list(folder.glob("model-*.safetensors"))) > 2  # the sharded save was read
    assert not load_for_inference(ckpt)[2]["model"].get("mup")


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, FP32_RTOL), (torch.float64, FP64_RTOL)], ids=["fp32", "fp64"])
def test_logits_equal_transformers(imported, dtype, rtol):
    _, _, hf, ckpt = imported
    model = load_for_inference(ckpt)[0].to(dtype)
    x = batch(hf.config.vocab_size)
    with torch.no_grad():
        ours, theirs = model(x)[0], hf.to(dtype)(x).logits
    hf.float()
    assert ours.dtype == theirs.dtype == dtype
    assert relative(ours, theirs) <= rtol


def test_the_tolerances_catch_broken_variants(imported, monkeypatch):
    """Each bound fails on a broken model: a wrong RMSNorm eps (1e-6, transformers' default, instead of the
    folder's 1e-5), and grouped-query attention with key/value heads tiled ([0, 1, 0, 1]) instead of repeated
    ([0, 0, 1, 1]), as an implementation forgetting repeat_kv's order would."""
    kind, _, hf, ckpt = imported
    model = load_for_inference(ckpt)[0]
    x = batch(hf.config.vocab_size)

    def worst(m) -> tuple[float, float]:
        with torch.no_grad():
            fp32 = relative(m(x)[0], hf(x).logits)
            fp64 = relative(m.double()(x)[0], hf.double()(x).logits)
        m.float(), hf.float()
        return fp32, fp64

    for norm in (m for m in model.modules() if isinstance(m, llama_module.RMSNorm)):
        norm.eps = 1e-6
    assert min(worst(model)) > FP32_RTOL
    if model.cfg.kv_heads in (1, model.cfg.n_heads):
        return  # one key/value head or one per query head: no order to get wrong
    for norm in (m for m in model.modules() if isinstance(m, llama_module.RMSNorm)):
        norm.eps = 1e-5
    assert max(worst(model)) <= FP32_RTOL
    sdpa = F.scaled_dot_product_attention

    def tiled(q, k, v, *args, enable_gqa=False, **kwargs):
        if enable_gqa:
            k, v = (t.repeat(1, q.shape[1] // t.shape[1], 1, 1) for t in (k, v))
        return sdpa(q, k, v, *args, **kwargs)

    class Broken:  # torch.nn.functional for flm's llama module only (transformers keeps the real one)
        scaled_dot_product_attention = staticmethod(tiled)

        def __getattr__(self, name):
            return getattr(F, name)

    monkeypatch.setattr(decoder_module, "F", Broken())  # the attention both archs call
    assert min(worst(model)) > FP32_RTOL


def test_greedy_generation_is_transformers(imported, capsys):
    """flm's sampler (KV cache, and without it) and `flm generate` give the tokens transformers' greedy generate
    gives; the padded rows past the tokenizer (qwen2) are suppressed on both sides."""
    _, folder, hf, ckpt = imported
    model, tok, _ = load_for_inference(ckpt)
    pad = list(range(tok.vocab_size, hf.config.vocab_size))
    for prompt in ["The quick brown", "hello world"]:
        ids = tok.encode(prompt)
        ours = generate(model, ids, 20, eot_id=tok.eot_id, vocab_limit=tok.vocab_size)
        assert generate(model, ids, 20, eot_id=tok.eot_id, vocab_limit=tok.vocab_size, use_cache=False) == ours
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                 suppress_tokens=pad or None)[0, len(ids):].tolist()
        assert theirs == ours and len(set(ours)) > 2
        assert main(["generate", str(ckpt), "--prompt", prompt, "-n", "20", "-t", "0", "--device", "cpu"]) == 0
        assert capsys.readouterr().out == prompt + tok.decode([t for t in ours if t != tok.eot_id]) + "\n"


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_export_is_a_stock_folder_bit_for_bit(imported, tmp_path):
    """Import -> export gives back every tensor bit for bit (sharded), a config stock transformers loads without
    remote code as the same class, the same logits and the same tokenizer."""
    kind, folder, hf, ckpt = imported
    out = export_hf(ckpt, tmp_path / "out", max_shard_size="40KB")
    assert not list(out.glob("*.py")) and (out / "model.safetensors.index.json").is_file()
    theirs, ours = tensors_of(folder), tensors_of(out)
    if hf.config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert type(back) is type(hf) and back.dtype == torch.float32
    x = batch(hf.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)
    hf_tok, tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True), load_tokenizer_dir(ckpt)
    assert hf_tok.bos_token == "<s>" and hf_tok.eos_token_id == tok.eot_id == 1
    for text in TEXTS[:4]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation.get("suppress_tokens", []) == list(range(tok.vocab_size, hf.config.vocab_size))


def test_the_commands_say_what_to_do_next(tied_gqa, tmp_path, capsys):
    """`flm import hf` names the run config to train with; `flm export hf` of a llama model loads without remote
    code."""
    folder = tied_gqa[1]
    assert main(["import", "hf", str(folder), str(tmp_path / "run")]) == 0
    config = tmp_path / "run" / IMPORT_CONFIG
    assert f"`flm train -c {config} --resume auto`" in capsys.readouterr().out and config.is_file()
    assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "from_pretrained(" in out and "trust_remote_code" not in out


def test_names_map_both_ways():
    cfg = ModelConfig(arch="llama", n_layers=2, vocab_size=50, qkv_bias=True)
    with torch.device("meta"):
        names = [n for n, _ in build_model(cfg).named_parameters()]
    assert all(flm_name(hf_name(n)) == n for n in names)
    assert hf_name("blocks.1.attn.q_proj.bias") == "model.layers.1.self_attn.q_proj.bias"
    assert flm_name("model.layers.0.mlp.gate_proj.weight") == "blocks.0.mlp.gate_proj.weight"
    assert flm_name("model.rotary_emb.inv_freq") is None


# ---- refusals ----------------------------------------------------------------------------------------------
def config_only(tmp_path: Path, kind: str, **changes) -> tuple[Path, dict]:
    """A folder with only the config.json transformers writes for `kind` with `changes` (refusals read nothing
    else)."""
    config_class, _, settings = KINDS[kind]
    settings = {k: v for k, v in settings.items() if k != "padded"}
    folder = tmp_path / f"{kind}-config"
    config_class(**{**SHAPE, **settings, **changes}, vocab_size=300).save_pretrained(folder)
    return folder, json.loads((folder / "config.json").read_text())


def refused(folder: Path, tmp_path: Path) -> str:
    with pytest.raises(FlmError) as e:
        import_hf(folder, tmp_path / "run")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_rope_scaling_is_refused_in_one_line(tmp_path):
    # transformers 5 writes rope scaling as rope_parameters ...
    folder, _ = config_only(tmp_path, "llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert refused(folder, tmp_path) == (
        f"cannot import {folder} exactly: config.json has rope_parameters = "
        '{"factor": 2.0, "rope_theta": 5000.0, "rope_type": "linear"}: flm has plain RoPE only (no scaling of any kind)')
    # ... and folders written before it as rope_scaling.
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    (folder / "config.json").write_text(json.dumps(config))
    assert refused(folder, tmp_path) == (
        f"cannot import {folder} exactly: config.json has rope_scaling = "
        '{"factor": 8.0, "rope_type": "llama3"}: flm has plain RoPE only (no scaling of any kind)')


def test_sliding_window_is_refused_in_one_line(tmp_path):
    folder, _ = config_only(tmp_path, "mistral", sliding_window=16)
    assert refused(folder, tmp_path) == (
        f"cannot import {folder} exactly: config.json has sliding_window = 16 is shorter than "
        "max_position_embeddings = 64: flm's attention sees the whole context")
    folder, _ = config_only(tmp_path, "qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert refused(folder, tmp_path) == (
        f"cannot import {folder} exactly: config.json has use_sliding_window = true, sliding_window = 16 is shorter "
        "than max_position_embeddings = 64: flm's attention sees the whole context")
    # A window as long as the context, or one Qwen2 does not use, changes nothing: those load.
    for kind, changes in (("mistral", dict(sliding_window=64)), ("qwen2", dict(sliding_window=16))):
        folder, config = config_only(tmp_path, kind, **changes)
        assert refused(folder, tmp_path).startswith("no tokenizer.json")  # past the config: no more in this folder


@pytest.mark.parametrize("change, message", [
    (dict(attention_bias=True), "attention_bias = true: flm's llama arch has no q, k, v and o biases (Qwen2's q, k, "
                                "v biases only)"),
    (dict(mlp_bias=True), "mlp_bias = true: flm's llama arch has no MLP biases (Qwen2's q, k, v biases only)"),
    (dict(hidden_act="gelu"), 'hidden_act = "gelu": flm\'s MLP is SwiGLU with silu only'),
])
def test_what_flm_cannot_reproduce_is_refused_in_one_line(tmp_path, change, message):
    folder, _ = config_only(tmp_path, "llama", **change)
    assert refused(folder, tmp_path) == f"cannot import {folder} exactly: config.json has {message}"


def test_a_folder_without_its_weights_or_tokenizer_is_one_line(hf_tokenizer, tmp_path):
    folder, _ = make_folder(tmp_path, "mistral", hf_tokenizer)
    (folder / "tokenizer.json").unlink()
    assert refused(folder, tmp_path) == (f"no tokenizer.json in {folder}: flm takes a Llama-family folder's "
                                         "tokenizer from its tokenizer.json")
    folder, _ = make_folder(tmp_path, "llama-tied-gqa", hf_tokenizer)
    (folder / "model.safetensors").unlink()
    assert refused(folder, tmp_path) == (f"no model.safetensors or model.safetensors.index.json in {folder} (flm "
                                         "reads safetensors weights only)")


# ---- the run after import: resume, export rules (growth: test_llama_growth.py) --------------------------------
def test_train_resumes_the_imported_checkpoint(tied_gqa, tmp_path):
    """import.toml's model is the imported one: `flm train --resume` takes the checkpoint (at step 0, fresh Adam
    state, data from the start) on data prepared with the imported tokenizer."""
    _, folder, hf, _ = tied_gqa
    run = tmp_path / "run"
    ckpt = import_hf(folder, run)
    settings = ["data.max_chars=20000", "data.corpus=kjv", "train.max_steps=2", "train.warmup_steps=1",
                "train.batch_size=2", "train.seq_len=32", "train.eval_every=2", "train.eval_batches=1",
                "train.ckpt_every=2", "train.sample_tokens=0", "train.progress=false", "train.tensorboard=false"]
    from flm.data import prepare

    cfg = load_config(run / IMPORT_CONFIG, settings)
    assert cfg.model == load_for_inference(ckpt)[0].cfg and cfg.data.tokenizer == str(run / "tokenizer")
    prepare(cfg.data, log=lambda _: None, workers=1)
    with Trainer(cfg, log=lambda _: None) as trainer:
        assert trainer.resume("auto") and trainer.step == 0
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        x = batch(hf.config.vocab_size)
        with torch.no_grad():
            assert relative(trainer.model(x)[0], hf(x).logits) <= FP32_RTOL
        summary = trainer.train()
    assert summary["step"] == 2 and all(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items()
                                        if k.endswith("weight"))
    assert read_meta(run / "checkpoints" / "step_00000002")["model"] == config_to_dict(cfg.model)


def save_llama(root: Path, tok: Tokenizer, **changes) -> Path:
    """A random llama-arch checkpoint made by flm itself (as training writes it)."""
    cfg = ModelConfig(arch="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                      vocab_size=tok.vocab_size + 2, max_seq_len=64, init_std=0.3, **changes)
    torch.manual_seed(0)
    model = build_model(cfg)
    meta = {"model": config_to_dict(cfg), "config": config_to_dict(Config(model=cfg, train=TrainConfig(seq_len=32))),
            "ramp": None, "stage": 0, "data": None}
    return save_checkpoint(root / "checkpoints", 3, model, None, meta, keep_last=1, write_extra=tok.save)


def test_mup_readout_is_folded_into_an_untied_head_and_refused_tied(hf_tokenizer, tmp_path):
    tok = Tokenizer(HFTokenizer.from_str(hf_tokenizer.to_str()), spec="test")
    ckpt = save_llama(tmp_path / "untied", tok, mup=True, base_width=64, output_mult=2.0)
    model = load_for_inference(ckpt)[0]
    out = export_hf(ckpt, tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    x = batch(tok.vocab_size)
    with torch.no_grad():  # the multiplier 2 * 64 / 32 = 4, folded into the head: one rounding per weight
        assert type(back) is LlamaForCausalLM and relative(back(x).logits, model(x)[0]) <= FP32_RTOL
    tied = save_llama(tmp_path / "tied", tok, mup=True, base_width=64, output_mult=2.0, tie_embeddings=True)
    with pytest.raises(FlmError) as e:
        export_hf(tied, tmp_path / "hf-tied")
    assert str(e.value) == (f"{tied}: a tied model's readout multiplier (4) cannot be folded into its head (the head "
                            "is the embedding) and stock LlamaForCausalLM has none; train it untied or with "
                            "model.mup = false and output_mult = 1")
    qwen = save_llama(tmp_path / "qwen", tok, qkv_bias=True)  # flm's own llama with biases: a Qwen2 folder
    back = AutoModelForCausalLM.from_pretrained(str(export_hf(qwen, tmp_path / "hf-qwen")), local_files_only=True)
    assert type(back) is Qwen2ForCausalLM


def test_a_checkpoint_mid_ramp_is_refused(hf_tokenizer, tmp_path):
    tok = Tokenizer(HFTokenizer.from_str(hf_tokenizer.to_str()), spec="test")
    ckpt = save_llama(tmp_path / "run", tok)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["ramp"] = {"old": meta["model"], "sources": [[0, False], [1, False]], "ramp_steps": 10, "steps_done": 4}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FlmError, match=r"in the middle of a growth ramp \(step 4 of 10.*earlier checkpoint$"):
        export_hf(ckpt, tmp_path / "hf")


# ---- the model on its own --------------------------------------------------------------------------------------
LLAMAS = [dict(), dict(n_kv_heads=2, d_ff=96), dict(n_kv_heads=1, qkv_bias=True, tie_embeddings=True),
          dict(n_heads=6, n_kv_heads=3, head_dim=8, d_ff=40)]


@pytest.mark.parametrize("shape", LLAMAS)
def test_counts_are_the_built_model(shape):
    """param_count, non_embedding_params and matmul_params count a built llama's parameters exactly."""
    cfg = ModelConfig(arch="llama", n_layers=3, d_model=48, vocab_size=70, **shape)
    model = build_model(cfg)
    params = dict(model.named_parameters())
    assert param_count(cfg) == sum(p.numel() for p in params.values())
    assert non_embedding_params(cfg) == sum(p.numel() for n, p in params.items() if n.startswith(("blocks", "ln_f")))
    assert matmul_params(cfg) == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops_per_token(cfg, 32) == 6 * matmul_params(cfg) + 12 * 3 * cfg.attn_dim * 32


def test_mask_buffers_are_none_and_act_as_flm_s():
    cfg = ModelConfig(arch="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=50)
    model = build_model(cfg).eval()
    blocks = list(model.blocks)
    assert model.hidden_mask is None and model.norm_mask is None
    assert all(b.gate is None and b.norm_mask is None and b.attn.head_mask is None and b.mlp.unit_mask is None
               for b in blocks)
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        plain = model(x)[0]
        model.hidden_mask = torch.ones(32)  # all ones: the same function
        for b in blocks:
            b.attn.head_mask, b.mlp.unit_mask = torch.ones(4), torch.ones(cfg.ffn_dim)
        assert torch.allclose(model(x)[0], plain, rtol=0, atol=1e-6)
        model.hidden_mask = None
        blocks[1].gate = torch.tensor(0.0)  # a gate at 0: the block passes its input through
        for b in blocks:
            b.attn.head_mask = b.mlp.unit_mask = None
        skipped = build_model(dataclasses.replace(cfg, n_layers=1))
        skipped.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.")})
        assert torch.equal(model(x)[0], skipped.eval()(x)[0])


@pytest.mark.parametrize("changes, message", [
    (dict(n_kv_heads=3), "model.n_kv_heads (3) must divide model.n_heads (4)"),
    (dict(arch="flm", n_kv_heads=2), "model.n_kv_heads (2) must be unset or equal model.n_heads (4) for arch 'flm' "
                                     "(no grouped-query attention)"),
    (dict(arch="flm", qkv_bias=True), "model.qkv_bias is for arch 'llama' (every linear layer of 'flm' has a bias)"),
    (dict(hf_class="GPT2LMHeadModel"), "model.hf_class must be one of ('LlamaForCausalLM', 'MistralForCausalLM', "
                                       "'Qwen2ForCausalLM'), got 'GPT2LMHeadModel'"),
])
def test_bad_llama_configs_are_one_line(changes, message):
    cfg = ModelConfig(**{"arch": "llama", "n_heads": 4, **changes})
    with pytest.raises(FlmError) as e:
        cfg.validate()
    assert str(e.value) == f"config error: {message}" or str(e.value) == message


def test_tensor_parallelism_must_split_key_value_heads():
    """Checked before any process group exists: each rank's query heads need their key/value heads."""
    cfg = ModelConfig(arch="llama", n_heads=8, n_kv_heads=2, head_dim=16, vocab_size=512)
    check_tensor_parallel(cfg, 2, 32, False)
    with pytest.raises(FlmError, match=r"^tensor parallelism tp=4 must divide model.n_kv_heads \(2\)$"):
        check_tensor_parallel(cfg, 4, 32, False)


def test_planner_memory_counts_grouped_query_attention_and_swiglu():
    """At the shape where the llama arch stores what FLM stores (key/value heads = heads, SwiGLU of 2·d units: 8f =
    16d, the 4·d GELU FFN's) the activation estimate is FLM's; sharing key/value heads stores less."""
    from flm.config.layout import Layout
    from flm.plan.memory import activation_bytes_per_layer, check_layout

    layout = Layout(tp=2, pp=1, dp=1, micro_batch_size=2, sequence_parallel=False, recompute="none",
                    distributed_optimizer=True)
    flm_cfg = ModelConfig(d_model=256, n_heads=8, head_dim=32, vocab_size=512)
    same = dataclasses.replace(flm_cfg, arch="llama", d_ff=512)
    assert activation_bytes_per_layer(same, 128, layout, "none") == activation_bytes_per_layer(flm_cfg, 128, layout,
                                                                                               "none")
    gqa = dataclasses.replace(same, n_kv_heads=2)
    sbh = 128 * 2 * 256
    saved = sbh * 4 * (256 - 64) / 256 / 2  # 4·(A - K)/h per token-width, split over tp = 2
    assert activation_bytes_per_layer(same, 128, layout, "none") - activation_bytes_per_layer(
        gqa, 128, layout, "none") == pytest.approx(saved)
    with pytest.raises(FlmError, match=r"^tp=4 does not divide n_kv_heads=2$"):
        check_layout(gqa, dataclasses.replace(layout, tp=4))


def test_a_tiny_llama_trains_at_tp2_as_in_one_process(tiny, tmp_path, torchrun):
    """Grouped-query attention with Qwen2's biases under tensor parallelism (q/k/v/gate/up by rows, o/down by
    columns): the losses and the final logits are those of one process, within test_parallel.py's bounds (1e-5 and
    1e-4 relative: another order of the same sums)."""
    from flm.train.metrics import read_metrics

    shape = ("model.arch='llama'", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16", "model.d_ff=96",
             "model.qkv_bias=true", "train.max_steps=4", "train.eval_every=4", "train.ckpt_every=4")
    torchrun(2, "train", *tiny.args(tmp_path / "tp2", *shape, "parallel.tp=2"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        with Trainer(load_config(None, tiny.settings(tmp_path / "one", *shape)), log=lambda _: None) as trainer:
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if r["kind"] == "train"] for run in ("tp2", "one")]
    assert len(losses[0]) == 4 and max(abs(a - b) / b for a, b in zip(*losses)) <= 1e-5
    x = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative(load_for_inference(tmp_path / "tp2")[0](x)[0], load_for_inference(tmp_path / "one")[0](x)[0]) <= 1e-4


if __name__ == "__main__":  # python tests/test_llama.py DIR [KIND]: the tiny stock folder the docs' commands use
    import sys

    tokenizer = train_tokenizer()
    folder, _ = make_folder(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "llama-tied-gqa", tokenizer)
    print(f"wrote {folder}")
