"""Fuzzing the ESL parser and the event dispatcher: hostile bytes in, no crash, no hang, bounded memory.

The fast CI slice of bench/fuzz.py (which runs 100 000+ frames). Streams come from
tests/fuzz_strategies.py: captured events with mutated headers and bodies, broken framing,
truncated frames and junk, cut into random chunks. Every test is deterministic
(``derandomize=True``, or a fixed seed for the live daemon).

What resync promises, exactly (tested below): the parser's state after some bytes depends
only on those bytes, so a frame is found whenever the bytes before it leave the parser at a
frame boundary. Junk that claims no length and ends with a blank line does; a header block
that claims ``Content-Length: N`` makes the next N bytes its body (or, over the cap, skips
them), whatever they hold: that is by design, and is the only way a good frame can be lost.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
import tracemalloc
from collections import defaultdict
from unittest import mock

import gevent
import gevent.threadpool
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import fuzz_strategies as fz
from harness import running_daemon, settings_for, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.calls import DOUBLED_EVENTS, CallRouter
from ivr_daemon.config import load_settings
from ivr_daemon.conversation import TurnServices, conversation_factory
from ivr_daemon.esl import commands
from ivr_daemon.esl.connection import CommandReply
from ivr_daemon.esl.dedup import EventDeduplicator
from ivr_daemon.esl.protocol import (
    EslEvent,
    Frame,
    FrameParser,
    MalformedEvent,
    MalformedFrame,
    build_plain_event,
    parse_event,
)
from ivr_daemon.llm import make_llm_client
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts.cache import PhraseCache
from ivr_daemon.tts.null import NullEngine

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                           HealthCheck.filter_too_much],
)
SMALL_CAPS = {"max_header_bytes": 512, "max_body_bytes": 4096}  # small caps: the fuzzer reaches both limits
DEFAULT_CAPS: dict[str, int] = {}
# Lines that mean an exception escaped into the router, a call or its handler.
FAILURE_EVENTS = {"esl_event_routing_failed", "call_handler_failed", "call_interrupt_failed", "call_close_failed",
                  "turn_failed"}
HANGUP = "CHANNEL_HANGUP_COMPLETE"


def unexpected_failures(logs: list[dict]) -> list[dict]:
    return [line for line in logs if line["event"] in FAILURE_EVENTS
            and not (line["event"] == "call_handler_failed" and fz.hangup_cleanup_bug(line.get("call_uuid")))]


def caps_of(parser: FrameParser) -> tuple[int, int]:
    return parser._max_header_bytes, parser._max_body_bytes  # the caps the parser was built with


def feed_all(chunks, **caps) -> tuple[list, int]:
    """Feed chunk by chunk; check the buffer bound after every feed; return items and the peak."""
    parser = FrameParser(**caps)
    max_header, max_body = caps_of(parser)
    items, peak = [], 0
    for chunk in chunks:
        got = parser.feed(chunk)
        assert all(isinstance(item, (Frame, MalformedFrame)) for item in got)
        items += got
        peak = max(peak, parser.buffered_bytes)
        # The bound: a header block (at most the header cap) and its blank line, and a body
        # still short of its Content-Length (at most the body cap); or one byte of a header
        # block being dropped; whatever the chunk sizes.
        assert parser.buffered_bytes <= max_header + max_body + 1
    return items, peak


def outline(items) -> list:
    """What must not depend on chunking: every frame's bytes, and the reason of each skip."""
    return [item.raw if isinstance(item, Frame) else item.reason for item in items]


def events_of(items) -> list[EslEvent]:
    events = []
    for item in items:
        if isinstance(item, Frame) and item.content_type.startswith("text/event-"):
            try:
                events.append(parse_event(item))
            except MalformedEvent:
                pass
    return events


