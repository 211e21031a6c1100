"""The simulator playing mod_vosk: a leg's caller audio (Piper-spoken) streamed to a real
``ivr-daemon asr-server`` (pocketsphinx), the server's replies fired as DETECTED_SPEECH on the
event socket as the captures show them."""

from __future__ import annotations

import logging

import pytest

from asr_clients import load_voice, spoken, words_of
from ivr_daemon.asr.pocketsphinx import PocketsphinxEngine
from ivr_daemon.asr.server import AsrServer
from ivr_daemon.replay.simulator import FreeswitchSimulator, SimulatorError
from test_simulator import RawPeer

HELP = "I need help with my bill"
HELP_WORDS = {"help", "bill"}
# The caller's audio goes out three times faster than real time: the same frames, less wall time.
SPEED = 3.0


@pytest.fixture(scope="module")
def help_pcm() -> bytes:
    return spoken(load_voice(), HELP, 8000, lead_s=0.3, tail_s=1.0)


@pytest.fixture(scope="module")
def sphinx():
    return PocketsphinxEngine()


@pytest.fixture
def asr_server(sphinx):
    with AsrServer(sphinx, port=0) as server:
        yield server


@pytest.fixture
def sim(asr_server):
    with FreeswitchSimulator(playback_gap_s=0.01, playback_speed=0.0, duplicate_speech_delay_s=0.0,
                             asr_server=asr_server.address, caller_audio_speed=SPEED) as simulator:
        yield simulator


def sim_lines(caplog, event: str) -> list[dict]:
    return [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == event]


def test_the_callers_audio_comes_back_as_partial_then_final_detected_speech(sim, asr_server, help_pcm):
    peer = RawPeer(sim.port)
    try:
        peer.login("event plain DETECTED_SPEECH")
        call = sim.new_call()
        assert sim.wait_asr_connected(call)
        utterance = sim.caller_says(call, help_pcm)

        partials = []
        while True:
            frame, event = peer.event("DETECTED_SPEECH", Unique_ID=call)
            if event.get("Speech-Type") == "detected-speech":
                break
            assert event.get("Speech-Type") == "detected-partial-speech"
            assert event.body  # mod_vosk fires nothing for an empty partial
            partials.append(event.body)
        # The final's body is the recognised text, as in capture 40; parked and idle, mod_vosk's
        # event comes twice, byte for byte (80_plain).
        assert HELP_WORDS <= words_of(event.body), event.body
        again, _ = peer.event("DETECTED_SPEECH", Unique_ID=call)
        assert again.raw == frame.raw
        assert partials and len(partials[-1].split()) >= 2, partials
        assert utterance.fed.wait(10) and utterance.settled.wait(30)

        sim.hangup(call)
        (summary,) = asr_server.wait_for_closed_streams(1)
    finally:
        peer.close()
    # One stream for the call, of 3,200-byte frames of the caller's audio decoded at the channel's
    # 8 kHz, ended at hangup by libks's malformed close frame; or, when the server was still
    # decoding frames sent before the hangup (a busy box), by its reply finding the socket gone.
    # Both are the normal end of a mod_vosk stream.
    assert (summary.path, summary.sample_rate_hz, summary.finals) == ("/", 8000, 1)
    assert summary.reason in ("client_closed_malformed", "disconnected"), summary
    assert summary.audio_s >= 1.0 and round(summary.audio_s / 0.2, 6).is_integer()  # whole 200 ms frames


def test_two_calls_each_stream_their_own_caller(sim, asr_server, help_pcm):
    first, second = sim.new_call(), sim.new_call(caller_id_number="5550000")
    assert sim.wait_asr_connected(first) and sim.wait_asr_connected(second)
    start = sim.events_emitted
    sim.caller_says(second, help_pcm)
    final = sim.wait_for_event(lambda e: e.name == "DETECTED_SPEECH" and e.get("Speech-Type") == "detected-speech",
                               timeout_s=30, start_index=start)
    assert final.unique_id == second and HELP_WORDS <= words_of(final.body)
    assert not [e for e in sim.emitted_events[start:] if e.name == "DETECTED_SPEECH" and e.unique_id == first]
    sim.hangup(first)
    sim.hangup(second)
    assert {s.reason for s in asr_server.wait_for_closed_streams(2)} <= {"client_closed_malformed", "disconnected"}


def test_audio_the_server_makes_nothing_of_settles_without_a_final(sim, asr_server):
    # Two seconds of a silent line: pocketsphinx hears no one, mod_vosk fires nothing, and the
    # utterance settles once the server has answered its frames and the silence after them.
    call = sim.new_call()
    assert sim.wait_asr_connected(call)
    start = sim.events_emitted
    utterance = sim.caller_says(call, bytes(2 * 8000 * 2))
    assert utterance.settled.wait(30)
    assert utterance.fed.is_set() and utterance.last_frame is not None
    assert not [e for e in sim.emitted_events[start:] if e.name == "DETECTED_SPEECH"]
    assert sim.call_exists(call)
    sim.hangup(call)


def test_without_a_reachable_asr_server_the_call_goes_on_without_speech_events(caplog, refusing_url):
    port = int(refusing_url.split(":")[2].split("/")[0])
    with FreeswitchSimulator(asr_server=("127.0.0.1", port)) as sim:
        call = sim.new_call()
        assert not sim.wait_asr_connected(call)
        (line,) = sim_lines(caplog, "sim_asr_connect_failed")
        assert line["call_uuid"] == call and line["url"] == f"ws://127.0.0.1:{port}"
        assert sim.call_exists(call)
        with pytest.raises(SimulatorError, match="runs no detect_speech"):
            sim.caller_says(call, b"\0\0")
        sim.hangup(call)


def test_an_asr_server_that_goes_away_mid_call_ends_the_stream_not_the_call(sim, asr_server, caplog):
    call = sim.new_call()
    assert sim.wait_asr_connected(call)
    asr_server.stop(timeout_s=0)  # cuts the stream with a close frame (1001 going away)
    assert sim.wait_asr_ended(call)
    assert sim_lines(caplog, "sim_asr_feed_failed")[0]["call_uuid"] == call
    assert sim.call_exists(call)
    sim.hangup(call)


def test_caller_audio_needs_an_asr_server():
    with FreeswitchSimulator() as sim:
        call = sim.new_call()
        with pytest.raises(SimulatorError, match="no ASR server"):
            sim.caller_says(call, b"\0\0")
