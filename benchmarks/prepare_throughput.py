"""`flm prepare` throughput and peak memory, against Hugging Face `datasets` and against the tokenizer alone.

The corpus is built from text already on the machine: the Python sources of the installed packages, one JSONL
record per file (UTF-8 files only, sorted paths), at least --megabytes of text, plus its first tenth as a corpus
10x smaller. Files over --max-document-kb (generated tables, e.g. chardet's language models) are left out, so that
both corpora have documents of the same sizes: a document is tokenised whole, and inside the tokenizer that costs
memory in proportion to the largest document (docs/data.md), a term this benchmark keeps apart from corpus size.
All runs use the same tokenizer (byte-level BPE, 8192 ids, trained on the bundled corpus as the demo's):

- flm: `flm prepare --workers N` (a subprocess; everything from start to exit: read, split, tokenise, write);
- peer: `datasets.load_dataset("json")` + `Dataset.map(batched=True, num_proc=N)` writing token-id arrays to
  its Arrow cache, the same tokenizer called with `encode_batch_fast` (a subprocess, import to exit);
- ceiling: the tokenizer's own `encode_batch_fast` (and `encode_batch`) over the documents already in memory, on
  N threads, timing the encoding only;
- what a part of a parallel prepare pays for reading the whole corpus: `flm prepare --part 0/100`.

Tokens/s counts every document's tokens plus its end-of-text, the same count for all three. Each run is its own
process tree, polled from /proc every 50 ms: peak RSS (summed over the tree) and peak anonymous memory (PSS, so
pages shared by forked workers count once). Runs go one at a time.

    python benchmarks/prepare_throughput.py                          # >= 100 MB, writes docs/results/prepare.*
    python benchmarks/prepare_throughput.py --megabytes 5 --out /tmp/prepare-bench   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from flm.files import write_json_report

REPO = Path(__file__).resolve().parent.parent

_PEER = r"""
import os, sys
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # N processes, one thread each, as flm's workers
import datasets
from tokenizers import Tokenizer
corpus, tokenizer, cache, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = Tokenizer.from_file(tokenizer)
tok.encode_special_tokens = True
eot = tok.token_to_id("<|endoftext|>")

def encode(batch):
    return {"ids": [e.ids + [eot] for e in tok.encode_batch_fast(batch["text"], add_special_tokens=False)]}

ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
ds = ds.map(encode, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=["text"])
import pyarrow.compute as pc
print(sum(pc.sum(pc.list_value_length(t["ids"])).as_py() for t in ds.with_format("arrow").iter(10_000)))
"""

_CEILING = r"""
import json, os, sys, time
threads = int(sys.argv[3])
os.environ["RAYON_NUM_THREADS"] = str(threads)
os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
tok.encode_special_tokens = True
with open(sys.argv[1], encoding="utf-8") as f:
    docs = [json.loads(line)["text"] for line in f]
encode = getattr(tok, sys.argv[4])
started = time.perf_counter()
tokens = 0
for i in range(0, len(docs), 1000):
    tokens += sum(len(e.ids) + 1 for e in encode(docs[i:i + 1000], add_special_tokens=False))
print(tokens, time.perf_counter() - started)
"""


def build_corpus(path: Path, megabytes: float, max_document_kb: float) -> tuple[int, int]:
    """JSONL of the installed packages' .py files until `megabytes` of text; (documents, text bytes)."""
    roots = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    files = sorted(p for root in roots for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    documents = size = 0
    with open(path, "w", encoding="utf-8") as out:
        for name in files:
            try:
                raw = Path(name).read_bytes()
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not text.strip() or len(raw) > max_document_kb * 1000:
                continue
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            documents += 1
            size += len(raw)
            if size >= megabytes * 1e6:
                return documents, size
    raise SystemExit(f"only {size / 1e6:.0f} MB of Python sources here; ask for fewer --megabytes")


def first_tenth(path: Path, small: Path) -> tuple[int, int]:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    target = sum(len(json.loads(line)["text"].encode()) for line in lines) / 10
    documents = size = 0
    with open(small, "w", encoding="utf-8") as out:
        for line in lines:
            out.write(line)
            documents += 1
            size += len(json.loads(line)["text"].encode())
            if size >= target:
                break
    return documents, size


def demo_tokenizer(path: Path) -> None:
    """BPE as the demo trains it (configs/demo.toml, without its teacher propositions and label tokens)."""
    from flm.data import iter_documents, train_bpe
    from flm.data.split import split_documents

    train, _ = split_documents(list(iter_documents("bundled")), 0.01)
    train_bpe(train, 8192).save(path.parent)


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `cmd`, polling its process tree; wall seconds, peak RSS and anonymous PSS (MiB), stdout."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_rss = peak_anon = 0
    while proc.poll() is None:
        rss, anon = _tree_memory(proc.pid)
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        time.sleep(0.05)
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"seconds": seconds, "peak_rss_mib": peak_rss / 1024, "peak_anon_mib": peak_anon / 1024,
            "stdout": out}


