"""The one exception type of the data layer.

`DataError` marks a problem with the user's data or data settings (a missing file, an empty glob, a bad
FASTA record, a corrupt shard, an incomplete dataset). The CLI prints its message as one line and exits
with code 2, so every message names the offending file, shard or setting and fits on one line.
"""

from __future__ import annotations

_WORKER_MARKER = "\nOriginal Traceback"


class DataError(ValueError):
    """A user-facing data problem; the message is a single line naming the file, shard or setting."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker re-raises our exception in the main process as
        # `DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...")`;
        # keep only the original one-line message so the CLI still prints a single line.
        if _WORKER_MARKER in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split("DataError: ", 1)[-1]
        super().__init__(message)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name): foreign errors, one line each."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
