"""Long runs meet faults: bad steps, a second writer, damaged metadata, kills, full disks, frozen ranks and
strangers' folders (docs/reliability.md lists each guarantee and the test here that holds it)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flm.errors import TrainingHalted
from flm.checkpoint import list_checkpoints
from flm.train import Trainer
from flm.inference import load_for_inference
from flm.parallel.trainer import Torchrun
from flm.train.metrics import read_metrics
from flm.train.progress import perplexity


def quiet(*_):
    pass


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Weights, Adam moments and step counts, copied."""
    out = {f"w.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            for key, value in trainer.optimizer.state.get(p, {}).items():
                out[f"{key}.{name}"] = value.detach().clone()
    return out


def poison_gradient_at(monkeypatch, trainer: Trainer, step: int) -> None:
    """Before `trainer`'s optimizer step number `step`, one gradient entry becomes NaN (a bad batch, an overflow)."""
    original = trainer.placement.clip

    def clip(model, max_norm):
        if trainer.step + 1 == step:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        return original(model, max_norm)

    monkeypatch.setattr(trainer.placement, "clip", clip)


def scale_step_loss(monkeypatch, trainer: Trainer, factor) -> None:
    """`trainer`'s step loss, as the step guard sees it, times `factor(step)` (a spike, an overflow)."""
    original = trainer.placement.step_loss
    monkeypatch.setattr(trainer.placement, "step_loss", lambda loss: original(loss) * factor(trainer.step))


def poison_weight_after(monkeypatch, step: int) -> None:
    """Once, right after optimizer step `step`, one weight that every token passes through (the final
    LayerNorm's gain) becomes NaN: the fault injected in the issue."""
    original, done = Trainer.train_step, []

    def train_step(self):
        out = original(self)
        if self.step == step and not done:
            done.append(True)
            with torch.no_grad():
                self.model.ln_f.weight[0] = float("nan")
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)


def all_finite(ckpt: Path) -> bool:
    model, _, _ = load_for_inference(ckpt)
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())


# ---- the step guard ------------------------------------------------------------------------------------
def test_a_cancelled_step_changes_nothing_and_is_counted(tiny, tmp_path, monkeypatch):
    """A NaN gradient at step 4: that step leaves weights, Adam moments and step counts bit for bit as they were,
    the steps after it train again, and metrics.jsonl records the cancelled step."""
    with Trainer(tiny.config(tmp_path / "run", "train.on_bad_step='skip'"), log=quiet) as trainer:
        poison_gradient_at(monkeypatch, trainer, 4)
        trainer.train(until_step=3)
        before = state_of(trainer)
        trainer.train_step()
        assert bool(trainer.last_step_bad)
        after = state_of(trainer)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        trainer.train_step()
        assert not bool(trainer.last_step_bad)
        assert not torch.equal(before["w.embed.weight"], trainer.model.embed.weight)

    run = tmp_path / "loop"
    with Trainer(tiny.config(run, "train.on_bad_step='skip'"), log=quiet) as trainer:
        poison_gradient_at(monkeypatch, trainer, 4)
        trainer.train()
    guard = [r for r in read_metrics(run) if r["kind"] == "guard"]
    assert guard == [{"kind": "guard", "step": 4, "bad_steps": 1, "nonfinite": 1, "first_bad_step": 4,
                      "policy": "skip"}]
    # The cancelled step's record has no loss (its loss was not a number); every other step has one.
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train" and r["loss"] is None] == [4]


def test_a_normal_run_trips_no_guard(tiny, tmp_path):
    run = tmp_path / "run"
    with Trainer(tiny.config(run, "train.spike_window=3", "train.max_steps=24"), log=quiet) as trainer:
        trainer.train()
    assert not [r for r in read_metrics(run) if r["kind"] in ("guard", "rollback")]


