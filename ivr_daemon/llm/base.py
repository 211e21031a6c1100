"""The LLM client interface: a chat history in, the reply's text and tool calls out, whole or streamed.

Every provider module (``ollama``, ``openai``, ``llama3``) turns the same ``messages`` list
into its own JSON request and reads its own reply shape; the HTTP exchange, the time bound
and the mapping of every failure to an :class:`LlmError` (``errors.py``) live here, once; the
stream framing (NDJSON lines, server-sent events) in ``framing.py``.

Tool calling (providers with ``supports_tools``): ``respond(messages, tools)`` and
``stream(messages, tools)`` offer :class:`ToolSpec` s and hand back the model's
:class:`ToolCall` s, whatever it called with whatever arguments (checking them is the
caller's job); a tool round goes back to the model as two kinds of message, which each
provider writes in its own wire format::

    {"role": "assistant", "content": "Let me put you through.", "tool_calls": [ToolCall, ...]}
    {"role": "tool", "tool_call_id": "<ToolCall.call_id>", "name": "transfer_call", "content": "<result>"}

A reply is bounded: at most ``MAX_TOOL_CALLS`` calls, each with at most
``MAX_TOOL_ARGUMENTS_CHARS`` characters of arguments and ``MAX_TOOL_NAME_CHARS`` of name;
past that it is an LlmBadReply.

Time bound of ``complete``: each request gets ``timeout=(timeout_s, timeout_s)`` (connect,
each read) *and* a wall-clock ``gevent.Timeout(timeout_s)`` around the whole exchange, so a
server that trickles its reply a byte at a time cannot hold a call for longer than
``timeout_s``. ``stream`` applies the same pair per delta instead: from the request to the
first text delta, and between any two deltas, at most ``timeout_s`` may pass (time the
caller spends between two ``next()`` calls does not count); a tool call is one delta, so its
arguments must all arrive within ``timeout_s``. The wall-clock bounds need the
process to be gevent monkey-patched (the daemon always is, and so are the tests); without
patching only the per-operation socket timeouts apply.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import http.client
import itertools
import json
import socket
import time
from types import MappingProxyType
from typing import Any, Callable, Generator, Iterable, Iterator, NoReturn, Sequence

import gevent
import requests
import urllib3.exceptions
import urllib3.response

from ivr_daemon.llm.errors import LlmBadReply, LlmError, LlmTimeout, LlmUnavailable
from ivr_daemon.llm.errors import one_line as _one_line
from ivr_daemon.llm.framing import StreamFraming, body_chunks, stream_events
from ivr_daemon.llm.transport import LlmTransport, connect_timed_out, release
from ivr_daemon.logs import get_logger

log = get_logger(__name__)

# {"role": "system" | "user" | "assistant", "content": "..."}, and for a tool round
# {"role": "assistant", "content": "...", "tool_calls": [ToolCall, ...]} and
# {"role": "tool", "tool_call_id": "...", "name": "...", "content": "..."}: see check_messages.
Message = dict[str, Any]
MESSAGE_ROLES = ("system", "user", "assistant", "tool")

MAX_TOOL_CALLS = 16  # in one reply
MAX_TOOL_ARGUMENTS_CHARS = 64 * 1024  # of one call's arguments, as the model sent them
MAX_TOOL_NAME_CHARS = 256

# After the end marker only the chunked-encoding trailer is left; reading it lets the
# connection go back to the pool, but a server dawdling over it is not worth waiting for.
_STREAM_DRAIN_S = 0.25
# urllib3's own errors (transport.py posts straight into its pool), OSErrors (requests'
# RequestException too: a bad URL, a redirect followed), and what http.client lets through
# (broken chunking, header overflow), and ValueError (a URL or JSON body that cannot be).
_TRANSPORT_ERRORS = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError, ValueError)
# What a bounded block maps to an LlmError: its deadline, or the transport failing.
_BOUNDED_ERRORS = (gevent.Timeout, *_TRANSPORT_ERRORS)
_STREAM_ACCEPT = MappingProxyType({"ndjson": "application/x-ndjson", "sse": "text/event-stream"})


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model: its name, what it does, and its arguments as a JSON Schema object."""

    name: str
    description: str
    parameters: dict  # {"type": "object", "properties": {...}, "required": [...]}


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A tool the model called, as it called it: the name may be unknown, the arguments anything."""

    name: str
    arguments: dict | None  # the parsed JSON object; None when the model sent anything else
    raw_arguments: str  # exactly what the model sent (OpenAI: its JSON string; Ollama: json.dumps of its object)
    call_id: str  # the server's id; generated ("call_<n>", unique per client) when the server sends none


def parse_tool_arguments(raw: str) -> dict | None:
    """The arguments as a JSON object; ``{}`` for none at all (empty or blank), None for anything but an object."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def caused_by(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """True when ``exc`` or anything in its chain is one of ``kinds``: requests and urllib3 wrap
    the real cause in their own errors (as an argument, a ``reason``, a cause or a context)."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds):
            return True
        pending.extend(current.args)
        pending.extend((current.__cause__, current.__context__, getattr(current, "reason", None)))
    return False


