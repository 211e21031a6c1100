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

Tools (https://platform.openai.com/docs/guides/function-calling): offered as
``"tools": [{"type": "function", "function": {"name", "description", "parameters"}}]`` with
``"tool_choice": "auto"`` — OpenAI's default when tools are given, sent because
llama_cpp.server (``--chat_format chatml-function-calling``) calls no tool without it. A
reply that calls tools has ``message.tool_calls`` (``content`` may be null)::

    <- "message": {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
                   "function": {"name": "transfer_call", "arguments": "{\"target\": \"sales\"}"}}]},
       "finish_reason": "tool_calls"

Streamed, each call comes in pieces keyed by ``index``: its ``id``, ``type`` and name first,
then the ``arguments`` string in pieces, each in a ``delta.tool_calls`` of its own; the pieces
are joined and the calls handed out at the ``finish_reason``. Lenient where servers differ:
null fields are absent fields, an id repeated on every piece (llama_cpp.server) is one call,
a new id at an index already used (Ollama's ``/v1``) is a new call. The next request tells
the model what happened: the assistant message with ``tool_calls`` as above (arguments as the
model sent them, "{}" for none), then one ``{"role": "tool", "tool_call_id", "content"}`` per call.

URL rule: ``api_url`` is normally the full endpoint URL. If its path is empty (``http://host:8080``)
``/v1/chat/completions`` is appended; if its path ends in ``/v1`` (``http://host:8080/v1``, the
"base URL" OpenAI SDKs take) ``/chat/completions`` is appended. Any other path is used as given,
and a query string is kept either way.
"""

from __future__ import annotations

import dataclasses
from typing import Generator, Sequence
from urllib.parse import urlsplit, urlunsplit

from ivr_daemon.llm.base import (
    MAX_TOOL_ARGUMENTS_CHARS,
    MAX_TOOL_CALLS,
    MAX_TOOL_NAME_CHARS,
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


class OpenAiClient(LlmClient):
    """A model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    provider = "openai"
    supports_tools = True

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

    def respond(self, messages: list[Message], tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        return self.reply_of(self.post_json(self._payload(messages, tools=tools)))

    def stream(
        self, messages: list[Message], tools: Sequence[ToolSpec] = ()
    ) -> Generator[str | ToolCall, None, None]:
        yield from self.post_stream(self._payload(messages, stream=True, tools=tools), "sse")

    def _payload(self, messages: list[Message], stream: bool = False, tools: Sequence[ToolSpec] = ()) -> dict:
        payload: dict = {"model": self.model, "messages": [_wire_message(m) for m in check_messages(messages)]}
        if stream:
            payload["stream"] = True
        if self.max_tokens is not None:
            # max_tokens, not max_completion_tokens: llama.cpp, vLLM and Ollama's /v1 read this one.
            payload["max_tokens"] = self.max_tokens
        tools = check_tools(tools)
        if tools:
            payload["tools"] = function_tools(tools)
            payload["tool_choice"] = "auto"
        return payload

    def reply_of(self, reply: object) -> tuple[str, list[ToolCall]]:
        """(text, tool calls) of a whole ``chat.completion``."""
        text, raw_calls = self.message_parts(reply, "choices", 0, "message")
        return self.whole_reply(text, self.tool_calls_of(raw_calls))

    def stream_reader(self) -> StreamReader:
        return _OpenAiStreamReader(self)


def _wire_message(message: Message) -> dict:
    """A checked message as the chat completions API takes it."""
    if message["role"] == "tool":
        return {"role": "tool", "tool_call_id": message["tool_call_id"], "content": message["content"]}
    if "tool_calls" in message:
        return {"role": "assistant", "content": message["content"], "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.raw_arguments if call.raw_arguments.strip() else "{}"}}
            for call in message["tool_calls"]
        ]}
    return {"role": message["role"], "content": message["content"]}


@dataclasses.dataclass
class _PartialCall:
    """A streamed tool call being put together from its pieces."""

    index: int
    call_id: str = ""
    name: str = ""
    arguments: list[str] = dataclasses.field(default_factory=list)
    arguments_chars: int = 0


class _OpenAiStreamReader(StreamReader):
    """Text from ``delta.content``; tool calls assembled from ``delta.tool_calls`` pieces, handed out at the end."""

    def __init__(self, client: OpenAiClient):
        self._client = client
        self._calls: list[_PartialCall] = []
        self._by_index: dict[int, _PartialCall] = {}

    def feed(self, event: str) -> tuple[str, list[ToolCall], bool]:
        if event.strip() == "[DONE]":
            return "", [], True
        chunk = self._client.stream_chunk(event)
        choices = chunk.get("choices")
        if choices == []:
            return "", [], False  # the usage chunk that stream_options.include_usage adds
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
            text, calls = self._client.reply_of(chunk)
            return text, calls, True
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        content = delta.get("content")
        if content is None:
            content = ""  # the role-only first chunk, the empty last one, a tool call's piece
        if not isinstance(content, str):
            raise LlmBadReply(f"openai: stream chunk's delta.content is {type(content).__name__}, not text")
        if delta.get("tool_calls") is not None:
            self._add(delta["tool_calls"])
        return content, [], choice.get("finish_reason") is not None

    def _add(self, pieces: object) -> None:
        if not isinstance(pieces, list):
            raise LlmBadReply(f"openai: stream chunk's delta.tool_calls is {type(pieces).__name__}, not a list")
        for piece in pieces:
            if not isinstance(piece, dict):
                raise LlmBadReply(f"openai: a delta.tool_calls entry is {type(piece).__name__}, not an object")
            index = piece.get("index")
            if index is None:
                index = self._calls[-1].index if self._calls else 0
            elif not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise LlmBadReply(f"openai: delta.tool_calls index is {index!r:.40}, not a number")
            call_id = piece.get("id")
            if call_id is not None and not isinstance(call_id, str):
                raise LlmBadReply(f"openai: delta.tool_calls[{index}].id is {type(call_id).__name__}, not a string")
            function = piece.get("function")
            if function is None:
                function = {}
            elif not isinstance(function, dict):
                raise LlmBadReply(f"openai: delta.tool_calls[{index}].function is not an object")
            call = self._by_index.get(index)
            if call is None or (call_id and call.call_id and call_id != call.call_id):
                if len(self._calls) == MAX_TOOL_CALLS:
                    raise LlmBadReply(f"openai: reply has more than {MAX_TOOL_CALLS} tool calls")
                call = self._by_index[index] = _PartialCall(index)
                self._calls.append(call)
            if call_id and not call.call_id:
                call.call_id = call_id
            self._add_name(call, function.get("name"))
            self._add_arguments(call, function.get("arguments"))

    @staticmethod
    def _add_name(call: _PartialCall, name: object) -> None:
        if name is None or name == "" or name == call.name:
            return  # absent, or repeated whole on a later piece
        if not isinstance(name, str):
            raise LlmBadReply(f"openai: delta.tool_calls[{call.index}].function.name is not a string")
        call.name += name  # the name may itself come in pieces
        if len(call.name) > MAX_TOOL_NAME_CHARS:
            raise LlmBadReply(f"openai: tool_calls[{call.index}] has a name longer than {MAX_TOOL_NAME_CHARS}")

    @staticmethod
    def _add_arguments(call: _PartialCall, arguments: object) -> None:
        if arguments is None:
            return
        if not isinstance(arguments, str):
            raise LlmBadReply(
                f"openai: delta.tool_calls[{call.index}].function.arguments is {type(arguments).__name__}, not a string"
            )
        call.arguments_chars += len(arguments)
        if call.arguments_chars > MAX_TOOL_ARGUMENTS_CHARS:
            raise LlmBadReply(
                f"openai: tool_calls[{call.index}] arguments longer than {MAX_TOOL_ARGUMENTS_CHARS} characters"
            )
        call.arguments.append(arguments)

    def finish(self) -> list[ToolCall]:
        return [
            self._client.tool_call(call.name, "".join(call.arguments), call.call_id, f"tool_calls[{call.index}]")
            for call in self._calls
        ]
