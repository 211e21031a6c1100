"""Fake LLM servers on real sockets (gevent.pywsgi, 127.0.0.1, port 0) speaking the Ollama, OpenAI and llama3 wire formats.

Usage::

    with FakeLlmServer("ollama", replies=["Hi there.", "Bye."]) as server:
        client = OllamaClient(server.url, "llama3", timeout_s=5)
        assert client.complete(messages) == "Hi there."
        assert server.requests[0]["messages"] == messages

The server checks every request the way the real one would need it (method, path, JSON body
keys and types, Content-Type, Bearer token when ``api_key`` is set). A bad request gets the
provider's 400 error reply and is recorded in ``.violations``; leaving the ``with`` block
without an exception raises AssertionError if there were any, so a test cannot pass on a
request the real server would refuse. Replies use each provider's real success and error
shapes. Knobs for failure tests: ``status`` (an HTTP error with the provider's error body),
``body`` (raw bytes/str/JSON sent instead of the reply: malformed or wrong-shaped),
``delay_s`` (wait before answering), ``hold_reply`` (answer nothing, headers included, until
the test sets ``.release_reply``: a client that still waits then cannot be told apart from
one that timed out only by the clock) and ``trickle_s`` (send the body, or each streamed
chunk, one byte at a time). ``port=`` listens on that port (a stopped server's: the same
endpoint back up); ``tls=True`` serves https with ``TLS_CERT_PATH`` (a self-signed certificate
for 127.0.0.1 and localhost, its own CA: a client trusts it through ``REQUESTS_CA_BUNDLE``). ``.bodies_completed`` counts non-streamed bodies written to
their last byte.

A reply may also call tools: ``FakeReply("Let me put you through.", [FakeToolCall("transfer_call",
{"target": "sales"})])`` answers with the text and the call in the provider's real shape (OpenAI:
``message.tool_calls`` with ``id``, ``type`` and the arguments as a JSON string, ``finish_reason``
"tool_calls"; Ollama: ``message.tool_calls`` with the arguments as an object). The requests'
``tools``, ``tool_choice`` and tool messages are checked against each provider's rules (OpenAI:
every assistant ``tool_calls`` id answered by a following ``tool`` message and nothing else;
Ollama: a ``tool`` message names its tool in ``tool_name``).

A request with ``"stream": true`` (Ollama, OpenAI) gets the reply the way the real server
streams it: Ollama NDJSON lines ending in a ``"done": true`` line, OpenAI server-sent events
(a role-only chunk, one chunk per text delta, a ``finish_reason`` chunk, ``data: [DONE]``).
The text is cut into word-sized deltas like LLM tokens ("Hi", " there", "."), or
``stream_body`` gives the raw chunks to send instead. Tool calls stream after the text: OpenAI
sends each call's ``index``, ``id``, ``type`` and ``function.name`` with empty arguments first,
then the arguments string in pieces of ``FakeToolCall.piece_chars`` characters, each in its own
chunk; Ollama sends all the calls whole in one line before the ``"done": true`` line.
Stream knobs: ``stream_first_delay_s`` (before the first chunk: the headers wait too, as on
the real servers), ``stream_gap_s`` (between chunks), ``stream_hold_after=n`` (after n deltas,
wait until the test sets ``.release_stream``: proof that the client got them before the rest
existed), and ``stream_break_after=n`` (after n deltas, cut the connection without ending the
body). A delta is a text delta or a tool-call chunk (every ``stream_body`` chunk is one).
``.deltas_sent`` counts deltas written; ``.stream_outcomes`` says how each stream
ended ("complete", "client_closed", "broken", "server_stopped"), and ``.client_disconnected``
is set when a client went away mid-stream.
The server runs on the gevent hub, so the process must be monkey-patched (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import re
import socket
import ssl
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import gevent.event
from gevent.pywsgi import WSGIHandler, WSGIServer

PROVIDER_PATHS = {"ollama": "/api/chat", "openai": "/v1/chat/completions", "llama3": "/chat"}
_CHAT_ROLES = ("system", "user", "assistant", "tool")
_HISTORY_ROLES = ("user", "assistant")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable"}



@dataclasses.dataclass(frozen=True)
class FakeToolCall:
    """A tool call the fake model makes; ``arguments`` as a dict is encoded the provider's way, a str sent as is."""

    name: str
    arguments: dict | str = dataclasses.field(default_factory=dict)
    call_id: str | None = None  # OpenAI's id (None: "call_fake<n>"); Ollama's documented shape has none
    piece_chars: int = 4  # OpenAI streams the arguments string in pieces this long


