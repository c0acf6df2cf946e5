"""flm.data: tokenizers, corpora, shards, prepare and the resumable loader."""

from __future__ import annotations

import base64
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flm.config.schema import DataConfig
from flm.data import (TokenLoader, iter_documents, iter_eval_batches, load_prepared, load_tokenizer, prepare,
                      read_shard, train_bpe, write_shard)
from flm.data.split import split_documents
from flm.data.shards import HEADER_SIZE, ShardFile, read_mask, read_shard_header, write_mask
from flm.data.tokenizer import load_tokenizer_dir
from flm.errors import FlmError

CJK = re.compile(r"[\u4e00-\u9fff]")
ROUND_TRIP = [
    "In the beginning God created the heaven and the earth.",
    "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。",
    "mixed 中英文 text: 你好, world!",
    "  leading spaces,\ttabs,   runs of    spaces  ",
    "lines\n\n\nand\r\nwindows\r\nendings\n",
    "emoji 🦀🔥👩‍👩‍👧 and accents: naïve café Ωμέγα",
    "a literal <|endoftext|> inside a document",
    "",
]


def _mixed_corpus() -> list[str]:
    en = "And God said, Let there be light: and there was light. And the evening and the morning were the first day."
    zh = "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？"
    return [f"{en} {i}\n{zh}{i}" for i in range(30)]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(_mixed_corpus(), vocab_size=320)


# --- tokenizers ---------------------------------------------------------------------------------------------


def test_bpe_round_trip_is_exact(bpe):
    for text in ROUND_TRIP:
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode_batch(ROUND_TRIP) == [bpe.encode(t) for t in ROUND_TRIP]


def test_bpe_vocab_and_eot(bpe):
    assert 256 < bpe.vocab_size <= 320
    assert bpe.decode([bpe.eot_id]) == "<|endoftext|>"
    # Text that spells the separator is ordinary text, not a document boundary.
    assert bpe.eot_id not in bpe.encode("a literal <|endoftext|> inside")
    # Merges were learned: the training text takes far fewer tokens than bytes.
    text = _mixed_corpus()[0]
    assert len(bpe.encode(text)) < len(text.encode()) / 2
    assert all(0 <= i < bpe.vocab_size for i in bpe.encode(ROUND_TRIP[5]))


def test_bpe_save_and_reload(bpe, tmp_path):
    bpe.save(tmp_path)
    for tok in (load_tokenizer_dir(tmp_path), load_tokenizer(str(tmp_path / "tokenizer.json"))):
        assert (tok.vocab_size, tok.eot_id) == (bpe.vocab_size, bpe.eot_id)
        assert tok.encode_batch(ROUND_TRIP) == bpe.encode_batch(ROUND_TRIP)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FlmError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(FlmError, match="cannot load tokenizer"):
        load_tokenizer(str(bad))
    with pytest.raises(FlmError, match="no tokenizer"):
        load_tokenizer_dir(tmp_path / "nothing")


def test_tiktoken_rank_file(tmp_path, tiktoken_file):
    path = tiktoken_file(tmp_path / "tiny.tiktoken")
    tok = load_tokenizer(f"tiktoken:{path}")
    assert tok.eot_id == 258 and tok.vocab_size == 259
    assert tok.encode("the") == [257]
    assert tok.encode("th") == [256]
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.eot_id not in tok.encode("<|endoftext|>")
    save_dir = tmp_path / "saved"
    tok.save(save_dir)
    path.unlink()  # the saved folder must not depend on the original file
    again = load_tokenizer_dir(save_dir)
    assert again.encode_batch(ROUND_TRIP) == tok.encode_batch(ROUND_TRIP) and again.eot_id == 258


def test_tiktoken_errors(tmp_path, tiktoken_file):
    with pytest.raises(FlmError, match="missing.tiktoken"):
        load_tokenizer(f"tiktoken:{tmp_path / 'missing.tiktoken'}")
    bad = tiktoken_file(tmp_path / "bad.tiktoken")
    bad.write_bytes(bad.read_bytes() + b"this-is-not-a-rank-line\n")
    with pytest.raises(FlmError, match=r"bad\.tiktoken:259"):
        load_tokenizer(f"tiktoken:{bad}")
    partial = tmp_path / "partial.tiktoken"
    partial.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(100)))
    with pytest.raises(FlmError, match="single-byte"):
        load_tokenizer(f"tiktoken:{partial}")


