"""Data sources (data.sources) and their mixture: label tokens, instruction/teacher formats, loss masks through
shards and loader, the mixture loader, prepare with sources, training on a mixture and its teacher accuracy."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flm.config.schema import DataConfig, SourceConfig
from flm.data import load_prepared, load_tokenizer, prepare, train_bpe
from flm.data.loader import IGNORE, LoaderSource, MixtureLoader, TokenStream, mixture_pattern
from flm.data.shards import read_mask, write_mask, write_shard
from flm.data.sources import Instruction, encode, read_instructions
from flm.data.teacher import TeacherItem, bundled_items, items_jsonl, read_items
from flm.data.tokenizer import FALSE_LABEL, TRUE_LABEL, load_tokenizer_dir, read_ranks
from flm.errors import FlmError
from flm.eval.teacher import teacher_accuracy
from flm.export.hf import tiktoken_as_hf
from flm.train import Trainer
from flm.inference import load_for_inference
from flm.train.metrics import read_metrics


@pytest.fixture(scope="module")
def tok():
    tok = train_bpe([f"In the beginning {i} plus {i + 1} equals {2 * i + 1}." for i in range(40)], vocab_size=300)
    tok.add_label_tokens()
    return tok


# --- label tokens -------------------------------------------------------------------------------------------


def test_label_tokens_are_appended_and_survive_save_and_load(tok, tmp_path):
    assert tok.label_ids == (tok.vocab_size - 2, tok.vocab_size - 1)
    assert [tok.decode([i]) for i in tok.label_ids] == [TRUE_LABEL, FALSE_LABEL]
    # Text can never produce them, not even text that spells them.
    assert not set(tok.encode(f"a {TRUE_LABEL} b {FALSE_LABEL}")) & set(tok.label_ids)
    tok.save(tmp_path)
    again = load_tokenizer_dir(tmp_path)
    assert (again.label_ids, again.vocab_size, again.eot_id) == (tok.label_ids, tok.vocab_size, tok.eot_id)
    assert train_bpe(["plain text"] * 5, vocab_size=270).label_ids is None


def test_label_tokens_on_a_tiktoken_tokenizer(tmp_path, tiktoken_file):
    tik = load_tokenizer(f"tiktoken:{tiktoken_file(tmp_path / 'tiny.tiktoken')}")
    assert tik.label_ids is None and tik.vocab_size == 259
    tik.add_label_tokens()
    assert tik.label_ids == (259, 260) and tik.vocab_size == 261 and tik.eot_id == 258
    assert tik.decode(list(tik.label_ids)) == TRUE_LABEL + FALSE_LABEL
    assert not set(tik.encode(TRUE_LABEL)) & set(tik.label_ids)
    tik.save(tmp_path / "saved")
    assert load_tokenizer_dir(tmp_path / "saved").label_ids == (259, 260)
    hf = tiktoken_as_hf(read_ranks(tmp_path / "saved" / "tokenizer.tiktoken"), 258, with_labels=True)
    assert [hf.token_to_id(t) for t in (TRUE_LABEL, FALSE_LABEL)] == [259, 260]  # what `flm export hf` writes


# --- formats and masks --------------------------------------------------------------------------------------


def test_teacher_records_and_multiple_choice_expansion(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "7 is greater than 3.", "label": true}\n\n'
                    '{"question": "2 plus 3 equals ", "options": ["4.", "5.", "6."], "answer": 1}\n')
    single, mc = read_items(path)
    assert single.propositions() == [("7 is greater than 3.", True)]
    assert mc.propositions() == [("2 plus 3 equals 4.", False), ("2 plus 3 equals 5.", True),
                                 ("2 plus 3 equals 6.", False)]
    assert [json.loads(line) for line in items_jsonl([single, mc]).decode().splitlines()] == [
        json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.parametrize("line, message", [
    ('{"text": "x", "label": "yes"}', '"label" must be true or false'),
    ('{"text": "", "label": true}', 'non-empty string "text"'),
    ('{"question": "q", "options": ["a"], "answer": 0}', "at least 2"),
    ('{"question": "q", "options": ["a", "b"], "answer": 2}', "index of the true option"),
    ('{"text": "x", "label": true, "lable": false}', "unexpected field 'lable'"),
    ('{"text": "x", "label": tru', "malformed JSONL line"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_teacher_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine.", "label": false}\n' + line + "\n")
    with pytest.raises(FlmError, match=rf"bad\.jsonl:2: .*{message}") as info:
        read_items(path)
    assert "\n" not in str(info.value)


def test_bundled_set_and_examples_parse():
    items = bundled_items()
    props = [p for item in items for p in item.propositions()]
    assert len({text for text, _ in props}) == len(props) and sum(t for _, t in props) * 2 == len(props)
    assert items == bundled_items()  # seeded
    examples = Path(__file__).parent.parent / "examples"
    assert sum(item.multiple_choice for item in read_items(examples / "teacher.jsonl")) == 1
    assert len(read_instructions(examples / "instruct.jsonl")) == 3


def test_teacher_encoding_puts_the_loss_on_the_label_only(tok):
    items = [TeacherItem("1 plus 2 equals 3.", label=True), TeacherItem("4 plus ", options=("1 is 5.", "1 is 6."),
                                                                         answer=0)]
    tokens, mask = encode(items, "teacher", tok)
    true_id, false_id = tok.label_ids
    assert tokens[mask == 1].tolist() == [true_id, true_id, false_id]
    assert sorted(np.flatnonzero(np.isin(tokens, tok.label_ids)).tolist()) == np.flatnonzero(mask).tolist()
    assert tok.decode(tokens).split("<|endoftext|>")[:-1] == [
        "1 plus 2 equals 3.<|true|>", "4 plus 1 is 5.<|true|>", "4 plus 1 is 6.<|false|>"]


def test_instruction_loss_on_response_or_all(tok):
    docs = [Instruction("Q: In the beginning? A: ", "God."), Instruction("", "plus")]
    tokens, on_response = encode(docs, "instruct", tok, loss_on="response")
    _, on_all = encode(docs, "instruct", tok, loss_on="all")
    assert on_all.tolist() == [1] * len(tokens)
    prompt = tok.encode(docs[0].prompt)
    first = len(prompt) + len(tok.encode("God.")) + 1
    assert on_response[:first].tolist() == [0] * len(prompt) + [1] * (first - len(prompt))
    assert on_response[first:].tolist() == [1] * (len(tok.encode("plus")) + 1)  # empty prompt: all response
    assert tokens[first - 1] == tok.eot_id and on_response[first - 1] == 1  # the model learns to stop


def test_mask_files_are_checked(tmp_path):
    write_mask(tmp_path / "m.mask", np.array([0, 1, 1, 0], dtype=np.uint8))
    assert read_mask(tmp_path / "m.mask").tolist() == [0, 1, 1, 0]
    with pytest.raises(FlmError, match="0s and 1s"):
        write_mask(tmp_path / "bad.mask", np.array([0, 2]))
    raw = (tmp_path / "m.mask").read_bytes()
    (tmp_path / "m.mask").write_bytes(raw[:-1])
    with pytest.raises(FlmError, match="truncated"):
        read_mask(tmp_path / "m.mask")
    write_shard(tmp_path / "s.bin", np.arange(4), 10)
    with pytest.raises(FlmError, match="not an flm loss mask"):
        read_mask(tmp_path / "s.bin")


# --- the mixture --------------------------------------------------------------------------------------------

SEQ = 8


def _source(tmp_path, index, n_tokens, masked=False):
    """Source `index` holds the tokens 10000 * index + (0, 1, ...); with `masked`, the multiples of 3 are targets."""
    tokens = 10_000 * index + np.arange(n_tokens)
    shard = tmp_path / f"s{index}.bin"
    write_shard(shard, tokens, 40_000)
    mask = None
    if masked:
        mask = tmp_path / f"s{index}.mask"
        write_mask(mask, (tokens % 3 == 0).astype(np.uint8))
    return LoaderSource(f"s{index}", TokenStream([shard], [mask]))


@pytest.fixture()
def sources(tmp_path):
    return [_source(tmp_path, 0, 4001), _source(tmp_path, 1, 801, masked=True), _source(tmp_path, 2, 161)]


def _mixture(sources, weights, batch_size=16, **kwargs):
    for src, w in zip(sources, weights):
        src.weight = w
    return MixtureLoader(sources, batch_size, SEQ, seed=3, **kwargs)


def test_masked_targets_are_ignored(sources):
    loader = _mixture(sources, [1, 1, 1], batch_size=12)
    for _ in range(10):
        inputs, targets = loader.next_batch()
        for x, y in zip(inputs, targets):
            following = x + 1  # the tokens the targets stand for (each source counts up)
            masked = int(x[0]) // 10_000 == 1
            assert torch.equal(y, torch.where(following % 3 == 0, following, IGNORE) if masked else following)
    assert (targets == IGNORE).any()


@pytest.mark.parametrize("weights", [[3, 1, 1], [0.7, 0.2, 0.1], [1, 1, 1]])
def test_every_batch_carries_the_weights(sources, weights):
    loader = _mixture(sources, weights)
    share = np.array(weights) / sum(weights)
    totals = np.zeros(3)
    for _ in range(200):
        inputs, _ = loader.next_batch()
        counts = np.bincount(inputs[:, 0].numpy() // 10_000, minlength=3)
        assert np.all(np.abs(counts - 16 * share) <= 2), counts  # each batch, not just on average
        totals += counts
    np.testing.assert_allclose(totals / totals.sum(), share, atol=0.002)


def test_each_source_cycles_through_its_own_epochs(sources):
    loader = _mixture(sources, [1, 1, 1], batch_size=15)
    starts = {0: [], 1: [], 2: []}
    for _ in range(8):  # 40 samples per source: source 2 has 20 windows, so two epochs
        inputs, _ = loader.next_batch()
        for x in inputs:
            starts[int(x[0]) // 10_000].append(int(x[0]) % 10_000)
    assert sorted(starts[2][:20]) == sorted(starts[2][20:]) == list(range(0, 160, SEQ))
    assert starts[2][:20] != starts[2][20:]
    assert len(set(starts[0])) == 40


def test_mixture_resumes_exactly_and_keeps_order_across_ranks(sources):
    whole = _mixture(sources, [3, 1, 1])
    reference = [whole.next_batch() for _ in range(60)]
    first = _mixture(sources, [3, 1, 1])
    got = [first.next_batch() for _ in range(23)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["samples_seen"] == 23 * 16 and state["weights"] == [3, 1, 1]
    resumed = _mixture(sources, [3, 1, 1])
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(37)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, reference))

    ranks = [_mixture(sources, [3, 1, 1], batch_size=8, rank=r, world_size=2) for r in range(2)]
    for inputs, targets in reference[:20]:
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(inputs, torch.cat([p[0] for p in parts]))
        assert torch.equal(targets, torch.cat([p[1] for p in parts]))

    with pytest.raises(FlmError, match="weights"):
        _mixture(sources, [1, 1, 1]).load_state_dict(state)


@pytest.mark.parametrize("weights, period, pattern", [
    # Shares 8/3 each: 2 slots each, the two spare slots to the lowest indices on a tie; midpoints 1/6, 1/2, 5/6
    # (sources 0, 1) and 1/4, 3/4 (source 2) interleave.
    ([1, 1, 1], 8, [0, 1, 2, 0, 1, 2, 0, 1]),
    # Shares 6.25 and 3.75: 6 + 3, the spare slot to the larger remainder (source 1): 6 + 4; midpoints (j+1/2)/6
    # and (j+1/2)/4 merged.
    ([5, 3], 10, [0, 1, 0, 1, 0, 0, 1, 0, 1, 0]),
    ([1, 1, 2], 8, [2, 0, 1, 2, 2, 0, 1, 2]),
])
def test_mixture_pattern_by_hand(weights, period, pattern):
    got = mixture_pattern(weights, period=period)
    assert got.dtype == np.int64 and got.tolist() == pattern


def test_mixture_pattern_refuses_a_vanishing_weight():
    with pytest.raises(FlmError, match=r"^a mixture weight is too small: each source needs at least 1/8 of the "):
        mixture_pattern([1, 1e-6], period=8)
    assert np.bincount(mixture_pattern([1, 1 / 8], period=8)).tolist() == [7, 1]  # 0.89 of a slot rounds up


# --- prepare with sources -----------------------------------------------------------------------------------


def _mixed_cfg(tmp_path, instruct, **extra):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(12):
        (corpus / f"{i:02d}.txt").write_text(f"In the beginning was document {i}. " * 20)
    return DataConfig(corpus=str(corpus), dir=str(tmp_path / "out"), vocab_size=300, val_fraction=0.2,
                      shard_tokens=3000, sources=[
                          SourceConfig(kind="text", weight=2), SourceConfig(kind="instruct", path=str(instruct)),
                          SourceConfig(kind="teacher", path="bundled", weight=1)], **extra)


def _instruct_file(tmp_path):
    path = tmp_path / "instruct.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: ", "response": f"answer {i}."}) + "\n"
                            for i in range(60)))
    return path


def test_prepare_mixture_keeps_masks_with_their_tokens(tmp_path):
    data = prepare(_mixed_cfg(tmp_path, _instruct_file(tmp_path)), log=lambda _: None)
    tok = data.tokenizer()
    assert [s.kind for s in data.sources] == ["text", "instruct", "teacher"]
    text, instruct, teacher = data.sources
    assert text.train_masks == [None] * len(text.train_shards) and all(instruct.train_masks + teacher.train_masks)
    assert len(teacher.train_shards) > 1  # masks are cut into shards in step with the tokens
    stream = TokenStream(teacher.train_shards, teacher.train_masks)
    tokens, mask = stream.read(0, len(stream)), stream.read(0, len(stream), masks=True)
    assert np.isin(tokens[mask == 1], tok.label_ids).all() and (mask == 1).sum() == np.isin(tokens, tok.label_ids).sum()
    held = read_items(teacher.heldout)
    n_props = sum(len(i.propositions()) for i in bundled_items())
    assert (mask == 1).sum() + sum(len(i.propositions()) for i in held) == n_props
    assert data.val_shards == text.val_shards + instruct.val_shards
    assert data.val_masks == [None] * len(text.val_shards) + instruct.val_masks
    loader = data.train_loader(batch_size=8, seq_len=16, seed=0)
    inputs, targets = loader.next_batch()
    assert inputs.shape == (8, 16) and (targets == IGNORE).any()


def test_failed_prepare_keeps_the_prepared_folder(tmp_path):
    instruct = _instruct_file(tmp_path)
    cfg = _mixed_cfg(tmp_path, instruct)
    prepare(cfg, log=lambda _: None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    instruct.write_text(instruct.read_text() + '{"prompt": "fine", "response": "also fine"}\n{"prompt": 3}\n')
    with pytest.raises(FlmError, match=r"instruct\.jsonl:62: .*\"prompt\""):
        prepare(cfg, log=lambda _: None)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert load_prepared(tmp_path / "out").sources[1].kind == "instruct"


def test_source_config_errors():
    with pytest.raises(FlmError, match=r"data\.sources\[0\]\.kind must be one of"):
        DataConfig(sources=[SourceConfig(kind="txt")]).validate()
    with pytest.raises(FlmError, match=r"data\.sources\[0\]\.path must name the teacher data"):
        DataConfig(sources=[SourceConfig(kind="teacher")]).validate()
    with pytest.raises(FlmError, match="loss_on applies to instruct sources only"):
        DataConfig(sources=[SourceConfig(kind="text", loss_on="all")]).validate()
    with pytest.raises(FlmError, match="weight must be positive"):
        DataConfig(sources=[SourceConfig(weight=0)]).validate()
    with pytest.raises(FlmError, match=r"sources\[1\]\.val_fraction must be in \(0, 0\.5\)"):
        DataConfig(sources=[SourceConfig(), SourceConfig(kind="teacher", path="bundled", val_fraction=0.5)]).validate()
    with pytest.raises(FlmError, match="needs a text or instruct source"):
        DataConfig(sources=[SourceConfig(kind="teacher", path="bundled")]).validate()


# --- training on a mixture ----------------------------------------------------------------------------------


# Text and the bundled teacher propositions, 3 : 1, the teacher's held-out share its own (0.2).
MIXED = ("data.corpus=kjv", "data.max_chars=60000", "data.vocab_size=400", "data.val_fraction=0.05",
         "data.sources=[{kind='text', weight=3}, {kind='teacher', path='bundled', val_fraction=0.2}]")
# The tiny run (conftest) at 2 layers x 32 with dropout, two micro-batches a step, 8 steps.
MIXTURE_RUN = ("model.d_model=32", "model.head_dim=16", "model.max_seq_len=32", "model.dropout=0.1",
               "train.grad_accum=2", "train.max_steps=8", "train.eval_every=4", "train.ckpt_every=4")


@pytest.fixture
def mixed(tiny_on):
    """The small run's builder on MIXED."""
    return tiny_on(*MIXED)


