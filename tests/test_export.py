"""Hugging Face export and import: exact logits and greedy tokens in transformers, tokenizers, shards, lm-eval,
round trips back into training, and refusal of checkpoints in the middle of a growth ramp."""

from __future__ import annotations

import os

# Before transformers / datasets read them: nothing here may touch the network.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import base64
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from flm.checkpoint import save_checkpoint
from flm.config import Config, ModelConfig, TrainConfig, config_to_dict
from flm.data.tokenizer import EOT, Tokenizer, load_tokenizer, train_bpe
from flm.errors import FlmError
from flm.export import export_hf, import_hf, parse_size
from flm.export.hf import CONFIG_KEYS, byte_to_unicode, hf_config, model_config_from_hf
from flm.model import FLM, generate, readout_multiplier
from flm.inference import load_for_inference
from flm.train import Trainer
from flm.train.optim import build_optimizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Question: What is two plus two?\nAnswer: four",
         "In the beginning God created the heaven and the earth.", "前提：他住在北京。答案：是",
         "画蛇添足：比喻做了多余的事，反而不恰当。"] * 8
PROBES = ["The quick brown fox", "前提：他住在北京。答案：是", "  spaces\tand\nlines  ", "emoji 🙂 and 1234567",
          "it's they'll WE'VE"]
SHAPES = {  # both with a μP readout multiplier of 2 * 64 / d_model
    "untied, attention narrower than d_model": dict(d_model=48, n_heads=3, head_dim=8),
    "tied": dict(d_model=32, n_heads=2, head_dim=16, tie_embeddings=True),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(TEXTS, vocab_size=320)


def make_model(tok: Tokenizer, **shape) -> FLM:
    """A random model with 6 padded vocabulary rows, boosted so that generation must actively suppress them."""
    cfg = ModelConfig(n_layers=2, vocab_size=tok.vocab_size + 6, max_seq_len=64, init_std=0.3, mup=True,
                      output_mult=2.0, base_width=64, **shape)
    torch.manual_seed(0)
    model = FLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] *= 8
    return model


def save(model: FLM, tok: Tokenizer, run_dir: Path, step: int = 3, **meta) -> Path:
    full = Config(model=model.cfg, train=TrainConfig(seq_len=32))
    opt = build_optimizer(model, full.train)
    meta = {"model": config_to_dict(model.cfg), "config": config_to_dict(full), "ramp": None, **meta}
    return save_checkpoint(run_dir / "checkpoints", step, model, opt, meta, keep_last=1, write_extra=tok.save)


def load_hf(path: Path):
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, local_files_only=True).eval()
    assert model.dtype == torch.float32  # from config.json's torch_dtype
    return model


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def exported(request, tok, tmp_path_factory):
    """(our model, its checkpoint, the exported folder, the model loaded back by transformers)."""
    root = tmp_path_factory.mktemp("export")
    model = make_model(tok, **SHAPES[request.param])
    ckpt = save(model, tok, root / "run")
    out = export_hf(root / "run", root / "hf")
    return model, ckpt, out, load_hf(out)


def test_logits_equal_ours(exported, tok):
    model, _, out, hf = exported
    assert readout_multiplier(model.cfg) != 1.0 and hf.config.readout_multiplier == readout_multiplier(model.cfg)
    ids = [tok.encode(" ".join(TEXTS[:4]))[:40], tok.encode(" ".join(TEXTS[3:8]))[:40]]
    with torch.no_grad():
        ours = model(torch.tensor(ids))[0]
        theirs = hf(torch.tensor(ids)).logits
        assert (ours - theirs).abs().max().item() <= 1e-5
        # Left padding (how batched generation pads) shifts absolute positions; xPos is relative, so the real
        # tokens' logits change only by rounding (relative to the logits' size: these are up to ~80).
        short = ids[1][:25]
        padded = torch.tensor([ids[0], [tok.eot_id] * 15 + short])
        mask = torch.tensor([[1] * 40, [0] * 15 + [1] * 25])
        theirs = hf(padded, attention_mask=mask).logits
        alone = model(torch.tensor([short]))[0][0]
        assert (theirs[1, 15:] - alone).abs().max().item() <= 1e-5 * alone.abs().max().item()
        assert (theirs[0] - ours[0]).abs().max().item() <= 1e-5
        # Labels are shifted inside, as in every transformers causal LM: the same loss as ours on shifted targets.
        x = torch.tensor(ids)
        assert hf(x, labels=x).loss.item() == pytest.approx(model(x[:, :-1], x[:, 1:])[1].item(), rel=1e-6)


