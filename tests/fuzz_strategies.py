"""Hostile ESL byte streams built from captured FreeSWITCH events: hypothesis strategies and a seeded twin.

Every generator here is written once against a small :class:`Chooser` (integer, chance, pick,
binary, text). :class:`HypothesisChooser` backs it with ``draw`` so the strategies shrink;
:class:`RandomChooser` backs it with ``random.Random(seed)`` so ``bench/fuzz.py`` can make
100 000 frames quickly and reproducibly with exactly the same mutations.

What a stream holds (see :func:`make_stream`): real events from ``tests/captures`` (plain,
json, xml) with mutated header values (``%0D%0A``, ``%00``, raw CR/LF, invalid UTF-8,
non-ASCII, values up to 200 kB), mutated Unique-ID / Event-Sequence / Event-Name, dropped and
repeated headers, bodies (none, empty, UTF-8, invalid UTF-8, up to 1 MB), inner and outer
Content-Length right, off, negative, huge, non-numeric or non-ASCII digits, wrong or missing
Content-Type, frames truncated at any byte, the other captured frames (replies, auth,
disconnect notice), and junk between frames. :func:`chunked` cuts any of it into random chunks.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence, TypeVar
from urllib.parse import unquote

from hypothesis import strategies as st

from ivr_daemon.esl.protocol import Frame, FrameParser, encode_header_value, parse_header_pairs
from ivr_daemon.replay.simulator import build_xml_event

T = TypeVar("T")

CAPTURES_DIR = Path(__file__).parent / "captures"
ONE_MB = 1 << 20
HUGE_VALUE_MAX_BYTES = 200_000
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

# Call UUIDs that fuzzed events share, so calls get several events and some a hangup.
FUZZ_CALL_UUIDS = tuple(f"f0220000-0000-4000-8000-{n:012d}" for n in range(1, 33))

# Content types the daemon's reader treats as replies or as the end of the session: a stray one
# desynchronises the reply FIFO or marks the connection dead, so daemon-safe streams hold none.
SESSION_CONTENT_TYPES = (b"api/response", b"command/reply", b"auth/request", b"text/disconnect-notice",
                         b"text/rude-rejection")

EVENT_NAMES = ("DETECTED_SPEECH", "CHANNEL_HANGUP_COMPLETE", "PLAYBACK_START", "PLAYBACK_STOP",
               "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_ANSWER", "CHANNEL_PARK", "DTMF", "BACKGROUND_JOB",
               "HEARTBEAT", "CUSTOM", "")
SPEECH_TYPES = ("detected-speech", "detected-partial-speech", "begin-speaking", "closed", "")

# Header values as they appear on the wire (after "Key: "), each a trap for the decoder.
WIRE_VALUE_TRAPS: tuple[bytes, ...] = (
    b"%0D%0A", b"%0A", b"%0D", b"%00", b"a%00b", b"%0A%0AEvent-Name: INJECTED",
    b"x%0D%0AUnique-ID: " + FUZZ_CALL_UUIDS[0].encode(), b"%0D%0Aapi uuid_kill " + FUZZ_CALL_UUIDS[1].encode(),
    b"%", b"%2", b"%ZZ", b"%C3", b"%C3%28", b"%FF%FE", b"%ED%A0%80", b"100%AB", b"50%zz", b"%25", b"%2525",
    b"_undef_", b"%E2%9C%93", b"h\xc3\xa9llo", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"a\rb", b"\r",
    b"x\nInjected-Header: 1", b"x\n\n", b"\t tab", b" leading space", b"trailing space ", b":", b": ", b"",
)
SEQUENCE_TRAPS = ("", "0", "-1", "\u00b2", "\u0661\u0662", "1e3", " 5", "5 ", "0x10", "99999999999999999999999", "abc")
UNIQUE_ID_TRAPS = (
    "", "*", "**", "../*", "../../etc/passwd", "/etc/passwd", "x" * 300, FUZZ_CALL_UUIDS[0] + "\r\n",
    FUZZ_CALL_UUIDS[0] + " all", FUZZ_CALL_UUIDS[0].upper(), " " + FUZZ_CALL_UUIDS[0], "\u00e9" * 36,
    "00000000-0000-0000-0000-00000000000\u0661", "_undef_",
)
CONTENT_LENGTH_TRAPS = ("-1", "-0", "abc", "", " ", "\u00b2", "\u0661\u0662", "0x10", "1e3", "+5", "1 2",
                        "99999999999999999999999999")
CONTENT_TYPE_TRAPS = ("", "TEXT/EVENT-PLAIN", "text/event-", "text/event-plain; charset=utf-8", "text/event-csv",
                      "text/plain", "application/json", "log/data", "\u00e9v\u00e9nement")
JSON_TRAPS = (
    "[1, 2]", '"text"', "null", "{}", "1e999", "NaN", '{"a": NaN}', '{"Event-Name": 5, "Unique-ID": ["a", "b"], "_body": 7}',
    '{"Event-Name": {"nested": [1, {"x": null}]}, "Unique-ID": []}', '{"Unique-ID": "\\ud800", "_body": "\\udcff"}',
    '{"Event-Name": "DETECTED_SPEECH\\r\\nUnique-ID: x", "a\\nb": "c"}', '{"": "", " x ": "y"}',
    '{"Content-Length": "-5", "_body": "hi"}', '{"Event-Sequence": "\\u00b2"}',
)
XML_TRAPS = (
    '<?xml version="1.0" encoding="foo"?><event><headers/></event>',
    '<?xml version="1.0" encoding="utf-16"?><event><headers/></event>',
    '<!DOCTYPE e [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><event><headers><x>&b;</x></headers></event>',
    '<event><headers><Unique-ID>%0D%0A</Unique-ID></headers><body>\x01</body></event>',
    "<event/>", "<headers/>", "<event><headers><a>1</a></headers><Content-Length>x</Content-Length></event>",
    "<?pi x?><!-- c --><event><headers><a/></headers></event>",
    '<?xml version="1.0" encoding="shift_jis"?><event/>', '<?xml version="1.0" encoding="idna"?><event/>',
    '<?xml version="1.0" encoding="rot13"?><event/>', '<?xml version="1.0" encoding="punycode"?><event>\u00e9</event>',
)
JUNK_TRAPS: tuple[bytes, ...] = (
    b"\n\n", b"\r\n\r\n", b"\n\r\n", b"no colon here\n\n", b"Foo: bar\n\n", b"Content-Type: text/event-plain\n\n",
    b"Content-Type: text/event-json\n\n", b"Content-Length: 0\n\n", b"Content-Length: 5\n\n",
    b"Content-Length: 99\nContent-Type: text/event-plain\n\n", b"Content-Length: -1\n\n", b"\x00" * 16,
    b"\xff\xfe\xfd\n\n", b"Key:\n\n", b" Key: v\n\n", b": v\n\n", b"Content-Length\n\n",
)
BODY_TRAPS: tuple[bytes, ...] = (
    b"", b"hello world", b'{"text": "what time is it"}', b'{"partial": "hel"}', b'{"text": ""}', b"   ",
    "h\u00e9llo w\u00f6rld \u2713 \"q\" 100%AB".encode(), b"\n\nContent-Length: 99\n\n", b"Content-Type: text/event-plain\n\n",
    b"+OK " + FUZZ_CALL_UUIDS[0].encode() + b"\n", b"\xff\xfe", b"hello \xc3 world", b"\xed\xa0\x80",
)


def hangup_cleanup_bug(call_uuid: str | None) -> bool:
    """A Unique-ID that made ConversationHandler.close() raise (reported, not fixed: conversation.py).

    close() globbed ``<tts dir>/<Unique-ID>-*.wav``: an absolute Unique-ID raised
    NotImplementedError and one with "**" inside a name ValueError (and "../*" quietly deleted
    WAVs outside the directory). It now deletes only the paths its own syntheses were given, so
    it no longer raises; still, without the phrase cache, ``<tts dir>/<Unique-ID>-....wav`` is
    where a turn writes its WAV, directories created on the way. Kept as a tolerance until that is fixed.
    """
    return call_uuid is not None and ("/" in call_uuid or "**" in call_uuid)


def is_valid_uuid(text: str | None) -> bool:
    """A UUID as FreeSWITCH makes them (the shape ``commands.check_uuid`` accepts)."""
    return text is not None and _UUID_RE.match(text) is not None


# --- the two choosers -----------------------------------------------------------------------------


class Chooser(Protocol):
    def integer(self, low: int, high: int) -> int: ...

    def chance(self, percent: int) -> bool: ...

    def pick(self, options: Sequence[T]) -> T: ...

    def binary(self, max_size: int) -> bytes: ...

    def text(self, max_size: int) -> str: ...


class HypothesisChooser:
    """Draws from hypothesis; every choice shrinks towards "no mutation" and the first option."""

    def __init__(self, draw: Callable):
        self._draw = draw

    def integer(self, low: int, high: int) -> int:
        return self._draw(st.integers(low, high))

    def chance(self, percent: int) -> bool:
        # Shrinks to 0, i.e. to False: a failing example loses the mutations it does not need.
        return self._draw(st.integers(0, 99)) >= 100 - percent

    def pick(self, options: Sequence[T]) -> T:
        return self._draw(st.sampled_from(options))

    def binary(self, max_size: int) -> bytes:
        return self._draw(st.binary(max_size=max_size))

    def text(self, max_size: int) -> str:
        return self._draw(st.text(max_size=max_size))


class RandomChooser:
    """The same choices from ``random.Random``: fast, for bench/fuzz.py's 100 000 frames."""

    _ALPHABET = (
        [chr(c) for c in range(0x20, 0x7F)] * 4 + ["\r", "\n", "\t", "\x00", "\x7f", "%"] * 2
        + [chr(c) for c in (0xE9, 0xF6, 0xFF, 0x2713, 0x0661, 0x00B2, 0xFFFD, 0x1F600, 0x10FFFF, 0xFEFF)]
    )

    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def chance(self, percent: int) -> bool:
        return self.rng.randrange(100) < percent

    def pick(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def binary(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))

    def text(self, max_size: int) -> str:
        return "".join(self.rng.choice(self._ALPHABET) for _ in range(self.rng.randint(0, max_size)))