def _trainer(mixed, run_dir, *extra) -> Trainer:
    return Trainer(mixed.config(run_dir, *MIXTURE_RUN, *extra), log=lambda *_: None)


def test_masked_positions_get_exactly_zero_gradient(mixed, tmp_path):
    with _trainer(mixed, tmp_path) as trainer:
        x, y = trainer.loader.next_batch()
        assert (y == IGNORE).any() and (y != IGNORE).any()
        logits, loss = trainer.model(x, y)
        logits.retain_grad()
        loss.backward()
        masked = y == IGNORE
        assert torch.count_nonzero(logits.grad[masked]) == 0
        assert torch.count_nonzero(logits.grad[~masked]) > 0
        # The same batch with the masked targets given any real ids would be another loss: -100 silences them.
        assert not torch.isclose(loss, trainer.model(x, torch.where(masked, 0, y))[1])


def test_accumulation_equals_one_big_batch_with_uneven_masks(mixed, tmp_path):
    with (_trainer(mixed, tmp_path / "a", "train.batch_size=2", "train.grad_accum=2", "model.dropout=0") as accumulated,
          _trainer(mixed, tmp_path / "b", "train.batch_size=4", "train.grad_accum=1", "model.dropout=0") as big,
          _trainer(mixed, tmp_path / "c", "train.batch_size=2") as probe):
        big.model.load_state_dict(accumulated.model.state_dict())
        counts = [int((probe.loader.next_batch()[1] != IGNORE).sum()) for _ in range(2)]
        assert counts[0] != counts[1]  # the micro-batches hold different numbers of loss tokens
        grads = []
        for trainer in (accumulated, big):  # keep the gradients the optimizer is handed
            trainer.optimizer.step = lambda t=trainer, **_: grads.append([p.grad.clone() for p in t.model.parameters()])
        loss_a, norm_a = accumulated.train_step()
        loss_b, norm_b = big.train_step()
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm_a, norm_b, rtol=1e-5, atol=1e-7)
    for (name, _), a, b in zip(accumulated.model.named_parameters(), *grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=name)


