"""`make gpu-check`: the one command a short GPU window runs (docs/results/gpu.md).

It runs from the source tree (PYTHONPATH=src) with the machine's own Python and packages: no virtualenv, nothing
from a package index. The parts run in order, each in processes of its own under its own time limit, so one that
hangs cannot eat the window, and each reports pass, fail or skipped and the next one goes on:

1. tests      pytest -m cuda: tests/test_cuda.py and the CUDA tests of tests/test_growth.py and tests/test_adamw.py;
2. prepare    `flm prepare -c benchmarks/gpu_growth.toml`: flm's own source as the corpus of parts 3 and 4;
3. throughput benchmarks/gpu_throughput.py --arch both: a ~1B FLM against HF GPT-2 of the same shape, MFU, a profile;
              then flm's llama arch against HF LlamaForCausalLM of the same shape, MFU (the JSON's "llama");
4. growth     `flm train -c benchmarks/gpu_growth.toml`: two stages, WSD with the growth after 2/3 of the tokens and
              the LR continuing through it; loss before/after growth, tokens/s per stage.

    python benchmarks/gpu_check.py --out DIR           # full sizes on CUDA; without CUDA, tiny (seconds)
    python benchmarks/gpu_check.py --out DIR --tiny    # tiny sizes anywhere: checks that the code runs

DIR receives gpu_check.json and gpu_check.md (rewritten after every part, so a window that closes early still
returns what was done), gpu_check.log (every part's output), cuda_tests.xml, and the growth run's
growth_metrics.jsonl and growth_loss.png; scratch (prepared data, run folders, a filelock wheel's install) goes to a
temporary folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

from gpu_report import markdown, part_line, summary_lines

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the driver runs from the source tree too, for flm's report writer
from flm.files import write_json_report  # noqa: E402
BENCH = ROOT / "benchmarks"
GROWTH_CONFIG = BENCH / "gpu_growth.toml"
FILELOCK_WHEEL = BENCH / "gpu_wheels" / "filelock-4.3.1-py3-none-any.whl"
FILELOCK_NEEDED = (4, 1)  # flm.checkpoint.lock: fallback_to_soft, is_singleton, on_acquired
PARTS = ("tests", "prepare", "throughput", "growth")
# Seconds per part. Full: 520 in all (the deadline), inside the 10 minutes a window's command may run; on an H200 the
# parts should take about 80, 10, 270 (four models, four compilations) and 40 (estimates). Tiny: limits for a hang.
BUDGETS = {"full": {"tests": 120, "prepare": 30, "throughput": 300, "growth": 70},
           "tiny": {"tests": 120, "prepare": 60, "throughput": 180, "growth": 120}}
DEADLINE = 520.0
TINY_DATA = ["data.vocab_size=512", "data.max_chars=100000"]
TINY_GROWTH = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.max_seq_len=32",
               "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=2", "train.log_every=2",
               "train.eval_every=8", "train.eval_batches=1", "train.ckpt_every=16", "train.sample_tokens=8",
               "stages.0.tokens=2048", "stages.1.n_layers=2", "stages.1.d_model=48", "stages.1.n_heads=3",
               "stages.1.tokens=1024", "stages.1.ramp_steps=4"]  # 16 + 8 steps: growth after 2/3, as the full run


def probe(python: str, env: dict[str, str]) -> dict | None:
    """benchmarks/gpu_probe.py's answer under `python`, or None when that Python cannot import torch."""
    try:
        out = subprocess.run([python, str(BENCH / "gpu_probe.py")], capture_output=True, text=True, timeout=120,
                             env=env, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return json.loads(out.stdout) if out.returncode == 0 else None


def find_python(explicit: str | None, env: dict[str, str]) -> tuple[str, dict]:
    """The first Python that has torch: --python, this one, the GPU image's, then python3 on the PATH."""
    candidates = [explicit] if explicit else [sys.executable, "/opt/torch/.venv/bin/python3", shutil.which("python3")]
    candidates = list(dict.fromkeys(c for c in candidates if c))
    for python in candidates:
        info = probe(python, env)
        if info is not None:
            return python, info
    sys.exit(f"gpu-check: no Python with torch among {', '.join(candidates)} (use --python)")


def version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text or "")[:2])


def compatible_filelock(python: str, info: dict, env: dict[str, str], work: Path) -> dict:
    """flm's run lock needs filelock >= 4.1. An older (or missing) one is shadowed by the wheel carried in
    benchmarks/gpu_wheels: a pure-Python wheel is a zip archive, unpacked into a scratch folder put first on the
    parts' PYTHONPATH (what `pip install --no-index --no-deps --target` does with it, without needing pip)."""
    found = info["packages"].get("filelock")
    if found is not None and version_tuple(found) >= FILELOCK_NEEDED:
        return {"found": found, "used": found}
    site = work / "site"
    with zipfile.ZipFile(FILELOCK_WHEEL) as wheel:
        wheel.extractall(site)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    used = (probe(python, env) or {}).get("packages", {}).get("filelock")
    return {"found": found, "used": used, "wheel": FILELOCK_WHEEL.name}


