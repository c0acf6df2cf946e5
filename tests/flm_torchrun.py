"""One way to start multi-process runs from tests: `torchrun` on CPU (gloo), with a hard timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import flm

SRC = str(Path(flm.__file__).resolve().parents[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *flm_args: str, timeout: float = 300, check: bool = True,
             script: str | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m flm.cli.main ARGS` (or `torchrun ... SCRIPT ARGS`) on this machine's CPU;
    one thread per process."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    target = [script] if script is not None else ["-m", "flm.cli.main"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *target, *flm_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def flm_cli(*flm_args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`flm ARGS` in a fresh single process (no torchrun environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "flm.cli.main", *flm_args], capture_output=True, text=True,
                          timeout=timeout, env=env)