def test_resume_keeps_the_mixture_position(mixed, tmp_path):
    with _trainer(mixed, tmp_path / "a") as straight:
        straight.train()
    with _trainer(mixed, tmp_path / "b") as first:
        first.train(until_step=4)
    with _trainer(mixed, tmp_path / "b") as second:
        assert second.resume("auto") and second.loader.samples_seen == 4 * 8
        second.train()
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    evals = [r for r in read_metrics(tmp_path / "a") if r["kind"] == "eval"]
    assert all(0 <= r["teacher_acc"] <= 1 and 0 <= r["teacher_mc_acc"] <= 1 for r in evals) and len(evals) == 2


# --- teacher accuracy ---------------------------------------------------------------------------------------


class _LastTokenJudge(torch.nn.Module):
    """A stand-in model whose log p(TRUE) - log p(FALSE) at each position is (token id - 100) / 10."""

    def __init__(self, tok):
        super().__init__()
        self.cfg = type("Cfg", (), {"max_seq_len": 64})()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.tok = tok

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.tok.vocab_size)
        true_id, false_id = self.tok.label_ids
        logits[..., true_id] = (tokens.float() - 100) / 10
        return logits, None


def test_teacher_accuracy_reads_the_label_position(tok):
    items = [TeacherItem(f"In the beginning {i} plus {i + 1} equals {2 * i + 1}." * (1 + i % 3), label=i % 2 == 0)
             for i in range(12)]
    items.append(TeacherItem("In the beginning ", options=("plus", "equals", "1."), answer=1))
    margin = {text: tok.encode(text)[-1] - 100 for item in items for text, _ in item.propositions()}
    assert len({m > 0 for m in margin.values()}) == 2  # both answers occur, so reading the wrong place shows
    expected = sum((margin[text] > 0) == truth for item in items for text, truth in item.propositions())
    options = [margin[text] for text, _ in items[-1].propositions()]
    result = teacher_accuracy(_LastTokenJudge(tok), tok, items, batch_size=5)
    assert (result.propositions, result.correct, result.questions) == (15, expected, 1)
    assert result.answered == int(options.index(max(options)) == 1)
    assert result.true_share == 7 / 15


