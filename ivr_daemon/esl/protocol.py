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

A plain event carries ~60 headers and the daemon reads a handful: the header block is kept as
one string (:class:`PlainEventHeaders`), the headers every event is routed on are decoded at
once and any other one when it is first read, with the same results as decoding them all
(tests/test_esl_lazy_headers.py). mod_vosk sends a partial transcript every ~200 ms per
caller, twice while parked, so this is the reader's hot path (bench/events.py); the second,
byte-identical copy is read off the first one's result, which each connection's
:class:`FrameParser` keeps (:meth:`FrameParser.parse_event`).
"""

from __future__ import annotations

import collections.abc
import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union
from urllib.parse import unquote

MAX_HEADER_BLOCK_BYTES = 64 * 1024
MAX_BODY_BYTES = 8 * 1024 * 1024
_PREVIEW_BYTES = 120
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# int() refuses strings of more than 4,300 digits (ValueError): a number that long is junk.
_MAX_DECIMAL_DIGITS = 4000


def _decimal(text: str) -> int | None:
    """``text`` as a non-negative int when it is plain ASCII digits, else None (never raises)."""
    # str.isdigit() alone also accepts "²" and other digits int() refuses.
    if text.isascii() and text.isdigit() and len(text) <= _MAX_DECIMAL_DIGITS:
        return int(text)
    return None


class MalformedEvent(ValueError):
    """A frame's body is not a well-formed plain or json event."""