def context_free_greedy(model: FLM, ids: list[int], n: int, vocab_limit: int) -> list[int]:
    """Greedy decoding as a remote code that drops the cache would do it: the first token from the whole prompt,
    then every token from the previous one alone, at position 0."""
    out = []
    with torch.no_grad():
        for step in range(n):
            context = ids if step == 0 else out[-1:]
            out.append(int(model(torch.tensor([context]))[0][0, -1, :vocab_limit].argmax()))
    return out


def test_greedy_generate_equals_flm_generate(exported, tok):
    model, _, _, hf = exported
    padded_wins = 0
    for prompt in ["The quick brown", "Question: What is", "前提：他住在"]:
        ids = tok.encode(prompt)
        ours = generate(model, ids, 24, temperature=0, eot_id=tok.eot_id, vocab_limit=tok.vocab_size)
        assert len(ours) == 24  # no end-of-text: all 24 tokens are compared
        # The continuation depends on more than the last token, so decoding that loses the cache is caught.
        assert context_free_greedy(model, ids, 24, tok.vocab_size) != ours
        with torch.no_grad():
            cached = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
            full = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                               use_cache=False)[0, len(ids):].tolist()
            padded_wins += int(model(torch.tensor([ids + ours]))[0][0].argmax(-1).ge(tok.vocab_size).any())
        assert cached == ours and full == ours and len(set(ours)) > 3
    assert padded_wins  # without suppressing the padded rows, greedy decoding would have emitted one


def test_forward_takes_the_cache_under_either_keyword(exported, tok):
    """transformers 5 passes the cache as `cache=`, 4.x as `past_key_values=`; both continue the sequence at the
    right positions (logits equal a full pass), `cache_position` is checked, and a cache under any other keyword,
    or two caches at once, are errors instead of a silently fresh cache."""
    from transformers.cache_utils import DynamicCache

    model, _, _, hf = exported
    ids = torch.tensor([tok.encode(" ".join(TEXTS[:3]))[:30]])
    with torch.no_grad():
        whole = model(ids)[0]
        for keyword in ("cache", "past_key_values"):
            cache = DynamicCache()
            hf(ids[:, :20], **{keyword: cache})
            assert cache.get_seq_length() == 20
            step = hf(ids[:, 20:], **{keyword: cache}, cache_position=torch.arange(20, 30)).logits
            # Equal up to fp32 rounding of differently ordered sums (relative to logits of size ~80); a wrong
            # position would move them by O(1).
            assert (step - whole[:, 20:]).abs().max().item() <= 1e-6 * whole.abs().max().item()
            assert cache.get_seq_length() == 30
        cache = DynamicCache()
        hf(ids[:, :20], cache=cache)
        with pytest.raises(ValueError, match="does not continue a cache holding 20"):
            hf(ids[:, 20:21], cache=cache, cache_position=torch.tensor([0]))
        with pytest.raises(ValueError, match="unknown keyword 'kv_cache'"):
            hf(ids[:, 20:21], kv_cache=cache)
        with pytest.raises(ValueError, match="two different caches"):
            hf(ids[:, 20:21], cache=cache, past_key_values=DynamicCache())


def test_export_carries_flms_own_xpos_code(exported):
    """One xPos definition: the folder's xpos.py is flm's module, byte for byte, and the modeling code uses it."""
    import flm.model.xpos

    out = exported[2]
    assert (out / "xpos.py").read_bytes() == Path(flm.model.xpos.__file__).read_bytes()
    assert "from .xpos import apply_rotary, xpos_tables" in (out / "modeling_flm.py").read_text()
    assert "def xpos_tables" not in (out / "modeling_flm.py").read_text()


def test_auto_tokenizer_encodes_like_ours(exported, tok):
    out = exported[2]
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == tok.eot_id
    for text in PROBES:
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text) and hf_tok.decode(ids) == text


def test_config_maps_every_model_field():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    # The architecture is config.json's model_type; FLM has no grouped-query attention, always has biases and is
    # always FLMForCausalLM, so the llama arch's n_kv_heads, qkv_bias and hf_class are not in its config.json; a model
    # with the separate teacher head (teacher_head) is not exported (tests/test_teacher_objective.py).
    assert fields == set(CONFIG_KEYS) | {"d_ff", "arch", "n_kv_heads", "qkv_bias", "hf_class", "teacher_head"}


