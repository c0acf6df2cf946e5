"""One writer per run folder.

Two `flm train` (or a `flm grow --out`) writing into one run folder would rotate away each other's
checkpoints and mix their metrics. The writer therefore holds an OS lock (flock, through the `filelock`
package) on `RUN_DIR/.flm.lock` for as long as it runs. The kernel drops the lock when the process ends,
however it ends, so a run killed with kill -9 never blocks `--resume`. A second writer gets one line
naming the holder (its pid, host and start time, written into the lock file by the holder).

The lock needs a file system with working flock (local disks, NFSv4, Lustre with `flock` mounted); on
one without, taking it fails with a clear error rather than silently running unlocked.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from flm.errors import FlmError

LOCK_FILE = ".flm.lock"


def _record_holder(fd: int) -> None:
    """Write who holds the lock into the lock file, for the message a second writer gets."""
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._lock: FileLock | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise a one-line FlmError naming its holder; then clear staging folders that dead
        writers left behind (no other writer can be alive while we hold the lock)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        # One lock object per path in this process (is_singleton): a process may take its own lock again (a
        # notebook that builds a second Trainer to resume); only other processes are kept out.
        lock = FileLock(path, timeout=0, fallback_to_soft=False, preserve_lock_file=True, is_singleton=True,
                        on_acquired=_record_holder)
        try:
            lock.acquire()
        except Timeout:
            try:
                other = path.read_text().strip() or "another process"
            except OSError:
                other = "another process"
            raise FlmError(f"run folder {self.run_dir} is in use by {other}; one writer per run folder "
                           "(wait for it, stop it, or choose another train.run_dir)") from None
        except OSError as e:
            raise FlmError(f"cannot lock run folder {self.run_dir} ({e.strerror or e}): its file system must "
                           "support flock") from None
        first = lock.lock_counter == 1  # not a second hold by this same process
        self._lock = lock
        if first:
            for stale in (self.run_dir / "checkpoints").glob(".step_*"):
                shutil.rmtree(stale, ignore_errors=True)
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