class Frame:
    """One framed message: outer headers (not URL-encoded) and exactly Content-Length bytes.

    A plain class with slots, not a frozen dataclass: one is made per frame on the reader. A
    frame cut by :class:`FrameParser` holds its bytes once (``raw``); ``body`` is sliced from
    them when first read (:func:`parse_event` reads a plain event in place).
    """

    __slots__ = ("headers", "raw", "_body", "_body_at")

    def __init__(self, headers: Mapping[str, str], body: bytes | None, raw: bytes, body_at: int = -1):
        self.headers = headers
        self.raw = raw
        self._body = body  # None: raw[body_at:], not sliced yet
        self._body_at = body_at

    @property
    def body(self) -> bytes:
        if self._body is None:
            self._body = self.raw[self._body_at :]
        return self._body

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (dict(self.headers), self.body, self.raw) == (dict(other.headers), other.body, other.raw)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Frame(headers={dict(self.headers)!r}, body={self.body!r})"


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
        # The last plain event this parser's connection read well, for parse_event's repeat
        # shortcut (see _parse_plain_event): one per connection, as the repeats are.
        self._last_plain: tuple[bytes, int, str, dict[str, str | None], str | None, str | None] | None = None

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[ParsedItem]:
        self._buf += data
        items: list[ParsedItem] = []
        # Frames are cut at an offset and the consumed bytes dropped once at the end: deleting
        # each frame from the front of the buffer moved the rest of the chunk every time.
        with memoryview(self._buf) as view:
            pos = self._cut(view, items)
        del self._buf[:pos]
        return items

    def parse_event(self, frame: Frame, received_s: float = 0.0) -> EslEvent:
        """:func:`parse_event` for the reader of this parser's connection: a plain event that
        repeats, byte for byte, the last one it read (mod_vosk's twice-sent transcripts) is read
        off that one's result. Another connection's events are not: each has its own parser."""
        return _parse_event(frame, received_s, self)

    def _cut(self, view: memoryview, items: list[ParsedItem]) -> int:
        """Append the items found in ``view``; return how many of its bytes they consumed."""
        buf = self._buf
        size = len(buf)
        pos = 0
        match_head = _EVENT_FRAME_HEAD.match
        max_body_bytes = self._max_body_bytes
        max_header_bytes = self._max_header_bytes
        while True:
            if self._skip_bytes:
                dropped = min(self._skip_bytes, size - pos)
                pos += dropped
                self._skip_bytes -= dropped
                if self._skip_bytes:
                    return pos
            if self._in_long_header:
                end = buf.find(b"\n\n", pos)
                if end < 0:
                    return max(pos, size - 1)  # the last byte may start the blank line
                pos = end + 2
                self._in_long_header = False
                continue
            # FreeSWITCH never sends blank lines between frames; tolerate them anyway.
            while pos < size and buf[pos] in (0x0A, 0x0D):
                pos += 1
            match = match_head(buf, pos)
            if match is not None:
                # An event frame, the flood on an event connection: what _take_frame does for
                # it, without searching for the blank line or taking the block apart line by
                # line (the match ends at the first blank line: nothing in it holds another).
                digits, content_type = match.groups()
                length = int(digits)
                body_at = match.end()
                if length <= max_body_bytes and body_at - 2 - pos <= max_header_bytes:
                    stop = body_at + length
                    if stop > size:
                        return pos  # body not complete yet
                    items.append(Frame({"Content-Length": digits.decode("ascii"),
                                        "Content-Type": _EVENT_CONTENT_TYPES[content_type]},
                                       None, bytes(view[pos:stop]), body_at - pos))
                    pos = stop
                    continue
            end = buf.find(b"\n\n", pos)
            if end < 0:
                # The block is at least size - pos - 1 bytes (its blank line may begin with the
                # last byte): over the cap for sure, whatever chunk brings the rest.
                if size - pos > self._max_header_bytes + 1:
                    items.append(MalformedFrame("header block too long", bytes(view[pos : pos + _PREVIEW_BYTES]),
                                                bytes(view[pos:])))
                    self._in_long_header = True
                    return size - 1
                return pos
            if end - pos > self._max_header_bytes:
                # The same block in one chunk: the same verdict as when it arrives in pieces.
                items.append(MalformedFrame("header block too long", bytes(view[pos : pos + _PREVIEW_BYTES]),
                                            bytes(view[pos : end + 2])))
                pos = end + 2
                continue
            item, pos = self._take_frame(view, pos, end)
            if item is None:
                return pos  # body not complete yet
            items.append(item)

    def _take_frame(self, view: memoryview, pos: int, end: int) -> tuple[ParsedItem | None, int]:
        """The frame whose header block is ``view[pos:end]``, and where the next one starts;
        (None, pos) while its body is not all there."""
        head_bytes = bytes(view[pos:end])
        body_start = end + 2
        try:
            headers = parse_header_lines(head_bytes.decode("utf-8"), url_decoded=False)
        except (UnicodeDecodeError, MalformedEvent) as exc:
            reason = "header block is not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
            return MalformedFrame(reason, head_bytes[:_PREVIEW_BYTES], head_bytes + b"\n\n"), body_start

        length = 0
        if "Content-Length" in headers:
            text = headers["Content-Length"].strip()
            length = _decimal(text)
            if length is None:
                return (MalformedFrame(f"bad Content-Length {text[:20]!r}", head_bytes[:_PREVIEW_BYTES],
                                       head_bytes + b"\n\n"), body_start)
            if length > self._max_body_bytes:
                self._skip_bytes = length
                return (MalformedFrame(f"Content-Length {length} over the {self._max_body_bytes}-byte cap",
                                       head_bytes[:_PREVIEW_BYTES], head_bytes + b"\n\n", over_cap=True), body_start)
        stop = body_start + length
        if len(view) < stop:
            return None, pos
        raw = bytes(view[pos:stop])
        if "Content-Type" not in headers:
            return MalformedFrame("no Content-Type header", raw[:_PREVIEW_BYTES], raw), stop
        return Frame(headers, None, raw, body_start - pos), stop


# The outer block of nearly every frame on an event connection (not URL-encoded; capture 80_*).
# Up to 9 digits: a longer number is over any body cap, and _take_frame says so.
_EVENT_FRAME_HEAD = re.compile(rb"Content-Length: ([0-9]{1,9})\nContent-Type: (text/event-(?:plain|json|xml))\n\n")
_EVENT_CONTENT_TYPES = {kind.encode(): kind for kind in ("text/event-plain", "text/event-json", "text/event-xml")}


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


