"""Ollama's chat API: ``POST /api/chat`` with ``stream: false``, text in ``message.content``.

Wire format (https://github.com/ollama/ollama/blob/main/docs/api.md#generate-a-chat-completion)::

    -> {"model": "llama3", "messages": [{"role": "system", "content": "..."}, ...], "stream": false}
    <- {"model": "llama3", "created_at": "2024-05-01T12:00:00Z",
        "message": {"role": "assistant", "content": "..."}, "done": true, "done_reason": "stop", ...}

``stream`` must be false: Ollama streams NDJSON chunks by default. ``api_url`` is the full
endpoint URL (default http://localhost:11434/api/chat); a bare ``http://host:port`` gets
``/api/chat`` appended.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from ivr_daemon.llm.base import LlmClient, Message, check_messages

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
        payload = {"model": self.model, "messages": check_messages(messages), "stream": False}
        return self.text_at(self.post_json(payload), "message", "content")
