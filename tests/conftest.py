"""Shared fixtures: one prepared tiny corpus per test run, a tiny run on it, and one way to run the CLI.

`tiny_data` is prepared once per session (the bundled KJV text, 150k characters, a 512-token BPE); `tiny`
gives the settings, command-line arguments and config of a small, fast run on it; `flm` runs the command
line in this process and returns its exit status and what it printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from flm.config import Config, load_config
from flm.data import prepare

DATA = ["data.corpus=kjv", "data.max_chars=150000", "data.vocab_size=512", "data.val_fraction=0.05"]

# Tiny matrices run faster on one thread, and the multi-process tests start one thread per process: with two
# threads here every run would compete with them (and with the other test process, if any) for two cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared folder of the bundled corpus, shared by every test that only reads it."""
    root = tmp_path_factory.mktemp("tiny-data") / "prepared"
    prepare(load_config(None, [f"data.dir='{root}'", *DATA]).data, log=lambda _: None)
    return root


@dataclass
class Tiny:
    """A small, fast run on the shared corpus: 2 layers x 64, batches of 4 x 32 tokens, 12 steps."""

    data: Path

    def settings(self, run_dir, *extra: str) -> list[str]:
        """`--set` values of the run writing into `run_dir` (later values win)."""
        return [f"data.dir='{self.data}'", *DATA, f"train.run_dir='{run_dir}'",
                "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.head_dim=32", "model.max_seq_len=64",
                "train.batch_size=4", "train.grad_accum=1", "train.seq_len=32", "train.max_steps=12",
                "train.warmup_steps=2", "train.lr=3e-3", "train.min_lr=3e-4", "train.eval_every=6",
                "train.eval_batches=2", "train.ckpt_every=3", "train.keep_last=10", "train.log_every=1",
                "train.progress=false", "train.tensorboard=false", "train.sample_tokens=0", *extra]

    def args(self, run_dir, *extra: str) -> list[str]:
        """The same as command-line arguments: --set a=1 --set b=2 ..."""
        return [arg for s in self.settings(run_dir, *extra) for arg in ("--set", s)]

    def config(self, run_dir, *extra: str, path=None) -> Config:
        return load_config(path, self.settings(run_dir, *extra))


@pytest.fixture
def tiny(tiny_data) -> Tiny:
    return Tiny(tiny_data)


@dataclass
class CliResult:
    status: int
    out: str
    err: str


@pytest.fixture
def flm(capsys):
    """Run `flm ARGS...` in this process: CliResult(exit status, stdout, stderr)."""
    from flm.cli.main import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        status = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(status, captured.out, captured.err)

    return run