# --- the captured corpus --------------------------------------------------------------------------


@dataclass(frozen=True)
class CapturedEvent:
    """One real event: header pairs as on the wire (URL-encoded, repeats kept) and its raw body."""

    source: str
    wire_format: str
    pairs: tuple[tuple[str, bytes], ...]  # without the inner Content-Length
    body: bytes | None


def _capture_files() -> list[Path]:
    files = sorted(CAPTURES_DIR.glob("*.txt")) + sorted((CAPTURES_DIR / "playback").glob("*.txt"))
    return [p for p in files if not p.name.startswith(("00_", "T_")) and not p.name.endswith(("_sent.txt", ".times.txt"))]


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[CapturedEvent, ...], tuple[bytes, ...]]:
    events: dict[tuple, CapturedEvent] = {}
    others: dict[bytes, None] = {}
    for path in _capture_files():
        parser = FrameParser()
        items = parser.feed(path.read_bytes())
        if parser.buffered_bytes or not all(isinstance(item, Frame) for item in items):
            continue  # not a wire capture
        for frame in items:
            event = _captured_event(path.name, frame)
            if event is None:
                others.setdefault(frame.raw)
                continue
            names = dict(event.pairs)
            key = (event.wire_format, names.get("Event-Name"), names.get("Speech-Type"), names.get("Application"),
                   names.get("Playback-Status"), event.body is None)
            events.setdefault(key, event)
    return tuple(events.values()), tuple(others)


