"""`make gpu-check` in its tiny mode on the CPU, so that the one command a GPU window runs never rots: every part
runs (the CUDA ones report "skipped: no CUDA"), and the numbers it writes agree with the arithmetic done here from
the config and the growth run's own metrics. Also the guards of the window: a hanging part is ended with its whole
process group, and an old filelock is shadowed by the carried wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402  (a script's module, beside it in benchmarks/)


def cpu_env() -> dict[str, str]:
    """This Python's environment with flm's source first and no GPU visible (on a GPU machine too)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--tiny",
                           "--python", sys.executable], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), proc.stdout


def test_tiny_mode_runs_every_part_and_reports_the_cuda_ones_skipped(tiny_check):
    out, report, md, stdout = tiny_check
    assert report["mode"] == "tiny" and "gpu_check.py" in report["command"] and report["date"]
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["cuda"] is False
    assert list(report["parts"]) == ["tests", "prepare", "throughput", "growth"]
    assert report["parts"]["tests"] == {"status": "skipped", "reason": "no CUDA"}
    assert all(report["parts"][p]["status"] == "pass" for p in ("prepare", "throughput", "growth")), report["parts"]
    assert report["parts"]["throughput"]["results"]["mfu"] == {"skipped": "no CUDA"}
    assert report["compatibility"]["filelock"]["used"] is not None
    assert "skipped: no CUDA" in md and "# flm GPU check (tiny mode)" in md and "MFU: skipped: no CUDA." in md
    assert "## Throughput and MFU" in md and "## Growth run" in md and f"torch {torch.__version__}" in md
    assert "tests      skipped: no CUDA" in stdout and stdout.rstrip().splitlines()[-1].startswith("growth")
    # What comes back from a GPU window: at most 8 files, none in a subfolder.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md",
                                                     "growth_loss.png", "growth_metrics.jsonl"]


def test_tiny_throughput_numbers_follow_from_the_shape(tiny_check):
    """FLOPs per token by hand from the shape (6 x matmul weights + attention's 12 L a s), tokens/s from the step
    time, and the peer of the same shape: GPT-2 has exactly flm's weights plus its learned positions (seq x width)."""
    r = tiny_check[1]["parts"]["throughput"]["results"]
    c = r["config"]
    L, d, heads = (int(v) for v in c["shape"].split("x"))
    a, f, V, s = heads * c["head_dim"], 4 * d, c["vocab"], c["seq"]
    assert r["flops_per_token"] == 6 * (L * (3 * d * a + a * d + 2 * d * f) + d * V) + 12 * L * a * s
    for run in (r["flm"], r["peer"]):
        assert run["tokens_per_s"] == pytest.approx(c["batch"] * s / (run["step_ms"] / 1e3), rel=1e-9)
        assert 0 < run["loss_first"] < 2 * torch.log(torch.tensor(float(V))).item()
    assert r["peer"]["params"] - r["params"] == s * d and r["peer"]["attention"] == "sdpa"
    assert r["profile"]["top"] and r["matmul"]["tflops"] > 0


def test_tiny_growth_summary_agrees_with_the_runs_metrics(tiny_check):
    out, report = tiny_check[0], tiny_check[1]
    part = report["parts"]["growth"]
    records = [json.loads(line) for line in (out / "growth_metrics.jsonl").read_text().splitlines()]
    assert part["growth"] == next(r for r in records if r["kind"] == "growth")
    assert abs(part["growth"]["loss_after"] - part["growth"]["loss_before"]) <= 1e-3 * part["growth"]["loss_before"]
    for stage in (1, 2):
        rates = [r["tokens_per_s"] for r in records if r["kind"] == "train" and r["stage"] == stage]
        summary = next(s for s in part["stages"] if s["stage"] == stage)
        assert len(rates) > 1 and summary["tokens_per_s"] == pytest.approx(sum(rates[1:]) / len(rates[1:]))


def test_a_part_past_its_time_limit_is_ended_with_its_children(tmp_path):
    """A part that hangs (here: a process whose child sleeps) is stopped at its limit, child included."""
    pid_file = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(600)")
    started = time.perf_counter()
    ran = gpu_check.run([sys.executable, "-c", hang], 3, tmp_path / "log", cpu_env())
    assert ran["timed_out"] and time.perf_counter() - started < 30
    time.sleep(0.5)
    assert not alive(int(pid_file.read_text()))


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_an_old_filelock_is_shadowed_by_the_carried_wheel(tmp_path):
    """The machine's filelock 3.x lacks what flm's run lock uses: the carried 4.3.1 comes first on the parts' path."""
    old = tmp_path / "old"
    (old / "filelock").mkdir(parents=True)
    (old / "filelock" / "__init__.py").write_text("__version__ = '3.12.0'\n")
    (old / "filelock-3.12.0.dist-info").mkdir()
    (old / "filelock-3.12.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: filelock\n"
                                                                 "Version: 3.12.0\n")
    env = {**cpu_env(), "PYTHONPATH": os.pathsep.join([str(old), cpu_env()["PYTHONPATH"]])}
    info = gpu_check.probe(sys.executable, env)
    assert info["packages"]["filelock"] == "3.12.0"
    compat = gpu_check.compatible_filelock(sys.executable, info, env, tmp_path / "work")
    assert compat == {"found": "3.12.0", "used": "4.3.1", "wheel": "filelock-4.3.1-py3-none-any.whl"}
    lock = subprocess.run([sys.executable, "-c", "from flm.checkpoint import RunLock; "
                           f"RunLock({str(tmp_path / 'run')!r}).acquire(); import filelock; print(filelock.__file__)"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert lock.returncode == 0 and lock.stdout.startswith(str(tmp_path / "work" / "site")), lock.stderr
