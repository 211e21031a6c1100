"""ESL wire format: bytes in, frames and events out (and back), with no socket in sight.

A frame on the event socket is a header block, a blank line, and ``Content-Length`` bytes of
body (https://developer.signalwire.com/freeswitch/FreeSWITCH-Explained/Client-and-Developer-Interfaces/Event-Socket-Library/)::

    Content-Length: 1937\\n
    Content-Type: text/event-plain\\n
    \\n
    Event-Name: DETECTED_SPEECH\\n        <- 1937 bytes: the event's own headers,
    Speech-Type: detected-speech\\n          URL-encoded values, then an inner body
    Unique-ID: 03362ffb-...\\n
    Content-Length: 11\\n
    \\n
    hello world                          <- raw UTF-8, never URL-encoded

Lengths count bytes, so frames are cut on bytes and decoded afterwards. Header values are
URL-decoded exactly once; bodies are never decoded. greenswitch instead unquotes the whole
frame and glues the body onto the last header (its PR #86), which loses the recognised text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union
from urllib.parse import unquote

MAX_HEADER_BLOCK_BYTES = 64 * 1024
MAX_BODY_BYTES = 8 * 1024 * 1024
_PREVIEW_BYTES = 120
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_decimal(text: str) -> bool:
    # str.isdigit() alone also accepts "²" and other digits int() refuses (ValueError).
    return text.isascii() and text.isdigit()


class MalformedEvent(ValueError):
    """A frame's body is not a well-formed plain or json event."""


@dataclass(frozen=True)
class Frame:
    """One framed message: outer headers (not URL-encoded) and exactly Content-Length bytes."""

    headers: Mapping[str, str]
    body: bytes
    raw: bytes = field(repr=False)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


@dataclass(frozen=True)
class MalformedFrame:
    """Bytes the parser had to skip; ``reason`` says why, ``preview`` shows the start.

    ``raw`` holds the skipped bytes as far as they were buffered (a body over the size cap,
    and the rest of a header block over its cap, are dropped as they stream past and are not
    in it).
    """

    reason: str
    preview: bytes
    raw: bytes = field(default=b"", repr=False)
    # The peer claimed a body over the cap: the parser stays in step by skipping it, but a
    # stream that says so is broken beyond trust (the connection reconnects).
    over_cap: bool = False


ParsedItem = Union[Frame, MalformedFrame]


