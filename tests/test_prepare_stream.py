"""Streaming `flm prepare`: workers, parts and merge, input formats, memory, interruptions and damaged shards.

Expectations are computed here from the documented rules (the split hash, the shard layout) and the tokenizer
applied directly to the documents, not from flm's own preparation code.
"""

import dataclasses
import gzip
import hashlib
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flm.config.schema import DataConfig, SourceConfig
from flm.data import iter_documents, load_prepared, load_tokenizer, prepare, read_shard, train_bpe
from flm.data import encoding
from flm.data import parts as parts_module
from flm.data.prepare import config_fingerprint, merge, prepare_part, prepare_tokenizer
from flm.data.shards import HEADER_SIZE
from flm.errors import FlmError

SALT = b"flm-split-v1"
QUIET = {"log": lambda _: None}


def score(doc: str) -> float:
    """The split hash as docs/data.md states it: blake2b-64 of the UTF-8 text, salted, read little-endian."""
    return int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8, salt=SALT).digest(), "little") / 2**64


def shard_file(ids: list[int], vocab_size: int) -> bytes:
    """A shard as the format in flm/data/shards.py describes it (uint16 ids for vocabularies up to 65536)."""
    header = struct.pack("<8sIIQQ", b"FLMSHARD", 1, 2, vocab_size, len(ids)).ljust(HEADER_SIZE, b"\0")
    return header + np.array(ids, dtype="<u2").tobytes()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "meta.json"}