def test_a_loss_spike_is_caught_at_its_step(tiny, tmp_path, monkeypatch):
    """The loss of step 8 reported 100x: above 3x the median of the window, so the step is cancelled."""
    run = tmp_path / "run"
    with Trainer(tiny.config(run, "train.on_bad_step='skip'", "train.spike_window=4"), log=quiet) as trainer:
        scale_step_loss(monkeypatch, trainer, lambda step: 100 if step == 7 else 1)
        trainer.train()
    guard = [r for r in read_metrics(run) if r["kind"] == "guard"]
    assert [(g["step"], g["first_bad_step"], g["nonfinite"]) for g in guard] == [(8, 8, 0)]


def test_nan_in_a_weight_rolls_back_to_the_newest_finite_checkpoint(tiny, tmp_path, monkeypatch):
    """The issue's fault: a NaN written into a weight after step 7. The run returns to the step-6 checkpoint,
    continues with the data after the bad batch, ends finite, and never writes a non-finite checkpoint."""
    poison_weight_after(monkeypatch, 7)
    run = tmp_path / "run"
    with Trainer(tiny.config(run, "train.keep_last=2"), log=quiet) as trainer:
        summary = trainer.train()
    assert summary["step"] == 12 and perplexity(summary["val_loss"]) != "nan"
    records = read_metrics(run)
    rollback = [r for r in records if r["kind"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] == 6 and rollback[0]["first_bad_step"] == 8
    assert rollback[0]["samples_seen"] == 8 * 4  # the batches of steps 7 and 8 are not read again
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 13))  # one history: the abandoned steps 7-8 are gone
    assert all(r["loss"] is not None for r in records if r["kind"] == "train")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000009", "step_00000012"]
    assert all(all_finite(p) for p in list_checkpoints(run / "checkpoints"))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_in_a_weight_stops_with_status_3_and_keeps_the_last_good_checkpoint(policy, tiny, tmp_path,
                                                                                  monkeypatch, cli):
    poison_weight_after(monkeypatch, 7)
    run = tmp_path / "run"
    result = cli("train", *tiny.args(run, f"train.on_bad_step='{policy}'", "train.keep_last=1",
                                     "train.max_bad_steps=2"))
    assert result.status == 3
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "the last good checkpoint is" in lines[0] and "step_00000006" in lines[0]
    assert ("non-finite" in lines[0]) if policy == "stop" else ("2 bad steps in a row" in lines[0])
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000006"]
    assert all_finite(run / "checkpoints" / "step_00000006")


def test_rollback_gives_up_after_max_rollbacks(tiny, tmp_path, monkeypatch):
    """A loss that is always bad (here: every step's loss reported as infinite from step 5 on) rolls back
    `max_rollbacks` times, then stops instead of looping forever."""
    run = tmp_path / "run"
    with Trainer(tiny.config(run, "train.max_rollbacks=2"), log=quiet) as trainer:
        scale_step_loss(monkeypatch, trainer, lambda step: float("inf") if step >= 4 else 1)
        with pytest.raises(TrainingHalted, match="after 2 rollbacks"):
            trainer.train()
    # Both rollbacks returned to step 3: the log keeps the surviving history, whose record counts them.
    assert [(r["step"], r["rollbacks"]) for r in read_metrics(run) if r["kind"] == "rollback"] == [(3, 2)]


@pytest.mark.parametrize("value, message", [("inf", "train.lr must be a finite number"),
                                            ("nan", "train.lr must be a finite number"),
                                            ("10", "train.lr must be in (0, 1]"),
                                            ("-inf", "train.lr must be a finite number")])
def test_non_finite_or_absurd_settings_are_one_line(value, message, tiny, tmp_path, cli):
    result = cli("train", *tiny.args(tmp_path / "run", f"train.lr={value}"))
    assert result.status == 2 and result.err.count("\n") == 1 and message in result.err


def test_printing_a_diverged_loss_does_not_overflow():
    assert perplexity(2.0) == "7.4" and perplexity(800.0) == "inf" and perplexity(float("nan")) == "nan"