@contextlib.contextmanager
def greenlet_failures():
    """Collect every greenlet that dies of an exception (the hub's error report) while inside."""
    hub = gevent.get_hub()
    failures: list[tuple[object, BaseException]] = []
    original = hub.handle_error

    def record(context, exc_type, value, tb):
        failures.append((context, value))
        return original(context, exc_type, value, tb)

    with mock.patch.object(hub, "handle_error", record):
        yield failures


# --- the parser ---------------------------------------------------------------------------------


@settings(FUZZ, max_examples=1000)
@given(stream=fz.esl_streams(), caps=st.sampled_from([DEFAULT_CAPS, SMALL_CAPS]))
def test_parser_never_raises_and_gives_the_same_items_in_any_chunking(stream, caps):
    whole, _ = feed_all([stream.data], **caps)
    chunked, _ = feed_all(stream.chunks(), **caps)
    assert outline(chunked) == outline(whole)
    one_byte_prefix, _ = feed_all([stream.data[i:i + 1] for i in range(min(len(stream.data), 300))]
                                  + [stream.data[300:]], **caps)
    assert outline(one_byte_prefix) == outline(whole)


@settings(FUZZ, max_examples=500)
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=20),
       caps=st.sampled_from([DEFAULT_CAPS, {"max_header_bytes": 64, "max_body_bytes": 256}]))
def test_parser_never_raises_on_arbitrary_bytes_in_any_chunking(data, cuts, caps):
    whole, _ = feed_all([data], **caps)
    assert outline(feed_all(fz.chunked(data, cuts), **caps)[0]) == outline(whole)


@settings(FUZZ, max_examples=300)
@given(stream=fz.esl_streams(max_segments=4, allow_big=False))
def test_intact_frames_after_a_frame_boundary_are_found_whatever_came_before(stream):
    """Every intact segment that starts where the parser stood at a boundary comes back whole."""
    parser = FrameParser()
    for segment in stream.segments:
        # Nothing buffered, nothing left to skip, not inside an over-long header block.
        at_boundary = parser.buffered_bytes == 0 and parser._skip_bytes == 0 and not parser._in_long_header
        items = parser.feed(segment.data)
        if at_boundary and segment.intact:
            assert isinstance(items[0], Frame) and items[0].raw == segment.data
            assert parser.buffered_bytes == 0


@settings(FUZZ, max_examples=400)
@given(junk=fz.junk(), frame=fz.event_frames(allow_big=False), cuts=st.lists(st.integers(0, 5000), max_size=8))
def test_junk_that_claims_no_length_and_ends_in_a_blank_line_never_costs_the_next_frame(junk, frame, cuts):
    data, intact = frame
    assume(intact and b"Content-Length" not in junk)
    items, _ = feed_all(fz.chunked(junk + b"\n\n" + data, cuts))
    assert isinstance(items[-1], Frame) and items[-1].raw == data
    assert all(not isinstance(item, Frame) or item.raw != data for item in items[:-1])


@settings(FUZZ, max_examples=200)
@given(claimed=st.integers(0, 2 * SMALL_CAPS["max_body_bytes"]), filler=st.binary(max_size=64),
       frame=fz.event_frames(allow_big=False), chunk_bytes=st.integers(1, 5000))