def _captured_event(source: str, frame: Frame) -> CapturedEvent | None:
    if frame.content_type == "text/event-plain":
        head, sep, rest = frame.body.partition(b"\n\n")
        pairs = [(k, v.encode()) for k, v in parse_header_pairs(head.decode(), url_decoded=False)]
        length = dict(pairs).get("Content-Length")
        body = rest[: int(length)] if length is not None else None
        return CapturedEvent(source, "plain", tuple(p for p in pairs if p[0] != "Content-Length"), body)
    if frame.content_type == "text/event-json":
        obj = json.loads(frame.body)
        body = obj.pop("_body", None)
        # Multi-valued headers are arrays in json; written as repeated headers.
        pairs = [(k, encode_header_value(item).encode()) for k, v in obj.items() if k != "Content-Length"
                 for item in (v if isinstance(v, list) else [v])]
        return CapturedEvent(source, "json", tuple(pairs), None if body is None else body.encode())
    return None


def captured_events() -> tuple[CapturedEvent, ...]:
    return _corpus()[0]


# The events the daemon acts on, speech weighted up: it is what starts a turn.
ACTED_ON = ("DETECTED_SPEECH", "DETECTED_SPEECH", "DETECTED_SPEECH", "CHANNEL_HANGUP_COMPLETE", "PLAYBACK_START",
            "PLAYBACK_STOP", "CHANNEL_EXECUTE_COMPLETE")


