"""The one exception type the CLI turns into a clean one-line error, and text made safe to print."""

import re


class TeskdError(Exception):
    """A user-facing error: bad input, bad config, missing data, broken checkpoint.

    The CLI prints ``error: <message>`` and exits non-zero, without a traceback
    (unless ``--debug``), so messages must be complete and on one line.
    """


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """``Type: message`` of an exception on one line (whitespace collapsed), its text cut at ``limit``."""
    text = " ".join(str(exc).split())[:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# C0/C1 control characters (escape sequences, newlines, carriage returns, backspaces) and the Unicode
# line/paragraph separators and bidirectional overrides: in a name read from a file they could forge output
# lines, clear the screen or reorder what the user sees.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text) -> str:
    """``str(text)`` with every control character shown as its escape (``\\x1b``, ``\\n``): for names that come
    from files (class names, file names, a run's method) before they reach the terminal."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