def _tree_memory(root: int) -> tuple[int, int]:
    """(RSS, anonymous PSS) in KiB summed over `root` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    rss = anon = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith(" "))
            rss += int(fields["Rss"].split()[0])
            anon += int(fields["Pss_Anon"].split()[0])
        except (OSError, KeyError, ValueError):
            continue
    return rss, anon


def flm_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    config = out.with_suffix(".toml")
    config.write_text(f'[data]\ncorpus = "{corpus}"\ndir = "{out}"\ntokenizer = "{tokenizer}"\n')
    result = run_measured([sys.executable, "-m", "flm.cli.main", "prepare", "-c", str(config), "--workers",
                           str(workers)])
    meta = json.loads((out / "meta.json").read_text())
    result["tokens"] = sum(meta["splits"][s]["tokens"] for s in ("train", "val"))
    result["shards_sha256"] = _digest(out)
    return result


def flm_part(corpus: Path, tokenizer: Path, out: Path, parts: int) -> dict:
    """`flm prepare --part 0/N`: the whole corpus read and hashed, 1/N of it tokenised (what a part costs)."""
    config = out.with_suffix(".toml")
    config.write_text(f'[data]\ncorpus = "{corpus}"\ndir = "{out}"\ntokenizer = "{tokenizer}"\n')
    result = run_measured([sys.executable, "-m", "flm.cli.main", "prepare", "-c", str(config), "--workers", "1",
                           "--part", f"0/{parts}"])
    (manifest,) = out.glob(f".prepare-*/part-0000-of-{parts:04d}.json")
    splits = json.loads(manifest.read_text())["sources"][0]
    result["tokens"] = sum(splits[s]["tokens"] for s in ("train", "val"))
    return result


def _digest(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.bin")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def peer(corpus: Path, tokenizer: Path, cache: Path, workers: int) -> dict:
    result = run_measured([sys.executable, "-c", _PEER, str(corpus), str(tokenizer), str(cache), str(workers)])
    result["tokens"] = int(result["stdout"].split()[0])
    return result


def ceiling(corpus: Path, tokenizer: Path, threads: int, method: str) -> dict:
    result = run_measured([sys.executable, "-c", _CEILING, str(corpus), str(tokenizer), str(threads), method])
    tokens, seconds = result["stdout"].split()
    result["tokens"], result["seconds"] = int(tokens), float(seconds)  # the encoding alone
    return result


def machine() -> dict:
    import tokenizers
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    versions = {"python": platform.python_version(), "torch": torch.__version__, "tokenizers": tokenizers.__version__}
    try:
        import datasets

        versions["datasets"] = datasets.__version__
    except ImportError:
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "versions": versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=100.0, help="text in the larger corpus (default 100)")
    parser.add_argument("--max-document-kb", type=float, default=100.0, help="leave out larger files (default 100)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "prepare"),
                        help="results as OUT.json and OUT.md")
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        corpora = {"large": work / "large.jsonl", "small": work / "small.jsonl"}
        sizes = {"large": build_corpus(corpora["large"], args.megabytes, args.max_document_kb)}
        sizes["small"] = first_tenth(corpora["large"], corpora["small"])
        for name, (docs, size) in sizes.items():
            print(f"{name} corpus: {docs:,} documents, {size / 1e6:.1f} MB of text")
        tokenizer = work / "tokenizer" / "tokenizer.json"
        demo_tokenizer(tokenizer)
        runs = []
        for name in ("large", "small"):
            for n in args.workers:
                todo = [("flm prepare", lambda: flm_prepare(corpora[name], tokenizer, work / f"flm-{name}-{n}", n)),
                        ("datasets map", lambda: peer(corpora[name], tokenizer, work / f"hf-{name}-{n}", n))]
                if name == "large":
                    todo += [(f"tokenizer {m}", lambda m=m: ceiling(corpora[name], tokenizer, n, m))
                             for m in ("encode_batch_fast", "encode_batch")]
                if name == "large" and n == 1:
                    todo.append(("flm prepare --part 0/100", lambda: flm_part(corpora[name], tokenizer,
                                                                                work / "flm-part", 100)))
                for what, run in todo:
                    result = run()
                    result.pop("stdout")
                    result.update(what=what, corpus=name, workers=n,
                                  tokens_per_s=result["tokens"] / result["seconds"])
                    runs.append(result)
                    print(f"{name:5s} {what:30s} x{n}: {result['tokens']:,} tokens in {result['seconds']:.1f}s = "
                          f"{result['tokens_per_s']:,.0f} tokens/s, peak RSS {result['peak_rss_mib']:.0f} MiB, "
                          f"anonymous {result['peak_anon_mib']:.0f} MiB", flush=True)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": ".venv/bin/python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
              "machine": machine(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "corpora": {name: {"documents": d, "text_bytes": s} for name, (d, s) in sizes.items()},
              "max_document_kb": args.max_document_kb,
              "runs": runs, "wall_seconds": time.perf_counter() - started}
    report["ratios"] = ratios(runs, args.workers)
    for line in report["ratios"]["lines"]:
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_report(out.with_suffix(".json"), report)
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} in {report['wall_seconds']:.0f}s")


def ratios(runs: list[dict], workers: list[int]) -> dict:
    def get(what: str, corpus: str, n: int) -> dict:
        return next(r for r in runs if (r["what"], r["corpus"], r["workers"]) == (what, corpus, n))

    lines, values = [], {}
    for n in workers:
        ours = get("flm prepare", "large", n)
        for other in ("tokenizer encode_batch_fast", "tokenizer encode_batch", "datasets map"):
            key = f"flm/{other.split()[-1]} x{n}"
            values[key] = ours["tokens_per_s"] / get(other, "large", n)["tokens_per_s"]
            lines.append(f"throughput, {n} worker(s): flm prepare / {other} = {values[key]:.3f}")
        for what in ("flm prepare", "datasets map"):
            key = f"{what} peak RSS large/small x{n}"
            values[key] = get(what, "large", n)["peak_rss_mib"] / get(what, "small", n)["peak_rss_mib"]
            lines.append(f"peak RSS, {n} worker(s): {what} on the 10x corpus / on the small one = {values[key]:.2f}")
    part, whole = get("flm prepare --part 0/100", "large", 1), get("flm prepare", "large", 1)
    values["part 0/100 / whole, 1 worker"] = part["seconds"] / whole["seconds"]
    lines.append(f"time of one part of 100 (reads the whole corpus, tokenises 1%) / the whole prepare, 1 worker = "
                 f"{values['part 0/100 / whole, 1 worker']:.3f}")
    values["same shards for every worker count"] = len({r["shards_sha256"] for r in runs
                                                        if r["what"] == "flm prepare" and r["corpus"] == "large"}) == 1
    values["same token count everywhere"] = len({r["tokens"] for r in runs if r["corpus"] == "large"
                                                 and "--part" not in r["what"]}) == 1
    lines += [f"{key}: {values[key]}" for key in ("same shards for every worker count", "same token count everywhere")]
    return {"values": values, "lines": lines}


def markdown(report: dict) -> str:
    m = report["machine"]
    rows = "\n".join(
        f"| {r['corpus']} | {r['what']} | {r['workers']} | {r['tokens']:,} | {r['seconds']:.1f} | "
        f"{r['tokens_per_s']:,.0f} | {r['peak_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} |" for r in report["runs"])
    corpora = ", ".join(f"{name} {c['documents']:,} documents / {c['text_bytes'] / 1e6:.1f} MB"
                        for name, c in report["corpora"].items())
    return f"""# `flm prepare` throughput and memory

Command (from the repository root, after `make setup`): `{report['command']}`

Date {report['date']}; {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB;
{', '.join(f'{k} {v}' for k, v in m['versions'].items())}. Load average (1, 5, 15 min) before:
{', '.join(f'{x:.2f}' for x in report['load_average_before'])}; after:
{', '.join(f'{x:.2f}' for x in report['load_average_after'])}. Whole run: {report['wall_seconds']:.0f} s.

Corpora: {corpora} (Python sources of the installed packages, one JSONL record per file, files up to
{report['max_document_kb']:g} kB). Tokenizer: byte-level BPE, 8192 ids, trained on the bundled corpus as the demo's.
Seconds: flm and `datasets` from process start to exit; the tokenizer ceiling, its encoding alone. Memory: peaks
over the whole process tree.

| corpus | run | workers / threads | tokens | seconds | tokens/s | peak RSS MiB | peak anonymous MiB |
|---|---|---|---|---|---|---|---|
{rows}

""" + "\n".join(f"- {line}" for line in report["ratios"]["lines"]) + "\n"


if __name__ == "__main__":
    main()
