"""The one exception type for mistakes a user can make.

The CLI prints a `LorafitError` as a single line and exits non-zero; anything else is a bug in lorafit
and keeps its traceback.
"""


class LorafitError(Exception):
    """A user-facing error: what was found, what was expected, and the likely fix, in one line."""

    exit_code = 2

    def __init__(self, message: str):
        # one line, whatever a user put into a key, value or file name that the message quotes
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class BudgetExceeded(LorafitError):
    """The adapter configuration trains more parameters than `budget.max_trainable` allows."""

    exit_code = 3