@dataclasses.dataclass(frozen=True)
class FakeReply:
    """What the fake model answers: text, tool calls, or both (the text comes first, as real models do)."""

    text: str = ""
    tool_calls: tuple[FakeToolCall, ...] | list[FakeToolCall] = ()


Reply = str | FakeReply
Replies = Reply | Sequence[Reply] | Callable[[dict], Reply]


def _messages_problems(messages: object, where: str, roles: tuple[str, ...], non_empty: bool) -> list[str]:
    if not isinstance(messages, list):
        return [f"{where} must be a list, got {type(messages).__name__}"]
    if non_empty and not messages:
        return [f"{where} must not be empty"]
    problems = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"{where}[{index}] must be an object")
        elif message.get("role") not in roles:
            problems.append(f"{where}[{index}].role must be one of {roles}, got {message.get('role')!r}")
        elif not isinstance(message.get("content"), str):
            problems.append(f"{where}[{index}].content must be a string")
    return problems


def _chat_messages_problems(provider: str, messages: object) -> list[str]:
    """``messages`` of an Ollama or OpenAI chat request, tool rounds included."""
    if not isinstance(messages, list):
        return [f"messages must be a list, got {type(messages).__name__}"]
    if not messages:
        return ["messages must not be empty"]
    problems = []
    unanswered: list[str] = []  # OpenAI: ids of the last assistant tool_calls not yet answered
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(f"{where} must be an object")
            continue
        role = message.get("role")
        if role not in _CHAT_ROLES:
            problems.append(f"{where}.role must be one of {_CHAT_ROLES}, got {role!r}")
            continue
        if provider == "openai" and unanswered and role != "tool":
            problems.append(f"{where}: the tool_calls {unanswered} of the assistant message before must each be"
                            f" answered by a tool message first")
            unanswered = []
        calls = message.get("tool_calls")
        content = message.get("content")
        # OpenAI lets an assistant message that calls tools have no content.
        content_optional = provider == "openai" and role == "assistant" and calls
        if not isinstance(content, str) and not (content_optional and content is None):
            problems.append(f"{where}.content must be a string")
        if calls is not None:
            if role != "assistant":
                problems.append(f"{where}: only an assistant message has tool_calls")
            else:
                call_problems, ids = _tool_calls_problems(provider, calls, f"{where}.tool_calls")
                problems += call_problems
                unanswered = ids
        if role == "tool":
            if provider == "openai":
                call_id = message.get("tool_call_id")
                if not isinstance(call_id, str):
                    problems.append(f"{where}.tool_call_id must be a string")
                elif call_id not in unanswered:
                    problems.append(f"{where}: tool message answers {call_id!r}, which no assistant tool_calls"
                                    f" right before it left unanswered")
                else:
                    unanswered.remove(call_id)
            elif not isinstance(message.get("tool_name"), str) or not message["tool_name"]:
                problems.append(f"{where}.tool_name must name the tool whose result this is")
    if unanswered:
        problems.append(f"the tool_calls {unanswered} of the last assistant message are not answered")
    return problems


def _tool_calls_problems(provider: str, calls: object, where: str) -> tuple[list[str], list[str]]:
    """Problems of an assistant message's ``tool_calls``, and the ids it asks answers for (OpenAI)."""
    if not isinstance(calls, list) or not calls:
        return [f"{where} must be a non-empty list"], []
    problems, ids = [], []
    for index, call in enumerate(calls):
        here = f"{where}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            problems.append(f"{here}.function must be an object")
            continue
        if not isinstance(function.get("name"), str) or not function["name"]:
            problems.append(f"{here}.function.name must be a non-empty string")
        if provider == "openai":
            if not isinstance(call.get("id"), str) or not call["id"]:
                problems.append(f"{here}.id must be a non-empty string")
            else:
                ids.append(call["id"])
            if call.get("type") != "function":
                problems.append(f"{here}.type must be \"function\"")
            if not isinstance(function.get("arguments"), str):
                problems.append(f"{here}.function.arguments must be a JSON string")
        elif not isinstance(function.get("arguments"), dict):
            problems.append(f"{here}.function.arguments must be an object")
    return problems, ids