class FrameParser:
    """Incremental frame splitter: ``feed()`` any chunk of bytes, get whole frames back.

    It never raises on bad input: what it cannot frame comes back as :class:`MalformedFrame`
    and parsing resumes after it. A Content-Length over ``max_body_bytes`` is skipped as the
    bytes stream past, and so is a header block over ``max_header_bytes`` up to its blank line,
    so ``buffered_bytes`` never exceeds ``max_header_bytes + max_body_bytes + 1`` whatever the
    peer claims, and the items do not depend on how the bytes were cut into chunks.
    """

    def __init__(self, max_body_bytes: int = MAX_BODY_BYTES, max_header_bytes: int = MAX_HEADER_BLOCK_BYTES):
        self._buf = bytearray()
        self._skip_bytes = 0
        self._in_long_header = False  # dropping a header block over the cap, up to its blank line
        self._max_body_bytes = max_body_bytes
        self._max_header_bytes = max_header_bytes

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[ParsedItem]:
        self._buf += data
        items: list[ParsedItem] = []
        while True:
            if self._skip_bytes:
                dropped = min(self._skip_bytes, len(self._buf))
                del self._buf[:dropped]
                self._skip_bytes -= dropped
                if self._skip_bytes:
                    return items
            if self._in_long_header:
                end = self._buf.find(b"\n\n")
                if end < 0:
                    del self._buf[: len(self._buf) - 1]  # the last byte may start the blank line
                    return items
                del self._buf[: end + 2]
                self._in_long_header = False
                continue
            # FreeSWITCH never sends blank lines between frames; tolerate them anyway.
            start = 0
            while start < len(self._buf) and self._buf[start] in (0x0A, 0x0D):
                start += 1
            if start:
                del self._buf[:start]
            end = self._buf.find(b"\n\n")
            if end < 0:
                # The block is at least len - 1 bytes (its blank line may begin with the last
                # byte): over the cap for sure, whatever chunk brings the rest.
                if len(self._buf) > self._max_header_bytes + 1:
                    items.append(MalformedFrame("header block too long", bytes(self._buf[:_PREVIEW_BYTES]), bytes(self._buf)))
                    del self._buf[: len(self._buf) - 1]
                    self._in_long_header = True
                return items
            if end > self._max_header_bytes:
                # The same block in one chunk: the same verdict as when it arrives in pieces.
                items.append(MalformedFrame("header block too long", bytes(self._buf[:_PREVIEW_BYTES]), bytes(self._buf[: end + 2])))
                del self._buf[: end + 2]
                continue
            item = self._take_frame(end)
            if item is None:
                return items  # body not complete yet
            items.append(item)

    def _take_frame(self, end: int) -> ParsedItem | None:
        head_bytes = bytes(self._buf[:end])
        body_start = end + 2
        try:
            headers = parse_header_lines(head_bytes.decode("utf-8"), url_decoded=False)
        except (UnicodeDecodeError, MalformedEvent) as exc:
            del self._buf[:body_start]
            reason = "header block is not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
            return MalformedFrame(reason, head_bytes[:_PREVIEW_BYTES], head_bytes + b"\n\n")

        length = 0
        if "Content-Length" in headers:
            text = headers["Content-Length"].strip()
            if not _is_decimal(text):
                del self._buf[:body_start]
                return MalformedFrame(f"bad Content-Length {text[:20]!r}", head_bytes[:_PREVIEW_BYTES], head_bytes + b"\n\n")
            length = int(text)
            if length > self._max_body_bytes:
                del self._buf[:body_start]
                self._skip_bytes = length
                return MalformedFrame(f"Content-Length {length} over the {self._max_body_bytes}-byte cap",
                                      head_bytes[:_PREVIEW_BYTES], head_bytes + b"\n\n", over_cap=True)
        if len(self._buf) < body_start + length:
            return None
        raw = bytes(self._buf[: body_start + length])
        del self._buf[: body_start + length]
        if "Content-Type" not in headers:
            return MalformedFrame("no Content-Type header", raw[:_PREVIEW_BYTES], raw)
        return Frame(headers=headers, body=raw[body_start:], raw=raw)


def parse_header_lines(text: str, *, url_decoded: bool) -> dict[str, str]:
    """``Key: value`` lines to a dict; the first of a repeated header wins (see X07 capture)."""
    headers: dict[str, str] = {}
    for key, value in parse_header_pairs(text, url_decoded=url_decoded):
        headers.setdefault(key, value)
    return headers


def parse_header_pairs(text: str, *, url_decoded: bool) -> list[tuple[str, str]]:
    """``Key: value`` lines in order, repeats kept; raises :class:`MalformedEvent`.

    ``url_decoded`` undoes FreeSWITCH's URL-encoding of event header values, once.
    """
    pairs: list[tuple[str, str]] = []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line:
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            # "Key:" with nothing after it still names a header with an empty value.
            if line.endswith(":") and " " not in line:
                key, value = line[:-1], ""
            else:
                raise MalformedEvent(f"header line without ': ': {line[:60]!r}")
        if not key or key != key.strip():
            raise MalformedEvent(f"bad header name {key[:60]!r}")
        if url_decoded:
            # errors="replace": FreeSWITCH leaves an uppercase %XX alone, so a value such as
            # "100%AB" decodes to a lone byte; keep the event, mark the byte.
            value = unquote(value, errors="replace")
        pairs.append((key, value))
    return pairs