class EslEvent:
    """A FreeSWITCH event: decoded headers plus the raw body text (None when it has none).

    ``headers`` is a mapping of str to str: a dict, or for a plain event from the wire a
    :class:`PlainEventHeaders` that decodes a header only when it is read. Not a dataclass:
    the reader makes one per event, and a frozen dataclass's ``__init__`` costs more than
    the rest of what the reader does with a partial transcript.
    """

    __slots__ = ("headers", "body", "wire_format", "received_s")

    def __init__(self, headers: Mapping[str, str], body: str | None = None, wire_format: str = "plain",
                 received_s: float = 0.0):
        self.headers = headers
        self.body = body
        self.wire_format = wire_format
        self.received_s = received_s  # time.monotonic() when its frame came off the socket, if known

    @property
    def name(self) -> str:
        return self.headers.get("Event-Name", "")

    @property
    def unique_id(self) -> str | None:
        return self.headers.get("Unique-ID") or None

    @property
    def sequence(self) -> int | None:
        text = self.headers.get("Event-Sequence", "")
        return _decimal(text)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.headers.get(key, default)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EslEvent):
            return NotImplemented
        return (dict(self.headers) == dict(other.headers) and self.body == other.body
                and self.wire_format == other.wire_format and self.received_s == other.received_s)

    __hash__ = None  # type: ignore[assignment]  # mutable headers, as before

    def __repr__(self) -> str:
        return (f"EslEvent(headers={dict(self.headers)!r}, body={self.body!r}, "
                f"wire_format={self.wire_format!r}, received_s={self.received_s!r})")


def parse_event(frame: Frame, received_s: float = 0.0) -> EslEvent:
    """Decode a ``text/event-plain``, ``-json`` or ``-xml`` frame; raises :class:`MalformedEvent`.

    A connection's reader uses its :meth:`FrameParser.parse_event` instead: the same results,
    and a byte-identical repeat of its last plain event costs one comparison."""
    return _parse_event(frame, received_s, None)


def _parse_event(frame: Frame, received_s: float, parser: FrameParser | None) -> EslEvent:
    content_type = frame.headers.get("Content-Type", "")
    if content_type == "text/event-plain":
        if frame._body is None:  # read in place: no copy of the body
            headers, body, wire_format = _parse_plain_event(frame.raw, frame._body_at, parser)
        else:
            headers, body, wire_format = _parse_plain_event(frame._body, 0, parser)
    elif content_type == "text/event-json":
        headers, body, wire_format = _parse_json_event(frame.body)
    elif content_type == "text/event-xml":
        headers, body, wire_format = _parse_xml_event(frame.body)
    else:
        raise MalformedEvent(f"not an event frame: Content-Type {content_type!r}")
    return EslEvent(headers, body, wire_format, received_s)