# ---- one writer per run folder ---------------------------------------------------------------------------
def wait_for(condition, timeout: float = 120, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_second_writer_is_refused_and_kill_9_never_blocks_resume(tiny, tmp_path, cli_process):
    run = tmp_path / "run"
    first = cli_process.start("train", *tiny.args(run, "train.max_steps=100000", "train.ckpt_every=2"))
    try:
        lock = run / ".flm.lock"
        wait_for(lambda: lock.is_file() and f"pid {first.pid} " in lock.read_text(), what="the first run's lock")
        wait_for(lambda: list_checkpoints(run / "checkpoints"), what="a first checkpoint")
        staging = run / "checkpoints" / ".step_99999999.tmp"  # as if the first run were writing it now
        staging.mkdir()
        second = cli_process.start("train", *tiny.args(run))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert err.strip().splitlines() == [
            f"error: run folder {run} is in use by {lock.read_text().strip()}; one writer per run folder "
            "(wait for it, stop it, or choose another train.run_dir)"]
        assert staging.is_dir()  # the refused writer touched nothing of the first one's
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    resumed = cli_process.start("train", *tiny.args(run, "train.max_steps=100000", "train.ckpt_every=2"),
                          "--resume", "auto", "--until-step", str(int(list_checkpoints(run / "checkpoints")[-1]
                                                                          .name[5:]) + 2))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "resumed from" in out and not staging.exists()  # the dead writer's leftover is cleared


# ---- checkpoint metadata and metrics -----------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("step"), "key 'step' is missing"),
    (lambda m: m.pop("model"), "key 'model' is missing"),
    (lambda m: m.pop("ramp"), "key 'ramp' is missing"),
    (lambda m: m.pop("data"), "key 'data' is missing"),
    (lambda m: m.pop("stage"), "key 'stage' is missing"),
    (lambda m: m.pop("config"), "key 'config' is missing"),
    (lambda m: m.update(step="6"), "'step' must be an integer >= 0, got '6'"),
    (lambda m: m.update(data=None), "'data' is null at step 6"),
    (lambda m: m["data"].pop("samples_seen"), "'data.samples_seen' must be an integer"),
    (lambda m: m.update(model={"d_model": "wide"}), "'model' is not a valid model config"),
    (lambda m: m.update(ramp={"old": {}, "sources": "x", "ramp_steps": 4, "steps_done": 1}), "'ramp.sources'"),
])
def test_damaged_checkpoint_metadata_is_one_line_naming_the_file_and_key(change, message, tiny, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", *tiny.args(run, "train.max_steps=6")).status == 0
    meta_file = list_checkpoints(run / "checkpoints")[-1] / "meta.json"
    meta = json.loads(meta_file.read_text())
    change(meta)
    meta_file.write_text(json.dumps(meta))
    result = cli("train", *tiny.args(run), "--resume", "auto")
    assert result.status == 2
    assert result.err.strip().splitlines() == [result.err.strip()] and result.err.startswith(f"error: {meta_file}: ")
    assert message in result.err


def test_inference_reads_only_what_it_needs_and_checks_it(tiny, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", *tiny.args(run, "train.max_steps=3")).status == 0
    meta_file = list_checkpoints(run / "checkpoints")[-1] / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("data", "stage", "config")}))
    assert cli("generate", run, "-n", "4").status == 0  # inference needs no data position
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "ramp"}))
    result = cli("generate", run, "-n", "4")
    assert result.status == 2 and "key 'ramp' is missing" in result.err


STAGES = """
[[stages]]
tokens = 384
[[stages]]
d_model = 96
n_heads = 3
tokens = 768
ramp_steps = 2
"""


