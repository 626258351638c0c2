"""The one exception type the CLI turns into a clean one-line error."""


class TeskdError(Exception):
    """A user-facing error: bad input, bad config, missing data, broken checkpoint.

    The CLI prints ``error: <message>`` and exits non-zero, without a traceback
    (unless ``--debug``), so messages must be complete and on one line.
    """
