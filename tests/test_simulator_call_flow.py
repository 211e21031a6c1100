"""The simulator through a whole call, against tests/captures/dtmf/ and playback/S6: DTMF, both loopback legs parked, transfer, kill."""

from __future__ import annotations

import re

from ivr_daemon.esl.protocol import Frame, parse_event
from test_simulator import (  # noqa: F401  (sim and peer are fixtures)
    CAPTURES,
    RawPeer,
    frames_of,
    header_names,
    peer,
    sim,
)

DTMF_DIR = CAPTURES / "dtmf"
# Headers whose values differ from run to run (uuids, clocks, counters), everything else must match.
VOLATILE = re.compile(
    r"Core-UUID|Event-Date-.*|Event-Sequence|Unique-ID|Channel-Call-UUID|Caller-Unique-ID|Caller-.*-Time"
    r"|variable_(uuid|call_uuid|session_id|other_loopback_leg_uuid)"
)


def dtmf_frame(name: str) -> Frame:
    (frame,) = frames_of((DTMF_DIR / name).read_bytes())
    return frame


def stream_events(name: str, event_name: str) -> list[Frame]:
    frames = frames_of((DTMF_DIR / name).read_bytes())
    return [f for f in frames if f.content_type.startswith("text/event-") and parse_event(f).name == event_name]


def stable_values(frame: Frame) -> dict[str, str]:
    event = parse_event(frame)
    return {name: event.get(name) for name in header_names(frame) if not VOLATILE.fullmatch(name)}


# -- 1. DTMF -------------------------------------------------------------------------------------


def test_dtmf_is_the_captured_frame_on_the_ivr_leg_without_channel_variables(sim, peer):
    peer.login("event plain DTMF")
    json_peer = RawPeer(sim.port)
    try:
        json_peer.login("event json DTMF")
        call = sim.new_call(variables={"ivr_agent": "sales"})
        sim.dtmf(call, "0")
        frame, event = peer.event("DTMF")
        real = dtmf_frame("event_plain_DTMF.txt")
        assert header_names(frame) == header_names(real)
        assert not [name for name in header_names(frame) if name.startswith("variable_")]
        assert stable_values(frame) == stable_values(real)  # DTMF-Source UNKNOWN, DTMF-Duration 2000, line 678...
        assert (event.unique_id, event.get("Channel-Name"), event.get("DTMF-Digit")) == (call, "loopback/ai-b", "0")
        json_frame, _ = json_peer.event("DTMF")
        assert header_names(json_frame) == header_names(stream_events("dtmf_json_stream.txt", "DTMF")[0])
    finally:
        json_peer.close()


def test_each_digit_is_one_dtmf_event_once_in_order_like_the_captured_stream(sim, peer):
    peer.login("event plain DTMF")
    call = sim.new_call()
    sequences = [sim.dtmf(call, digit) for digit in "05#"]
    got = [peer.event("DTMF") for _ in range(3)]
    real = stream_events("dtmf_plain_stream.txt", "DTMF")
    assert [event.get("DTMF-Digit") for _, event in got] == ["0", "5", "#"]
    assert [int(event.get("Event-Sequence")) for _, event in got] == sequences and len(set(sequences)) == 3
    # '#' is URL-encoded on the wire like every value: the frame's bytes say DTMF-Digit: %23.
    assert b"\nDTMF-Digit: %23\n" in got[2][0].body and b"\nDTMF-Digit: %23\n" in real[2].body
    assert [header_names(frame) for frame, _ in got] == [header_names(frame) for frame in real]
    sim.hangup(call)
    assert len([e for e in sim.emitted_events if e.name == "DTMF"]) == 3  # no duplicate delivery