def _tools_problems(tools: object) -> list[str]:
    """``tools``: the same shape for Ollama and OpenAI."""
    if not isinstance(tools, list) or not tools:
        return ["tools must be a non-empty list"]
    problems = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            problems.append(f"{where} must be an object with type \"function\"")
            continue
        function = tool.get("function")
        if not isinstance(function, dict):
            problems.append(f"{where}.function must be an object")
            continue
        if not isinstance(function.get("name"), str) or not _TOOL_NAME.fullmatch(function["name"]):
            problems.append(f"{where}.function.name must match {_TOOL_NAME.pattern}")
        if "description" in function and not isinstance(function["description"], str):
            problems.append(f"{where}.function.description must be a string")
        parameters = function.get("parameters")
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            problems.append(f"{where}.function.parameters must be a JSON Schema object with type \"object\"")
    return problems


def _tool_choice_problems(request: dict) -> list[str]:
    choice = request["tool_choice"]
    if "tools" not in request:
        return ["tool_choice is only allowed when tools are specified"]
    if choice in ("none", "auto", "required"):
        return []
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        return []
    return [f"tool_choice must be none, auto, required or a named function, got {choice!r}"]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _body_problems(provider: str, request: object) -> list[str]:
    if not isinstance(request, dict):
        return ["body must be a JSON object"]
    problems: list[str] = []
    if provider in ("ollama", "openai"):
        if not isinstance(request.get("model"), str) or not request["model"]:
            problems.append("model must be a non-empty string")
        problems += _chat_messages_problems(provider, request.get("messages"))
        if "tools" in request:
            problems += _tools_problems(request["tools"])
    if provider == "openai" and "tool_choice" in request:
        problems += _tool_choice_problems(request)
    if provider == "ollama" and not isinstance(request.get("stream"), bool):
        problems.append("stream must be true or false: Ollama streams NDJSON chunks when it is absent")
    if provider == "openai" and not isinstance(request.get("stream", False), bool):
        problems.append("stream must be absent, true or false")
    if provider == "openai" and "max_tokens" in request and not _positive_int(request["max_tokens"]):
        problems.append("max_tokens must be a positive integer")
    if provider == "ollama" and "options" in request:
        options = request["options"]
        if not isinstance(options, dict):
            problems.append("options must be an object")
        elif "num_predict" in options and not isinstance(options["num_predict"], int):
            problems.append("options.num_predict must be an integer")
    if provider == "llama3":
        if not isinstance(request.get("system_prompt"), str):
            problems.append("system_prompt must be a string")
        problems += _messages_problems(
            request.get("conversation_history"), "conversation_history", _HISTORY_ROLES, non_empty=False
        )
        if not isinstance(request.get("user_message"), str) or not request["user_message"]:
            problems.append("user_message must be a non-empty string")
    return problems


def _error_body(provider: str, status: int, message: str) -> dict:
    if provider == "openai":
        # OpenAI and llama.cpp server both nest the error; llama.cpp adds the numeric code.
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"code": status, "message": message, "type": kind}}
    return {"error": message}


def _openai_call_id(call: FakeToolCall, sequence: int, index: int) -> str:
    return call.call_id or f"call_fake{sequence}x{index}"


def _openai_arguments(call: FakeToolCall) -> str:
    return call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)


def _ollama_tool_calls(reply: FakeReply) -> list[dict]:
    # Ollama's arguments are an object; "index" numbers the calls of one reply (newer servers send it).
    calls = []
    for index, call in enumerate(reply.tool_calls):
        calls.append({"function": {"index": index, "name": call.name, "arguments": call.arguments}})
    return calls


