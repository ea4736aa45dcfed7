"""The errors a user can fix: each carries one sentence that says what is wrong and how to fix it."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """What an error says, in its first line (its type's name when it says nothing): the reason a sentence quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class UserError(Exception):
    """Bad input or an unusable environment, explained in one sentence that names the fix.

    The command line prints it as `error: <sentence>` (no traceback) and ends the run FAILED with it.
    """


class ConfigError(UserError, ValueError):
    """A bad setting."""


class DataError(UserError, ValueError):
    """Unusable data; the sentence names the file, line and field."""


class ModelLoadError(UserError, RuntimeError):
    """A model or tokenizer that cannot be loaded."""


class FetchError(UserError, RuntimeError):
    """An offline model that could not be fetched or verified."""


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be used."""


class GpuMemoryError(UserError, RuntimeError):
    """The GPU ran out of memory."""


class ServerError(UserError, RuntimeError):
    """A server (engine.backend=server) that does not answer, exits, or never becomes healthy."""


def interrupt(signum: int, frame: object) -> None:
    """A signal handler: SIGTERM ends the current run as Ctrl-C does (KILLED, and resumable)."""
    raise KeyboardInterrupt(f"signal {signum}")