def split_plain_event(data: bytes) -> tuple[list[tuple[str, str]], str | None]:
    """A ``text/event-plain`` frame body as (decoded header pairs in order, repeats kept; body).

    The inner ``Content-Length`` is consumed, not returned: :func:`build_plain_event` writes it
    again from the body, so ``build_plain_event(*split_plain_event(b))`` gives the frame back.
    Every header is decoded here: the reader uses :func:`parse_event`, which decodes only what
    is read. Raises :class:`MalformedEvent`.
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
    return [(key, value) for key, value in pairs if key != "Content-Length"], _inner_body(text, rest, 0)[0]


def _inner_body(length_text: str, data: bytes, start: int) -> tuple[str, int]:
    """The body of a plain event (``Content-Length`` bytes of ``data`` from ``start``, as UTF-8)
    and its length in bytes."""
    length = _decimal(length_text)
    if length is None or length > len(data) - start:
        raise MalformedEvent(f"event body Content-Length {length_text[:20]!r} does not match its "
                             f"{len(data) - start} bytes")
    try:
        return data[start : start + length].decode("utf-8"), length
    except UnicodeDecodeError:
        raise MalformedEvent("event body is not UTF-8") from None


# The header block of a plain event as FreeSWITCH writes it: ``Name: value`` lines, the values
# URL-encoded, so neither names nor values hold a space, a colon, a control byte or a non-ASCII
# byte. With the newline before it, deleting every other byte leaves "\n" then ": \n" per line.
_NOT_STRUCTURAL = bytes(b for b in range(0x21, 0x7F) if b != 0x3A)
_SKELETON = b"\n" + b": \n" * 4096

_CONTENT_LENGTH_LINE = "\nContent-Length: "
# Searched with re, which scans for the literal ":" or "\n:" faster than bytes.count/find do.
_EMPTY_NAME = re.compile(rb"\n:")
_COLON_WITHOUT_SPACE = re.compile(rb":[^ ]")


def _freeswitch_shaped(block: bytes) -> bool:
    """True when ``block`` (newline, a header block, newline) is ``Name: value`` lines that
    :func:`parse_header_pairs` reads with no surprise: each line one ``": "`` after a non-empty
    name, nothing but printable ASCII.

    Any other block (a space or colon in a value, CR, tabs, UTF-8, ``Name:`` with no value,
    blank lines, over 4096 lines) is valid or not exactly as before: it is decoded the careful way.
    """
    skeleton = block.translate(None, _NOT_STRUCTURAL)
    return (len(skeleton) % 3 == 1 and len(skeleton) > 1 and skeleton == _SKELETON[: len(skeleton)]
            # One ":" and one " " per line, in that order: adjacent if no ":" is followed by
            # anything else; the name before it is empty if a line starts with it.
            and _COLON_WITHOUT_SPACE.search(block) is None
            and _EMPTY_NAME.search(block) is None)


def _line_value(text: str, needle: str) -> str | None:
    """The decoded value of the first line of ``text`` that starts with ``needle`` (newline, name, ": ")."""
    start = text.find(needle)
    if start < 0:
        return None
    start += len(needle)
    value = text[start : text.find("\n", start)]
    # errors="replace": FreeSWITCH leaves an uppercase %XX alone, so "100%AB" decodes to a lone
    # byte; keep the event, mark the byte (as parse_header_pairs does).
    return unquote(value, errors="replace") if "%" in value else value


def _parse_plain_event(data: bytes, start: int = 0, parser: FrameParser | None = None
                       ) -> tuple[Mapping[str, str], str | None, str]:
    """The plain event that is ``data[start:]``.

    ``parser`` (the connection's, or None) keeps the last plain event read well: its bytes,
    where it starts, and what it read as. While a channel is parked every DETECTED_SPEECH
    arrives twice in a row on the connection, byte-identical (dedup.py): the second copy is the
    same bytes, so it reads the same, for one comparison of bytes instead of a parse (bytes of
    another frame mostly differ in length, else the comparison stops at the first byte that
    differs). Each connection's repeats follow its own last event, so each parser keeps its own.
    """
    last = parser._last_plain if parser is not None else None
    if last is not None and last[1] == start and last[0] == data:
        return PlainEventHeaders(last[2], last[3].copy(), last[4]), last[5], "plain"
    # Where the header block ends. FreeSWITCH writes Content-Length last, right before the blank
    # line: found with a long needle, that line's end is a guess that costs little (a search for
    # "\n\n" costs a byte-by-byte scan, slow where every line ends in "\n"), and
    # _freeswitch_shaped, no blank line in the block, tells whether it is the first blank line.
    # Without that line (a playback report: no body) the guess is the blank line FreeSWITCH ends
    # a bodyless event with, the frame's last two bytes. A wrong guess only costs the careful path.
    length_at = data.find(b"\nContent-Length: ", start) + 17
    # No "\nContent-Length: " anywhere: only the block's first line can be that header.
    no_length_line = length_at == 16 and not data.startswith(b"Content-Length: ", start)
    end = data.find(b"\n", length_at) if length_at > 16 else -1
    if end < 0 or data[end + 1 : end + 2] != b"\n":
        if no_length_line and len(data) - start > 2 and data.endswith(b"\n\n"):
            end, length_at = len(data) - 2, -1
        else:
            end, length_at = data.find(b"\n\n", start), -1
    if end < 0:
        block = b"\n" + data[start:] + b"\n"
    elif start and data[start - 1] == 0x0A:  # in a frame: the outer header block's blank line
        block = data[start - 1 : end + 1]
    else:
        block = b"\n" + data[start : end + 1]
    if not _freeswitch_shaped(block):
        # Not the shape FreeSWITCH writes (hostile or hand-made): decode all of it, the careful way.
        pairs, body = split_plain_event(data[start:] if start else data)
        headers: dict[str, str] = {}
        for key, value in pairs:
            headers.setdefault(key, value)
        if body is not None:
            headers["Content-Length"] = str(len(body.encode("utf-8")))
        return headers, body, "plain"
    text = block.decode("ascii")  # every line, the first too, is "\nName: value\n"
    # Read off every event by the reader and the router: decoded at once, each with one search.
    # The other ~60 headers (Event-Sequence, Core-UUID and Speech-Type too: only a transcript's
    # are read, by the dedup and absorb) are decoded if and when something reads them.
    seen = {"Event-Name": _line_value(text, "\nEvent-Name: "), "Unique-ID": _line_value(text, "\nUnique-ID: ")}
    if length_at >= 0 and not data.startswith(b"Content-Length: ", start):
        # The first Content-Length line is the one found above: no second search.
        length_text = data[length_at:end].decode("ascii")
        if "%" in length_text:
            length_text = unquote(length_text, errors="replace")
    elif no_length_line:
        length_text = None  # searched above, in vain
    else:
        length_text = _line_value(text, _CONTENT_LENGTH_LINE)
    if length_text is None:
        body = length = None
    else:
        body, byte_count = _inner_body(length_text, data, len(data) if end < 0 else end + 2)
        length = str(byte_count)
    if parser is not None:
        # This event's own cache, not a copy: what the reader decodes of it before the next
        # frame (a transcript's Speech-Type, Event-Sequence, Core-UUID) its repeat reads for
        # free. Only ever added to, with the values of the same text; a repeat gets a copy.
        parser._last_plain = (data, start, text, seen, length, body)
    return PlainEventHeaders(text, seen, length), body, "plain"


_UNSEEN = object()


class PlainEventHeaders(collections.abc.Mapping):
    """The headers of a plain event, each decoded (URL-decoded, once) when it is first read.

    An event carries ~60 headers and the daemon reads 3 to 6 of them, so the header block is
    kept as one string and a read finds its line. What it returns is what decoding every line
    with :func:`parse_header_pairs` and keeping the first of a repeated header gives (the
    inner ``Content-Length`` is the body's byte count, last, as :func:`parse_event` always
    did): tests/test_esl_lazy_headers.py compares the two on every capture and fuzzed input.
    Only blocks of :func:`_freeswitch_shaped` shape are held this way; others are decoded
    whole into a dict.
    """

    __slots__ = ("_text", "_seen", "_all", "_length")

    def __init__(self, text: str, seen: dict[str, str | None], length: str | None):
        self._text = text  # "\n" + the header block + "\n", FreeSWITCH-shaped
        self._seen = seen  # decoded so far; None: no such header
        self._all: dict[str, str] | None = None
        self._length = length  # the body's byte count, when it has one

    def raw_value(self, key: str) -> str | None:
        """The first ``key`` line's value, decoded; None when there is none. Not cached."""
        if "\n" in key:
            return None  # no name holds one; "a: b\nc" must not match across two lines
        return _line_value(self._text, "\n" + key + ": ")

    def _lookup(self, key: str) -> str | None:
        value = self._seen.get(key, _UNSEEN)
        if value is _UNSEEN:
            value = self._seen[key] = self._length if key == "Content-Length" else self.raw_value(key)
        return value  # type: ignore[return-value]

    def get(self, key: str, default=None):  # type: ignore[override]
        value = self._seen.get(key, _UNSEEN)
        if value is _UNSEEN:
            value = self._seen[key] = self._length if key == "Content-Length" else self.raw_value(key)
        return default if value is None else value

    def __getitem__(self, key: str) -> str:
        value = self._lookup(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._lookup(key) is not None

    def _decoded(self) -> dict[str, str]:
        """Every header, in order, the first of a repeated one (for iteration, len, dict())."""
        if self._all is None:
            headers: dict[str, str] = {}
            for line in self._text[1:-1].split("\n"):
                key, _, value = line.partition(": ")
                if key != "Content-Length" and key not in headers:
                    headers[key] = unquote(value, errors="replace") if "%" in value else value
            if self._length is not None:
                headers["Content-Length"] = self._length
            self._all = headers
        return self._all

    def __iter__(self):
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def keys(self):  # type: ignore[override]
        return self._decoded().keys()

    def items(self):  # type: ignore[override]
        return self._decoded().items()

    def values(self):  # type: ignore[override]
        return self._decoded().values()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, collections.abc.Mapping):
            return self._decoded() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PlainEventHeaders({self._decoded()!r})"


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