def _caused_by_read_timeout(exc: BaseException) -> bool:
    # requests wraps a read timeout hit while downloading the body in ConnectionError, not
    # Timeout (models.Response.iter_content), so look inside before calling it "unavailable".
    return caused_by(exc, (urllib3.exceptions.ReadTimeoutError, socket.timeout, requests.Timeout))


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


@dataclasses.dataclass
class _StreamProgress:
    """What one stream got so far: for error messages and the log line."""

    status: int | None = None
    chars: int = 0
    tool_calls: int = 0


def check_messages(messages: list[Message], minimum: int = 1) -> list[Message]:
    """Copies of ``messages`` with only the fields each role has; ValueError on a caller's mistake.

    ``{"role": "system" | "user", "content"}``; ``{"role": "assistant", "content"}`` plus
    ``"tool_calls": [ToolCall, ...]`` when it called tools (an empty list is left out);
    ``{"role": "tool", "tool_call_id", "name", "content"}`` for a tool's result. Any other
    key (a caller's annotation) is dropped.
    """
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
        if role not in MESSAGE_ROLES:
            raise ValueError(f"message {index}: role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r:.40}")
        copy: Message = {"role": role, "content": content}
        calls = message.get("tool_calls")
        if calls:
            if role != "assistant":
                raise ValueError(f"message {index}: only an assistant message has tool_calls")
            if not isinstance(calls, (list, tuple)) or not all(isinstance(call, ToolCall) for call in calls):
                raise ValueError(f"message {index}: tool_calls must be a list of ToolCall")
            copy["tool_calls"] = list(calls)
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if not isinstance(message.get(key), str) or not message[key]:
                    raise ValueError(f"message {index}: a tool message needs a non-empty {key!r} string")
            copy["tool_call_id"], copy["name"] = message["tool_call_id"], message["name"]
        clean.append(copy)
    return clean


def check_tools(tools: Sequence[ToolSpec]) -> tuple[ToolSpec, ...]:
    """``tools`` as a tuple; ValueError on a caller's mistake (not ToolSpecs, a name twice, parameters not a dict)."""
    if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Iterable):
        raise ValueError(f"tools must be a sequence of ToolSpec, got {type(tools).__name__}")
    tools = tuple(tools)
    names = set()
    for index, tool in enumerate(tools):
        if not isinstance(tool, ToolSpec):
            raise ValueError(f"tool {index} is a {type(tool).__name__}, not a ToolSpec")
        if not isinstance(tool.name, str) or not tool.name or tool.name in names:
            raise ValueError(f"tool {index}: the name must be a non-empty string used once, got {tool.name!r:.40}")
        if not isinstance(tool.description, str) or not isinstance(tool.parameters, dict):
            raise ValueError(f"tool {index} ({tool.name}): description must be a string, parameters a dict")
        names.add(tool.name)
    return tools