def test_arch_is_the_model_type():
    cfg = ModelConfig(vocab_size=256, n_layers=1, d_model=32, n_heads=2, head_dim=16)
    hf = hf_config(cfg, eot_id=0, dtype="fp32")
    assert hf["model_type"] == cfg.arch == "flm"
    assert model_config_from_hf(hf).arch == "flm"


def test_import_round_trip_is_exact(exported, tok, tmp_path):
    model, ckpt, out, _ = exported
    path = import_hf(out, tmp_path / "run")
    assert path == tmp_path / "run" / "checkpoints" / ckpt.name
    original, imported = load_file(str(ckpt / "model.safetensors")), load_file(str(path / "model.safetensors"))
    assert original.keys() == imported.keys()
    assert all(torch.equal(original[k], imported[k]) for k in original)
    assert not any(k.startswith("opt.") for k in load_file(str(path / "train_state.safetensors")))  # fresh Adam
    back, back_tok, meta = load_for_inference(tmp_path / "run")
    before = json.loads((ckpt / "meta.json").read_text())
    assert meta == before  # model, run config and step: everything but the optimizer state
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        assert torch.equal(back(ids)[0], model(ids)[0])
    assert all(back_tok.encode(t) == tok.encode(t) for t in PROBES)


def test_import_of_a_model_fine_tuned_and_saved_by_transformers(exported, tok, tmp_path):
    """The ecosystem round trip: one training step in transformers, save_pretrained, back into flm."""
    _, _, out, _ = exported
    hf = load_hf(out).train()
    ids = torch.tensor([tok.encode(TEXTS[2])])
    hf(ids, labels=ids).loss.backward()
    torch.optim.SGD(hf.parameters(), lr=0.1).step()
    hf.eval().save_pretrained(tmp_path / "tuned")
    AutoTokenizer.from_pretrained(str(out), trust_remote_code=True).save_pretrained(tmp_path / "tuned")
    back, back_tok, meta = load_for_inference(import_hf(tmp_path / "tuned", tmp_path / "run"))
    assert meta["step"] == 0 and meta["ramp"] is None  # no flm_training.json: a fresh start
    with torch.no_grad():
        assert (back(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-5
    assert all(back_tok.encode(t) == tok.encode(t) for t in PROBES)


def test_sharded_and_bf16_exports(tok, tmp_path):
    model = make_model(tok, **SHAPES["tied"])
    save(model, tok, tmp_path / "run")
    out = export_hf(tmp_path / "run", tmp_path / "hf", max_shard_size="8KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (out / "model.safetensors").exists()
    for shard in shards:  # at most 8 kB of tensors, or one tensor that is larger on its own
        tensors = load_file(str(out / shard)).values()
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors) <= 8000
    ids = torch.tensor([tok.encode(TEXTS[1])])
    with torch.no_grad():
        assert (load_hf(out)(ids).logits - model(ids)[0]).abs().max().item() <= 1e-5
    back, _, _ = load_for_inference(import_hf(out, tmp_path / "back"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))

    half = export_hf(tmp_path / "run", tmp_path / "bf16", dtype="bf16")
    weights = load_file(str(half / "model.safetensors"))
    assert torch.equal(weights["model.embed.weight"], model.embed.weight.bfloat16())
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_a_sharded_checkpoint_exports_to_the_same_files_as_a_whole_one(tok, tmp_path):
    """The export reads weights through the checkpoint package's reader, whatever the format: the same model saved
    by a (one-process) torchrun job in the sharded format exports to the very bytes of its whole checkpoint."""
    import torch.distributed as dist

    model = make_model(tok, **SHAPES["untied, attention narrower than d_model"])
    save(model, tok, tmp_path / "whole")
    full = Config(model=model.cfg, train=TrainConfig(seq_len=32))
    meta = {"model": config_to_dict(model.cfg), "config": config_to_dict(full), "ramp": None,
            "layout": {"world_size": 1}}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ckpt = save_checkpoint(tmp_path / "sharded" / "checkpoints", 3, model, build_optimizer(model, full.train),
                               meta, keep_last=1, write_extra=tok.save, distributed=True)
    finally:
        dist.destroy_process_group()
    assert (ckpt / "sharded").is_dir() and not (ckpt / "model.safetensors").exists()
    whole = export_hf(tmp_path / "whole", tmp_path / "hf-whole", max_shard_size="8KB")
    sharded = export_hf(tmp_path / "sharded", tmp_path / "hf-sharded", max_shard_size="8KB")
    weights = sorted(p.name for p in whole.glob("model*"))
    assert len(weights) > 2 and sorted(p.name for p in sharded.glob("model*")) == weights
    assert all((whole / name).read_bytes() == (sharded / name).read_bytes() for name in weights)
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in whole.iterdir())


def tiktoken_ranks(tokenizer_json: Path, out: Path) -> Path:
    """Write a byte-level BPE's vocabulary (without its special token) as a tiktoken rank file, ranks in id order."""
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    tokens = sorted((t for t in vocab if t != EOT), key=vocab.get)
    out.write_text("".join(f"{base64.b64encode(bytes(to_byte[c] for c in t)).decode()} {rank}\n"
                           for rank, t in enumerate(tokens)))
    return out


def test_tiktoken_tokenizer_exports_and_imports(tok, tmp_path):
    tok.save(tmp_path / "tok")
    tik = load_tokenizer(f"tiktoken:{tiktoken_ranks(tmp_path / 'tok' / 'tokenizer.json', tmp_path / 'r.tiktoken')}")
    assert tik.encode(PROBES[0]) != tok.encode(PROBES[0])  # ids shifted by one: really another tokenizer
    model = make_model(tik, **SHAPES["untied, attention narrower than d_model"])
    save(model, tik, tmp_path / "run")
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = " ".join(TEXTS[:5] + PROBES)
    assert hf_tok(text)["input_ids"] == tik.encode(text) and hf_tok.eos_token_id == tik.eot_id
    assert all(hf_tok(t)["input_ids"] == tik.encode(t) for t in PROBES)
    _, back_tok, _ = load_for_inference(import_hf(out, tmp_path / "back"))
    assert back_tok.spec.startswith("tiktoken:") and back_tok.encode(text) == tik.encode(text)


def test_lm_eval_runs_offline_on_an_export(exported, tok, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, _, out, _ = exported
    docs = [{"question": q, "choices": ["four", "the lazy dog", "北京"], "gold": g}
            for q, g in [("What is two plus two?", 0), ("What does the fox jump over?", 1), ("他住在哪里？", 2),
                         ("What did God create?", 1)]]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tiny.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: 'Question: {{question}}\\nAnswer:'\n"
        "doc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    results = simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float32",
                              tasks=["tiny_mc"], device="cpu", bootstrap_iters=0, log_samples=False,
                              task_manager=TaskManager(include_path=[str(tmp_path)], include_defaults=False))

    def logprob(context: str, continuation: str) -> float:
        ctx, whole = tok.encode(context), tok.encode(context + continuation)
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]]))[0][0, len(ctx) - 1:]
        return F.log_softmax(logits, -1).gather(-1, torch.tensor(whole[len(ctx):])[:, None]).sum().item()

    def ours(doc: dict) -> int:
        scores = [logprob(f"Question: {doc['question']}\nAnswer:", " " + c) for c in doc["choices"]]
        return scores.index(max(scores))

    expected = sum(ours(d) == d["gold"] for d in docs) / len(docs)
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(expected)


