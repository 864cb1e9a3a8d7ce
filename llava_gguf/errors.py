"""The one user-facing error type, and the one warning type. Anything else that escapes is a bug."""
from __future__ import annotations

import warnings


def _one_line(message: str, hint: str | None) -> str:
    text = message if not hint else f"{message} ({hint})"
    return " ".join(text.split())


class LlavaGgufError(Exception):
    """An expected failure the user can act on: a message naming the problem, and a hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return _one_line(self.message, self.hint)

    def __str__(self) -> str:
        return self.one_line()


class InvalidSetting(LlavaGgufError, ValueError):
    """A setting out of its range (sampling, threads, context): the CLI prints it as one line like every
    LlavaGgufError; Python callers can catch it as the ValueError it is."""


class LlavaGgufWarning(UserWarning):
    """Something the user should know that does not stop the work (a capped setting, a lossy input).
    The CLI prints each as one line on stderr (`warning: ...`); library callers get a Python warning
    they can filter or turn into an error."""


def warn(message: str, hint: str | None = None, *, stacklevel: int = 2) -> None:
    """Emit a LlavaGgufWarning whose text is one line."""
    warnings.warn(LlavaGgufWarning(_one_line(message, hint)), stacklevel=stacklevel + 1)
