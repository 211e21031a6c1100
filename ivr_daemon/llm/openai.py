"""Any OpenAI-compatible chat endpoint (llama.cpp, vLLM, OpenAI): ``choices[0].message.content``, whole or streamed.

Wire format (https://platform.openai.com/docs/api-reference/chat/create)::

    -> POST /v1/chat/completions   Authorization: Bearer <api_key>   (header only when a key is set)
       {"model": "llama3", "messages": [{"role": "system", "content": "..."}, ...], "max_tokens": 200}
    <- {"id": "chatcmpl-...", "object": "chat.completion", "created": 1714560000, "model": "llama3",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."},
                     "finish_reason": "stop"}], "usage": {...}}

Streamed (``"stream": true``), the reply is server-sent events, one ``chat.completion.chunk``
per event, the text in ``choices[0].delta.content``::

    <- data: {"id": "chatcmpl-...", "object": "chat.completion.chunk", ..., "choices": [{"index": 0,
              "delta": {"role": "assistant"}, "finish_reason": null}]}

       data: {..., "choices": [{"index": 0, "delta": {"content": "We"}, "finish_reason": null}]}

       data: {..., "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

       data: [DONE]

The reply is over at the first ``finish_reason`` (older llama.cpp servers send no ``[DONE]``)
or at ``[DONE]``; ``: ping`` comment lines (llama_cpp.server's keep-alives) are skipped.

URL rule: ``api_url`` is normally the full endpoint URL. If its path is empty (``http://host:8080``)
``/v1/chat/completions`` is appended; if its path ends in ``/v1`` (``http://host:8080/v1``, the
"base URL" OpenAI SDKs take) ``/chat/completions`` is appended. Any other path is used as given,
and a query string is kept either way.
"""

from __future__ import annotations

from typing import Generator
from urllib.parse import urlsplit, urlunsplit

from ivr_daemon.llm.base import LlmBadReply, LlmClient, Message, check_messages


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
        return self.text_at(self.post_json(self._payload(messages)), "choices", 0, "message", "content")

    def stream(self, messages: list[Message]) -> Generator[str, None, None]:
        yield from self.post_stream(self._payload(messages, stream=True), "sse")

    def _payload(self, messages: list[Message], stream: bool = False) -> dict:
        payload: dict = {"model": self.model, "messages": check_messages(messages)}
        if stream:
            payload["stream"] = True
        if self.max_tokens is not None:
            # max_tokens, not max_completion_tokens: llama.cpp, vLLM and Ollama's /v1 read this one.
            payload["max_tokens"] = self.max_tokens
        return payload

    def stream_delta(self, event: str) -> tuple[str, bool]:
        if event.strip() == "[DONE]":
            return "", True
        chunk = self.stream_chunk(event)
        choices = chunk.get("choices")
        if choices == []:
            return "", False  # the usage chunk that stream_options.include_usage adds
        try:
            choice = choices[0]
        except (TypeError, IndexError, KeyError):
            raise LlmBadReply(
                f"openai: stream chunk has no choices[0] (keys: {', '.join(sorted(chunk)) or 'none'})"
            ) from None
        if not isinstance(choice, dict):
            raise LlmBadReply(f"openai: stream chunk's choices[0] is {type(choice).__name__}, not an object")
        if "delta" not in choice and "message" in choice:
            # A whole chat.completion: the server ignored "stream": true.
            return self.text_at(chunk, "choices", 0, "message", "content"), True
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if content is None:
            content = ""  # the role-only first chunk, the empty last one, a tool call
        if not isinstance(content, str):
            raise LlmBadReply(f"openai: stream chunk's delta.content is {type(content).__name__}, not text")
        return content, choice.get("finish_reason") is not None
