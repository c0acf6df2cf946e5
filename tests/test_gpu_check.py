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
from flm.config import load_config  # noqa: E402


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
    assert "| flm (llama arch) |" in md and "| HF LlamaForCausalLM (sdpa) |" in md and "flm / HF Llama: " in md
    assert "tests      skipped: no CUDA" in stdout and stdout.rstrip().splitlines()[-1].startswith("growth")
    assert "; llama arch: flm " in next(line for line in stdout.splitlines() if line.startswith("throughput pass"))
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


def test_tiny_llama_line_times_flm_and_hf_llama_of_one_shape(tiny_check):
    """The llama line: flm's llama arch and HF LlamaForCausalLM of the FLM shape's layers, width and heads, with the
    SwiGLU width of the stated formula, time a step each; both models hold the same parameters (so one FLOPs count,
    computed here by hand, holds for both), and flm / HF is the ratio of their tokens/s."""
    r = tiny_check[1]["parts"]["throughput"]["results"]
    c, llama = r["config"], r["llama"]
    L, d, heads = (int(v) for v in c["shape"].split("x"))
    a, V, s = heads * c["head_dim"], c["vocab"], c["seq"]
    assert "errors" not in r
    assert (llama["n_layers"], llama["d_model"], llama["n_heads"], llama["head_dim"]) == (L, d, heads, c["head_dim"])
    assert llama["n_kv_heads"] == heads and llama["rope_theta"] == 10000.0 and llama["tie_embeddings"] is True
    kv = llama["n_kv_heads"] * llama["head_dim"]
    f = llama["d_ff"]
    assert f == 64 * round((2 * a + 2 * 4 * d - 2 * kv) / 192) == 192  # 8 d / 3 = 170.7 at d = 64
    assert llama["flops_per_token"] == 6 * (L * (2 * d * a + 2 * d * kv + 3 * d * f) + d * V) + 12 * L * a * s
    params = V * d + L * (2 * d + 2 * d * a + 2 * d * kv + 3 * d * f) + d  # tied head, two gains a block, final gain
    assert llama["params"] == llama["flm"]["params"] == llama["hf"]["params"] == params and llama["params_equal"]
    assert llama["params_of_flm_shape"] == r["params"]
    assert llama["params_over_flm_shape"] == pytest.approx(params / r["params"]) and 0.9 < params / r["params"] < 1.1
    for key in ("flm", "hf"):
        run = llama[key]
        assert set(run) >= {"first_step_s", "step_ms", "tokens_per_s", "peak_memory_gib", "loss_first", "loss_last",
                            "graphs_compiled", "params"}
        assert run["tokens_per_s"] > 0
        assert run["tokens_per_s"] == pytest.approx(c["batch"] * s / (run["step_ms"] / 1e3), rel=1e-9)
        assert 0 < run["loss_first"] < 2 * torch.log(torch.tensor(float(V))).item()
    assert llama["hf"]["attention"] == "sdpa" and llama["hf"]["rope_theta"] == 10000.0
    assert llama["flm_over_hf"] == llama["flm"]["tokens_per_s"] / llama["hf"]["tokens_per_s"]
    assert llama["mfu"] == {"skipped": "no CUDA"}


def test_a_throughput_json_without_the_llama_line_is_judged_and_reported(tiny_check, tmp_path):
    """An older JSON (or --arch flm) has no "llama": the part is judged on the FLM line and its page has no llama
    table; a llama line whose two models differ in size fails the part."""
    from gpu_report import markdown, part_line

    report = tiny_check[1]
    old = {k: v for k, v in report["parts"]["throughput"]["results"].items() if k != "llama"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    part = gpu_check.judge_throughput({"status": "pass"}, tmp_path / "old.json")
    assert part == {"status": "pass", "results": old}
    md = markdown({**report, "parts": {"throughput": part}})
    assert "| flm |" in md and "| HF GPT-2 (sdpa) |" in md and "Llama" not in md and "llama arch" not in md
    assert "llama" not in part_line("throughput", part)
    new = report["parts"]["throughput"]["results"]
    unequal = {**new, "llama": {**new["llama"], "params_equal": False, "hf": {**new["llama"]["hf"], "params": 1}}}
    (tmp_path / "unequal.json").write_text(json.dumps(unequal))
    assert gpu_check.judge_throughput({"status": "pass"}, tmp_path / "unequal.json")["status"] == "fail"


def test_tiny_growth_summary_agrees_with_the_runs_metrics(tiny_check):
    """Also the recipe of docs/growth.md, tiny as in full: WSD, the growth after 2/3 of the steps, the LR continuing at
    its peak through the growth and decaying only at the end; the loss kept across the growth."""
    out, report = tiny_check[0], tiny_check[1]
    part = report["parts"]["growth"]
    records = [json.loads(line) for line in (out / "growth_metrics.jsonl").read_text().splitlines()]
    assert part["growth"] == next(r for r in records if r["kind"] == "growth")
    assert abs(part["growth"]["loss_after"] - part["growth"]["loss_before"]) <= 1e-3 * part["growth"]["loss_before"]
    for sets in ([], gpu_check.TINY_GROWTH):
        cfg = load_config(gpu_check.GROWTH_CONFIG, sets)
        assert cfg.train.schedule == "wsd" and [s.lr_at_growth for s in cfg.stages] == [None, "continue"]
        assert 3 * cfg.stages[0].tokens == 2 * (cfg.stages[0].tokens + cfg.stages[1].tokens)
    train = [r for r in records if r["kind"] == "train"]
    assert 3 * part["growth"]["step"] == 2 * train[-1]["step"]
    after = [r["lr"] for r in train if r["step"] > part["growth"]["step"]]
    assert after[0] == pytest.approx(cfg.train.lr) and after[-1] < cfg.train.lr
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