def meta_without_dir(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    del meta["config"]["dir"]
    return meta


def documents_of(data, source=None) -> dict[str, list[tuple[int, ...]]]:
    """Each split's documents as token tuples (cut at end-of-text), sorted: what a folder holds, in any order."""
    shards = {"train": source.train_shards if source else data.train_shards,
              "val": source.val_shards if source else data.val_shards}
    out = {}
    for split, paths in shards.items():
        tokens = np.concatenate([np.asarray(read_shard(p)) for p in paths]) if paths else np.array([], int)
        ends = np.flatnonzero(tokens == data.eot_id)
        out[split] = sorted(tuple(doc) for doc in np.split(tokens, ends + 1)[:-1])
    return out


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def sample_docs(n: int) -> list[str]:
    return [f"Document {i}: " + "lorem ipsum dolor sit " * (i % 7 + 1) + f"天地玄黄{i}" for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    train_bpe(sample_docs(40) + ["Question? answer. In the beginning"] * 5, vocab_size=300).save(folder)
    return folder / "tokenizer.json"


def cfg_for(corpus, out, tokenizer="bpe", **kw) -> DataConfig:
    return DataConfig(**{"corpus": str(corpus), "dir": str(out), "tokenizer": str(tokenizer), "vocab_size": 300,
                         "val_fraction": 0.2, "shard_tokens": 500, **kw})


# --- workers ------------------------------------------------------------------------------------------------


def test_one_and_two_workers_write_the_hand_computed_shards(tmp_path, tokenizer_file, monkeypatch):
    docs = sample_docs(80)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    monkeypatch.setattr(parts_module, "_CHUNK_CHARS", 300)  # ~30 chunks: the first 4 here, then two workers
    started = []

    class Recorded(encoding.ProcessPoolExecutor):
        def __init__(self, workers, **kwargs):
            started.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(encoding, "ProcessPoolExecutor", Recorded)
    for workers in (1, 2):
        prepare(cfg_for(corpus, tmp_path / f"w{workers}", tokenizer_file), workers=workers, **QUIET)
    assert started == [2]
    assert files(tmp_path / "w1") == files(tmp_path / "w2")
    assert meta_without_dir(tmp_path / "w1") == meta_without_dir(tmp_path / "w2")

    tok = load_tokenizer(str(tokenizer_file))
    for split, held in (("train", False), ("val", True)):
        ids = [t for d in docs if (score(d) < 0.2) == held for t in tok.encode(d) + [tok.eot_id]]
        assert 0 < len(ids) < 50_000
        expected = {f"{split}_{k // 500:05d}.bin": shard_file(ids[k:k + 500], tok.vocab_size)
                    for k in range(0, len(ids), 500)}
        assert {n: b for n, b in files(tmp_path / "w1").items() if n.startswith(split + "_")} == expected


# --- parts and merge ----------------------------------------------------------------------------------------


def mixture_cfg(tmp_path, out) -> DataConfig:
    """Text, instruction and teacher sources; the files are written once (their mtime is in the fingerprint)."""
    corpus, instruct = tmp_path / "corpus.jsonl", tmp_path / "instruct.jsonl"
    if not corpus.exists():
        write_jsonl(corpus, sample_docs(60))
        instruct.write_text("".join(json.dumps({"prompt": f"Question {i}? ", "response": f"answer {i}."}) + "\n"
                                    for i in range(40)))
    return cfg_for(corpus, out, sources=[SourceConfig(kind="text", weight=2),
                                         SourceConfig(kind="instruct", path=str(instruct)),
                                         SourceConfig(kind="teacher", path="bundled")])


def test_parts_in_any_order_then_merge_equal_one_run(tmp_path):
    prepare(mixture_cfg(tmp_path, tmp_path / "whole"), parts=3, **QUIET)

    cfg = mixture_cfg(tmp_path, tmp_path / "parts")
    with pytest.raises(FlmError, match="--tokenizer-only"):
        prepare_part(cfg, 0, 3, **QUIET)  # BPE is trained once, before the parts
    prepare_tokenizer(cfg, **QUIET)
    for part, workers in ((2, 1), (0, 2), (1, 1)):
        prepare_part(cfg, part, 3, workers=workers, **QUIET)
    prepare_part(cfg, 0, 4, **QUIET)  # a part of another split of the work
    with pytest.raises(FlmError, match="holds parts of 3 and of 4"):
        merge(cfg, **QUIET)
    (tmp_path / "parts" / f".prepare-{config_fingerprint(cfg)}" / "part-0000-of-0004.json").unlink()
    merged = merge(cfg, **QUIET)
    assert files(tmp_path / "parts") == files(tmp_path / "whole")
    assert meta_without_dir(tmp_path / "parts") == meta_without_dir(tmp_path / "whole")
    assert any(".bin" in name and "_p0002of0003_" in name for name in files(tmp_path / "parts"))

    # In one part the folder holds the same documents, tokens and tokenizer; only the order differs.
    single = prepare(mixture_cfg(tmp_path, tmp_path / "single"), **QUIET)
    assert (tmp_path / "single" / "tokenizer.json").read_bytes() == (tmp_path / "parts" / "tokenizer.json").read_bytes()
    for a, b in zip(single.sources, merged.sources):
        assert documents_of(single, a) == documents_of(merged, b)
    assert (single.train_tokens, single.val_tokens) == (merged.train_tokens, merged.val_tokens)
    assert single.meta["sources"][1]["train"]["loss_tokens"] == merged.meta["sources"][1]["train"]["loss_tokens"]


def test_a_split_left_empty_moves_the_lowest_hash_document_in_any_part(tmp_path, tokenizer_file):
    docs = sample_docs(7)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    fraction = min(map(score, docs)) / 2  # no document falls below it
    lowest = min(docs, key=score)
    for parts in (1, 3):
        cfg = cfg_for(corpus, tmp_path / f"p{parts}", tokenizer_file, val_fraction=fraction)
        data = prepare(cfg, parts=parts, **QUIET)
        tok = data.tokenizer()
        assert documents_of(data)["val"] == [tuple(tok.encode(lowest)) + (tok.eot_id,)]
        assert documents_of(data)["train"] == sorted(tuple(tok.encode(d)) + (tok.eot_id,) for d in docs
                                                     if d != lowest)


# --- the tokenizer ------------------------------------------------------------------------------------------


def test_bpe_trains_on_every_training_document_or_on_the_lowest_hashes(tmp_path):
    docs = sample_docs(50)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    train = [d for d in docs if score(d) >= 0.2]
    prepare(cfg_for(corpus, tmp_path / "all"), **QUIET)
    assert (tmp_path / "all" / "tokenizer.json").read_bytes() == _saved(train_bpe(train, 300), tmp_path / "a")

    limit = sum(map(len, train)) // 3
    by_score = sorted(train, key=score)
    sample = next(by_score[:k] for k in range(1, len(by_score)) if sum(map(len, by_score[:k])) >= limit)
    prepare(cfg_for(corpus, tmp_path / "sample", bpe_sample_chars=limit), **QUIET)
    assert (tmp_path / "sample" / "tokenizer.json").read_bytes() == _saved(
        train_bpe([d for d in train if d in sample], 300), tmp_path / "b")


def _saved(tok, folder: Path) -> bytes:
    tok.save(folder)
    return (folder / "tokenizer.json").read_bytes()


# --- input formats ------------------------------------------------------------------------------------------


def test_every_input_format_streams_the_same_documents(tmp_path, tokenizer_file):
    zstandard = pytest.importorskip("zstandard")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    docs = sample_docs(13)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "00.txt").write_text(docs[0], encoding="utf-8")
    write_jsonl(root / "01.jsonl", docs[1:4])
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[4:7]).encode()
    (root / "02.jsonl.gz").write_bytes(gzip.compress(lines))
    frames = [zstandard.ZstdCompressor().compress(json.dumps({"text": d}).encode() + b"\n") for d in docs[7:10]]
    (root / "sub" / "03.jsonl.zst").write_bytes(b"".join(frames))  # as `cat` or pzstd make them
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": docs[10:13] + ["  "]}), root / "sub" / "04.parquet",
                   row_group_size=2)
    (root / "notes.md").write_text("not a corpus file")
    (root / ".hidden.txt").write_text("hidden")
    assert list(iter_documents(str(root))) == docs
    assert list(iter_documents(str(root / "*.jsonl*"))) == docs[1:7]
    assert list(iter_documents(str(root / "**" / "*.md"))) == ["not a corpus file"]  # a glob reads any file
    data = prepare(cfg_for(root, tmp_path / "out", tokenizer_file), **QUIET)
    tok = data.tokenizer()
    assert documents_of(data)["train"] + documents_of(data)["val"] == sorted(
        [tuple(tok.encode(d)) + (tok.eot_id,) for d in docs if score(d) >= 0.2]) + sorted(
        [tuple(tok.encode(d)) + (tok.eot_id,) for d in docs if score(d) < 0.2])