def _success_body(provider: str, request: dict, reply: FakeReply, sequence: int) -> dict:
    text = reply.text
    if provider == "ollama":
        message: dict = {"role": "assistant", "content": text}
        if reply.tool_calls:
            message["tool_calls"] = _ollama_tool_calls(reply)
        return {
            "model": request["model"],
            "created_at": _created_at(),
            "message": message,
            "done_reason": "stop",
            "done": True,
            "total_duration": 5_191_566_416,
            "load_duration": 2_154_458,
            "prompt_eval_count": 26,
            "prompt_eval_duration": 383_809_000,
            "eval_count": len(text.split()),
            "eval_duration": 4_799_921_000,
        }
    if provider == "openai":
        completion_tokens = len(text.split())
        message = {"role": "assistant", "content": text}
        finish_reason = "stop"
        if reply.tool_calls:
            # OpenAI sends null content when the reply is only tool calls.
            message = {"role": "assistant", "content": text or None, "tool_calls": [
                {"id": _openai_call_id(call, sequence, index), "type": "function",
                 "function": {"name": call.name, "arguments": _openai_arguments(call)}}
                for index, call in enumerate(reply.tool_calls)
            ]}
            finish_reason = "tool_calls"
        return {
            "id": f"chatcmpl-fake{sequence}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request["model"],
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 26, "completion_tokens": completion_tokens,
                      "total_tokens": 26 + completion_tokens},
        }
    return {"response": text}


class _Handler(WSGIHandler):
    """Sets TCP_NODELAY as real servers do, and hands the app its socket so that a stream can be cut mid-body."""

    def handle(self):
        # Without it Nagle holds each reply on a kept-alive connection until the client's
        # delayed ACK (~40 ms); Go's net/http (Ollama) and asyncio (uvicorn) set it too.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return super().handle()

    def get_environ(self):
        environ = super().get_environ()
        environ["fake.socket"] = self.socket
        return environ


def split_into_deltas(text: str) -> list[str]:
    """Word-sized pieces the way LLM tokens come: "Hi there." -> ["Hi", " there", "."]."""
    return re.findall(r"\s*[\w']+|\s*[^\w\s]|\s+$", text)


