"""The one exception type the CLI turns into a clean one-line error."""


class TeskdError(Exception):
    """A user-facing error: bad input, bad config, missing data, broken checkpoint.

    The CLI prints ``error: <message>`` and exits non-zero, without a traceback
    (unless ``--debug``), so messages must be complete and on one line.
    """


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """``Type: message`` of an exception on one line (whitespace collapsed), its text cut at ``limit``."""
    text = " ".join(str(exc).split())[:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
