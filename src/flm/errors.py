"""One exception type for user mistakes.

The CLI turns an `FlmError` into a one-line message and exit code 2; anything else is a bug and keeps
its traceback.
"""


class FlmError(Exception):
    """A problem the user can fix (bad config, missing file, corrupt shard, ...)."""


def require_module(name: str, extra: str) -> None:
    """Fail with an install hint, not an ImportError traceback, when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise FlmError(f"this command needs the '{name}' package: pip install 'flm[{extra}]' (or pip install {name})")
