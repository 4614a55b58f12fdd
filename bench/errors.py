"""User-facing errors.

Anything a user can cause (a missing folder, a bad ``--set`` value, an infeasible noise ratio)
raises a subclass of :class:`UserError` with a one-line message that says what went wrong, where,
and what to do. The CLI prints that line to stderr and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one clear line."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep it to one line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))
