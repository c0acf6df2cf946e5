"""The one validation helper every config dataclass uses."""

from flm.errors import FlmError


def require(cond: bool, msg: str) -> None:
    """Raise a one-line config error unless `cond` holds."""
    if not cond:
        raise FlmError(f"config error: {msg}")
