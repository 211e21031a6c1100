"""Lazily decoded event headers read exactly what decoding every header gives.

parse_event() keeps a plain event's header block as one string and decodes a header when it
is read (PlainEventHeaders). These tests hold it to a straightforward reference decode, written
here on its own (every line split, URL-decoded once, the first of a repeated header kept, the
inner Content-Length replaced by the body's byte count): on every event of every capture, on
mutated captures and on random header blocks, for each header read alone before anything else,
for absent headers, and for the whole mapping.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_strategies as fz
from ivr_daemon.esl.protocol import (
    Frame,
    FrameParser,
    MalformedEvent,
    PlainEventHeaders,
    build_plain_event,
    parse_event,
)

CAPTURES = Path(__file__).parent / "captures"
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
# Names nothing has: never in a capture, and shaped to trip a search that is not line-exact.
ABSENT_NAMES = ("Nope", "event-name", "Event-Nam", "vent-Name", "Name", "variable_ivr_agent", "",
                "Event-Name: DETECTED_SPEECH", "Event-Name: DETECTED_SPEECH\nCore-UUID", "Speech-Type\n",
                "Unique-ID ", " Unique-ID", "Unique-ID:")


class Malformed(Exception):
    """The reference refuses the event (parse_event must raise MalformedEvent)."""


def reference_plain(data: bytes) -> tuple[dict[str, str], str | None]:
    """A text/event-plain frame body decoded the obvious way, every header at once."""
    end = data.find(b"\n\n")
    head, rest = (data, b"") if end < 0 else (data[:end], data[end + 2 :])
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("headers not UTF-8") from None
    pairs = []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line:
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            if not (line.endswith(":") and " " not in line):
                raise Malformed(f"no ': ' in {line!r}")
            key, value = line[:-1], ""
        if not key or key != key.strip():
            raise Malformed(f"bad name {key!r}")
        pairs.append((key, unquote(value, errors="replace")))
    headers: dict[str, str] = {}
    for key, value in pairs:
        if key != "Content-Length" and key not in headers:
            headers[key] = value
    lengths = [value for key, value in pairs if key == "Content-Length"]
    if not lengths:
        return headers, None
    length = lengths[0]
    if not (length.isascii() and length.isdigit()) or len(length) > 4000 or int(length) > len(rest):
        raise Malformed(f"body length {length!r}")
    try:
        body = rest[: int(length)].decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("body not UTF-8") from None
    headers["Content-Length"] = str(int(length))
    return headers, body


def reference_json(data: bytes) -> tuple[dict[str, str], str | None]:
    obj = json.loads(data.decode("utf-8"))
    body = obj.pop("_body", None)
    return {key: value[0] if isinstance(value, list) else value for key, value in obj.items()}, body


def plain_frame(inner: bytes) -> Frame:
    """The event as FreeSWITCH frames it, cut by FrameParser (its body not sliced yet)."""
    items = FrameParser().feed(b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(inner) + inner)
    assert len(items) == 1 and isinstance(items[0], Frame)
    return items[0]


def assert_reads_like_reference(frame: Frame, names: tuple[str, ...] = (),
                                reader: FrameParser | None = None) -> PlainEventHeaders | dict:
    """parse_event(frame) raises MalformedEvent exactly when the reference refuses the event, and
    otherwise reads, header by header (each on a fresh event, before anything else is decoded)
    and as a whole, what the reference decoded.

    Read by ``reader``'s parse_event (a fresh parser's when None) first, as the connection's reader
    reads it (after what that reader read last: a test's repeat is read off the last one's
    result); then again, each later read of the same bytes a repeat; and by the module's
    parse_event, which keeps nothing from one event to the next."""
    read = (reader if reader is not None else FrameParser()).parse_event
    # Cut by FrameParser, the event is read in place from the frame's bytes; built with its
    # body (as tests and the replayer do), from the body: both ways must read the same.
    data = frame.raw[frame._body_at :] if frame._body is None else frame._body  # not frame.body: it caches
    given_body = Frame(frame.headers, data, b"")
    try:
        expected, body = reference_plain(data)
    except Malformed:
        for parse in (read, parse_event):
            with pytest.raises(MalformedEvent):
                parse(frame)
            with pytest.raises(MalformedEvent):
                parse(given_body)
        return {}
    event = read(frame)
    assert event.body == body
    assert frame._body is None  # read in place: the frame's body never sliced
    for parse in (read, parse_event):
        assert dict(parse(given_body).headers) == expected and parse(given_body).body == body
        assert dict(parse(frame).headers) == expected and parse(frame).body == body
    for name in (*expected, *names, *ABSENT_NAMES):
        assert read(frame).headers.get(name) == expected.get(name), name  # read first, alone
        assert (name in event.headers) == (name in expected), name
        if name in expected:
            assert event.headers[name] == expected[name]
        else:
            with pytest.raises(KeyError):
                event.headers[name]
    # After some reads (cached), then the whole mapping: same values, same order.
    assert event.name == expected.get("Event-Name", "")
    assert event.unique_id == (expected.get("Unique-ID") or None)
    assert list(event.headers.items()) == list(expected.items())
    assert dict(event.headers) == expected and len(event.headers) == len(expected)
    assert event.headers == expected
    return event.headers


def capture_event_frames() -> list[tuple[str, Frame]]:
    """Every distinct event frame of every capture, with the file it first appears in."""
    frames: dict[bytes, tuple[str, Frame]] = {}
    for path in sorted(CAPTURES.rglob("*.txt")):
        for item in FrameParser().feed(path.read_bytes()):
            if isinstance(item, Frame) and item.content_type.startswith("text/event-"):
                frames.setdefault(item.raw, (str(path.relative_to(CAPTURES)), item))
    return list(frames.values())


CAPTURE_FRAMES = capture_event_frames()


def test_every_captured_event_reads_like_the_reference_header_by_header_and_whole():
    kinds = {"text/event-plain": 0, "text/event-json": 0, "text/event-xml": 0}
    lazy = 0
    for source, frame in CAPTURE_FRAMES:
        kinds[frame.content_type] += 1
        if frame.content_type == "text/event-plain":
            headers = assert_reads_like_reference(frame)
            assert headers, f"{source}: a real FreeSWITCH event refused"
            lazy += isinstance(headers, PlainEventHeaders)
        elif frame.content_type == "text/event-json":
            expected, body = reference_json(frame.body)
            event = parse_event(frame)
            assert dict(event.headers) == expected and event.body == body, source
    assert kinds["text/event-plain"] > 500 and kinds["text/event-json"] > 100 and kinds["text/event-xml"] > 10
    # Every plain event FreeSWITCH wrote takes the lazy path (none is decoded whole up front).
    assert lazy == kinds["text/event-plain"]


def test_the_lazy_path_decodes_only_what_is_read():
    frame = next(f for source, f in CAPTURE_FRAMES if source.startswith("41_"))
    event = parse_event(frame)
    assert isinstance(event.headers, PlainEventHeaders)
    assert (event.name, event.get("Speech-Type"), event.body) == ("DETECTED_SPEECH", "detected-partial-speech", "hello")
    assert event.headers._all is None  # no full decode for routing reads
    assert event.get("Caller-Callee-ID-Name") == "Outbound Call"  # %20, decoded on first read
    assert event.headers._all is None
    assert len(event.headers) == 59 and event.headers._all is not None


@pytest.mark.parametrize("inner, why", [
    (b"Event-Name: A\nX: 1\nX: 2\nContent-Length: 2\n\nhi", "repeated header: the first wins"),
    (b"Content-Length: 2\nEvent-Name: A\n\nhi", "Content-Length on the first line"),
    (b"Event-Name: A\nContent-Length: 2\nContent-Length: 9\n\nhi", "two lengths: the first counts"),
    (b"Event-Name: A\nContent-Length: 0%32\n\nhi", "an encoded length is decoded first"),
    (b"Event-Name: A\nContent-Length: 002\n\nhi", "leading zeros"),
    (b"Event-Name: A\nContent-Length: 20\n\nContent-Length: 3\n\nabc..........", "a body that looks like headers"),
    (b"Event-Name: A\nContent-Length: 3\n\n\n\nx", "a body of blank lines"),
    (b"Event-Name: A\nX: 100%AB%zz%41\n\n", "percent escapes, lossy ones too"),
    (b"Event-Name: A\nX: a: b\n\n", "': ' inside a value"),
    (b"Event-Name: A\nX: a b\n\n", "a space inside a value"),
    (b"Event-Name: A\nX:\n\n", "'Name:' with nothing after it"),
    (b"Event-Name: A\nX: \n\n", "an empty value"),
    (b"Event-Name: A\r\nX: b\r\n\r\n", "CRLF lines"),
    (b"Event-Name: A\nX:\tb\n\n", "a tab after the colon"),
    (b"Event-Name: A\nX: h\xc3\xa9\n\n", "raw UTF-8 in a value"),
    (b"Event-Name: A\nh\xc3\xa9: x\n\n", "raw UTF-8 in a name"),
    (b"Event-Name: A\n: x\n\n", "an empty name"),
    (b": x\nEvent-Name: A\n\n", "an empty name first"),
    (b"Event-Name: A\n X: b\n\n", "a name starting with a space"),
    (b"Event-Name: A\nX : b\n\n", "a name ending with a space"),
    (b"Event-Name: A\nX:b\n\n", "no space after the colon"),
    (b"Event-Name: A\nno colon\n\n", "a line without a colon"),
    (b"Event-Name: A\nX: b", "no blank line at all"),
    (b"Event-Name: A\nX: b\n", "one newline at the end"),
    (b"\nEvent-Name: A\n\n", "a blank first line"),
    (b"", "nothing"),
    (b"Event-Name: A\nContent-Length: 5\n\nhi", "a body shorter than its length"),
    (b"Event-Name: A\nContent-Length: \xc2\xb2\n\nhi", "a non-ASCII digit"),
    (b"Event-Name: A\nContent-Length: " + b"1" * 5000 + b"\n\nhi", "a length int() refuses"),
    (b"Event-Name: A\nContent-Length: 2\n\n\xff\xfe", "a body that is not UTF-8"),
    (b"Event-Name: A\nX: b\n\n\n", "no body, a stray newline"),
    # A bodyless event's block is guessed to end at the frame's last blank line: wrong guesses.
    (b"Event-Name: A\nX: b\n\nY: c\n\n", "no body, more lines after the blank line"),
    (b"Event-Name: A\nX: b\n\n\n\n", "no body, blank lines after the blank line"),
    (b"Event-Name: A\nContent-Length: 4\n\nab\n\n", "a body that ends with a blank line"),
    (b"Content-Length: 0\nEvent-Name: A\n\n", "Content-Length first, an empty body"),
    (b"Event-Name: A\nX: Content-Length%3A 2\n\n", "a value that names Content-Length"),
])
def test_edge_cases_read_like_the_reference(inner, why):
    assert_reads_like_reference(plain_frame(inner), names=("X", "X ", "h\u00e9", "Content-Length", "Event-Name"))


def test_a_name_that_spans_lines_never_matches():
    event = parse_event(plain_frame(b"Event-Name: A\nX: b\nY: c\n\n"))
    assert event.get("X: b\nY") is None and event.get("b\nY") is None and "X: b\nY" not in event.headers


@settings(FUZZ, max_examples=300)
@given(frame=fz.event_frames(allow_big=False))
def test_mutated_captures_read_like_the_reference(frame):
    for item in FrameParser().feed(frame[0]):
        if isinstance(item, Frame) and item.content_type == "text/event-plain":
            assert_reads_like_reference(item, names=("Unique-ID", "Event-Sequence", "Speech-Type"))


# Header blocks made of the bytes that matter to the shape check.
_PIECES = st.sampled_from([b"Event-Name", b"Unique-ID", b"X", b"a", b":", b": ", b" ", b"\n", b"\r", b"\t", b"%",
                           b"%41", b"%0A", b"\xc3\xa9", b"\xff", b"Content-Length", b"Content-Length: 1", b"0", b"\n\n"])


@settings(FUZZ, max_examples=800)
@given(pieces=st.lists(_PIECES, max_size=30), body=st.binary(max_size=12))
def test_random_header_blocks_read_like_the_reference(pieces, body):
    inner = b"".join(pieces) + body
    assert_reads_like_reference(plain_frame(inner), names=("X", "a", "Event-Name", "Unique-ID", "X\r"))


# Header lines, mostly well-formed, with the traps of each part: most take the lazy path.
_NAMES = st.sampled_from(["Event-Name", "Unique-ID", "X", "a", "Event-Name", "Unique-ID", "X", "a", "Content-Length"] * 10
                         + ["X ", " X", "", "h\u00e9", "a:b", "a b", "X\r", "X\t"])
_SEPARATORS = st.sampled_from([": "] * 100 + [":", " : ", "", ":\t"])
_VALUES = st.sampled_from(["A", "1", "2", "002", "%41", "%0A", "100%AB", "_undef_", "0%32"] * 12
                          + ["", "a: b", "a b", "x:y", "\t", "\r", "\u00e9", "\u00b2"])


@settings(FUZZ, max_examples=800)
@given(lines=st.lists(st.tuples(_NAMES, _SEPARATORS, _VALUES), min_size=1, max_size=8),
       body=st.none() | st.binary(max_size=6), newline=st.sampled_from(["\n"] * 9 + ["\r\n"]))
def test_header_lines_with_traps_read_like_the_reference(lines, body, newline):
    head = newline.join(name + separator + value for name, separator, value in lines) + newline
    inner = head.encode() + (b"" if body is None else b"\n" + body)
    assert_reads_like_reference(plain_frame(inner), names=("X", "a", "Event-Name", "Unique-ID", "X\r"))


@settings(FUZZ, max_examples=300)
@given(headers=st.lists(st.tuples(st.sampled_from(["Event-Name", "Unique-ID", "X", "variable_ivr_agent", "Y-Z"]),
                                  st.text(max_size=12)), min_size=1, max_size=8),
       body=st.none() | st.text(max_size=12))
def test_events_as_freeswitch_writes_them_read_back_exactly(headers, body):
    frame = FrameParser().feed(build_plain_event(headers, body))[0]
    assert isinstance(parse_event(frame).headers, PlainEventHeaders)  # the lazy path
    assert_reads_like_reference(frame, names=("X", "Y-Z"))


# While parked, FreeSWITCH sends every DETECTED_SPEECH twice in a row, byte-identical (dedup.py);
# parse_event reads the second copy off the first one's result. These hold that shortcut to the
# reference: it must never answer for bytes that differ, however little.
_SPEECH = dict(capture_event_frames())


def _copy(frame: Frame) -> Frame:
    """The same frame as a second recv() gives it: equal bytes, another object."""
    return FrameParser().feed(bytes(bytearray(frame.raw)))[0]


def test_a_repeated_event_reads_like_the_reference_and_apart_from_the_first():
    frame = next(f for name, f in _SPEECH.items() if "event_plain_DETECTED_SPEECH" in name)
    reader = FrameParser()
    first = reader.parse_event(frame)
    first.headers.get("Channel-Name")  # cached on the first copy: the repeat gets a copy of it
    again = _copy(frame)
    assert again.raw == frame.raw and again.raw is not frame.raw
    second = reader.parse_event(again)
    assert second.headers is not first.headers
    assert second.body is first.body  # read off the first one's result, not parsed again
    assert_reads_like_reference(again, names=("Channel-Name",), reader=reader)
    assert dict(second.headers) == dict(first.headers) and second.body == first.body


def test_each_connections_parser_reads_its_own_repeats_and_never_another_ones():
    """Two connections (two parsers) given the same bytes each read them right, and a repeat is
    read off the last event of its own connection only: one connection's traffic neither serves
    the other's first copy nor pushes out the event the other is about to repeat. (A repeat read
    off the last result carries that result's very body object; a parse makes a new one.)"""
    speech = [f for name, f in _SPEECH.items() if "event_plain_DETECTED_SPEECH" in name]
    x, y = speech[0], next(f for f in speech if f.raw != speech[0].raw)
    assert len(parse_event(x).body) > 1 and len(parse_event(y).body) > 1  # not a cached one-character str
    a, b = FrameParser(), FrameParser()
    a_x = a.parse_event(x)
    b_x = b.parse_event(_copy(x))  # the same bytes on another connection: parsed there
    assert b_x.body is not a_x.body
    b_y = b.parse_event(y)  # b moves on to another event
    a_x_again = a.parse_event(_copy(x))  # a's repeat: still read off a's last event
    assert a_x_again.body is a_x.body
    assert b.parse_event(_copy(y)).body is b_y.body
    assert b.parse_event(_copy(x)).body is not a_x.body  # x again on b: not a's, b's last was y
    for frame, event in ((x, a_x), (x, b_x), (y, b_y), (x, a_x_again)):
        assert_reads_like_reference(frame)
        expected = parse_event(frame)
        assert dict(event.headers) == dict(expected.headers) and event.body == expected.body


