"""The LLM clients' errors, one vocabulary for every provider (and what a log line of one looks like)."""

from __future__ import annotations

SNIPPET_CHARS = 200  # of a server's words quoted in an error or a log line


def one_line(text: str, limit: int = SNIPPET_CHARS) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class LlmError(Exception):
    """Base of every LLM failure; ``str()`` is one line, fit for a log."""

    def __init__(self, message: str):
        super().__init__(one_line(message, limit=500))


class LlmTimeout(LlmError):
    """No complete reply within ``timeout_s``."""


class LlmUnavailable(LlmError):
    """The server could not be reached or answered with an HTTP error status."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class LlmBadReply(LlmError):
    """The server answered, but not with JSON of the provider's shape carrying non-empty text or tool calls."""