def test_eval_teacher_command(mixed, cli, tmp_path):
    with _trainer(mixed, tmp_path / "run", "train.max_steps=4") as trainer:
        trainer.train()
    result = cli("eval", "teacher", "--model", tmp_path / "run", "--json", tmp_path / "t.json")
    assert result.status == 0
    out = result.out
    report = json.loads((tmp_path / "t.json").read_text())
    held = read_items(load_prepared(mixed.data).teacher_heldout[0])
    assert 0.15 < len(held) / len(bundled_items()) < 0.25  # the source's own val_fraction (0.2)
    assert report["propositions"] == sum(len(i.propositions()) for i in held) and "teacher accuracy" in out
    result = teacher_accuracy(trainer.model, trainer.tokenizer, held)
    assert report["accuracy"] == result.accuracy and report["mc_accuracy"] == result.mc_accuracy
    last_eval = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"][-1]
    assert last_eval["teacher_acc"] == result.accuracy  # the trainer logs the same measure

    # The label tokens survive the Hugging Face export and the import back.
    from transformers import AutoTokenizer

    assert cli("export", "hf", tmp_path / "run", tmp_path / "hf").status == 0
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf_tok.convert_tokens_to_ids([TRUE_LABEL, FALSE_LABEL]) == list(trainer.tokenizer.label_ids)
    assert cli("import", "hf", tmp_path / "hf", tmp_path / "back").status == 0
    assert load_for_inference(tmp_path / "back")[1].label_ids == trainer.tokenizer.label_ids

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1 plus 1 equals 2.", "label": 1}\n')
    result = cli("eval", "teacher", "--model", tmp_path / "run", "--data", bad)
    assert result.status == 2
    err = result.err
    assert err.count("\n") == 1 and "bad.jsonl:1" in err
