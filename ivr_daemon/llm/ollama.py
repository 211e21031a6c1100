"""Ollama's chat API: ``POST /api/chat``, text in ``message.content``, whole or streamed as NDJSON.

Wire format (https://github.com/ollama/ollama/blob/main/docs/api.md#generate-a-chat-completion)::

    -> {"model": "llama3", "messages": [{"role": "system", "content": "..."}, ...], "stream": false,
        "options": {"num_predict": 200}}
    <- {"model": "llama3", "created_at": "2024-05-01T12:00:00Z",
        "message": {"role": "assistant", "content": "..."}, "done": true, "done_reason": "stop", ...}

``stream`` is always sent: Ollama streams when it is absent. With ``"stream": true`` the reply
is ``application/x-ndjson``, one object per line, each carrying the next piece of text::

    <- {"model": "llama3", "created_at": "...", "message": {"role": "assistant", "content": "We"}, "done": false}
       {"model": "llama3", "created_at": "...", "message": {"role": "assistant", "content": " are"}, "done": false}
       {"model": "llama3", "created_at": "...", "message": {"role": "assistant", "content": ""},
        "done": true, "done_reason": "stop", "total_duration": ..., "eval_count": ...}

A failure after the stream started cannot change the HTTP status any more, so Ollama sends it
as a line of its own: ``{"error": "..."}``. ``api_url`` is the full endpoint URL (default
http://localhost:11434/api/chat); a bare ``http://host:port`` gets ``/api/chat`` appended.
"""

from __future__ import annotations

from typing import Generator
from urllib.parse import urlsplit, urlunsplit

from ivr_daemon.llm.base import LlmBadReply, LlmClient, Message, check_messages

CHAT_PATH = "/api/chat"


class OllamaClient(LlmClient):
    """A model served by Ollama."""

    provider = "ollama"

    @classmethod
    def endpoint_url(cls, api_url: str) -> str:
        parts = urlsplit(api_url)
        if parts.path.strip("/") == "":
            return urlunsplit(parts._replace(path=CHAT_PATH))
        return api_url

    def complete(self, messages: list[Message]) -> str:
        return self.text_at(self.post_json(self._payload(messages, stream=False)), "message", "content")

    def stream(self, messages: list[Message]) -> Generator[str, None, None]:
        yield from self.post_stream(self._payload(messages, stream=True), "ndjson")

    def _payload(self, messages: list[Message], stream: bool) -> dict:
        payload = {"model": self.model, "messages": check_messages(messages), "stream": stream}
        if self.max_tokens is not None:
            payload["options"] = {"num_predict": self.max_tokens}
        return payload

    def stream_delta(self, event: str) -> tuple[str, bool]:
        chunk = self.stream_chunk(event)
        done = chunk.get("done") is True
        message = chunk.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is None and done:
            content = ""  # the closing line of statistics need not repeat the message
        if not isinstance(content, str):
            raise LlmBadReply(
                f"ollama: stream line has no message.content text (keys: {', '.join(sorted(chunk)) or 'none'})"
            )
        return content, done
