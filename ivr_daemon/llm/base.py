"""The LLM client interface and its errors: a chat history in, the assistant's text out.

Every provider module (``ollama``, ``openai``, ``llama3``) turns the same ``messages`` list
into its own JSON request and reads its own reply shape; the HTTP exchange, the time bound
and the mapping of every failure to an :class:`LlmError` live here, once.

Time bound: each request gets ``timeout=(timeout_s, timeout_s)`` (connect, each read) *and*
a wall-clock ``gevent.Timeout(timeout_s)`` around the whole exchange, so a server that
trickles its reply a byte at a time cannot hold a call for longer than ``timeout_s``. The
wall-clock bound needs the process to be gevent monkey-patched (the daemon always is, and
so are the tests); without patching only the per-operation socket timeouts apply.
"""

from __future__ import annotations

import abc
import http.client
import json
import socket
import time

import gevent
import requests
import urllib3.exceptions

from ivr_daemon.logs import get_logger

log = get_logger(__name__)

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}

_SNIPPET_CHARS = 200


def _one_line(text: str, limit: int = _SNIPPET_CHARS) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class LlmError(Exception):
    """Base of every LLM failure; ``str()`` is one line, fit for a log."""

    def __init__(self, message: str):
        super().__init__(_one_line(message, limit=500))


class LlmTimeout(LlmError):
    """No complete reply within ``timeout_s``."""


class LlmUnavailable(LlmError):
    """The server could not be reached or answered with an HTTP error status."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class LlmBadReply(LlmError):
    """The server answered, but not with JSON of the provider's shape carrying non-empty text."""


def _caused_by_read_timeout(exc: BaseException) -> bool:
    # requests wraps a read timeout hit while downloading the body in ConnectionError, not
    # Timeout (models.Response.iter_content), so look inside before calling it "unavailable".
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (urllib3.exceptions.ReadTimeoutError, socket.timeout, requests.Timeout)):
            return True
        pending.extend(current.args)
        pending.extend((current.__cause__, getattr(current, "reason", None)))
    return False


def _server_error(reply: object) -> str | None:
    """The message of an ``{"error": ...}`` reply (Ollama: a string; OpenAI, llama.cpp: an object)."""
    error = reply.get("error") if isinstance(reply, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) and error else None


def _error_detail(body: bytes) -> str:
    """What an error reply says, as one short line."""
    text = body.decode("utf-8", "replace")
    try:
        return _one_line(_server_error(json.loads(body)) or text)
    except ValueError:
        return _one_line(text)


def check_messages(messages: list[Message], minimum: int = 1) -> list[Message]:
    """Plain ``{"role", "content"}`` copies of ``messages``; ValueError on a caller's mistake."""
    if not isinstance(messages, list) or len(messages) < minimum:
        raise ValueError(f"need a list of at least {minimum} message(s), got {messages!r:.80}")
    clean: list[Message] = []
    for index, message in enumerate(messages):
        try:
            role, content = message["role"], message["content"]
        except (TypeError, KeyError):
            raise ValueError(f"message {index} is not a {{'role', 'content'}} dict") from None
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"message {index}: role and content must be strings")
        clean.append({"role": role, "content": content})
    return clean


class LlmClient(abc.ABC):
    """One endpoint and model; ``complete`` is a blocking request, cooperative under gevent."""

    provider: str

    def __init__(
        self,
        api_url: str,
        model: str,
        timeout_s: float,
        api_key: str = "",
        session: requests.Session | None = None,
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.api_url = self.endpoint_url(api_url.strip())
        self.model = model
        self.timeout_s = float(timeout_s)
        self.api_key = api_key
        # One session per client: the server's keep-alive connection is reused across turns.
        self._session = session if session is not None else requests.Session()

    @classmethod
    def endpoint_url(cls, api_url: str) -> str:
        """The URL to POST to, from the configured one; providers may complete a base URL."""
        return api_url

    @abc.abstractmethod
    def complete(self, messages: list[Message]) -> str:
        """Blocking HTTP request (cooperative under gevent monkey-patching).

        ``messages[0]`` is the system prompt, the last one is the new user message. Returns
        the assistant text, stripped. Raises LlmError subclasses only — never requests/json
        exceptions (a malformed ``messages`` argument is a caller bug: ValueError).
        """

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "LlmClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def request_headers(self) -> dict[str, str]:
        return {"Accept": "application/json"}

    def post_json(self, payload: dict) -> object:
        """POST ``payload`` as JSON to ``api_url``; the parsed JSON reply, or an LlmError."""
        started_s = time.monotonic()
        outcome, status = "ok", None
        try:
            status, body = self._exchange(payload)
            if status >= 400:
                raise LlmUnavailable(
                    f"{self.provider}: HTTP {status} from {self.api_url}: {_error_detail(body)}", status=status
                )
            try:
                return json.loads(body)
            except ValueError:
                raise LlmBadReply(
                    f"{self.provider}: reply from {self.api_url} is not JSON (HTTP {status}, {len(body)} bytes):"
                    f" {_one_line(body.decode('utf-8', 'replace'), 80)!r}"
                ) from None
        except LlmError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            log.debug(
                "llm_request",
                provider=self.provider,
                model=self.model,
                outcome=outcome,
                status=status,
                elapsed_ms=round((time.monotonic() - started_s) * 1000),
            )

    def _exchange(self, payload: dict) -> tuple[int, bytes]:
        deadline = gevent.Timeout(self.timeout_s)
        deadline.start()
        try:
            response = self._session.post(
                self.api_url,
                json=payload,
                headers=self.request_headers(),
                timeout=(self.timeout_s, self.timeout_s),
            )
            # Read the whole body inside the deadline: a trickling body is the slow part.
            return response.status_code, response.content
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise  # a caller's own timeout: not ours to translate
            raise self._timeout() from None
        except requests.Timeout as exc:
            raise self._timeout() from exc
        except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError, ValueError) as exc:
            # requests.RequestException is an OSError; the rest are what urllib3 or http.client
            # occasionally let through unwrapped (bad URL, broken chunking, header overflow).
            if _caused_by_read_timeout(exc):
                raise self._timeout() from exc
            raise LlmUnavailable(f"{self.provider}: cannot reach {self.api_url}: {_one_line(exc)}") from exc
        finally:
            deadline.close()

    def _timeout(self) -> LlmTimeout:
        return LlmTimeout(f"{self.provider}: no reply from {self.api_url} within {self.timeout_s:g} s")

    def text_at(self, reply: object, *path: str | int) -> str:
        """The non-empty stripped string at ``path`` inside ``reply``, else LlmBadReply."""
        node = reply
        walked = "reply"
        for step in path:
            try:
                node = node[step]  # type: ignore[index]
            except (KeyError, IndexError, TypeError):
                detail = ""
                if _server_error(reply):
                    detail = f" (server error: {_one_line(_server_error(reply))})"
                elif isinstance(reply, dict):
                    detail = f" (keys: {', '.join(sorted(map(str, reply))) or 'none'})"
                raise LlmBadReply(
                    f"{self.provider}: reply has no {walked}[{step!r}]{detail}"
                ) from None
            walked += f"[{step!r}]"
        if not isinstance(node, str):
            raise LlmBadReply(f"{self.provider}: {walked} is {type(node).__name__}, not text")
        text = node.strip()
        if not text:
            raise LlmBadReply(f"{self.provider}: {walked} is empty")
        return text