def comparable(records: list[dict]) -> list[dict]:
    """Records without their wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in records]


def test_metrics_after_kills_and_resumes_equal_an_uninterrupted_run(tiny, tmp_path):
    """Resuming from the stage-boundary checkpoint (step 3, written before the growth) does not record the
    growth twice, and a torn last line (a kill mid-write) is dropped with a note instead of failing the resume."""
    (tmp_path / "stages.toml").write_text(STAGES)
    extra = ("train.ckpt_every=3", "model.dropout=0.1")
    straight = tmp_path / "straight"
    with Trainer(tiny.config(straight, *extra, path=tmp_path / "stages.toml"), log=quiet) as trainer:
        trainer.train()
    run = tmp_path / "run"
    with Trainer(tiny.config(run, *extra, path=tmp_path / "stages.toml"), log=quiet) as trainer:
        trainer.train(until_step=5)
    shutil.rmtree(run / "checkpoints" / "step_00000005")  # killed before its step-5 checkpoint... and
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # ...while writing a record
    notes = []
    with Trainer(tiny.config(run, *extra, path=tmp_path / "stages.toml"), log=notes.append) as trainer:
        assert trainer.resume("auto") and trainer.step == 3
        trainer.train()
    assert any("dropped a torn last line" in n for n in notes)
    assert comparable(read_metrics(run)) == comparable(read_metrics(straight))
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "growth"] == [3]


# ---- full disk -------------------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_the_last_good_checkpoint_survives(tiny, tmp_path, cli, cli_process):
    """A real write error: the process may write no file over 2 MB (RLIMIT_FSIZE; SIGXFSZ ignored, so writes
    fail with EFBIG as on a full disk). Stage 1's checkpoint files fit, the grown model's do not."""
    (tmp_path / "stages.toml").write_text(STAGES)
    run = tmp_path / "run"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    proc = cli_process.start("train", "-c", str(tmp_path / "stages.toml"), *tiny.args(run, "train.ckpt_every=3"),
                       preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=300)
    good = run / "checkpoints" / "step_00000003"
    assert proc.returncode == 2, err[-3000:]
    assert err.strip().splitlines() == [
        f"error: could not write checkpoint step 6 in {run / 'checkpoints'}: File too large; "
        f"the last good checkpoint is {good}"]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000003"]
    assert not list((run / "checkpoints").glob(".step_*"))
    result = cli("train", "-c", tmp_path / "stages.toml", *tiny.args(run, "train.ckpt_every=3"), "--resume", "auto")
    assert result.status == 0 and "resumed from" in result.out


# ---- a frozen rank ---------------------------------------------------------------------------------------
def ranks_of(job: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of a torchrun job's worker processes."""
    children = Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()
    out = {}
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            out[int(rank[0][5:])] = pid
    return out


@pytest.mark.parametrize("kind, message, expected", [
    (RuntimeError,
     "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation to complete",
     "rank 1: a collective did not finish within parallel.timeout_s = 5 s: another rank is stuck"),
    (RuntimeError,
     "Wait timeout\n[gloo] Timed out waiting 5000ms for send\nException raised from recv at unbound_buffer.cc:81",
     "rank 1: a collective did not finish within parallel.timeout_s = 5 s: another rank is stuck"),
    (RuntimeError, "Application timeout caused pair closure",  # gloo, a peer stopped during an all_reduce
     "rank 1: a collective did not finish within parallel.timeout_s = 5 s: another rank is stuck"),
    (torch.distributed.DistBackendError,
     "[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500",
     "rank 1: lost another rank ([gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500)"),
    (RuntimeError, "expected a tensor of dtype float", None),
])
def test_a_collective_s_failure_is_named_from_anywhere_in_its_message(kind, message, expected):
    """The timeout is recognised on any line of a multi-line message, in both of gloo's wordings; a lost peer names
    the last line; any other RuntimeError is a bug and is left alone (None)."""
    placement = SimpleNamespace(rank=1, cfg=SimpleNamespace(parallel=SimpleNamespace(timeout_s=5.0)))
    got = Torchrun.peer_failure(placement, kind(message))
    assert (got is None) if expected is None else got.startswith(expected)


