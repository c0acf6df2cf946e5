"""The `flm` command line end to end: prepare, train, resume, generate, info."""

import json

import pytest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.toml"
    config.write_text(f"""
[model]
n_layers = 2
d_model = 32
n_heads = 2
head_dim = 16
max_seq_len = 64
[data]
corpus = "bundled"
max_chars = 60000
vocab_size = 400
dir = "{root / 'data'}"
[train]
run_dir = "{root / 'run'}"
batch_size = 4
seq_len = 32
max_steps = 8
warmup_steps = 2
eval_every = 4
eval_batches = 2
ckpt_every = 4
progress = false
sample_tokens = 8
""")
    return root, config


def test_prepare_train_resume_generate(run, cli_process):
    """In fresh processes: the real command line, exit status included."""
    root, config = run
    out = cli_process("prepare", "-c", str(config), check=True).stdout
    assert "prepared" in out and (root / "data" / "meta.json").exists()
    first = cli_process("train", "-c", str(config), "--until-step", "4", check=True).stdout
    assert "validation loss" in first
    second = cli_process("train", "-c", str(config), "--resume", "auto", check=True).stdout
    assert "resumed from" in second and "step_00000004" in second
    assert "sample: 'In the beginning" in second
    assert (root / "run" / "loss.png").exists() and (root / "run" / "tensorboard").is_dir()
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [4, 8]  # log_every 10: at stop and end
    # A finished run: nothing to do, still reports.
    done = cli_process("train", "-c", str(config), "--resume", "auto", check=True).stdout
    assert "resumed from" in done and "validation loss" in done
    text = cli_process("generate", root / "run", "-p", "In the beginning", "-n", "10", "-t", "0", check=True).stdout
    again = cli_process("generate", root / "run", "-p", "In the beginning", "-n", "10", "-t", "0", check=True).stdout
    assert text.startswith("In the beginning") and text == again


def test_info_counts_the_paper_shape(cli_process):
    info = json.loads(cli_process("info", "--preset", "flm-101b", check=True).stdout)
    assert info["parameters"] == 102_729_175_040
    assert info["n_layers"] == 80 and info["d_model"] == 10240


def test_user_mistakes_are_one_line_errors(run, cli_process):
    root, config = run
    for args in (["generate", str(root / "nothing-here")],
                 ["train", "-c", str(config), "--set", "train.lr=-1"],
                 ["train", "-c", str(config), "--resume", str(root)],
                 ["info", "--preset", "nope"]):
        proc = cli_process(*args)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_progress_is_lines_in_a_log_file(tiny, tmp_path, cli_process):
    """Written to a file (CI, nohup, Slurm), progress is one line every log_every steps, never a bar redrawn with
    carriage returns."""
    proc = cli_process("train", *tiny.args(tmp_path / "run", "train.progress=true", "train.max_steps=8",
                                           "train.log_every=4"), check=True)
    out = proc.stdout + proc.stderr
    assert "\r" not in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ") and " lr " in line] == \
        ["4/8", "8/8"]