def run(cmd: list[str], timeout: float, log: Path, env: dict[str, str]) -> dict:
    """Run `cmd` in the repository root in a process group of its own, output appended to `log`; at the time limit
    the whole group (workers, compile processes, torchrun's children) is ended."""
    started = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                    rc = proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    rc = proc.wait()
                    break
            return {"rc": rc, "seconds": time.perf_counter() - started, "timed_out": True}
    return {"rc": rc, "seconds": time.perf_counter() - started, "timed_out": False}


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def outcome(ran: dict, log: Path, budget: float) -> dict:
    if ran["timed_out"]:
        return {"status": "fail", "reason": f"stopped at its time limit ({budget:.0f} s)"}
    if ran["rc"] != 0:
        return {"status": "fail", "reason": f"exit status {ran['rc']}: {last_line(log)}"}
    return {"status": "pass"}


def read_junit(path: Path) -> list[dict]:
    """Each test case of a pytest JUnit XML report: name, outcome, seconds, and the first line of any message."""
    if not path.is_file():
        return []
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        result, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                result = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").splitlines()[0][:300] if child.get("message") else ""
        cases.append({"test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}", "outcome": result,
                      "seconds": float(case.get("time", 0)), "message": message})
    return cases


def judge_tests(part: dict, cases: list[dict]) -> dict:
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    if part["status"] == "pass" and not counts["passed"]:
        part = {"status": "fail", "reason": "no CUDA test passed"}
    elif part["status"] == "fail" and cases and not part["reason"].startswith("stopped"):
        bad = [c["test"] for c in cases if c["outcome"] in ("failed", "error")]
        part = {**part, "reason": f"{len(bad)} failed: {', '.join(bad)}"}
    return {**part, "counts": counts, "tests": cases}


