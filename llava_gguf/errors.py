"""The one user-facing error type. Anything else that escapes is a bug."""
from __future__ import annotations


class LlavaGgufError(Exception):
    """An expected failure the user can act on: a message naming the problem, and a hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.one_line()