def _created_at() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def stream_chunks(provider: str, request: dict, reply: FakeReply, sequence: int) -> list[tuple[bytes, bool]]:
    """The wire chunks of a streamed reply, each with "carries a delta" (text or tool call)."""
    deltas = split_into_deltas(reply.text)
    if provider == "ollama":
        def line(content: str, **extra) -> bytes:
            message = {"role": "assistant", "content": content}
            if "tool_calls" in extra:
                message["tool_calls"] = extra.pop("tool_calls")
            return (json.dumps({
                "model": request["model"], "created_at": _created_at(), "message": message, **extra,
            }, ensure_ascii=False) + "\n").encode()  # Go's encoder sends UTF-8 as it is
        final = line("", done_reason="stop", done=True, total_duration=5_191_566_416, load_duration=2_154_458,
                     prompt_eval_count=26, prompt_eval_duration=383_809_000, eval_count=len(deltas),
                     eval_duration=4_799_921_000)
        calls = [(line("", tool_calls=_ollama_tool_calls(reply), done=False), True)] if reply.tool_calls else []
        return [(line(delta, done=False), True) for delta in deltas] + calls + [(final, False)]

    def event(delta: dict, finish_reason: str | None) -> bytes:
        chunk = {
            "id": f"chatcmpl-fake{sequence}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": request["model"], "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        return f"data: {json.dumps(chunk)}\n\n".encode()
    calls = []
    for index, call in enumerate(reply.tool_calls):
        # The first chunk of a call names it; its arguments follow in pieces, keyed by index only.
        calls.append((event({"tool_calls": [{
            "index": index, "id": _openai_call_id(call, sequence, index), "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }]}, None), True))
        arguments = _openai_arguments(call)
        for offset in range(0, len(arguments), call.piece_chars):
            piece = arguments[offset:offset + call.piece_chars]
            calls.append((event({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, None), True))
    first = {"role": "assistant", "content": "" if deltas or not reply.tool_calls else None}
    return (
        [(event(first, None), False)]
        + [(event({"content": delta}, None), True) for delta in deltas]
        + calls
        + [(event({}, "tool_calls" if reply.tool_calls else "stop"), False), (b"data: [DONE]\n\n", False)]
    )


LISTEN_BACKLOG = 2048
# openssl req -x509 -newkey rsa:2048 -nodes -days 36500 -subj /CN=localhost
#   -addext subjectAltName=IP:127.0.0.1,DNS:localhost
TLS_CERT_PATH = Path(__file__).resolve().parent / "tls" / "localhost.pem"
TLS_KEY_PATH = TLS_CERT_PATH.with_suffix(".key")


class FakeLlmServer:
    """One fake LLM endpoint; a context manager exposing ``.url``, ``.requests`` and ``.headers``."""

    def __init__(
        self,
        provider: str,
        replies: Replies = "Hello from the fake LLM.",
        *,
        path: str | None = None,
        api_key: str | None = None,
        status: int = 200,
        body: bytes | str | dict | list | None = None,
        delay_s: float = 0.0,
        hold_reply: bool = False,
        trickle_s: float = 0.0,
        stream_body: Sequence[bytes | str] | None = None,
        stream_first_delay_s: float = 0.0,
        stream_gap_s: float = 0.0,
        stream_hold_after: int | None = None,
        stream_break_after: int | None = None,
        port: int = 0,
        tls: bool = False,
    ):
        if provider not in PROVIDER_PATHS:
            raise ValueError(f"unknown provider {provider!r}")
        self.provider = provider
        self.path = path or PROVIDER_PATHS[provider]
        self.api_key = api_key
        self.status = status
        self.body = body
        self.delay_s = delay_s
        self.hold_reply = hold_reply
        self.release_reply = gevent.event.Event()
        self.bodies_completed = 0
        self.trickle_s = trickle_s
        self._replies = replies
        self.stream_body = stream_body
        self.stream_first_delay_s = stream_first_delay_s
        self.stream_gap_s = stream_gap_s
        self.stream_hold_after = stream_hold_after
        self.stream_break_after = stream_break_after
        self.release_stream = gevent.event.Event()
        self.client_disconnected = gevent.event.Event()
        self.deltas_sent = 0
        self.stream_outcomes: list[str] = []
        self.requests: list[object] = []  # parsed JSON bodies (None when not JSON), in arrival order
        self.headers: list[dict[str, str]] = []  # lower-case header names, parallel to .requests
        self.client_ports: list[int] = []  # the client's source port per request: equal ports = a reused connection
        self.violations: list[str] = []
        self._sequence = itertools.count()
        self._closing = gevent.event.Event()
        self._server: WSGIServer | None = None
        self._listen_port = port  # 0: any free one; a stopped server's port: the same server back
        self.tls = tls

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_port

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def start(self) -> "FakeLlmServer":
        # A listen queue as deep as a serving engine's (uvicorn's 2048): gevent's default of 128
        # drops the SYNs of a burst of turns, and each dropped one costs its turn 1-3 s of
        # TCP retransmission that is no part of the daemon.
        tls = {}
        if self.tls:
            tls["ssl_context"] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls["ssl_context"].load_cert_chain(TLS_CERT_PATH, TLS_KEY_PATH)
        self._server = WSGIServer(("127.0.0.1", self._listen_port), self._app, log=None, error_log=None, handler_class=_Handler,
                                  backlog=LISTEN_BACKLOG, **tls)
        self._server.start()
        return self

    def stop(self) -> None:
        # Wakes handlers parked in delay_s/trickle_s so stopping never waits for them.
        self._closing.set()
        if self._server is not None:
            self._server.stop(timeout=1)

    def check(self) -> None:
        if self.violations:
            raise AssertionError(f"fake {self.provider} server got bad requests: " + "; ".join(self.violations))

    def __enter__(self) -> "FakeLlmServer":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is None:
            self.check()

    def _reply(self, request: dict, sequence: int) -> FakeReply:
        if callable(self._replies):
            reply = self._replies(request)
        elif isinstance(self._replies, (str, FakeReply)):
            reply = self._replies
        else:
            reply = self._replies[min(sequence, len(self._replies) - 1)]
        if isinstance(reply, str):
            return FakeReply(reply)
        if self.provider == "llama3":
            return FakeReply(reply.text)  # the llama3 API has no tool calls
        return reply

    def _app(self, environ, start_response) -> Iterator[bytes] | list[bytes]:
        headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")}
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        raw = environ["wsgi.input"].read()
        try:
            request = json.loads(raw)
        except ValueError:
            request = None
        sequence = next(self._sequence)
        self.requests.append(request)
        self.headers.append(headers)
        self.client_ports.append(int(environ.get("REMOTE_PORT") or 0))

        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            # Not a violation: a wrong key is a scenario tests may want, answered as OpenAI does.
            return self._respond(start_response, 401, _error_body(self.provider, 401, "Incorrect API key provided"))
        problems = []
        if environ["REQUEST_METHOD"] != "POST":
            problems.append(f"method must be POST, got {environ['REQUEST_METHOD']}")
        if environ.get("PATH_INFO") != self.path:
            problems.append(f"path must be {self.path}, got {environ.get('PATH_INFO')}")
        if not headers.get("content-type", "").startswith("application/json"):
            problems.append(f"Content-Type must be application/json, got {headers.get('content-type')!r}")
        problems += _body_problems(self.provider, request)
        if problems:
            self.violations += problems
            return self._respond(start_response, 400, _error_body(self.provider, 400, "; ".join(problems)))

        if self.delay_s and self._closing.wait(self.delay_s):
            return self._respond(start_response, 503, _error_body(self.provider, 503, "server shutting down"))
        if self.hold_reply:
            gevent.wait([self.release_reply, self._closing], count=1)
            if self._closing.is_set():
                return self._respond(start_response, 503, _error_body(self.provider, 503, "server shutting down"))
        if self.body is not None:
            return self._respond(start_response, self.status, self.body)
        if self.status >= 400:
            return self._respond(start_response, self.status, _error_body(self.provider, self.status, "fake failure"))
        reply = self._reply(request, sequence)
        if self.provider != "llama3" and request.get("stream") is True:
            if self.stream_body is not None:
                chunks = [(chunk.encode() if isinstance(chunk, str) else chunk, True) for chunk in self.stream_body]
            else:
                chunks = stream_chunks(self.provider, request, reply, sequence)
            content_type = "application/x-ndjson" if self.provider == "ollama" else "text/event-stream; charset=utf-8"
            # No Content-Length: pywsgi sends each chunk as it comes, with chunked encoding.
            start_response("200 OK", [("Content-Type", content_type), ("Cache-Control", "no-cache")])
            return self._stream(chunks, environ["fake.socket"])
        return self._respond(start_response, 200, _success_body(self.provider, request, reply, sequence))

    def _stream(self, chunks: list[tuple[bytes, bool]], sock: socket.socket) -> Iterator[bytes]:
        # pywsgi asks for the next chunk only once it wrote the last one, and closes this
        # generator (GeneratorExit at the yield) when a write fails: the client went away.
        outcome = "client_closed"
        try:
            if self.stream_first_delay_s and self._closing.wait(self.stream_first_delay_s):
                outcome = "server_stopped"
                return
            sent_deltas = 0
            for index, (chunk, is_delta) in enumerate(chunks):
                if index and self.stream_gap_s and self._closing.wait(self.stream_gap_s):
                    outcome = "server_stopped"
                    return
                if is_delta and sent_deltas == self.stream_hold_after:
                    gevent.wait([self.release_stream, self._closing], count=1)
                    if self._closing.is_set():
                        outcome = "server_stopped"
                        return
                if is_delta and sent_deltas == self.stream_break_after:
                    # Ends the TCP stream mid-body: no terminating chunk ever follows.
                    sock.shutdown(socket.SHUT_RDWR)
                    outcome = "broken"
                    return
                if self.trickle_s:
                    for offset in range(len(chunk)):
                        yield chunk[offset:offset + 1]
                        if self._closing.wait(self.trickle_s):
                            outcome = "server_stopped"
                            return
                else:
                    yield chunk
                if is_delta:
                    sent_deltas += 1
                    self.deltas_sent += 1
            outcome = "complete"
        finally:
            self.stream_outcomes.append(outcome)
            if outcome == "client_closed":
                self.client_disconnected.set()

    def _respond(self, start_response, status: int, body: bytes | str | dict | list) -> Iterator[bytes] | list[bytes]:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        start_response(
            f"{status} {_REASONS.get(status, 'Status')}",
            [("Content-Type", "application/json; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return self._trickle(body)

    def _trickle(self, body: bytes) -> Iterator[bytes]:
        if not self.trickle_s:
            yield body
        else:
            for offset in range(len(body)):
                yield body[offset:offset + 1]
                if offset + 1 < len(body) and self._closing.wait(self.trickle_s):
                    return
        self.bodies_completed += 1