def _bad_files(tmp_path: Path) -> list[tuple[Path, str]]:
    zstandard = pytest.importorskip("zstandard")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    good = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(50)).encode()
    cases = []
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(good)[:-30])
    cases.append((path, r"cut\.jsonl\.gz:\d+: cannot read"))
    path = tmp_path / "cut.jsonl.zst"  # zstandard's own stream reader would end quietly here
    path.write_bytes(zstandard.ZstdCompressor().compress(good)[:-5])
    cases.append((path, r"cut\.jsonl\.zst:\d+: cannot read \(the file ends inside a zstd frame"))
    path = tmp_path / "broken.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(good)[:20] + b"\xff" * 40)
    cases.append((path, r"broken\.jsonl\.zst:\d+: cannot read"))
    path = tmp_path / "line2.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "ok"}\n{"text": 3}\n'))
    cases.append((path, r"line2\.jsonl\.zst:2: malformed JSONL line"))
    path = tmp_path / "latin1.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    cases.append((path, r"latin1\.jsonl\.gz:3: not UTF-8"))
    path = tmp_path / "notext.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    cases.append((path, r'notext\.parquet: no "text" column \(columns: body\)'))
    path = tmp_path / "null.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), path)
    cases.append((path, r'null\.parquet: row 2: "text" is null'))
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    cases.append((path, r'numbers\.parquet: the "text" column holds int64'))
    cases.append((tmp_path / "none-*.jsonl", "no files match the corpus pattern"))
    return cases


def test_damaged_input_files_are_one_line_errors_naming_the_place(tmp_path):
    for path, message in _bad_files(tmp_path):
        with pytest.raises(FlmError, match=message) as err:
            list(iter_documents(str(path)))
        assert "\n" not in str(err.value)


# --- memory -------------------------------------------------------------------------------------------------

