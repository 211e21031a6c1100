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

Tools (https://docs.ollama.com/capabilities/tool-calling): offered as ``"tools": [{"type":
"function", "function": {"name", "description", "parameters"}}]``. A reply that calls tools has
``message.tool_calls``, each call whole, its arguments an object; streamed, the calls come
whole in a line of their own (``"done": false``) after the text, and each is handed out as
soon as its line arrives::

    <- {"model": "llama3", ..., "message": {"role": "assistant", "content": "",
        "tool_calls": [{"function": {"index": 0, "name": "transfer_call", "arguments": {"target": "sales"}}}]},
        "done": false}

Ollama numbers no calls (newer versions may send an ``id``: it is kept), so the client gives
each an id of its own. The next request tells the model what happened: the assistant message
with ``"tool_calls": [{"type": "function", "id", "function": {"index", "name", "arguments":
{object}}}]`` (``{}`` for arguments that were not an object), then one ``{"role": "tool",
"content", "tool_name", "tool_call_id"}`` per call (``tool_name`` is the field Ollama's docs
give; ``tool_call_id`` is for newer versions, older ones ignore it).
"""

from __future__ import annotations

from typing import Generator, Sequence
from urllib.parse import urlsplit, urlunsplit

from ivr_daemon.llm.base import (
    LlmBadReply,
    LlmClient,
    Message,
    StreamReader,
    ToolCall,
    ToolSpec,
    check_messages,
    check_tools,
    function_tools,
)

CHAT_PATH = "/api/chat"


class OllamaClient(LlmClient):
    """A model served by Ollama."""

    provider = "ollama"
    supports_tools = True

    @classmethod
    def endpoint_url(cls, api_url: str) -> str:
        parts = urlsplit(api_url)
        if parts.path.strip("/") == "":
            return urlunsplit(parts._replace(path=CHAT_PATH))
        return api_url

    def complete(self, messages: list[Message]) -> str:
        return self.text_at(self.post_json(self._payload(messages, stream=False)), "message", "content")

    def respond(self, messages: list[Message], tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        text, raw_calls = self.message_parts(self.post_json(self._payload(messages, stream=False, tools=tools)),
                                             "message")
        return self.whole_reply(text, self.tool_calls_of(raw_calls))

    def stream(
        self, messages: list[Message], tools: Sequence[ToolSpec] = ()
    ) -> Generator[str | ToolCall, None, None]:
        yield from self.post_stream(self._payload(messages, stream=True, tools=tools), "ndjson")

    def _payload(self, messages: list[Message], stream: bool, tools: Sequence[ToolSpec] = ()) -> dict:
        payload = {"model": self.model, "messages": [_wire_message(m) for m in check_messages(messages)],
                   "stream": stream}
        if self.max_tokens is not None:
            payload["options"] = {"num_predict": self.max_tokens}
        tools = check_tools(tools)
        if tools:
            payload["tools"] = function_tools(tools)
        return payload

    def stream_reader(self) -> StreamReader:
        return _OllamaStreamReader(self)


def _wire_message(message: Message) -> dict:
    """A checked message as Ollama's chat API takes it."""
    if message["role"] == "tool":
        return {"role": "tool", "tool_call_id": message["tool_call_id"], "tool_name": message["name"],
                "content": message["content"]}
    if "tool_calls" in message:
        return {"role": "assistant", "content": message["content"], "tool_calls": [
            {"type": "function", "id": call.call_id,
             "function": {"index": index, "name": call.name,
                          "arguments": call.arguments if call.arguments is not None else {}}}
            for index, call in enumerate(message["tool_calls"])
        ]}
    return {"role": message["role"], "content": message["content"]}


class _OllamaStreamReader(StreamReader):
    """Text from ``message.content``; the calls of ``message.tool_calls`` as soon as their line arrives."""

    def __init__(self, client: OllamaClient):
        self._client = client

    def feed(self, event: str) -> tuple[str, list[ToolCall], bool]:
        chunk = self._client.stream_chunk(event)
        done = chunk.get("done") is True
        message = chunk.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is None and done:
            content = ""  # the closing line of statistics need not repeat the message
        if not isinstance(content, str):
            raise LlmBadReply(
                f"ollama: stream line has no message.content text (keys: {', '.join(sorted(chunk)) or 'none'})"
            )
        calls = self._client.tool_calls_of(message.get("tool_calls")) if isinstance(message, dict) else []
        return content, calls, done