# --- corpora ------------------------------------------------------------------------------------------------


def test_kjv_starts_with_genesis_and_is_deterministic():
    docs = list(iter_documents("kjv", max_chars=5000))
    assert docs[0].startswith("In the beginning God created the heaven and the earth. And the earth was")
    assert sum(map(len, docs)) == 5000
    assert docs == list(iter_documents("kjv", max_chars=5000))


def test_zh_idioms_and_bundled_mix():
    zh = list(iter_documents("zh-idioms", max_chars=3000))
    assert len(zh) > 5 and all(CJK.search(d) for d in zh)
    assert zh == list(iter_documents("zh-idioms", max_chars=3000))
    bundled = list(iter_documents("bundled", max_chars=10000))
    assert any("God" in d for d in bundled) and sum(bool(CJK.search(d)) for d in bundled) > 5


def test_folder_corpus(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "line one"}\n\n{"text": "line two", "id": 2}\n')
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("ignored")
    assert list(iter_documents(str(tmp_path), None)) == ["first file\n", "second file\n", "line one", "line two"]
    assert list(iter_documents(str(tmp_path / "sub" / "c.jsonl"), max_chars=10)) == ["line one", "li"]


def test_folder_corpus_errors(tmp_path):
    with pytest.raises(FlmError, match="corpus not found"):
        list(iter_documents(str(tmp_path / "nope"), None))
    with pytest.raises(FlmError, match="no .txt or .jsonl"):
        list(iter_documents(str(tmp_path), None))
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(FlmError, match=r"d\.jsonl:2"):
        list(iter_documents(str(tmp_path), None))


# --- shards -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size, itemsize", [(1000, 2), (65536, 2), (70000, 4)])
def test_shard_round_trip(tmp_path, vocab_size, itemsize):
    tokens = np.random.default_rng(0).integers(0, vocab_size, size=1234)
    tokens[-1] = vocab_size - 1
    path = tmp_path / "s.bin"
    write_shard(path, tokens, vocab_size)
    assert path.stat().st_size == HEADER_SIZE + tokens.size * itemsize
    assert not list(tmp_path.glob("*.tmp"))
    got = read_shard(path)
    assert isinstance(got, np.memmap) and not got.flags.writeable and got.dtype.itemsize == itemsize
    np.testing.assert_array_equal(got, tokens)
    header = read_shard_header(path)
    assert (header.vocab_size, header.token_count, header.version) == (vocab_size, 1234, 1)


def test_write_shard_refuses_out_of_vocab(tmp_path):
    with pytest.raises(FlmError, match=r"\[0, 100\)"):
        write_shard(tmp_path / "s.bin", np.array([1, 100]), 100)
    assert not list(tmp_path.iterdir())


def _corrupt(raw: bytes, how: str) -> bytes:
    if how == "magic":
        return b"NOTSHARD" + raw[8:]
    if how == "version":
        return raw[:8] + struct.pack("<I", 7) + raw[12:]
    if how == "dtype":
        return raw[:12] + struct.pack("<I", 3) + raw[16:]
    if how == "truncated":
        return raw[:-1]
    if how == "trailing":
        return raw + b"\0\0"
    return raw[:HEADER_SIZE - 1]  # shorter than the header


@pytest.mark.parametrize("how, message", [("magic", "magic"), ("version", "version"), ("dtype", "dtype code"),
                                          ("truncated", "truncated"), ("trailing", "trailing"),
                                          ("short", "shorter than")])
def test_read_shard_rejects_damage(tmp_path, how, message):
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(10), 50)
    bad = tmp_path / f"damaged_{how}.bin"
    bad.write_bytes(_corrupt(good.read_bytes(), how))
    with pytest.raises(FlmError, match=message) as err:
        read_shard(bad)
    assert bad.name in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["shard", "mask"])
