"""The exceptions the CLI turns into one line on stderr and an exit status; anything else is a bug and keeps
its traceback.
"""


class FlmError(Exception):
    """A problem the user can fix (bad config, missing file, corrupt shard, a full disk, ...): exit status 2."""

    exit_status = 2


class TrainingHalted(FlmError):
    """Training stopped on purpose because it went bad (non-finite loss, spikes, a stuck rank): exit status 3,
    so that a job script can tell it from a user mistake. The last good checkpoint is intact."""

    exit_status = 3


def require_module(name: str, extra: str) -> None:
    """Fail with an install hint, not an ImportError traceback, when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise FlmError(f"this command needs the '{name}' package: pip install 'flm[{extra}]' (or pip install {name})")