@dataclass(frozen=True)
class EslEvent:
    """A FreeSWITCH event: decoded headers plus the raw body text (None when it has none)."""

    headers: Mapping[str, str]
    body: str | None = None
    wire_format: str = "plain"
    received_s: float = 0.0  # time.monotonic() when its frame came off the socket, if known

    @property
    def name(self) -> str:
        return self.headers.get("Event-Name", "")

    @property
    def unique_id(self) -> str | None:
        return self.headers.get("Unique-ID") or None

    @property
    def sequence(self) -> int | None:
        text = self.headers.get("Event-Sequence", "")
        return int(text) if _is_decimal(text) else None

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.headers.get(key, default)


def parse_event(frame: Frame, received_s: float = 0.0) -> EslEvent:
    """Decode a ``text/event-plain``, ``-json`` or ``-xml`` frame; raises :class:`MalformedEvent`."""
    if frame.content_type == "text/event-plain":
        headers, body, wire_format = _parse_plain_event(frame.body)
    elif frame.content_type == "text/event-json":
        headers, body, wire_format = _parse_json_event(frame.body)
    elif frame.content_type == "text/event-xml":
        headers, body, wire_format = _parse_xml_event(frame.body)
    else:
        raise MalformedEvent(f"not an event frame: Content-Type {frame.content_type!r}")
    return EslEvent(headers=headers, body=body, wire_format=wire_format, received_s=received_s)


def split_plain_event(data: bytes) -> tuple[list[tuple[str, str]], str | None]:
    """A ``text/event-plain`` frame body as (decoded header pairs in order, repeats kept; body).

    The inner ``Content-Length`` is consumed, not returned: :func:`build_plain_event` writes it
    again from the body, so ``build_plain_event(*split_plain_event(b))`` gives the frame back.
    Raises :class:`MalformedEvent`.
    """
    end = data.find(b"\n\n")
    head, rest = (data, b"") if end < 0 else (data[:end], data[end + 2 :])
    try:
        pairs = parse_header_pairs(head.decode("utf-8"), url_decoded=True)
    except UnicodeDecodeError:
        raise MalformedEvent("event headers are not UTF-8") from None
    text = next((value for key, value in pairs if key == "Content-Length"), None)
    if text is None:
        return pairs, None
    if not _is_decimal(text) or int(text) > len(rest):
        raise MalformedEvent(f"event body Content-Length {text[:20]!r} does not match its {len(rest)} bytes")
    try:
        body = rest[: int(text)].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEvent("event body is not UTF-8") from None
    return [(key, value) for key, value in pairs if key != "Content-Length"], body


def _parse_plain_event(data: bytes) -> tuple[dict[str, str], str | None, str]:
    pairs, body = split_plain_event(data)
    headers: dict[str, str] = {}
    for key, value in pairs:
        headers.setdefault(key, value)
    if body is not None:
        headers["Content-Length"] = str(len(body.encode("utf-8")))
    return headers, body, "plain"