def test_a_flipped_reserved_header_byte_is_damage(tmp_path, kind):
    """Bytes 32-63 of the header follow the documented fields and must be zero: each one flipped alone is
    reported, naming the file and the byte, rather than read past."""
    good = tmp_path / f"good.{kind}"
    write, read = (lambda p: write_shard(p, np.arange(10), 50), read_shard) if kind == "shard" else \
        (lambda p: write_mask(p, np.arange(10) % 2), read_mask)
    write(good)
    raw = good.read_bytes()
    assert raw[32:HEADER_SIZE] == bytes(HEADER_SIZE - 32)
    read(good)
    for at in range(32, HEADER_SIZE):
        bad = tmp_path / f"flipped_{at}.{kind}"
        bad.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:])
        with pytest.raises(FlmError, match=f"reserved header byte {at} is 0xff, not zero") as err:
            read(bad)
        assert bad.name in str(err.value) and "\n" not in str(err.value)


# --- prepare ------------------------------------------------------------------------------------------------


def _tiny_corpus(root):
    root.mkdir()
    for i in range(12):
        (root / f"doc{i:02d}.txt").write_text(f"Text file {i}: the quick brown fox jumps over the lazy dog.\n"
                                              f"第{i}章：天地玄黄，宇宙洪荒。")
    lines = [json.dumps({"text": f"JSON line {i}: 学而时习之，不亦说乎？ Rain {i}."}, ensure_ascii=False)
             for i in range(30)]
    (root / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _cfg(corpus, out, **kw):
    return DataConfig(corpus=str(corpus), dir=str(out), vocab_size=300, val_fraction=0.2, shard_tokens=400, **kw)


def _split_text(data, shards):
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in shards])
    assert tokens[-1] == data.eot_id
    return data.tokenizer().decode(tokens).split("<|endoftext|>")[:-1]


def test_prepare_tiny_corpus(tmp_path):
    corpus = _tiny_corpus(tmp_path / "corpus")
    logs = []
    data = prepare(_cfg(corpus, tmp_path / "out"), log=logs.append)
    assert (tmp_path / "out" / "meta.json").is_file()
    assert data.train_tokens > 0 and data.val_tokens > 0 and len(data.train_shards) > 1
    assert all(read_shard_header(p).token_count <= 400 for p in data.train_shards + data.val_shards)
    docs = list(iter_documents(str(corpus), None))
    train_docs, val_docs = split_documents(docs, 0.2)
    assert val_docs and train_docs
    assert _split_text(data, data.train_shards) == train_docs
    assert _split_text(data, data.val_shards) == val_docs
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == len(train_docs) and meta["vocab_size"] == data.vocab_size

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    logs.clear()
    again = prepare(_cfg(corpus, tmp_path / "out"), log=logs.append)
    assert any("reusing" in line for line in logs) and len(logs) == 1
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes
    assert again.train_shards == data.train_shards and again.val_tokens == data.val_tokens

    changed = prepare(_cfg(corpus, tmp_path / "out", max_chars=500), log=lambda _: None)
    assert changed.train_tokens + changed.val_tokens < data.train_tokens + data.val_tokens
    assert sorted((tmp_path / "out").glob("*_?????.bin")) == sorted(changed.train_shards + changed.val_shards)


def test_prepare_with_tiktoken(tmp_path, tiktoken_file):
    corpus = _tiny_corpus(tmp_path / "corpus")
    ranks = tiktoken_file(tmp_path / "tiny.tiktoken")
    cfg = DataConfig(corpus=str(corpus), dir=str(tmp_path / "out"), tokenizer=f"tiktoken:{ranks}", val_fraction=0.2)
    data = prepare(cfg, log=lambda _: None)
    assert (data.vocab_size, data.eot_id) == (259, 258)
    assert _split_text(data, data.val_shards) == split_documents(list(iter_documents(str(corpus), None)), 0.2)[1]