def test_lm_eval_generate_until_on_an_export_equals_flm_eval_harness(exported, tok, tmp_path):
    """A local generate-until task, offline: `lm_eval --model hf` on the export (transformers' generate() with
    its cache) produces exactly the generations of our own lm-eval model on the checkpoint (`flm eval harness`)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from flm.eval.harness import FlmLM
    from flm.eval.scorer import load_scorer

    _, ckpt, out, _ = exported
    docs = [{"prompt": p} for p in ["The quick brown", "Question: What is two", "In the beginning God", "前提：他住在"]]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    (tmp_path / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: ''\n"
        "generation_kwargs:\n  until: ['<|endoftext|>']\n  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")

    def generations(model) -> list[str]:
        result = simple_evaluate(model=model, model_args=model_args if isinstance(model, str) else None,
                                 tasks=["tiny_gen"], device="cpu", bootstrap_iters=0, log_samples=True,
                                 task_manager=TaskManager(include_path=[str(tmp_path)], include_defaults=False))
        samples = sorted(result["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
        return [s["resps"][0][0] for s in samples]

    model_args = f"pretrained={out},trust_remote_code=True,dtype=float32"
    theirs = generations("hf")
    ours = generations(FlmLM(scorer=load_scorer(ckpt, "cpu")))
    assert theirs == ours
    assert all(len(g) >= 4 for g in ours), ours  # real continuations, not empty strings


def test_imported_checkpoint_continues_training(tiny, tmp_path):
    """A μP run on the tiny corpus (2 x 32, batches of 2 x 16 tokens), exported at step 2 and imported into a new run
    folder, resumes there with the same weights and trains on."""
    run = ("model.d_model=32", "model.head_dim=16", "model.max_seq_len=32", "model.mup=true", "train.batch_size=2",
           "train.seq_len=16", "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2",
           "train.eval_batches=1", "train.ckpt_every=2")
    with Trainer(tiny.config(tmp_path / "a", *run), log=lambda *_: None) as first:
        first.train(until_step=2)
    export_hf(tmp_path / "a", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "b")
    with Trainer(tiny.config(tmp_path / "b", *run), log=lambda *_: None) as second:
        assert second.resume("auto") and second.step == 2
        assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), second.model.parameters()))
        summary = second.train()
    assert second.step == 4 and summary["val_loss"] == pytest.approx(summary["val_loss"])  # finite, not NaN


def test_checkpoint_mid_growth_ramp_is_refused(tok, tmp_path):
    model = make_model(tok, **SHAPES["tied"])
    old = dataclasses.replace(model.cfg, d_model=16, n_heads=1)
    ramp = {"old": dataclasses.asdict(old), "sources": [[0, 0], [1, 1]], "ramp_steps": 10, "steps_done": 4}
    save(model, tok, tmp_path / "run", ramp=ramp)
    with pytest.raises(FlmError, match=r"middle of a growth ramp \(step 4 of 10.*Train 6 more steps"):
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_and_user_mistakes(tok, tmp_path, cli):
    model = make_model(tok, **SHAPES["tied"])
    save(model, tok, tmp_path / "run", step=7)
    exported = cli("export", "hf", tmp_path / "run", tmp_path / "hf", "--max-shard-size", "100KB")
    assert exported.status == 0 and "trust_remote_code=True" in exported.out
    assert cli("import", "hf", tmp_path / "hf", tmp_path / "back").status == 0
    assert (tmp_path / "back" / "checkpoints" / "step_00000007" / "meta.json").is_file()
    with pytest.raises(FlmError, match="not an empty folder"):
        export_hf(tmp_path / "run", tmp_path / "hf")
    with pytest.raises(FlmError, match="bad size"):
        export_hf(tmp_path / "run", tmp_path / "other", max_shard_size="lots")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("1234") == 1234
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(FlmError, match="model_type 'gpt2'"):
        import_hf(tmp_path / "hf", tmp_path / "again")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(FlmError, match="different model"):
        import_hf(tmp_path / "hf", tmp_path / "again")
    (tmp_path / "hf" / "flm_training.json").unlink()  # without the training record: step 0, defaults
    with pytest.raises(FlmError, match="do not fit config.json"):
        import_hf(tmp_path / "hf", tmp_path / "again")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert import_hf(tmp_path / "hf", tmp_path / "again").name == "step_00000000"


def test_a_model_without_mup_exports_output_mult_alone_as_its_readout(tok, tmp_path):
    """Without μP the readout multiplier is output_mult alone, whatever base_width and d_model are: 2, not
    2 * 64 / 32 = 4 as with μP. The exported config carries it and the exported model's logits are flm's."""
    cfg = ModelConfig(n_layers=2, vocab_size=tok.vocab_size + 6, max_seq_len=64, init_std=0.3, mup=False,
                      output_mult=2.0, base_width=64, d_model=32, n_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = FLM(cfg).eval()
    save(model, tok, tmp_path / "run")
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["mup"], config["output_mult"], config["base_width"], config["hidden_size"]) == (False, 2.0, 64, 32)
    hf = load_hf(out)
    assert readout_multiplier(cfg) == hf.config.readout_multiplier == 2.0
    ids = torch.tensor([tok.encode(" ".join(TEXTS[:4]))[:40]])
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-5
