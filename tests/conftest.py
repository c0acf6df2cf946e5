"""Shared fixtures: prepared corpora, one small run's config, and the ways tests run flm's command line.

- `prepare_corpus(*data_settings)` prepares a corpus once per test session and gives its folder; `tiny_data` is
  the tiny corpus most tests train on (the bundled KJV text, 150k characters, a 512-token BPE).
- `tiny` builds the settings, command-line arguments and Config of a small, fast run on it, with overrides;
  `tiny_on(*data_settings)` is the same builder on another corpus (for a test whose numbers depend on it).
- `cli(*args)` runs `flm ARGS` in this process: CliResult(exit status, stdout, stderr).
- `cli_process(*args)` runs `flm ARGS` in a fresh Python process (CompletedProcess); `cli_process.start(...)`
  starts one in the background (Popen), for tests that kill or stop it.
- `torchrun(nproc, *args)` runs `torchrun --nproc-per-node N -m flm.cli.main ARGS` on the CPU (gloo) with a hard
  timeout; `torchrun.start(...)` starts it in the background.

`flm` is always the package; a runner of its command line is `cli` (in this process) or `cli_process` (in another).
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import flm
from flm.config import Config, load_config
from flm.data import prepare

SRC = str(Path(flm.__file__).resolve().parents[1])

TINY_CORPUS = ("data.corpus=kjv", "data.max_chars=150000", "data.vocab_size=512", "data.val_fraction=0.05")

# Tiny matrices run faster on one thread, and the multi-process tests start one thread per process: with two
# threads here every run would compete with them (and with the other test process, if any) for two cores.
torch.set_num_threads(1)


# ---- corpora -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prepare_corpus(tmp_path_factory):
    """`prepare_corpus(*data_settings)`: the folder of the corpus those `data.*` settings describe, prepared once
    per session (every test asking for the same settings shares it and only reads it)."""
    folders: dict[tuple[str, ...], Path] = {}

    def prepared(*settings: str) -> Path:
        if settings not in folders:
            root = tmp_path_factory.mktemp("corpus") / "prepared"
            prepare(load_config(None, [f"data.dir='{root}'", *settings]).data, log=lambda _: None)
            folders[settings] = root
        return folders[settings]

    return prepared


@pytest.fixture(scope="session")
def tiny_data(prepare_corpus) -> Path:
    """The prepared folder of the tiny corpus, shared by every test that only reads it."""
    return prepare_corpus(*TINY_CORPUS)


@pytest.fixture
def tiktoken_file():
    """`tiktoken_file(path)`: a tiny tiktoken rank file (the 256 bytes, then `extra` merged tokens) written to
    `path`; its tokenizer has ids 0..257 and end-of-text 258."""

    def write(path: Path, extra: tuple[bytes, ...] = (b"th", b"the")) -> Path:
        lines = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]
        lines += [base64.b64encode(tok) + b" %d" % (256 + i) for i, tok in enumerate(extra)]
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path

    return write


# ---- the config of a small run -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiny:
    """A small, fast run on a prepared corpus: 2 layers x 64, batches of 4 x 32 tokens, 12 steps. Every method
    takes the run folder and overrides (`section.key=value`, later values win)."""

    data: Path
    corpus: tuple[str, ...] = TINY_CORPUS  # the data settings `data` was prepared with

    def settings(self, run_dir, *extra: str) -> list[str]:
        """`--set` values of the run writing into `run_dir`."""
        return [f"data.dir='{self.data}'", *self.corpus, f"train.run_dir='{run_dir}'",
                "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.head_dim=32", "model.max_seq_len=64",
                "train.batch_size=4", "train.grad_accum=1", "train.seq_len=32", "train.max_steps=12",
                "train.warmup_steps=2", "train.lr=3e-3", "train.min_lr=3e-4", "train.eval_every=6",
                "train.eval_batches=2", "train.ckpt_every=3", "train.keep_last=10", "train.log_every=1",
                "train.progress=false", "train.tensorboard=false", "train.sample_tokens=0", *extra]

    def args(self, run_dir, *extra: str) -> list[str]:
        """The same as command-line arguments: --set a=1 --set b=2 ..."""
        return [arg for s in self.settings(run_dir, *extra) for arg in ("--set", s)]

    def config(self, run_dir, *extra: str, path=None) -> Config:
        """The Config: the TOML file `path` (if any: [[stages]], say) under these settings."""
        return load_config(path, self.settings(run_dir, *extra))


@pytest.fixture(scope="session")
def tiny(tiny_data) -> Tiny:
    return Tiny(tiny_data)


@pytest.fixture(scope="session")
def tiny_on(prepare_corpus):
    """`tiny_on(*data_settings)`: the small run's builder on another corpus, prepared once per session."""
    return lambda *corpus: Tiny(prepare_corpus(*corpus), corpus)


# ---- the command line, in this process ---------------------------------------------------------------------
@dataclass
class CliResult:
    status: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """`cli(*args)`: run `flm ARGS` in this process; CliResult(exit status, stdout, stderr). An argparse error's
    exit is an exit status like any other."""
    from flm.cli.main import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            status = main([str(a) for a in args])
        except SystemExit as e:  # as the process would exit: None is 0, a message is 1
            status = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(status, captured.out, captured.err)

    return run


# ---- other processes ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(torchrun: bool) -> dict[str, str]:
    """This environment with flm's source first; one thread per torchrun rank; a single process never sees a
    torchrun environment that the test process may have."""
    env = dict(os.environ)
    if torchrun:
        env["OMP_NUM_THREADS"] = "1"
    else:
        env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


class CliProcess:
    """`flm ARGS` in a fresh single process (no torchrun environment)."""

    @staticmethod
    def command(*args) -> list[str]:
        return [sys.executable, "-m", "flm.cli.main", *map(str, args)]

    def __call__(self, *args, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        """Run it to the end; with `check`, assert it exits 0 (showing its stderr otherwise)."""
        proc = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout, env=_env(False))
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def start(self, *args, **popen) -> subprocess.Popen:
        """Start it in the background (text pipes for stdout and stderr unless `popen` says otherwise)."""
        popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
        return subprocess.Popen(self.command(*args), env=_env(False), **popen)


class Torchrun:
    """`torchrun --nproc-per-node N -m flm.cli.main ARGS` (or `torchrun ... SCRIPT ARGS`) on this machine's CPU,
    one thread per process."""

    @staticmethod
    def command(nproc: int, *args, script: str | None = None) -> list[str]:
        target = [script] if script is not None else ["-m", "flm.cli.main"]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *target, *map(str, args)]

    def __call__(self, nproc: int, *args, timeout: float = 300, check: bool = True,
                 script: str | None = None) -> subprocess.CompletedProcess:
        """Run the job to the end; with `check` (the default), assert it exits 0."""
        proc = subprocess.run(self.command(nproc, *args, script=script), capture_output=True, text=True,
                              timeout=timeout, env=_env(True))
        if check:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return proc

    def start(self, nproc: int, *args, **popen) -> subprocess.Popen:
        """Start the job in the background (text pipes for stdout and stderr)."""
        popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
        return subprocess.Popen(self.command(nproc, *args), env=_env(True), **popen)


@pytest.fixture(scope="session")
def cli_process() -> CliProcess:
    return CliProcess()


@pytest.fixture(scope="session")
def torchrun() -> Torchrun:
    return Torchrun()
