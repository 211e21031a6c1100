"""How the body of a streamed reply is cut into events, whatever the provider: bytes in, event texts out.

Ollama sends one JSON object per line (NDJSON); OpenAI-compatible servers send server-sent
events (``data: {...}`` lines, an event ending at a blank line). Both arrive as HTTP chunks
(a server writes each event as one) or, behind a buffering proxy, as a body with a length.
Nothing here knows a provider's JSON: :class:`ivr_daemon.llm.base.StreamReader` s read the events.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Literal

import urllib3.response

from ivr_daemon.llm.errors import LlmBadReply

StreamFraming = Literal["ndjson", "sse"]

STREAM_READ_BYTES = 8192
# One event line larger than this is not a chat chunk; refusing it bounds the buffer.
STREAM_MAX_LINE_BYTES = 1 << 20


def stream_events(chunks: Iterable[bytes], framing: StreamFraming, provider: str) -> Iterator[str]:
    """The events of a body arriving as ``chunks``: NDJSON lines, or each server-sent event's data."""
    lines = body_lines(chunks, provider)
    return sse_events(lines) if framing == "sse" else ndjson_events(lines)


def body_chunks(raw: urllib3.response.BaseHTTPResponse) -> Iterator[bytes]:
    """The pieces of a streamed body as they arrive, at most ``STREAM_READ_BYTES`` each.

    A chunked body (every streaming server's) is read an HTTP chunk at a time with urllib3's
    ``read_chunked``: servers write each event as one chunk, and read1 went through urllib3's and
    http.client's whole read path for every one of them (one chunk per call, even when many had
    arrived together): a third of the daemon's CPU per streamed token. Any other body (a length,
    or up to the close) with read1, which returns whatever has arrived: read(n) would sit on a
    finished line waiting for n bytes.
    """
    if raw.chunked:
        return raw.read_chunked(STREAM_READ_BYTES, decode_content=True)
    return iter(lambda: raw.read1(STREAM_READ_BYTES, decode_content=True), b"")


def body_lines(chunks: Iterable[bytes], provider: str) -> Iterator[str]:
    """The lines of a streamed body (LF, CRLF or CR ends one), decoded as UTF-8, as its ``chunks`` arrive."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        # A CR at the end may be the first half of a CRLF that the next read completes.
        held = b"\r" if pending.endswith(b"\r") else b""
        if held:
            pending = pending[:-1]
        # bytes.splitlines ends a line at LF, CRLF or CR and at nothing else (str.splitlines would
        # also at \x1c, \x85, U+2028...): one C call instead of a regex split.
        lines = pending.splitlines()
        pending = lines.pop() if lines and not pending.endswith((b"\n", b"\r")) else b""
        pending += held
        if len(pending) > STREAM_MAX_LINE_BYTES:
            raise LlmBadReply(f"{provider}: stream line longer than {STREAM_MAX_LINE_BYTES} bytes")
        for line in lines:
            yield line.decode("utf-8", "replace")
    if pending.rstrip(b"\r"):
        yield pending.rstrip(b"\r").decode("utf-8", "replace")


def ndjson_events(lines: Iterable[str]) -> Iterator[str]:
    return (line for line in lines if line.strip())


def sse_events(lines: Iterable[str]) -> Iterator[str]:
    """The data of each server-sent event (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif not line.startswith(":"):  # a comment: llama_cpp.server's keep-alive pings are these
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value[1:] if value.startswith(" ") else value)
            # event, id, retry: nothing a chat stream needs.
    if data:
        # The spec drops an event the body ends inside; a last "data: [DONE]" with no blank
        # line after it is still the end marker to us.
        yield "\n".join(data)