@functools.lru_cache(maxsize=1)
def _events_by_name() -> dict[str, tuple[CapturedEvent, ...]]:
    by_name: dict[str, list[CapturedEvent]] = {}
    for event in captured_events():
        by_name.setdefault(dict(event.pairs).get("Event-Name", b"").decode(), []).append(event)
    return {name: tuple(events) for name, events in by_name.items()}


def captured_other_frames() -> tuple[bytes, ...]:
    """The captured frames that are not events: auth/request, replies, api responses, disconnect."""
    return _corpus()[1]


# --- pieces ---------------------------------------------------------------------------------------


def make_wire_value(c: Chooser) -> bytes:
    """A header value as written after ``Key: `` (so still URL-encoded when it is well-formed)."""
    kind = c.integer(0, 5)
    if kind == 0:
        return encode_header_value(c.text(40)).encode()
    if kind == 1:
        return c.pick(WIRE_VALUE_TRAPS)
    if kind == 2:
        return c.pick(WIRE_VALUE_TRAPS) + encode_header_value(c.text(10)).encode() + c.pick(WIRE_VALUE_TRAPS)
    if kind == 3:
        return c.binary(30).replace(b"\n", b"")  # raw bytes, invalid UTF-8 often, no line break
    if kind == 4 and c.chance(20):
        unit = c.pick((b"A", b"%0D%0A", b"%C3%A9", b"\xc3\xa9", b"%"))
        return unit * (c.integer(1000, HUGE_VALUE_MAX_BYTES) // len(unit))
    return encode_header_value(c.pick(FUZZ_CALL_UUIDS)).encode()


def make_unique_id(c: Chooser) -> str:
    kind = c.integer(0, 3)
    if kind == 0:
        return c.pick(FUZZ_CALL_UUIDS)
    if kind == 1:
        return f"{c.integer(0, 0xFFFFFFFF):08x}-0000-4000-8000-{c.integer(0, 0xFFFFFFFFFFFF):012x}"
    if kind == 2:
        return c.pick(UNIQUE_ID_TRAPS)
    return c.text(40)


def make_body(c: Chooser, allow_big: bool) -> bytes:
    kind = c.integer(0, 5)
    if kind == 0:
        return c.pick(BODY_TRAPS)
    if kind == 1:
        return c.text(60).encode("utf-8")
    if kind == 2:
        text = c.text(30).encode("utf-8")
        at = c.integer(0, len(text))
        return text[:at] + c.pick((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80")) + text[at:]
    if kind == 3:
        return c.binary(200)
    if kind == 4 and allow_big and c.chance(20):
        unit = c.pick((b"a", "h\u00e9llo \u2713 ".encode(), b"x\n\n", b"Content-Length: 10\n\n"))
        size = c.pick((64 * 1024, 256 * 1024, ONE_MB - 1, ONE_MB)) if c.chance(50) else c.integer(0, ONE_MB)
        data = (unit * (size // len(unit) + 1))[:size]
        return data if c.chance(70) else data[: size // 2] + b"\xff" + data[size // 2 + 1 :]
    return b"hello world"


def _length_text(c: Chooser, true_length: int, cap_bytes: int, daemon_safe: bool) -> str:
    """Content-Length as written: mostly right, else off, negative, non-numeric or over the cap."""
    if not c.chance(25):
        return str(true_length)
    kind = c.integer(0, 3)
    if kind == 0:
        return str(max(0, true_length + c.integer(-40, 40)))
    if kind == 1:
        return c.pick(CONTENT_LENGTH_TRAPS)
    if kind == 2:
        return f" {true_length} " if c.chance(50) else f"{true_length:05d}"
    if daemon_safe:
        return str(true_length + c.integer(1, 4096))
    return str(c.pick((cap_bytes + 1, cap_bytes * 4, 2**31, 2**63, 10**30)))


def _mutate_pairs(c: Chooser, pairs: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    pairs = list(pairs)

    def set_header(key: str, value: bytes) -> None:
        for i, (k, _) in enumerate(pairs):
            if k == key:
                pairs[i] = (key, value)
                return
        pairs.insert(c.integer(0, len(pairs)), (key, value))

    if c.chance(60):
        set_header("Unique-ID", encode_header_value(make_unique_id(c)).encode() if c.chance(80) else make_wire_value(c))
    if c.chance(15):
        name = c.pick(EVENT_NAMES) if c.chance(80) else c.text(20)
        set_header("Event-Name", encode_header_value(name).encode())
    if c.chance(15):
        set_header("Speech-Type", encode_header_value(c.pick(SPEECH_TYPES)).encode())
    if c.chance(10):
        set_header("Event-Sequence", encode_header_value(c.pick(SEQUENCE_TRAPS)).encode())
    elif c.chance(70):
        # Fresh sequences, or the router drops the second use of a template as a duplicate.
        set_header("Event-Sequence", str(c.integer(0, 10**6)).encode())
    for _ in range(c.integer(0, 3) if c.chance(40) else 0):
        if pairs:
            i = c.integer(0, len(pairs) - 1)
            pairs[i] = (pairs[i][0], make_wire_value(c))
    for key in ("Event-Name", "Unique-ID", "Event-Sequence"):
        if c.chance(5):
            pairs = [p for p in pairs if p[0] != key]
    if c.chance(8) and pairs:
        key = c.pick(("Unique-ID", "Event-Name", "Event-Sequence", pairs[c.integer(0, len(pairs) - 1)][0]))
        pairs.insert(c.integer(0, len(pairs)), (key, make_wire_value(c)))  # a repeated header
    if c.chance(4):
        key = c.text(20).replace("\n", "") or "X"
        pairs.insert(c.integer(0, len(pairs)), (key, make_wire_value(c)))
    return pairs


def _decoded(wire: bytes) -> str:
    return unquote(wire.decode("utf-8", "replace"), errors="replace")


def _json_text(pairs: Sequence[tuple[str, bytes]], body: bytes | None, c: Chooser) -> bytes:
    # Built by hand so that repeated keys stay repeated, as in capture 63.
    members = [json.dumps(k, ensure_ascii=False) + ":" + json.dumps(_decoded(v), ensure_ascii=False) for k, v in pairs]
    if body is not None:
        text = body.decode("utf-8", "replace")
        members.append(f'"Content-Length":"{len(text.encode())}"')
        members.append('"_body":' + json.dumps(text, ensure_ascii=False))
    data = ("{" + ",".join(members) + "}").encode("utf-8")
    if c.chance(15):
        kind = c.integer(0, 3)
        if kind == 0:
            return data[: c.integer(0, len(data))]
        if kind == 1:
            return c.pick(JSON_TRAPS).encode()
        if kind == 2:
            depth = c.pick((50, 2000, 100_000))
            return b'{"a":' + b"[" * depth + b"]" * depth + b"}"
        at = c.integer(0, len(data))
        return data[:at] + b"\xff" + data[at:]
    return data


def _xml_text(pairs: Sequence[tuple[str, bytes]], body: bytes | None, c: Chooser) -> bytes:
    headers = [(k, _decoded(v)) for k, v in pairs if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", k)]
    frame = build_xml_event(headers, None if body is None else body.decode("utf-8", "replace"))
    data = frame.split(b"\n\n", 1)[1]
    if c.chance(20):
        kind = c.integer(0, 2)
        if kind == 0:
            return data[: c.integer(0, len(data))]
        if kind == 1:
            return c.pick(XML_TRAPS).encode()
        depth = c.pick((50, 5000))
        return b"<event><headers>" + b"<a>" * depth + b"</a>" * depth + b"</headers></event>"
    return data


def make_event_frame(c: Chooser, *, allow_big: bool = True, daemon_safe: bool = False,
                     max_body_bytes: int = 8 * ONE_MB) -> tuple[bytes, bool]:
    """One event frame from a captured event, mutated; returns (bytes, whether its framing is intact).

    Intact framing means a FrameParser must return these bytes as exactly one Frame, whatever
    precedes them (at a frame boundary); the event inside may still be malformed.
    """
    # Half the time one of the events the daemon acts on, so fuzzed calls reach the turn code.
    template = c.pick(_events_by_name()[c.pick(ACTED_ON)]) if c.chance(50) else c.pick(captured_events())
    pairs = _mutate_pairs(c, list(template.pairs)) if c.chance(85) else list(template.pairs)
    body = template.body
    if c.chance(40):
        body = None if c.chance(20) else make_body(c, allow_big)
    wire_format = template.wire_format
    if c.chance(15):
        wire_format = c.pick(("plain", "json", "xml"))
    if wire_format == "plain":
        head = b"".join(k.encode("utf-8", "surrogatepass") + b": " + v + b"\n" for k, v in pairs)
        if body is None:
            inner = head + b"\n"
        else:
            inner = head + b"Content-Length: " + _length_text(c, len(body), 2**31, False).encode("utf-8") + b"\n\n" + body
        content_type = "text/event-plain"
    elif wire_format == "json":
        inner, content_type = _json_text(pairs, body, c), "text/event-json"
    else:
        inner, content_type = _xml_text(pairs, body, c), "text/event-xml"

    length_text = _length_text(c, len(inner), max_body_bytes, daemon_safe)
    digits = length_text.strip()
    intact = digits.isascii() and digits.isdigit() and int(digits) == len(inner)
    if c.chance(10):
        content_type = c.pick(CONTENT_TYPE_TRAPS)
    outer = [("Content-Length", length_text), ("Content-Type", content_type)]
    if c.chance(5):
        outer.pop(c.integer(0, 1))
        intact = False
    if c.chance(5):
        outer.insert(c.integer(0, len(outer)), ("Content-Length", str(c.integer(0, 5000))))
        intact = False
    line_end = b"\n"
    if c.chance(3):
        line_end = b"\r\n"
        intact = False
    head = b"".join(k.encode() + b": " + v.encode("utf-8") + line_end for k, v in outer)
    frame = head + line_end + inner
    return frame, intact and len(inner) <= max_body_bytes


def make_junk(c: Chooser) -> bytes:
    kind = c.integer(0, 4)
    if kind == 0:
        return c.pick(JUNK_TRAPS)
    if kind == 1:
        return c.binary(300)
    if kind == 2:
        return c.text(80).encode("utf-8")
    if kind == 3:
        return b"".join(c.pick((b"Foo: bar\n", b"X:\n", b"\n", b"a: %0D%0A\n", b"\xff: \xfe\n")) for _ in range(c.integer(1, 6)))
    return c.binary(20).replace(b"\n", b"") + b"\n\n"


@dataclass(frozen=True)
class Segment:
    """One piece of a stream: ``kind`` is event, frame, junk or truncated."""

    kind: str
    data: bytes
    intact: bool  # a whole frame a parser at a frame boundary returns as one Frame


@dataclass(frozen=True)
class EslStream:
    segments: tuple[Segment, ...]
    cuts: tuple[int, ...]  # offsets where the reader's recv() chunks end

    @property
    def data(self) -> bytes:
        return b"".join(s.data for s in self.segments)

    def chunks(self) -> list[bytes]:
        return chunked(self.data, self.cuts)


def chunked(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    edges = [0, *sorted({min(max(0, x), len(data)) for x in cuts}), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def make_cuts(c: Chooser, length: int) -> tuple[int, ...]:
    count = c.integer(0, 24) if length else 0
    return tuple(sorted({c.integer(0, length) for _ in range(count)}))


def make_segment(c: Chooser, *, allow_big: bool = True, daemon_safe: bool = False,
                 max_body_bytes: int = 8 * ONE_MB) -> Segment:
    roll = c.integer(0, 99)
    if roll < 62:
        data, intact = make_event_frame(c, allow_big=allow_big, daemon_safe=daemon_safe, max_body_bytes=max_body_bytes)
        return Segment("event", data, intact)
    if roll < 70 and not daemon_safe:
        return Segment("frame", c.pick(captured_other_frames()), True)
    if roll < 88:
        return Segment("junk", make_junk(c), False)
    data, _ = make_event_frame(c, allow_big=False, daemon_safe=daemon_safe, max_body_bytes=max_body_bytes)
    return Segment("truncated", data[: c.integer(0, max(0, len(data) - 1))], False)


def make_stream(c: Chooser, *, max_segments: int = 8, allow_big: bool = True, daemon_safe: bool = False,
                max_body_bytes: int = 8 * ONE_MB) -> EslStream:
    """A stream of 1..max_segments segments, cut into random chunks.

    ``daemon_safe``: nothing the reader treats as a reply or the end of the session (see
    SESSION_CONTENT_TYPES) and no Content-Length over the body cap, so that the stream cannot
    eat the replies to the daemon's own commands for ever.
    """
    segments = []
    for _ in range(c.integer(1, max_segments)):
        segment = make_segment(c, allow_big=allow_big, daemon_safe=daemon_safe, max_body_bytes=max_body_bytes)
        if daemon_safe and any(t in segment.data for t in SESSION_CONTENT_TYPES):
            segment = Segment("junk", b"\n\n", False)
        segments.append(segment)
    data_length = sum(len(s.data) for s in segments)
    return EslStream(tuple(segments), make_cuts(c, data_length))


def closing_padding(data: bytes, *, max_padding_bytes: int = 4 * ONE_MB,
                    parser_factory: Callable[[], FrameParser] = FrameParser) -> bytes | None:
    """Newlines that bring a parser fed ``data`` back to a frame boundary; None if too many are needed.

    Newlines are harmless filler: they end a pending header block, count towards a pending
    body, and are skipped between frames. Proof of the boundary: a sentinel frame fed after the
    padding comes back whole.
    """
    parser = parser_factory()
    parser.feed(data)
    padding = bytearray(b"\n\n")
    parser.feed(b"\n\n")
    step = 64
    while parser.buffered_bytes and len(padding) < max_padding_bytes:
        parser.feed(b"\n" * step)
        padding += b"\n" * step
        step = min(step * 2, 256 * 1024)
    sentinel = b"Content-Type: text/fuzz-sentinel\nContent-Length: 3\n\nend"
    items = parser.feed(sentinel)
    if parser.buffered_bytes or not items or not isinstance(items[-1], Frame) or items[-1].raw != sentinel:
        return None
    return bytes(padding)


# --- hypothesis strategies ------------------------------------------------------------------------


@st.composite
def wire_values(draw) -> bytes:
    return make_wire_value(HypothesisChooser(draw))


@st.composite
def unique_ids(draw) -> str:
    return make_unique_id(HypothesisChooser(draw))


@st.composite
def event_bodies(draw, allow_big: bool = True) -> bytes:
    return make_body(HypothesisChooser(draw), allow_big)


@st.composite
def event_frames(draw, allow_big: bool = True, max_body_bytes: int = 8 * ONE_MB) -> tuple[bytes, bool]:
    """(frame bytes, framing intact) of one mutated captured event."""
    return make_event_frame(HypothesisChooser(draw), allow_big=allow_big, max_body_bytes=max_body_bytes)


@st.composite
def junk(draw) -> bytes:
    return make_junk(HypothesisChooser(draw))


@st.composite
def esl_streams(draw, max_segments: int = 8, allow_big: bool = True, daemon_safe: bool = False,
                max_body_bytes: int = 8 * ONE_MB) -> EslStream:
    return make_stream(HypothesisChooser(draw), max_segments=max_segments, allow_big=allow_big,
                       daemon_safe=daemon_safe, max_body_bytes=max_body_bytes)


def random_streams(seed: int, **options) -> Iterator[EslStream]:
    """Endless seeded streams (the same generators, driven by random.Random)."""
    chooser = RandomChooser(random.Random(seed))
    while True:
        yield make_stream(chooser, **options)