def test_prepare_malformed_jsonl(tmp_path):
    corpus = _tiny_corpus(tmp_path / "corpus")
    (corpus / "zz.jsonl").write_text('{"text": "fine"}\n{"text": "broken"\n')
    with pytest.raises(FlmError, match=r"zz\.jsonl:2"):
        prepare(_cfg(corpus, tmp_path / "out"), log=lambda _: None)
    assert not (tmp_path / "out" / "meta.json").exists()


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_crash_midway_keeps_the_prepared_folder(tmp_path, monkeypatch):
    corpus = _tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    good = prepare(_cfg(corpus, out), log=lambda _: None)  # a complete folder, about to be redone
    before = _files(out)

    calls = []
    real = ShardFile.close

    def flaky(self):
        calls.append(self.path)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        real(self)

    monkeypatch.setattr(ShardFile, "close", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare(_cfg(corpus, out, max_chars=1000), log=lambda _: None)
    monkeypatch.undo()
    # The earlier preparation is still the prepared folder, byte for byte (the new one was being staged).
    assert _files(out) == before
    assert load_prepared(out).train_tokens == good.train_tokens
    # Preparing again finishes the new one and removes what the old one had and the new one has not.
    redone = prepare(_cfg(corpus, out, max_chars=1000), log=lambda _: None)
    assert redone.train_tokens < good.train_tokens
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in redone.train_shards + redone.val_shards] + ["meta.json", "tokenizer.json"])


def test_interrupted_switch_is_completed(tmp_path, monkeypatch):
    corpus = _tiny_corpus(tmp_path / "corpus")
    reference = prepare(_cfg(corpus, tmp_path / "reference", max_chars=1000), log=lambda _: None)
    out = tmp_path / "out"
    prepare(_cfg(corpus, out), log=lambda _: None)

    moved = []
    real = os.replace

    def killed_midway(src, dst):  # the third shard moved into the folder is where the "kill" happens
        if Path(dst).parent == out and Path(dst).suffix == ".bin":
            moved.append(dst)
            if len(moved) == 3:
                raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(corpus, out, max_chars=1000), log=lambda _: None)
    monkeypatch.undo()
    with pytest.raises(FlmError, match="run `flm prepare` first"):
        load_prepared(out)  # between the two meta.json files the folder reads as not prepared
    logs = []
    done = prepare(_cfg(corpus, out, max_chars=1000), log=logs.append)
    assert "completing the switch" in logs[0]
    assert {p.name for p in done.train_shards + done.val_shards} == {
        p.name for p in reference.train_shards + reference.val_shards}
    assert {n: b for n, b in _files(out).items() if n != "meta.json"} == {
        n: b for n, b in _files(tmp_path / "reference").items() if n != "meta.json"}
    assert not list(out.glob(".prepare-*"))


def test_load_prepared_checks_shards(tmp_path):
    with pytest.raises(FlmError, match="no prepared data"):
        load_prepared(tmp_path)
    data = prepare(_cfg(_tiny_corpus(tmp_path / "corpus"), tmp_path / "out"), log=lambda _: None)
    shard = data.val_shards[0]
    write_shard(shard, np.arange(3), data.vocab_size)
    with pytest.raises(FlmError, match="does not match"):
        load_prepared(tmp_path / "out")
    shard.unlink()
    with pytest.raises(FlmError, match=shard.name):
        load_prepared(tmp_path / "out")


# --- loader -------------------------------------------------------------------------------------------------

N_TOKENS, SEQ = 1001, 10  # 100 windows


@pytest.fixture()
def stream_shards(tmp_path):
    """The stream 0, 1, ..., N-1 split over three uneven shards, so windows cross shard boundaries."""
    tokens = np.arange(N_TOKENS)
    paths = []
    for i, part in enumerate(np.split(tokens, [333, 334])):
        paths.append(tmp_path / f"train_{i:05d}.bin")
        write_shard(paths[-1], part, 2000)
    return paths


def _batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(a, b))


def test_loader_windows_match_the_stream(stream_shards):
    loader = TokenLoader(stream_shards, batch_size=4, seq_len=SEQ, seed=1)
    starts = []
    for inputs, targets in _batches(loader, 25):  # exactly one epoch of 100 windows
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.shape == targets.shape == (4, SEQ)
        assert (targets[:, :-1] == inputs[:, 1:]).all()
        for row, target in zip(inputs.numpy(), targets.numpy()):
            assert row[0] % SEQ == 0
            np.testing.assert_array_equal(row, np.arange(row[0], row[0] + SEQ))
            np.testing.assert_array_equal(target, row + 1)
            starts.append(int(row[0]))
    assert sorted(starts) == list(range(0, 1000, SEQ)) and starts != sorted(starts)


def test_loader_without_shuffle_reads_in_order(stream_shards):
    loader = TokenLoader(stream_shards, batch_size=5, seq_len=SEQ, seed=1, shuffle=False)
    first = [int(x) for inputs, _ in _batches(loader, 21) for x in inputs[:, 0]]
    assert first == list(range(0, 1000, SEQ)) + list(range(0, 50, SEQ))