def function_tools(tools: Sequence[ToolSpec]) -> list[dict]:
    """The ``tools`` of an OpenAI or Ollama request: ``[{"type": "function", "function": {...}}, ...]``."""
    return [
        {"type": "function",
         "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters}}
        for tool in tools
    ]


def plain_messages(clean: list[Message]) -> list[Message]:
    """``clean`` for a provider without tools: tool results dropped, assistant turns without the calls.

    An assistant turn that was only tool calls has nothing left to show and goes too.
    """
    plain = []
    for message in clean:
        if message["role"] == "tool" or ("tool_calls" in message and not message["content"].strip()):
            continue
        plain.append({"role": message["role"], "content": message["content"]})
    return plain


class StreamReader:
    """Reads the events of one streamed reply, in order: a new one per stream, since it may keep state."""

    def feed(self, event: str) -> tuple[str, list[ToolCall], bool]:
        """One event (an NDJSON line, an SSE event's data) -> (text delta, tool calls now complete, reply finished).

        Raises LlmBadReply for an event of the wrong shape.
        """
        raise NotImplementedError

    def finish(self) -> list[ToolCall]:
        """The tool calls still being assembled when the reply finished (called once, after the last feed)."""
        return []


class LlmClient(abc.ABC):
    """One endpoint and model; ``complete``, ``respond`` and ``stream`` block, cooperatively under gevent."""

    provider: str
    supports_tools: bool = False  # False: tools are ignored, tool messages dropped (see plain_messages)

    def __init__(
        self,
        api_url: str,
        model: str,
        timeout_s: float,
        api_key: str = "",
        max_tokens: int | None = None,
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens!r}")
        # Sent to providers that take it: a model that loops must stop at the server, not only
        # when the caller hangs up.
        self.max_tokens = max_tokens
        self.api_url = self.endpoint_url(api_url.strip())
        self.model = model
        self.timeout_s = float(timeout_s)
        self.api_key = api_key
        # One per client: the server's keep-alive connections are reused across turns.
        self._transport = LlmTransport(self.api_url, self.timeout_s)
        self._call_numbers = itertools.count()

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

    def respond(self, messages: list[Message], tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        """The whole reply: its text, stripped (may be "" when the model only called tools), and its tool calls.

        With ``tools=()`` the request is exactly the one ``complete`` sends. A reply with
        neither text nor tool calls is an LlmBadReply; otherwise the errors are ``complete``'s.
        This fallback, for providers without tools, ignores ``tools`` (a debug line says so).
        """
        self.ignore_tools(tools)
        return self.complete(messages), []

    def stream(
        self, messages: list[Message], tools: Sequence[ToolSpec] = ()
    ) -> Generator[str | ToolCall, None, None]:
        """The reply as text deltas, yielded as the server produces them, and its tool calls.

        A generator: the request goes out at the first ``next()`` (so does a ValueError for a
        malformed ``messages`` or ``tools``). Leading whitespace is dropped, and
        ``"".join(deltas).strip()`` is what ``complete`` would have returned. Each tool call
        comes as one :class:`ToolCall` once it is complete (after the text that precedes it;
        OpenAI's at the end of the reply, Ollama's as soon as its line arrives). With
        ``tools=()`` the request is exactly as without tool support. Raises LlmError
        subclasses only, also after some deltas: a stream that breaks off is LlmUnavailable,
        one that stalls LlmTimeout, one with a wrong shape, an error event, no end marker or
        neither text nor tool calls LlmBadReply. ``close()`` abandons the reply (barge-in) and
        closes its connection at once; to abandon a stream that another greenlet is reading,
        kill that greenlet.

        This fallback, for providers without a streaming API, yields the whole ``complete``
        reply as one delta, ignoring ``tools``.
        """
        self.ignore_tools(tools)
        yield self.complete(messages)

    def ignore_tools(self, tools: Sequence[ToolSpec]) -> None:
        """For providers without tools: check ``tools`` as the others would, and say at debug that they go unused."""
        tools = check_tools(tools)
        if tools:
            log.debug("llm_tools_ignored", provider=self.provider, model=self.model, tools=len(tools))

    def stream_reader(self) -> StreamReader:
        """A reader for the events of one streamed reply; providers that stream through :meth:`post_stream` give one."""
        raise NotImplementedError(f"{type(self).__name__} does not stream")

    def new_call_id(self) -> str:
        """An id for a tool call the server sent without one; unique per client, so results match their call."""
        return f"call_{next(self._call_numbers)}"

    def tool_call(self, name: object, raw_arguments: str, call_id: object, where: str) -> ToolCall:
        """A ToolCall from what the server sent, within the bounds; LlmBadReply past them or without a name."""
        if not isinstance(name, str) or not name:
            raise LlmBadReply(f"{self.provider}: {where} has no function name (got {name!r:.40})")
        if len(name) > MAX_TOOL_NAME_CHARS:
            raise LlmBadReply(f"{self.provider}: {where} has a name longer than {MAX_TOOL_NAME_CHARS} characters")
        if len(raw_arguments) > MAX_TOOL_ARGUMENTS_CHARS:
            raise LlmBadReply(
                f"{self.provider}: {where} ({name:.40}) has arguments longer than {MAX_TOOL_ARGUMENTS_CHARS} characters"
            )
        if not isinstance(call_id, str) or not call_id:
            call_id = self.new_call_id()
        return ToolCall(name=name, arguments=parse_tool_arguments(raw_arguments), raw_arguments=raw_arguments,
                        call_id=call_id)

    def tool_calls_of(self, raw_calls: object) -> list[ToolCall]:
        """The ToolCalls of a whole reply's ``message.tool_calls`` (absent: none), OpenAI's or
        Ollama's shape: arguments a JSON string (OpenAI) or the object itself (Ollama, and some
        OpenAI-compatible servers). LlmBadReply for a wrong shape."""
        if raw_calls is None:
            return []
        if not isinstance(raw_calls, list):
            raise LlmBadReply(f"{self.provider}: message.tool_calls is {type(raw_calls).__name__}, not a list")
        self.check_tool_call_count(len(raw_calls))
        calls = []
        for index, item in enumerate(raw_calls):
            where = f"message.tool_calls[{index}]"
            function = item.get("function") if isinstance(item, dict) else None
            if not isinstance(function, dict):
                raise LlmBadReply(f"{self.provider}: {where} has no function object")
            arguments = function.get("arguments")
            # Anything but a JSON object becomes ToolCall.arguments None: the daemon refuses it.
            raw = "" if arguments is None else arguments if isinstance(arguments, str) else json.dumps(arguments)
            calls.append(self.tool_call(function.get("name"), raw, item.get("id"), where))
        return calls

    def check_tool_call_count(self, count: int) -> None:
        if count > MAX_TOOL_CALLS:
            raise LlmBadReply(f"{self.provider}: reply has more than {MAX_TOOL_CALLS} tool calls")

    def close(self) -> None:
        self._transport.close()

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
        with self._bounded(self._timeout, self._unreachable):
            response = self._transport.post(payload, self.request_headers())
            try:
                # Read the whole body inside the deadline: a trickling body is the slow part.
                return response.status, response.read(decode_content=True)
            finally:
                release(response)

    def post_stream(self, payload: dict, framing: StreamFraming) -> Generator[str | ToolCall, None, None]:
        """POST ``payload`` and yield the text deltas and tool calls a :meth:`stream_reader` finds in the reply.

        Each ``next()`` runs under its own ``timeout_s`` deadline; the generator's
        ``finally`` closes the response, so ``close()`` or a kill never leaks the connection.
        """
        progress = _StreamProgress()
        deltas = self._stream_deltas(payload, framing, progress)
        started_s = time.monotonic()
        first_delta_ms = None
        outcome = "abandoned"
        # What _bounded does around each next(), without a context manager and two closures
        # per delta (~30 deltas a turn). A fresh timer each time: a libev timer stopped and
        # started again runs on with what was left of its time, not the whole timeout_s.
        timed_out = lambda: self._stream_timeout(progress)  # noqa: E731
        failed = lambda exc: self._stream_failure(progress, exc)  # noqa: E731
        try:
            while True:
                deadline = gevent.Timeout(self.timeout_s)
                deadline.start()
                try:
                    delta = next(deltas, None)
                except _BOUNDED_ERRORS as exc:
                    self._raise_mapped(exc, deadline, timed_out, failed)
                finally:
                    deadline.close()
                if delta is None:
                    break
                if first_delta_ms is None:
                    first_delta_ms = round((time.monotonic() - started_s) * 1000)
                yield delta
            outcome = "ok"
        except LlmError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            deltas.close()
            log.debug(
                "llm_stream",
                provider=self.provider,
                model=self.model,
                outcome=outcome,
                status=progress.status,
                chars=progress.chars,
                tool_calls=progress.tool_calls,
                first_delta_ms=first_delta_ms,
                elapsed_ms=round((time.monotonic() - started_s) * 1000),
            )

    def _stream_deltas(
        self, payload: dict, framing: StreamFraming, progress: _StreamProgress
    ) -> Iterator[str | ToolCall]:
        headers = {
            **self.request_headers(),
            "Accept": _STREAM_ACCEPT[framing],
            # A compressing proxy may hold small chunks back until its buffer fills.
            "Accept-Encoding": "identity",
        }
        response = self._transport.post(payload, headers)
        try:
            progress.status = response.status
            if response.status >= 400:
                detail = _error_detail(response.read(decode_content=True))
                raise LlmUnavailable(
                    f"{self.provider}: HTTP {response.status} from {self.api_url}: {detail}",
                    status=response.status,
                )
            finished = False
            reader = self.stream_reader()
            connection = getattr(response, "connection", None)
            chunks = body_chunks(response)
            for event in self._stream_events(response, framing, chunks):
                delta, calls, finished = reader.feed(event)
                if not progress.chars:
                    delta = delta.lstrip()
                if delta:
                    progress.chars += len(delta)
                    yield delta
                if finished:
                    calls = [*calls, *reader.finish()]
                # The spoken part before the calls: a caller may say it while the calls run.
                for call in calls:
                    progress.tool_calls += 1
                    self.check_tool_call_count(progress.tool_calls)
                    yield call
                if finished:
                    break
            if not finished:
                # The body ended cleanly as HTTP goes, so urllib3 has pooled the connection; but a
                # server that broke off its reply (llama_cpp.server failing a streamed tool call)
                # may close it a moment later, and the next request would meet a reset. Nothing
                # ran since the release, so no other greenlet can have taken it yet.
                if connection is not None:
                    connection.close()
                raise LlmBadReply(
                    f"{self.provider}: stream from {self.api_url} ended without its end marker"
                    f" after {progress.chars} chars"
                )
            if not progress.chars and not progress.tool_calls:
                raise LlmBadReply(f"{self.provider}: stream from {self.api_url} carried no text and no tool call")
            self._drain(chunks)
        finally:
            release(response)

    def _stream_events(self, response: urllib3.response.BaseHTTPResponse, framing: StreamFraming,
                       chunks: Iterable[bytes]) -> Iterable[str]:
        if framing == "sse" and response.headers.get("Content-Type", "").startswith("application/json"):
            # Not a stream after all: a server that ignores "stream": true, or an error object.
            return [response.read(decode_content=True).decode("utf-8", "replace")]
        return stream_events(chunks, framing, self.provider)

    def _drain(self, chunks: Iterator[bytes]) -> None:
        """Read what follows the end marker, so that the kept-alive connection can be reused."""
        with gevent.Timeout(min(self.timeout_s, _STREAM_DRAIN_S), False):
            try:
                for _ in chunks:
                    pass
            except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError, ValueError):
                pass  # the reply is complete; closing the response discards the connection

    def stream_chunk(self, event: str) -> dict:
        """One streamed event parsed as a JSON object; LlmBadReply for anything else and for an error object."""
        try:
            chunk = json.loads(event)
        except ValueError:
            raise LlmBadReply(f"{self.provider}: stream event is not JSON: {_one_line(event, 80)!r}") from None
        if not isinstance(chunk, dict):
            raise LlmBadReply(f"{self.provider}: stream event is a JSON {type(chunk).__name__}, not an object")
        if _server_error(chunk):
            raise LlmBadReply(f"{self.provider}: server error in the stream: {_one_line(_server_error(chunk))}")
        return chunk

    @contextlib.contextmanager
    def _bounded(
        self, timed_out: Callable[[], LlmTimeout], failed: Callable[[BaseException], LlmUnavailable]
    ) -> Iterator[None]:
        """Run the block within ``timeout_s`` of wall clock, turning transport failures into LlmErrors."""
        deadline = gevent.Timeout(self.timeout_s)
        deadline.start()
        try:
            yield
        except _BOUNDED_ERRORS as exc:
            self._raise_mapped(exc, deadline, timed_out, failed)
        finally:
            deadline.close()

    @staticmethod
    def _raise_mapped(
        exc: BaseException, deadline: gevent.Timeout, timed_out: Callable[[], LlmTimeout],
        failed: Callable[[BaseException], LlmUnavailable],
    ) -> NoReturn:
        """Raise the LlmError for ``exc`` (a gevent.Timeout or one of _TRANSPORT_ERRORS), caught
        while ``deadline`` ran; from an ``except`` block only."""
        if isinstance(exc, gevent.Timeout):
            if exc is not deadline:
                raise exc  # a caller's own timeout: not ours to translate
            raise timed_out() from None
        if isinstance(exc, requests.Timeout) or connect_timed_out(exc) or _caused_by_read_timeout(exc):
            raise timed_out() from exc
        raise failed(exc) from exc

    def _timeout(self) -> LlmTimeout:
        return LlmTimeout(f"{self.provider}: no reply from {self.api_url} within {self.timeout_s:g} s")

    def _unreachable(self, exc: BaseException) -> LlmUnavailable:
        return LlmUnavailable(f"{self.provider}: cannot reach {self.api_url}: {_one_line(exc)}")

    def _stream_timeout(self, progress: _StreamProgress) -> LlmTimeout:
        if not progress.chars:
            return self._timeout()
        return LlmTimeout(
            f"{self.provider}: stream from {self.api_url} stalled for {self.timeout_s:g} s"
            f" after {progress.chars} chars"
        )

    def _stream_failure(self, progress: _StreamProgress, exc: BaseException) -> LlmUnavailable:
        if progress.status is None:
            return self._unreachable(exc)
        return LlmUnavailable(
            f"{self.provider}: stream from {self.api_url} broke off after {progress.chars} chars: {_one_line(exc)}"
        )

    def text_at(self, reply: object, *path: str | int) -> str:
        """The non-empty stripped string at ``path`` inside ``reply``, else LlmBadReply."""
        node = self.node_at(reply, *path)
        walked = "reply" + "".join(f"[{step!r}]" for step in path)
        if not isinstance(node, str):
            raise LlmBadReply(f"{self.provider}: {walked} is {type(node).__name__}, not text")
        text = node.strip()
        if not text:
            raise LlmBadReply(f"{self.provider}: {walked} is empty")
        return text

    def node_at(self, reply: object, *path: str | int) -> object:
        """Whatever is at ``path`` inside ``reply``; LlmBadReply (naming any server error) when it is not there."""
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
        return node

    def message_parts(self, reply: object, *path: str | int) -> tuple[str, object]:
        """(stripped text, raw tool_calls) of the message object at ``path``: content may be absent or null."""
        message = self.node_at(reply, *path)
        where = "reply" + "".join(f"[{step!r}]" for step in path)
        if not isinstance(message, dict):
            raise LlmBadReply(f"{self.provider}: {where} is {type(message).__name__}, not an object")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise LlmBadReply(f"{self.provider}: {where}['content'] is {type(content).__name__}, not text")
        return (content or "").strip(), message.get("tool_calls")

    def whole_reply(self, text: str, calls: list[ToolCall]) -> tuple[str, list[ToolCall]]:
        """(text, calls) of a whole reply, or LlmBadReply when it has neither."""
        if not text and not calls:
            raise LlmBadReply(f"{self.provider}: reply from {self.api_url} has neither text nor tool calls")
        return text, calls