_PEAK_RSS = """
import json, random, resource, sys
from flm.config.schema import DataConfig
from flm.data.prepare import prepare
corpus, out, megabytes = sys.argv[1], sys.argv[2], float(sys.argv[3])
rng = random.Random(0)
words = "in the beginning god created heaven and earth light darkness water day night".split()
with open(corpus, "w") as f:
    written = 0
    while written < megabytes * 1e6:
        line = json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(50, 400)))}) + "\\n"
        written += f.write(line)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare(DataConfig(corpus=corpus, dir=out, vocab_size=300, bpe_sample_chars=500_000, shard_tokens=100_000),
        log=lambda _: None, workers=1)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    peaks = {}
    for megabytes in (2, 20):
        proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(tmp_path / f"c{megabytes}.jsonl"),
                               str(tmp_path / f"out{megabytes}"), str(megabytes)],
                              capture_output=True, text=True, timeout=120, check=True)
        before, peak = map(int, proc.stdout.split())  # KiB
        peaks[megabytes] = peak
        assert load_prepared(tmp_path / f"out{megabytes}").train_tokens > megabytes * 1e5
    # Holding the corpus (the text, or its tokens) would add at least the 18 MB of extra text; the implementation
    # before streaming added 9x that. Half of it leaves room for allocator noise (measured: about 2 MB).
    assert peaks[20] - peaks[2] < 18_000 / 2, peaks


# --- interruptions ------------------------------------------------------------------------------------------


def test_a_killed_prepare_leaves_the_prepared_folder_and_can_be_run_again(tmp_path, tokenizer_file, cli_process):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", sample_docs(40) * 400)
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\ncorpus = "{corpus}"\ndir = "{tmp_path / "out"}"\ntokenizer = "{tokenizer_file}"\n'
                      "shard_tokens = 2000\n")
    prepare_args = ("prepare", "-c", config, "--workers", "1")
    cli_process(*prepare_args, "--set", "data.max_chars=20000", timeout=120, check=True)
    before = files(tmp_path / "out")
    meta = (tmp_path / "out" / "meta.json").read_bytes()

    proc = cli_process.start(*prepare_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "out").glob(".prepare-*/train_00003.bin")):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert files(tmp_path / "out") == before and (tmp_path / "out" / "meta.json").read_bytes() == meta
    assert load_prepared(tmp_path / "out").train_tokens == json.loads(meta)["splits"]["train"]["tokens"]

    cli_process(*prepare_args, timeout=120, check=True)
    assert load_prepared(tmp_path / "out").train_tokens > 20 * json.loads(meta)["splits"]["train"]["tokens"]
    assert not list((tmp_path / "out").glob(".prepare-*"))


# --- damaged shards, the command line -----------------------------------------------------------------------


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


@pytest.fixture()
def small_run(tmp_path, tokenizer_file) -> Path:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", sample_docs(200))
    config = tmp_path / "c.toml"
    config.write_text(f"""