def test_loader_seeds(stream_shards):
    a = _batches(TokenLoader(stream_shards, 4, SEQ, seed=7), 30)
    assert _same(a, _batches(TokenLoader(stream_shards, 4, SEQ, seed=7), 30))
    assert not _same(a, _batches(TokenLoader(stream_shards, 4, SEQ, seed=8), 30))
    more = _batches(TokenLoader(stream_shards, 4, SEQ, seed=7), 50)[30:]
    starts = [int(x) for inputs, _ in a + more for x in inputs[:, 0]]
    epoch0, epoch1 = starts[:100], starts[100:200]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # each epoch is a fresh permutation


def test_loader_resume_across_epoch_boundary(stream_shards):
    reference = _batches(TokenLoader(stream_shards, 6, SEQ, seed=3), 40)  # 240 samples: epochs 0, 1, 2
    first = TokenLoader(stream_shards, 6, SEQ, seed=3)
    got = _batches(first, 15)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"samples_seen": 90, "seed": 3, "seq_len": SEQ, "n_windows": 100, "shuffle": True}
    resumed = TokenLoader(stream_shards, 6, SEQ, seed=3)
    resumed.load_state_dict(state)
    got += _batches(resumed, 25)
    assert _same(got, reference)


def test_loader_ranks_split_the_global_batch(stream_shards):
    whole = TokenLoader(stream_shards, 8, SEQ, seed=5)
    ranks = [TokenLoader(stream_shards, 4, SEQ, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):  # crosses two epoch boundaries, one of them inside a batch
        inputs, targets = whole.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(inputs, torch.cat([p[0] for p in parts]))
        assert torch.equal(targets, torch.cat([p[1] for p in parts]))
    assert ranks[1].state_dict() == whole.state_dict()


def test_loader_refuses_mismatched_state_and_tiny_data(stream_shards):
    loader = TokenLoader(stream_shards, 4, SEQ, seed=1)
    for key, value in (("seq_len", 20), ("n_windows", 99), ("seed", 2), ("shuffle", False)):
        with pytest.raises(FlmError, match=key):
            loader.load_state_dict({**loader.state_dict(), key: value})
    with pytest.raises(FlmError, match="too small"):
        TokenLoader(stream_shards, batch_size=60, seq_len=SEQ, seed=1, world_size=2)
    with pytest.raises(FlmError, match="rank"):
        TokenLoader(stream_shards, 4, SEQ, seed=1, rank=2, world_size=2)


def test_eval_batches(stream_shards, tmp_path):
    batches = list(iter_eval_batches(stream_shards, batch_size=8, seq_len=SEQ, max_batches=100))
    assert len(batches) == 12  # 100 windows -> 12 full batches of 8
    starts = [int(x) for inputs, _ in batches for x in inputs[:, 0]]
    assert starts == list(range(0, 960, SEQ))
    assert _same(batches[:3], list(iter_eval_batches(stream_shards, 8, SEQ, max_batches=3)))
    small = tmp_path / "val.bin"
    write_shard(small, np.arange(35), 100)
    (only,) = iter_eval_batches([small], batch_size=8, seq_len=SEQ, max_batches=5)
    assert only[0].shape == (3, SEQ)
    with pytest.raises(FlmError, match=r"^validation split too small: 35 tokens, need at least 41 for one window "
                                       r"of seq_len 40$"):
        list(iter_eval_batches([small], batch_size=8, seq_len=40, max_batches=5))
    # A source with a loss mask (instruction or teacher data): its validation targets are ignored where the mask is
    # 0, as in training. Tokens 0..34, every third one not a target.
    mask = tmp_path / "val.mask"
    write_mask(mask, (np.arange(35) % 3 != 0).astype(np.uint8))
    (masked,) = iter_eval_batches([small], batch_size=8, seq_len=SEQ, max_batches=5, masks=[mask])
    assert masked[0].tolist() == [list(range(s, s + SEQ)) for s in (0, 10, 20)]
    assert masked[1].tolist() == [[p if p % 3 else -100 for p in range(s + 1, s + SEQ + 1)] for s in (0, 10, 20)]
