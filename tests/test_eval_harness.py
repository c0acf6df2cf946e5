"""Scorers and the lm-evaluation-harness adapter: exact log-likelihoods, greedy decoding, offline lm-eval runs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / datasets read it: nothing here may touch the network
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json

import pytest
import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from flm.config import ModelConfig, config_to_dict
from flm.data.tokenizer import EOT, train_bpe
from flm.errors import FlmError
from flm.eval.harness import FlmLM
from flm.eval.iq import Settings, run_iq
from flm.eval.scorer import FlmScorer, HFScorer, load_scorer
from flm.eval.yaml_export import export_iq
from flm.model import FLM, generate
from flm.checkpoint import save_checkpoint

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Question: What is two plus two?\nAnswer: four",
         "Input: 3 8 1\nOutput: 3 1", "前提：他住在北京。答案：是"] * 10


@pytest.fixture(scope="module")
def scorer() -> FlmScorer:
    torch.manual_seed(0)
    tok = train_bpe(TEXTS, vocab_size=320)
    # Rows past the tokenizer's vocabulary must be masked; a large init makes greedy output non-trivial.
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, vocab_size=tok.vocab_size + 5, max_seq_len=32,
                      init_std=0.3)
    return FlmScorer(FLM(cfg).eval(), tok)


def by_hand(scorer: FlmScorer, ids: list[int], n_targets: int) -> float:
    """Log-probability of the last n_targets ids, from one plain forward pass (no cache) over the rest."""
    with torch.no_grad():
        logits = scorer.model(torch.tensor([ids[:-1]]))[0][0, -n_targets:, :scorer.vocab_limit].float()
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(ids[-n_targets:])[:, None]).sum().item()


def test_loglikelihood_is_the_sum_of_continuation_log_probs(scorer):
    enc = scorer.encode
    cases = [("Question: What is", " two plus two"), ("Input: 3 8", " 1"), ("", "The quick brown fox"),
             ("前提：他住在", "北京")]
    for ctx, cont in cases:
        ids = (enc(ctx) or [scorer.eot_id]) + enc(cont)
        assert len(ids) <= scorer.max_length
        assert scorer.loglikelihood(ctx, cont) == pytest.approx(by_hand(scorer, ids, len(enc(cont))), abs=1e-4)
    # Choices of one context reuse its cached state: same values in any order, as from a fresh scorer.
    values = [scorer.loglikelihood("Input: 3 8", c) for c in (" 1", " 3 1", " 1")]
    assert values[0] == values[2] and values[1] == pytest.approx(
        by_hand(scorer, enc("Input: 3 8") + enc(" 3 1"), len(enc(" 3 1"))), abs=1e-4)


def test_long_contexts_are_cut_from_the_left_and_counted(scorer):
    ctx, cont = " ".join(TEXTS[:4]), " lazy dog"
    ids = scorer.encode(ctx) + scorer.encode(cont)
    assert len(ids) > scorer.max_length + 1
    before = scorer.truncated
    expected = by_hand(scorer, ids[-(scorer.max_length + 1):], len(scorer.encode(cont)))
    assert scorer.loglikelihood(ctx, cont) == pytest.approx(expected, abs=1e-4)
    assert scorer.truncated == before + 1


def test_rolling_loglikelihood_predicts_every_token_once(scorer):
    short = "Input: 3 8 1"
    ids = [scorer.eot_id] + scorer.encode(short)
    assert scorer.rolling_loglikelihood(short) == pytest.approx(by_hand(scorer, ids, len(ids) - 1), abs=1e-4)
    text = " ".join(TEXTS[:6])
    ids = [scorer.eot_id] + scorer.encode(text)
    n, L = len(ids), scorer.max_length
    assert n > 2 * L + 1 and (n - 1) % L  # several windows, the last one partly new
    # Disjoint windows of L predictions; the remainder is predicted from a full window ending at the text's end.
    full = (n - 1) // L
    expected = sum(by_hand(scorer, ids[k * L:(k + 1) * L + 1], L) for k in range(full))
    expected += by_hand(scorer, ids[n - L - 1:], n - 1 - full * L)
    assert scorer.rolling_loglikelihood(text) == pytest.approx(expected, abs=1e-3)


def test_greedy_equals_flm_generate(scorer):
    for prompt, n in [("The quick brown", 12), ("Input: 3 8 1\nOutput:", 20), (" ".join(TEXTS[:3]), 10)]:
        ids = generate(scorer.model, scorer.encode(prompt), n, eot_id=scorer.eot_id, vocab_limit=scorer.vocab_limit)
        expected = scorer.decode([t for t in ids if t != scorer.eot_id])
        assert scorer.greedy(prompt, n, stop=()) == expected and len(expected) >= 6  # room for the stop string below
        stop = expected[4:6]  # decoding halts before the first occurrence of a stop string
        assert scorer.greedy(prompt, n, stop=["\n", stop]) == expected[:expected.index(stop)]
    with pytest.raises(FlmError, match="max_new_tokens"):
        scorer.greedy("x", scorer.max_length)


def instance(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_adapter_returns_the_scorers_values(scorer):
    lm = FlmLM(scorer=scorer)
    pairs = [("Question: What is", " two plus two"), ("", "The"), ("Input: 3 8 1\nOutput:", " 3 1")]
    got = lm.loglikelihood([instance("loglikelihood", p) for p in pairs])
    assert got == [scorer.score(*p) for p in pairs]
    assert lm.loglikelihood_rolling([instance("loglikelihood_rolling", ("The lazy dog",))]) == [
        scorer.rolling_loglikelihood("The lazy dog")]
    out = lm.generate_until([instance("generate_until", ("The quick", {"until": ["fox"], "max_gen_toks": 500}))])
    assert out == [scorer.greedy("The quick", scorer.max_length - 1, stop=["fox"])]
    with pytest.raises(FlmError, match="greedily"):
        lm.generate_until([instance("generate_until", ("The", {"do_sample": True, "temperature": 0.7}))])


def test_lm_eval_end_to_end_offline(scorer, tmp_path):
    """A local multiple-choice task and exported IQ tasks, through lm_eval.simple_evaluate on our adapter."""
    docs = [{"question": q, "choices": ["four", "five", "dog"], "gold": g}
            for q, g in [("What is two plus two?", 0), ("What jumps over the lazy dog?", 2), ("3 8 1?", 1)]]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tiny.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: 'Question: {{question}}\\nAnswer:'\n"
        "doc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    settings = Settings(items=4)
    names = ["superglue_iq_rte", "clue_iq_afqmc", "head_tail"]
    tasks = export_iq(tmp_path / "iq", names, settings)
    results = simple_evaluate(model=FlmLM(scorer=scorer), tasks=["tiny_mc", *tasks], bootstrap_iters=0,
                              task_manager=TaskManager(include_path=[str(tmp_path)], include_defaults=False),
                              log_samples=False)["results"]

    def ours(doc: dict) -> int:
        scores = [scorer.loglikelihood(f"Question: {doc['question']}\nAnswer:", " " + c) for c in doc["choices"]]
        return scores.index(max(scores))

    assert results["tiny_mc"]["acc,none"] == pytest.approx(sum(ours(d) == d["gold"] for d in docs) / len(docs))
    for result in run_iq(scorer, names, settings):
        metric = "acc,none" if result.subtask.closed else "exact_match,strip"
        assert results[f"flm_iq_{result.subtask.name}"][metric] == pytest.approx(result.accuracy / 100)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny randomly initialised GPT-2 with its own BPE tokenizer, saved like any local HF model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("hf-gpt2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT).save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_hf_scorer_runs_iq_offline(hf_dir):
    scorer = load_scorer(hf_dir, "cpu")
    assert isinstance(scorer, HFScorer) and scorer.max_length == 256
    ctx, cont = "Input: 3 8 1\nOutput:", " 3 1"
    ids = scorer.encode(ctx) + scorer.encode(cont)
    with torch.no_grad():
        logits = scorer.model(torch.tensor([ids[:-1]])).logits[0, -len(scorer.encode(cont)):]
    expected = F.log_softmax(logits, -1).gather(-1, torch.tensor(scorer.encode(cont))[:, None]).sum().item()
    assert scorer.loglikelihood(ctx, cont) == pytest.approx(expected, abs=1e-4)
    scorer.loglikelihood(ctx, " 8 8 8")  # another branch of the same cached context must not disturb it
    assert scorer.loglikelihood(ctx, cont) == pytest.approx(expected, abs=1e-4)
    results = run_iq(scorer, ["superglue_iq_wsc", "head_tail"], Settings(items=3))
    assert [r.total for r in results] == [3, 3] and 0 <= results[0].accuracy <= 100
    with torch.no_grad():
        ref = scorer.model.generate(torch.tensor([scorer.encode("The quick")]), max_new_tokens=6, do_sample=False,
                                    pad_token_id=scorer.eot_id)[0, len(scorer.encode("The quick")):].tolist()
    ref = ref[:ref.index(scorer.eot_id)] if scorer.eot_id in ref else ref
    assert scorer.greedy("The quick", 6, stop=()) == scorer.decode(ref)


def test_cli_export_then_harness(scorer, tmp_path, cli):
    model = scorer.model
    opt = torch.optim.SGD([{"params": list(model.parameters()), "names": [n for n, _ in model.named_parameters()]}])
    save_checkpoint(tmp_path / "run" / "checkpoints", 3, model, opt, {"model": config_to_dict(model.cfg), "ramp": None},
                    keep_last=1,
                    write_extra=scorer.tokenizer.save)

    assert cli("eval", "export-iq", tmp_path / "iq", "--tasks", "head_slicing,superglue_iq_wic", "--items", "3"
               ).status == 0
    harness = cli("eval", "harness", "--model", tmp_path / "run", "--include-path", tmp_path / "iq",
                  "--tasks", "flm_iq", "--json", tmp_path / "h.json", "--device", "cpu")
    assert harness.status == 0
    assert "flm_iq_head_slicing" in harness.out
    results = json.loads((tmp_path / "h.json").read_text())["results"]
    assert {"flm_iq_head_slicing", "flm_iq_superglue_iq_wic"} <= set(results)
    bad = cli("eval", "harness", "--model", tmp_path / "run", "--tasks", "x", "--include-path", "nowhere")
    assert bad.status == 2 and "not a folder" in bad.err  # an FlmError
