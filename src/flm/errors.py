"""One exception type for user mistakes.

The CLI turns an `FlmError` into a one-line message and exit code 2; anything else is a bug and keeps
its traceback.
"""


class FlmError(Exception):
    """A problem the user can fix (bad config, missing file, corrupt shard, ...)."""