@pytest.mark.parametrize("flip_at", [-1, -3, 40, 200])
def test_a_same_length_event_that_differs_in_one_byte_is_read_on_its_own(flip_at):
    """A frame of the same length as the one before, one byte changed (in the body, the last
    header, the first ones): read as itself, well-formed or not."""
    frame = next(f for name, f in _SPEECH.items() if "event_plain_DETECTED_SPEECH" in name)
    for replacement in (b"x", b" ", b"\n", b"\xff"):
        raw = bytearray(frame.raw)
        at = flip_at if flip_at < 0 else frame._body_at + flip_at
        raw[at : at + 1 if at != -1 else None] = replacement
        reader = FrameParser()
        reader.parse_event(frame)
        changed = FrameParser().feed(bytes(raw))[0]
        assert len(changed.raw) == len(frame.raw)
        assert_reads_like_reference(changed, names=("Unique-ID", "Event-Sequence", "Speech-Type"), reader=reader)


@settings(FUZZ, max_examples=150)
@given(picks=st.lists(st.integers(min_value=0, max_value=5), min_size=2, max_size=12),
       frames=st.lists(fz.event_frames(allow_big=False), min_size=1, max_size=6))
def test_streams_with_repeats_read_like_the_reference(picks, frames):
    """Mutated captured events, some repeated back to back, some repeated later, each read right."""
    stream = b"".join(frames[pick % len(frames)][0] for pick in picks for _ in range(1 + pick % 2))
    parser = FrameParser()
    for item in parser.feed(stream):
        if isinstance(item, Frame) and item.content_type == "text/event-plain":
            assert_reads_like_reference(item, names=("Unique-ID", "Event-Sequence"), reader=parser)


def test_a_repeat_gets_what_its_first_copy_decoded_in_a_cache_of_its_own():
    """Only Event-Name and Unique-ID are decoded at once; what the reader decodes of a transcript
    (Speech-Type, Event-Sequence, Core-UUID) before its repeat comes is not searched for again."""
    frame = next(f for name, f in _SPEECH.items() if "event_plain_DETECTED_SPEECH" in name)
    reader = FrameParser()
    first = reader.parse_event(frame)
    assert set(first.headers._seen) == {"Event-Name", "Unique-ID"}
    routed = {name: first.headers.get(name) for name in ("Speech-Type", "Event-Sequence", "Core-UUID")}
    assert all(routed.values())
    second = reader.parse_event(_copy(frame))
    assert second.headers._seen is not first.headers._seen
    assert {name: second.headers._seen.get(name) for name in routed} == routed  # not decoded again
    second.headers.get("Channel-Name")
    assert "Channel-Name" not in first.headers._seen  # the repeat's reads stay its own
    assert_reads_like_reference(_copy(frame), reader=reader)
