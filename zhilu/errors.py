"""User-facing errors: one line, exit code 2, no traceback."""

from __future__ import annotations


class ZhiluError(Exception):
    """The user's input is wrong.

    The message names the field and what would be valid, e.g.
    ``ZhiluError("train.steps", "must be a positive integer, got -3")`` prints
    ``error: train.steps: must be a positive integer, got -3``.
    """

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # raised in a worker process, shown by the parent
        return (ZhiluError, (self.field, self.message))
