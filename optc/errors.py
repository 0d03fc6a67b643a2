"""The one exception type users see: a one-line message saying what is wrong and where."""


class OptcError(Exception):
    """Bad input or an unmet requirement. The CLI prints `error: <message>` and exits 2."""

    exit_code = 2


class VerificationError(OptcError):
    """The compiled artifact exceeded its accuracy budget. Exit code 1, nothing written."""

    exit_code = 1


class InvalidValue(OptcError, ValueError):
    """A value of the right type that the API cannot take (a ValueError for Python callers)."""


class InvalidType(OptcError, TypeError):
    """A value of the wrong type given to the API (a TypeError for Python callers)."""


class PastContextWarning(UserWarning):
    """A sequence ran past the positions the model was trained on. Not an error (benchmarks and
    streaming experiments go there on purpose), but quality drops: pycoder-v2's perplexity rises
    30x past its 2,048 tokens (docs/streaming/pycoder-v2). The CLI prints it as `warning: ...`."""
