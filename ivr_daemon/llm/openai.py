"""Any OpenAI-compatible chat endpoint (llama.cpp server, vLLM, OpenAI): text in ``choices[0].message.content``.

Wire format (https://platform.openai.com/docs/api-reference/chat/create)::

    -> POST /v1/chat/completions   Authorization: Bearer <api_key>   (header only when a key is set)
       {"model": "llama3", "messages": [{"role": "system", "content": "..."}, ...]}
    <- {"id": "chatcmpl-...", "object": "chat.completion", "created": 1714560000, "model": "llama3",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."},
                     "finish_reason": "stop"}], "usage": {...}}

URL rule: ``api_url`` is normally the full endpoint URL. If its path is empty (``http://host:8080``)
``/v1/chat/completions`` is appended; if its path ends in ``/v1`` (``http://host:8080/v1``, the
"base URL" OpenAI SDKs take) ``/chat/completions`` is appended. Any other path is used as given,
and a query string is kept either way.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from ivr_daemon.llm.base import LlmClient, Message, check_messages


class OpenAiClient(LlmClient):
    """A model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    provider = "openai"

    @classmethod
    def endpoint_url(cls, api_url: str) -> str:
        parts = urlsplit(api_url)
        path = parts.path.rstrip("/")
        if path == "":
            path = "/v1/chat/completions"
        elif path.endswith("/v1"):
            path += "/chat/completions"
        else:
            return api_url
        return urlunsplit(parts._replace(path=path))

    def request_headers(self) -> dict[str, str]:
        headers = super().request_headers()
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def complete(self, messages: list[Message]) -> str:
        payload = {"model": self.model, "messages": check_messages(messages)}
        return self.text_at(self.post_json(payload), "choices", 0, "message", "content")