def test_a_length_claim_swallows_exactly_the_claimed_bytes_then_the_next_frame_is_found(claimed, filler, frame, chunk_bytes):
    data, intact = frame
    assume(intact and len(data) <= SMALL_CAPS["max_body_bytes"])
    swallowed = (filler * (claimed // max(1, len(filler)) + 1))[:claimed] if filler else b"\n" * claimed
    claim = b"Content-Length: %d\nContent-Type: text/x-junk\n\n" % claimed + swallowed
    parser, items, peak = FrameParser(**SMALL_CAPS), [], 0
    for i in range(0, len(claim), chunk_bytes):
        items += parser.feed(claim[i:i + chunk_bytes])
        peak = max(peak, parser.buffered_bytes)
    items += parser.feed(data)
    if claimed > SMALL_CAPS["max_body_bytes"]:
        assert isinstance(items[0], MalformedFrame) and "cap" in items[0].reason
        assert peak < 100  # at most the claim's own header block: the claimed bytes are never buffered
    else:
        assert isinstance(items[0], Frame) and items[0].body == swallowed
    assert isinstance(items[-1], Frame) and items[-1].raw == data and len(items) == 2


def test_buffer_bound_holds_for_an_endless_body_and_an_endless_header_at_default_caps():
    parser = FrameParser()
    max_header, max_body = caps_of(parser)
    parser.feed(b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % max_body)
    for _ in range(max_body // 65536 - 1):
        assert parser.feed(b"x" * 65536) == []
    assert max_body - 65536 < parser.buffered_bytes <= max_body + 100
    header_only = FrameParser()
    items = []
    for _ in range(2 * max_header // 65536 + 2):
        items += header_only.feed(b"X" * 65536)
        assert header_only.buffered_bytes <= max_header
    assert items and all(isinstance(i, MalformedFrame) and "too long" in i.reason for i in items)


# --- parse_event --------------------------------------------------------------------------------


def check_event(event: EslEvent) -> None:
    """Everything the router and the handlers read off an event works, and is valid text."""
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in event.headers.items())
    assert event.body is None or isinstance(event.body, str)
    for text in [*event.headers, *event.headers.values(), event.body or ""]:
        text.encode("utf-8")  # no lone surrogates: every writer (log, LLM request, WAV path) takes it
    assert isinstance(event.name, str)
    assert event.unique_id is None or isinstance(event.unique_id, str)
    assert event.sequence is None or event.sequence >= 0


@settings(FUZZ, max_examples=1000)
@given(frame=fz.event_frames())
def test_parse_event_returns_an_event_or_raises_malformed_event_for_mutated_captures(frame):
    items, _ = feed_all([frame[0]])
    for item in items:
        if isinstance(item, Frame):
            try:
                check_event(parse_event(item))
            except MalformedEvent:
                pass


@settings(FUZZ, max_examples=1000)
@given(content_type=st.sampled_from(["text/event-plain", "text/event-json", "text/event-xml", "text/event-x", ""]),
       body=st.one_of(st.binary(max_size=400), fz.event_bodies(allow_big=False),
                      st.sampled_from(fz.JSON_TRAPS + fz.XML_TRAPS).map(str.encode)))
def test_parse_event_returns_an_event_or_raises_malformed_event_for_any_body(content_type, body):
    try:
        check_event(parse_event(Frame(headers={"Content-Type": content_type}, body=body, raw=b"")))
    except MalformedEvent:
        pass


@settings(FUZZ, max_examples=600)
@given(frame=fz.event_frames(allow_big=False))
def test_decoded_values_with_cr_lf_round_trip_through_build_plain_event_without_new_header_lines(frame):
    items, _ = feed_all([frame[0]])
    assume(items and isinstance(items[0], Frame) and items[0].content_type in ("text/event-plain", "text/event-json"))
    try:
        event = parse_event(items[0])
    except MalformedEvent:
        assume(False)
    # Header names from json can be any string; only names a plain event can carry are re-serialised.
    assume(all(k and "\n" not in k and ": " not in k and k == k.strip() for k in event.headers))
    wire = build_plain_event(list(event.headers.items()), event.body)
    inner = wire.split(b"\n\n", 1)[1]
    head = inner.split(b"\n\n", 1)[0] if event.body is not None else inner[:-1]
    lines = [line for line in head.split(b"\n") if line]
    expected_keys = set(event.headers) - {"Content-Length"} | ({"Content-Length"} if event.body is not None else set())
    assert len(lines) == len(expected_keys)  # one line per header: nothing injected
    assert all(not set(line.split(b": ", 1)[1]) & set(b"\r\n\0") for line in lines)
    again, _ = feed_all([wire])
    assert len(again) == 1 and isinstance(again[0], Frame)
    rebuilt = parse_event(again[0])
    assert set(rebuilt.headers) == expected_keys
    assert rebuilt.body == event.body
    for key, value in event.headers.items():
        if key == "Content-Length":
            continue
        if value == "":
            assert rebuilt.headers[key] == "_undef_"  # FreeSWITCH's empty value
        elif "%" not in value:
            assert rebuilt.headers[key] == value
        # else: an uppercase %XX already in a value is not re-encoded (capture 92): lossy by design


def test_percent_escapes_that_decode_to_crlf_stay_one_value_after_a_round_trip():
    inner = b"Event-Name: CUSTOM\nUnique-ID: %s\nX-Evil: a%%0D%%0AUnique-ID: x%%0A%%0Ab\n\n" % fz.FUZZ_CALL_UUIDS[0].encode()
    event = parse_event(FrameParser().feed(b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(inner) + inner)[0])
    assert event.get("X-Evil") == "a\r\nUnique-ID: x\n\nb" and event.unique_id == fz.FUZZ_CALL_UUIDS[0]
    again = parse_event(FrameParser().feed(build_plain_event(list(event.headers.items())))[0])
    assert dict(again.headers) == dict(event.headers)


def test_non_ascii_digits_in_lengths_and_sequences_are_refused_not_crashing():
    # "²".isdigit() is True but int("²") raises: this used to escape FrameParser.feed and kill the reader.
    bad_outer = "Content-Length: \u00b2\nContent-Type: text/event-plain\n\n".encode()
    items = FrameParser().feed(bad_outer + fz.captured_other_frames()[0])
    assert isinstance(items[0], MalformedFrame) and "bad Content-Length" in items[0].reason
    assert isinstance(items[1], Frame)
    inner = "Event-Name: X\nContent-Length: \u0661\n\nab".encode()
    frame = FrameParser().feed(b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(inner) + inner)[0]
    try:
        parse_event(frame)
        raise AssertionError("a non-ASCII inner Content-Length was accepted")
    except MalformedEvent:
        pass
    assert EslEvent(headers={"Event-Sequence": "\u00b2"}).sequence is None


def test_json_nested_too_deep_bad_xml_codecs_and_lone_surrogates_are_malformed_or_replaced():
    def frame(content_type: str, body: bytes) -> Frame:
        return Frame(headers={"Content-Type": content_type}, body=body, raw=b"")

    for body in (b"[" * 100_000, b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"):
        try:
            parse_event(frame("text/event-json", body))
            assert body.startswith(b'{"a"'), "unbalanced json parsed"
        except MalformedEvent:
            pass
    for codec in ("foo", "shift_jis", "idna", "rot13"):
        try:
            parse_event(frame("text/event-xml", f'<?xml version="1.0" encoding="{codec}"?><event/>'.encode()))
            raise AssertionError(f"xml in {codec} parsed")
        except MalformedEvent:
            pass
    event = parse_event(frame("text/event-json", b'{"Unique-ID": "a\\ud800b", "_body": "\\udcff"}'))
    assert event.unique_id == "a\ufffdb" and event.body == "\ufffd"


# --- the dispatcher -----------------------------------------------------------------------------


class Recorder:
    """A cheap CallHandler that remembers what it was given."""

    def __init__(self, uuid, log, book):
        self.uuid, self.book = uuid, book
        book["made"].append(uuid)

    def interrupt(self, event):
        self.book["interrupted"][self.uuid].append(event)

    def handle(self, event):
        self.book["handled"][self.uuid].append(event)

    def close(self):
        self.book["closed"].append(self.uuid)


def new_book() -> dict:
    return {"made": [], "closed": [], "interrupted": defaultdict(list), "handled": defaultdict(list)}


def expected_routing(events: list[EslEvent]) -> tuple[dict, dict, list]:
    """What CallRouter must do with events routed in one go (no greenlet runs in between)."""
    seen, calls = set(), {}
    interrupted, handled, callless = defaultdict(list), defaultdict(list), []
    for event in events:
        sequence = event.headers.get("Event-Sequence")
        if sequence and event.name in DOUBLED_EVENTS:  # the only events FreeSWITCH sends twice
            key = (event.headers.get("Core-UUID", ""), event.headers.get("Unique-ID", ""), sequence)
            if key in seen:
                continue
            seen.add(key)
        uuid = event.unique_id
        if uuid is None:
            callless.append(event)
            continue
        interrupted[uuid].append(event)
        if not calls.get(uuid):  # the call's greenlet stops at its first hangup
            handled[uuid].append(event)
        calls[uuid] = calls.get(uuid) or event.name == HANGUP
    return interrupted, handled, callless


def route_fuzzed(router: CallRouter, events: list[EslEvent], failures: list) -> None:
    for event in events:
        router.route(event)
        for call in router.calls.values():
            # Anything that kills a call's greenlet (not its handler's errors: those are logged).
            call.greenlet.link_exception(lambda g, call=call: failures.append((call.uuid, g.exception)))


@settings(FUZZ, max_examples=250)
@given(streams=st.lists(fz.esl_streams(max_segments=6, allow_big=False), min_size=1, max_size=4))
def test_router_delivers_every_fuzzed_event_in_order_and_survives(streams):
    events = [e for s in streams for e in events_of(feed_all(s.chunks())[0])]
    book, callless, died = new_book(), [], []
    router = CallRouter(lambda uuid, log: Recorder(uuid, log, book), on_callless_event=callless.append)
    with capture_logs() as logs:
        route_fuzzed(router, events, died)
        for n, uuid in enumerate(list(router.calls)):
            router.route(EslEvent(headers={"Event-Name": HANGUP, "Unique-ID": uuid, "Event-Sequence": f"{10**12 + n}"}))
        assert router.join(10)
    interrupted, handled, expected_callless = expected_routing(events)
    assert not died
    assert not [line for line in logs if line["event"] in FAILURE_EVENTS]
    assert router.calls == {}
    assert callless == expected_callless
    assert sorted(book["made"]) == sorted(book["closed"]) == sorted(set(book["made"]))
    for uuid in book["made"]:
        assert book["interrupted"][uuid][: len(interrupted[uuid])] == interrupted[uuid]
        if handled[uuid] and handled[uuid][-1].name == HANGUP:
            assert book["handled"][uuid] == handled[uuid]
        else:  # our closing hangup came after the fuzzed events
            assert book["handled"][uuid][:-1] == handled[uuid] and book["handled"][uuid][-1].name == HANGUP


def wait_quiet(router: CallRouter, timeout_s: float = 20.0) -> None:
    """Until every call has worked through its queue and no turn is in flight (three calm polls in a row)."""
    calm, deadline_s = 0, time.monotonic() + timeout_s
    while calm < 3:
        assert time.monotonic() < deadline_s, "the calls did not settle"
        gevent.sleep(0.005)
        busy = any(not call.queue.empty() or call.handler.busy for call in router.calls.values())
        calm = 0 if busy else calm + 1


@contextlib.contextmanager
def conversation_router(tts_dir, llm_url: str):
    """A CallRouter whose calls are real ConversationHandlers; commands go to a recording fake."""
    settings = load_settings(environ={"TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(tts_dir), "LLM_PROVIDER": "ollama",
                                      "LLM_API_URL": llm_url, "LLM_TIMEOUT": "5"})
    sent: list[commands.EslCommand] = []

    def send(command):
        sent.append(command)
        text = "+OK Message sent\n" if command.line.startswith("api uuid_broadcast ") else "+OK\n"
        return CommandReply(command=command, text=text)

    tts = NullEngine()
    cache = PhraseCache.for_output_dir(settings.tts_output_dir, settings.tts_cache_max_mb * 1024 * 1024)
    pool = gevent.threadpool.ThreadPool(1)
    services = TurnServices(settings=settings, llm=make_llm_client(settings), tts=tts, send=send, synth_pool=pool,
                            fallback_wav=cache.get_or_synthesize(tts, settings.fallback_phrase), cache=cache)
    try:
        yield CallRouter(conversation_factory(services)), sent
    finally:
        pool.kill()


def contained_tts_dir(tmp_path):
    """A TTS dir three levels down, so that what a "../" Unique-ID reaches stays in tmp_path.

    The phrase cache is on wherever a turn can run: without it a Unique-ID such as "/etc/x"
    or "../../x" becomes the path of a per-call WAV (reported, see fuzz_strategies.hangup_cleanup_bug)."""
    return tmp_path / "a" / "b" / "tts"


def test_real_conversation_handlers_survive_fuzzed_events_and_only_command_valid_uuids(tmp_path):
    streams = fz.random_streams(20260421, max_segments=6, allow_big=False)
    events = [e for s in itertools.islice(streams, 300) for e in events_of(feed_all(s.chunks())[0])]
    speech = [e for e in events if e.name == "DETECTED_SPEECH" and e.get("Speech-Type") == "detected-speech"
              and e.body and fz.is_valid_uuid(e.unique_id)]
    assert len(events) > 250 and speech  # the seed does reach the turn code
    with FakeLlmServer("ollama", replies=lambda request: "Fine. Anything else?") as llm, \
            conversation_router(contained_tts_dir(tmp_path), llm.url) as (router, sent), greenlet_failures() as hub_errors:
        died = []
        with capture_logs() as logs:
            for n in range(0, len(events), 25):
                # A burst, as one recv() brings, then every turn it started runs to its end:
                # what the handlers do no longer depends on timing.
                route_fuzzed(router, events[n:n + 25], died)
                wait_quiet(router)
            for n, uuid in enumerate(list(router.calls)):
                router.route(EslEvent(headers={"Event-Name": HANGUP, "Unique-ID": uuid, "Event-Sequence": f"{10**12 + n}"}))
            assert router.join(30)
    assert not died and not hub_errors
    assert not unexpected_failures(logs)
    assert router.calls == {}
    uuids = {command.line.split()[2] for command in sent}
    assert uuids and all(fz.is_valid_uuid(u) for u in uuids)
    fuzzed_valid = {e.unique_id for e in events if fz.is_valid_uuid(e.unique_id)}
    assert uuids <= fuzzed_valid


# --- memory -------------------------------------------------------------------------------------


def test_dedup_and_ended_call_memory_stay_at_their_caps_under_distinct_unique_ids():
    rng = random.Random(7)
    book = new_book()
    router = CallRouter(lambda uuid, log: Recorder(uuid, log, book), remember_ended=256,
                        dedup=EventDeduplicator(max_keys=512))
    for n in range(5000):
        uuid = f"{rng.getrandbits(32):08x}-0000-4000-8000-{n:012d}"
        router.route(EslEvent(headers={"Event-Name": "DETECTED_SPEECH", "Unique-ID": uuid, "Event-Sequence": str(2 * n)}))
        router.route(EslEvent(headers={"Event-Name": HANGUP, "Unique-ID": uuid, "Event-Sequence": str(2 * n + 1)}))
        if n % 500 == 0:
            gevent.sleep(0)
            assert len(router.dedup) <= 512 and len(router._ended) <= 256
    assert router.join(10)
    assert len(router.dedup) == 512 and len(router._ended) == 256 and router.calls == {}
    assert len(book["closed"]) == 5000


def test_dedup_memory_does_not_grow_with_the_length_of_hostile_header_values():
    dedup = EventDeduplicator(max_keys=1000)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for n in range(3000):
        huge = f"{n:08d}" + "u" * 65536  # a Unique-ID can be as long as an event body
        assert not dedup.is_duplicate(EslEvent(headers={"Unique-ID": huge, "Core-UUID": huge, "Event-Sequence": str(n)}))
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert len(dedup) == 1000 and grown < 1000 * 300  # a few hundred bytes a key, not 128 kB
    last = f"{2999:08d}" + "u" * 65536
    assert dedup.is_duplicate(EslEvent(headers={"Unique-ID": last, "Core-UUID": last, "Event-Sequence": "2999"}))
    first = f"{0:08d}" + "u" * 65536
    assert not dedup.is_duplicate(EslEvent(headers={"Unique-ID": first, "Core-UUID": first, "Event-Sequence": "0"}))


def test_calls_without_hangup_are_bounded_only_by_their_number():
    """A finding, not a wish: the router keeps one Call (and one parked greenlet) per Unique-ID
    that never got a hangup; nothing else bounds them. bench/fuzz.py measures what each costs."""
    book = new_book()
    router = CallRouter(lambda uuid, log: Recorder(uuid, log, book))
    for n in range(10_000):
        router.route(EslEvent(headers={"Event-Name": "CHANNEL_ANSWER", "Unique-ID": f"f0220000-0000-4000-8000-{n:012d}",
                                       "Event-Sequence": str(n)}))
    wait_until(lambda: sum(len(events) for events in book["handled"].values()) == 10_000, 30)
    assert len(router.calls) == 10_000 and all(not c.greenlet.dead for c in router.calls.values())
    for n, uuid in enumerate(list(router.calls)):
        router.route(EslEvent(headers={"Event-Name": HANGUP, "Unique-ID": uuid, "Event-Sequence": str(10**6 + n)}))
    assert router.join(20)
    assert router.calls == {} and len(book["closed"]) == 10_000


# --- a live daemon on the simulator -------------------------------------------------------------


def test_live_daemon_survives_fuzzed_streams_then_answers_a_normal_call(tmp_path):
    streams = fz.random_streams(4242, max_segments=6, daemon_safe=True)
    injected, parser = [], FrameParser()
    for stream in itertools.islice(streams, 250):
        padding = fz.closing_padding(stream.data)
        if padding is not None:  # else the stream would eat what follows it for ever
            injected.append(stream.data + padding)
    events = events_of(parser.feed(b"".join(injected)))
    assert len(injected) > 200 and len(events) > 200
    fuzzed_valid = {e.unique_id for e in events if fz.is_valid_uuid(e.unique_id)}

    with FakeLlmServer("ollama", replies=lambda request: "We open at nine.") as llm, \
            FreeswitchSimulator(playback_speed=0.01) as sim:
        settings = settings_for(sim, contained_tts_dir(tmp_path), LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        assert settings.tts_cache_max_mb > 0  # see contained_tts_dir
        with greenlet_failures() as hub_errors, capture_logs() as logs, \
                running_daemon(sim, settings, tts=NullEngine()) as daemon:
            sim.wait_for_subscription("DETECTED_SPEECH")
            for data in injected:
                sim.inject_raw(data)
                gevent.sleep(0)
            call = sim.new_call()  # its events come after every fuzzed byte on the same socket
            sim.speak(call, "when do you open")
            sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {call} "), 30)
            assert daemon.esl.connected and daemon.esl.connections_made == 1  # the reader never died
            assert daemon.router.events_routed > 100
    assert not hub_errors
    assert not unexpected_failures(logs)
    assert any(line["event"] == "esl_malformed_frame_skipped" for line in logs)
    assert any(line["event"] == "esl_malformed_event_skipped" for line in logs)
    uuid_commands = [c.line for c in sim.commands if c.line.startswith("api uuid_")]
    targets = {line.split()[2] for line in uuid_commands}
    assert call in targets
    assert all(fz.is_valid_uuid(u) for u in targets)
    assert targets - {call} <= fuzzed_valid