def _parse_json_event(data: bytes) -> tuple[dict[str, str], str | None, str]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested deep
        raise MalformedEvent(f"event json does not parse: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedEvent("event json is not an object")
    body = obj.pop("_body", None)
    headers: dict[str, str] = {}
    for key, value in obj.items():
        # Multi-valued headers come as JSON arrays; keep the first, as for plain events.
        if isinstance(value, list):
            value = value[0] if value else ""
        try:
            text = value if isinstance(value, str) else json.dumps(value)
        except RecursionError:
            raise MalformedEvent(f"event json header {key[:60]!r} is nested too deep") from None
        headers[_utf8_safe(key)] = _utf8_safe(text)
    return headers, _utf8_safe(body) if isinstance(body, str) else None, "json"


def _utf8_safe(text: str) -> str:
    """A JSON "\\ud800" escape decodes to a lone surrogate that no UTF-8 writer accepts: mark it U+FFFD,
    as a bad escape in a plain event is marked."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)
    return text


def _parse_xml_event(data: bytes) -> tuple[dict[str, str], str | None, str]:
    # Only the daemon's own tests subscribe as xml; values are URL-encoded as in plain events.
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(data)
    except (ElementTree.ParseError, ValueError, LookupError) as exc:
        # ValueError/LookupError: an XML declaration naming a codec expat cannot use ("shift_jis", "foo").
        raise MalformedEvent(f"event xml does not parse: {exc}") from None
    headers_node = root.find("headers")
    if root.tag != "event" or headers_node is None:
        raise MalformedEvent("event xml has no <event><headers>")
    headers: dict[str, str] = {}
    for node in headers_node:
        headers.setdefault(node.tag, unquote(node.text or "", errors="replace"))
    length_node = root.find("Content-Length")
    if length_node is not None:
        headers.setdefault("Content-Length", length_node.text or "")
    body_node = root.find("body")
    body = None if body_node is None else (body_node.text or "")
    return headers, body, "xml"


# --- Serialising: what FreeSWITCH writes. The simulator and the tests speak through these. ---

_FS_URL_UNSAFE = frozenset(b'\r\n #%&+:;<=>?@[\\]^`{|}"')
_UPPER_HEX = frozenset(b"0123456789ABCDEF")


def encode_header_value(value: str) -> str:
    """URL-encode a header value the way FreeSWITCH's ``switch_url_encode`` does (see capture 92).

    Unsafe ASCII and every non-ASCII byte become ``%XX``; an existing ``%XX`` with uppercase
    hex digits is left as it is, which is why the encoding is not reversible.
    """
    if value == "":
        return "_undef_"
    data = value.encode("utf-8")
    out: list[str] = []
    i = 0
    while i < len(data):
        byte = data[i]
        if byte == 0x25 and i + 2 < len(data) and data[i + 1] in _UPPER_HEX and data[i + 2] in _UPPER_HEX:
            out.append("%")
        elif byte in _FS_URL_UNSAFE or byte < 0x20 or byte >= 0x7F:
            out.append(f"%{byte:02X}")
        else:
            out.append(chr(byte))
        i += 1
    return "".join(out)


def build_frame(headers: Iterable[tuple[str, str]], body: bytes = b"") -> bytes:
    """An outer frame: the given headers in order, then the body (Content-Length is not added)."""
    head = "".join(f"{key}: {value}\n" for key, value in headers)
    return head.encode("utf-8") + b"\n" + body


def build_plain_event(headers: Iterable[tuple[str, str]], body: str | None = None) -> bytes:
    """A whole ``text/event-plain`` frame, byte-compatible with FreeSWITCH's ``event plain``."""
    lines = "".join(
        f"{key}: {encode_header_value(value)}\n" for key, value in headers if key != "Content-Length"
    )
    if body is None:
        inner = lines.encode("utf-8") + b"\n"
    else:
        body_bytes = body.encode("utf-8")
        inner = lines.encode("utf-8") + f"Content-Length: {len(body_bytes)}\n\n".encode() + body_bytes
    return build_frame([("Content-Length", str(len(inner))), ("Content-Type", "text/event-plain")], inner)


def build_json_event(headers: Iterable[tuple[str, str]], body: str | None = None) -> bytes:
    """A whole ``text/event-json`` frame: one flat object, the body under ``_body``."""
    obj: dict[str, str] = {}
    for key, value in headers:
        if key != "Content-Length":
            obj.setdefault(key, value)
    if body is not None:
        obj["Content-Length"] = str(len(body.encode("utf-8")))
        obj["_body"] = body
    inner = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return build_frame([("Content-Length", str(len(inner))), ("Content-Type", "text/event-json")], inner)


def build_api_response(text: str) -> bytes:
    data = text.encode("utf-8")
    return build_frame([("Content-Type", "api/response"), ("Content-Length", str(len(data)))], data)


def build_command_reply(reply_text: str, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    return build_frame([("Content-Type", "command/reply"), ("Reply-Text", reply_text), *extra])


DISCONNECT_NOTICE_BODY = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"


def build_disconnect_notice() -> bytes:
    return build_frame(
        [("Content-Type", "text/disconnect-notice"), ("Content-Length", str(len(DISCONNECT_NOTICE_BODY)))],
        DISCONNECT_NOTICE_BODY,
    )


AUTH_REQUEST = build_frame([("Content-Type", "auth/request")])