[model]
n_layers = 1
d_model = 16
n_heads = 1
head_dim = 16
max_seq_len = 16
[data]
corpus = "{corpus}"
dir = "{tmp_path / 'data'}"
tokenizer = "{tokenizer_file}"
val_fraction = 0.2
shard_tokens = 3000
[train]
run_dir = "{tmp_path / 'run'}"
batch_size = 2
seq_len = 16
max_steps = 1
warmup_steps = 0
progress = false
tensorboard = false
sample_tokens = 0
""")
    return config


def test_the_command_line_prepares_in_parts(small_run, tmp_path, cli_process):
    config = str(small_run)
    assert cli_process("prepare", "-c", config, "--tokenizer-only", "--set", f"data.dir='{tmp_path / 'other'}'"
                   ).returncode == 0
    assert list((tmp_path / "other").glob(".prepare-*/tokenizer.json"))
    # A given tokenizer is installed by the first part that needs it.
    assert cli_process("prepare", "-c", config, "--part", "1/2", "--workers", "2").returncode == 0
    one_line_error(cli_process("prepare", "-c", config), "holds 1 of 2 prepared parts", "(part 0)")
    one_line_error(cli_process("prepare", "-c", config, "--merge"), "part 0 of 2 not prepared yet")
    assert cli_process("prepare", "-c", config, "--part", "0/2").returncode == 0
    assert "prepared" in cli_process("prepare", "-c", config).stdout  # a complete set is merged
    assert load_prepared(tmp_path / "data").meta["parts"] == 2
    assert "reusing" in cli_process("prepare", "-c", config).stdout


def test_a_truncated_shard_is_one_line_and_exit_2_until_prepared_again(small_run, tmp_path, cli_process):
    assert cli_process("prepare", "-c", str(small_run)).returncode == 0
    shard = tmp_path / "data" / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    for command in ("prepare", "train"):
        one_line_error(cli_process(command, "-c", str(small_run)), str(shard), "truncated", "flm prepare --force")
    assert cli_process("prepare", "-c", str(small_run), "--force").returncode == 0
    assert load_prepared(tmp_path / "data").train_tokens > 0


def test_an_out_of_vocabulary_id_is_found_when_the_shard_is_opened(small_run, tmp_path, cli_process):
    assert cli_process("prepare", "-c", str(small_run)).returncode == 0
    shard = tmp_path / "data" / "train_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[HEADER_SIZE + 2 * 77:HEADER_SIZE + 2 * 78] = struct.pack("<H", 4000)  # id 4000 in a 300-id vocabulary
    shard.write_bytes(bytes(raw))
    with pytest.raises(FlmError, match=r"token id 4000 at position 77 is outside its vocabulary of 300 ids"):
        read_shard(shard)
    one_line_error(cli_process("train", "-c", str(small_run)), str(shard), "token id 4000 at position 77")


# --- the fingerprint --------------------------------------------------------------------------------------------


def test_every_field_that_changes_the_prepared_files_is_in_the_fingerprint(tmp_path, tokenizer_file):
    base = cfg_for(tmp_path / "corpus.jsonl", tmp_path / "out")
    changes = {"corpus": str(tmp_path / "other.jsonl"), "tokenizer": str(tokenizer_file), "vocab_size": 400,
               "bpe_sample_chars": 1000, "val_fraction": 0.3, "shard_tokens": 600, "max_chars": 5000,
               "sources": [SourceConfig(kind="text")]}
    neutral = {"dir": str(tmp_path / "elsewhere"), "workers": 3}  # where the files go, and how fast
    assert set(changes) | set(neutral) == {f.name for f in dataclasses.fields(DataConfig)}
    for name, value in changes.items():
        assert config_fingerprint(dataclasses.replace(base, **{name: value})) != config_fingerprint(base), name
    for name, value in neutral.items():
        assert config_fingerprint(dataclasses.replace(base, **{name: value})) == config_fingerprint(base), name
    # A tokenizer file decides the vocabulary: BPE's size and sample no longer count.
    given = dataclasses.replace(base, tokenizer=str(tokenizer_file))
    for name, value in (("vocab_size", 400), ("bpe_sample_chars", 1000)):
        assert config_fingerprint(dataclasses.replace(given, **{name: value})) == config_fingerprint(given), name
    mixture = dataclasses.replace(base, sources=[SourceConfig(kind="text")])
    assert config_fingerprint(mixture) != config_fingerprint(
        dataclasses.replace(base, sources=[SourceConfig(kind="text", val_fraction=0.3)]))


def test_a_new_validation_fraction_prepares_the_split_again(tmp_path, tokenizer_file):
    docs = sample_docs(60)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    logs: list[str] = []
    prepare(cfg_for(corpus, tmp_path / "out", tokenizer_file), log=logs.append)
    data = prepare(cfg_for(corpus, tmp_path / "out", tokenizer_file, val_fraction=0.3), log=logs.append)
    assert not any("reusing" in line for line in logs)
    tok = load_tokenizer(str(tokenizer_file))
    by_hand = {split: sorted(tuple(tok.encode(d) + [tok.eot_id]) for d in docs if (score(d) < 0.3) == held)
               for split, held in (("train", False), ("val", True))}
    assert 0 < len(by_hand["val"]) < len(docs) and documents_of(data) == by_hand
    assert sum(score(d) < 0.2 for d in docs) < len(by_hand["val"])  # the old split held fewer documents