def judge_throughput(part: dict, path: Path) -> dict:
    """Fails on a recorded error and on a llama line whose two models differ in size (then one FLOPs count would not
    hold for both); the goals as met or not. A JSON without the "llama" key (an older one, or --arch flm) is judged
    on its FLM line alone."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    llama = data.get("llama") or {}
    if part["status"] == "pass" and data.get("errors"):
        part = {"status": "fail", "reason": "; ".join(f"{k}: {v.splitlines()[-1]}" for k, v in data["errors"].items())}
    elif part["status"] == "pass" and llama.get("params_equal") is False:
        part = {"status": "fail", "reason": f"llama line: flm has {llama['flm']['params']:,} parameters, HF Llama "
                                            f"{llama['hf']['params']:,}"}
    mfu, llama_mfu = data.get("mfu") or {}, llama.get("mfu") or {}
    goals = {}
    if "flm" in mfu:
        goals["flm MFU >= 50% of the datasheet peak"] = (mfu["flm"].get("datasheet") or 0) >= 0.5
    if "flm_over_peer" in mfu:
        goals["flm faster than HF GPT-2"] = mfu["flm_over_peer"] > 1.0
    if "flm" in llama_mfu:
        goals["llama arch: flm MFU >= 50% of the datasheet peak"] = (llama_mfu["flm"].get("datasheet") or 0) >= 0.5
    if "flm_over_hf" in llama_mfu:
        goals["llama arch: flm faster than HF LlamaForCausalLM"] = llama_mfu["flm_over_hf"] > 1.0
    return {**part, **({"goals": goals} if goals else {}), "results": data}


def judge_growth(part: dict, run_dir: Path, out: Path) -> dict:
    """Loss before and after growth, tokens/s and last loss per stage, from the run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    for name, target in (("metrics.jsonl", "growth_metrics.jsonl"), ("loss.png", "growth_loss.png")):
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, out / target)
    stages: dict[int, dict] = {}
    for r in (r for r in records if r["kind"] == "train"):
        s = stages.setdefault(r["stage"], {"stage": r["stage"], "steps": 0, "rates": [], "last_loss": None})
        s["steps"], s["last_loss"] = r["step"], r["loss"]
        s["rates"].append(r["tokens_per_s"])
    for s in stages.values():  # the first interval of a stage holds its warm-up (allocations, kernel choice)
        rates = s.pop("rates")
        s["tokens_per_s"] = sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[0]
    growth = next((r for r in records if r["kind"] == "growth"), None)
    evals = [r for r in records if r["kind"] == "eval"]
    details = {"stages": list(stages.values()), "growth": growth, "val_loss": evals[-1]["val_loss"] if evals else None}
    if part["status"] == "pass":
        if growth is None:
            part = {"status": "fail", "reason": "the run never grew"}
        elif not abs(growth["loss_after"] - growth["loss_before"]) <= 0.01 * growth["loss_before"]:
            part = {"status": "fail", "reason": f"growth changed the loss: {growth['loss_before']:.4f} -> "
                                                f"{growth['loss_after']:.4f}"}
    return {**part, **details}


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def cap_log(log: Path, limit: int = 8 << 20) -> None:
    """Keep the log's last `limit` bytes: what comes back from a GPU window is limited in size."""
    if log.stat().st_size > limit:
        with open(log, "rb") as f:
            f.seek(-limit, os.SEEK_END)
            tail = f.read()
        log.write_bytes(b"[... earlier output cut ...]\n" + tail)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the results (created)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes even on a GPU")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which parts, comma-separated (default: all of {PARTS}; "
                   "throughput and growth bring prepare along)")
    p.add_argument("--python", help="the Python to run the parts with (default: the first with torch of this one, "
                   "/opt/torch/.venv/bin/python3 and python3)")
    p.add_argument("--deadline", type=float, default=DEADLINE, help="seconds for everything: a part gets its budget "
                   f"or what is left, whichever is less (default {DEADLINE:.0f})")
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="one part's time limit")
    p.add_argument("--throughput-args", default="", help="extra arguments for benchmarks/gpu_throughput.py, "
                   "e.g. '--batch 16 --steps 20', '--arch flm' (the FLM-vs-GPT-2 line only) or '--kv-heads 4'")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    args = p.parse_args()
    started = time.perf_counter()
    parts = [name for name in PARTS if name in args.parts.split(",") or
             (name == "prepare" and {"throughput", "growth"} & set(args.parts.split(",")))]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("gpu_check.json", "gpu_check.md", "gpu_check.log", "cuda_tests.xml", "growth_metrics.jsonl",
                 "growth_loss.png"):
        (out / name).unlink(missing_ok=True)  # a folder used before holds no stale results
    work = (args.work or Path(tempfile.mkdtemp(prefix="flm-gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.touch()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    python, info = find_python(args.python, env)
    mode = "tiny" if args.tiny or not info["cuda"] else "full"
    budgets = dict(BUDGETS[mode], **{k: float(v) for k, v in (b.split("=", 1) for b in args.budget)})
    report = {"command": shlex.join([python, "benchmarks/gpu_check.py", *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "mode": mode, "commit": git_commit(), "machine": info,
              "compatibility": {"filelock": compatible_filelock(python, info, env, work)},
              "deadline_s": args.deadline, "budgets_s": budgets, "parts": {}, "seconds": None}

    def record(name: str, part: dict) -> None:
        report["parts"][name] = part
        report["seconds"] = round(time.perf_counter() - started, 1)
        cap_log(log)
        write_json_report(out / "gpu_check.json", report)
        (out / "gpu_check.md").write_text(markdown(report))
        print(part_line(name, part), flush=True)

    def attempt(name: str, cmd: list[str], part_env: dict[str, str] = env) -> dict:
        limit = min(budgets[name], args.deadline - (time.perf_counter() - started))
        if limit < 15:
            return {"status": "skipped", "reason": "out of time"}
        print(f"{name}: running (limit {limit:.0f} s)", flush=True)
        ran = run(cmd, limit, log, part_env)
        return {**outcome(ran, log, limit), "seconds": round(ran["seconds"], 1), "limit_s": round(limit)}

    print(f"gpu-check: {mode} mode, {python} (torch {info['torch']}, "
          f"{info.get('gpu') or 'no CUDA'}); results in {out}", flush=True)
    data, tiny = work / "data", mode == "tiny"
    data_sets = [f"data.dir='{data}'", *(TINY_DATA if tiny else [])]
    flm_cli = [python, "-m", "flm.cli.main"]
    for name in parts:
        if name == "tests":
            if not info["cuda"]:
                part = {"status": "skipped", "reason": "no CUDA"}
            else:
                xml = out / "cuda_tests.xml"
                part = judge_tests(attempt(name, [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                                                  f"--junitxml={xml}", "tests/test_cuda.py", "tests/test_growth.py",
                                                  "tests/test_adamw.py"],
                                           {**env, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}), read_junit(xml))
        elif name == "prepare":
            part = attempt(name, [*flm_cli, "prepare", "-c", str(GROWTH_CONFIG),
                                  *[a for s in data_sets for a in ("--set", s)]])
        elif report["parts"].get("prepare", {}).get("status") != "pass":
            part = {"status": "skipped", "reason": "no prepared data (prepare failed)"}
        elif name == "throughput":
            results = work / "throughput.json"
            part = judge_throughput(attempt(name, [python, str(BENCH / "gpu_throughput.py"), "--data", str(data),
                                                   "--json", str(results), "--work", str(work / "throughput-run"),
                                                   "--arch", "both", *(["--tiny"] if tiny else []),
                                                   *shlex.split(args.throughput_args)]),
                                    results)
        else:
            run_dir = work / "growth"
            sets = [*data_sets, f"train.run_dir='{run_dir}'", *(TINY_GROWTH if tiny else [])]
            part = judge_growth(attempt(name, [*flm_cli, "train", "-c", str(GROWTH_CONFIG),
                                               *[a for s in sets for a in ("--set", s)]]), run_dir, out)
        record(name, part)
    print("\n".join(summary_lines(report)), flush=True)
    return 0 if all(p["status"] != "fail" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