def test_a_frozen_rank_ends_the_job_within_the_collective_timeout(tiny, tmp_path, torchrun):
    """SIGSTOP on one of two gloo ranks: the other rank's next collective times out after parallel.timeout_s
    and it exits with one line and status 3; torchrun then removes the frozen rank (after its own grace time)."""
    run = tmp_path / "run"
    job = torchrun.start(2, "train", *tiny.args(run, "parallel.dp=2", "parallel.timeout_s=5", "train.max_steps=100000",
                                                "train.ckpt_every=5", "train.eval_every=100000"))
    try:
        wait_for(lambda: list_checkpoints(run / "checkpoints"), what="a first checkpoint")
        frozen = ranks_of(job)[1]
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = job.communicate(timeout=120)
        took = time.monotonic() - stopped
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0 and took < 5 + 30 + 30  # timeout + torchrun's grace before SIGKILL + margin
    lines = [line for line in err.splitlines() if "did not finish" in line]
    assert lines, err[-4000:]
    line = lines[0]
    assert line.startswith("error: rank 0: a collective did not finish within parallel.timeout_s = 5 s")
    assert "exitcode  : 3" in err  # rank 0 ended with TrainingHalted's status


# ---- strangers' folders ----------------------------------------------------------------------------------
PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def test_a_folder_s_own_code_runs_only_with_trust_remote_code(tmp_path, cli):
    folder, marker = tmp_path / "stranger", tmp_path / "payload-ran"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "stranger", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                               "AutoModelForCausalLM": "modeling_x.XModel"}}))
    for name in ("configuration_x.py", "modeling_x.py"):
        (folder / name).write_text(PAYLOAD.format(marker=str(marker)))
    result = cli("eval", "iq", "--model", folder, "--tasks", "head_tail", "--items", "2", "--device", "cpu")
    assert result.status == 2 and result.err.count("\n") == 1 and "--trust-remote-code" in result.err
    assert not marker.exists()


def test_an_flm_export_is_read_with_flms_own_code(tiny, tmp_path, cli):
    """A folder `flm export hf` wrote, with a payload planted in its modeling code: `flm eval iq` reads it with
    flm's model (no flag needed, nothing of the folder runs) and scores exactly what the checkpoint scores."""
    run, out, marker = tmp_path / "run", tmp_path / "hf", tmp_path / "payload-ran"
    assert cli("train", *tiny.args(run, "train.max_steps=3")).status == 0
    assert cli("export", "hf", run, out).status == 0
    with open(out / "modeling_flm.py", "a") as f:
        f.write(PAYLOAD.format(marker=str(marker)))
    args = ("--tasks", "head_tail,superglue_iq_rte", "--items", "3", "--device", "cpu")
    from_export = cli("eval", "iq", "--model", out, *args, "--json", tmp_path / "a.json")
    from_checkpoint = cli("eval", "iq", "--model", run, *args, "--json", tmp_path / "b.json")
    assert from_export.status == from_checkpoint.status == 0 and not marker.exists()
    reports = [json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json")]
    assert reports[0]["items"] == reports[1]["items"] and reports[0]["abilities"] == reports[1]["abilities"]


# ---- mid-ramp checkpoints --------------------------------------------------------------------------------
def test_inference_on_a_grown_checkpoint_equals_the_original_model(tiny, tmp_path, cli):
    """`flm grow` writes a checkpoint at c = 0 of its ramp; inference applies its masks, so the grown model
    computes the original function (width, heads, FFN and depth growth at once)."""
    run, grown = tmp_path / "run", tmp_path / "grown"
    assert cli("train", *tiny.args(run, "train.max_steps=6")).status == 0
    assert cli("grow", run, "--to", "d_model=96,n_heads=3,n_layers=3", "--out", grown, "--ramp-steps", "10").status == 0
    before, _, _ = load_for_inference(run)
    after, _, meta = load_for_inference(grown)
    assert meta["ramp"]["steps_done"] == 0 and after.cfg.d_model == 96
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = before(tokens)[0], after(tokens)[0]
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
    texts = [cli("generate", path, "-p", "And God said", "-n", "24", "-t", "0").out for path in (run, grown)]
    assert texts[0] == texts[1] and len(texts[0]) > len("And God said")
