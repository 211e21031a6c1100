"""Hardening: the switch drops, the LLM and TTS fail, hostile input, SIGTERM, several daemons."""

import os
import signal
import subprocess
import sys
import uuid as uuid_lib
from pathlib import Path

import numpy
import pytest
from gevent.monkey import get_original
from structlog.testing import capture_logs

from harness import (TurnLog, broadcasts, captured_event, routed_events, running_daemon, settings_for, wait_heard,
                     wait_idle, wait_until)
from llm_fakes import FakeLlmServer
from ivr_daemon.conversation import FIRST_AUDIO_MARGIN_S
from ivr_daemon.daemon import build_conversation_daemon, shard_of
from ivr_daemon.localllm import pick_free_port
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts.base import TtsEngine, TtsModelUnavailable
from ivr_daemon.tts.null import NullEngine

CAPTURES = Path(__file__).parent / "captures"
DETECTED_SPEECH = "40_event_plain_DETECTED_SPEECH_detected-speech.txt"


# --- ESL loss mid-call -----------------------------------------------------------------------


def test_twenty_drops_mid_turn_lose_no_call_state_and_never_broadcast_twice(tmp_path):
    """Each turn: the caller speaks, the switch connection dies while the LLM thinks, the
    daemon reconnects, and the answer is broadcast once, after the reconnect."""
    replies = [f"Answer number {i}." for i in range(20)]
    turns = TurnLog()
    with FakeLlmServer("ollama", replies=replies, hold_reply=True) as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, MAX_CONVERSATION_HISTORY="100")
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            for i in range(20):
                subscriptions = len([c for c in sim.commands if c.line.startswith("event plain")])
                llm.release_reply.clear()
                sim.speak(call, f"question {i}")
                wait_until(lambda i=i: len(llm.requests) == i + 1)  # the LLM is thinking now, and holds
                sim.drop_connections()
                llm.release_reply.set()  # the answer comes during the outage or just after it
                wait_until(lambda s=subscriptions: len([c for c in sim.commands if c.line.startswith("event plain")]) == s + 1)
                wait_until(lambda i=i: len(broadcasts(sim, call)) == i + 1, 10)
                wait_until(lambda i=i: len([c for c in sim.commands if c.line == f"api uuid_exists {call}"]) == i + 1)
                turns.wait(i + 1, call)
                wait_heard(sim, call)
            assert len(broadcasts(sim, call)) == 20  # one per turn, none repeated
            assert not any(t.used_fallback for t in turns.of(call))
            handler = daemon.router.calls[call].handler
            contents = [m["content"] for m in handler.history.messages()[1:]]
            assert contents == [x for i in range(20) for x in (f"question {i}", f"Answer number {i}.")]
            resyncs = [c for c in sim.commands if c.line == f"api uuid_exists {call}"]
            assert len(resyncs) == 20  # after every reconnect


def test_calls_that_ended_during_the_outage_are_cleaned_up_after_reconnect(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("ollama", replies="Hello.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_CACHE_MAX_MB="0")
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            stays, goes = sim.new_call(), sim.new_call()
            for call in (stays, goes):
                sim.speak(call, "hi")
                turns.wait(1, call)
            assert all(list(tmp_path.glob(f"{c}-*.wav")) for c in (stays, goes))
            # The connection dies; meanwhile one caller hangs up, and its events are lost.
            sim.drop_connections()
            sim.hangup(goes)
            wait_until(lambda: goes not in daemon.router.calls, 10)
            assert stays in daemon.router.calls
            assert list(tmp_path.glob(f"{goes}-*.wav")) == [] and list(tmp_path.glob(f"{stays}-*.wav"))
            wait_heard(sim, stays)
            sim.speak(stays, "still there?")
            # The turn reports after it wrote its history; its broadcast goes out before that.
            turns.wait(2, stays)
            assert len(broadcasts(sim, stays)) == 2
            assert [m["content"] for m in daemon.router.calls[stays].handler.history.messages()[1:]] == \
                ["hi", "Hello.", "still there?", "Hello."]


# --- No dead air ---------------------------------------------------------------------------


class RaisingEngine(NullEngine):
    name = "raising"

    def synthesize(self, text):
        if "answer" in text:
            raise RuntimeError("onnx runtime exploded")
        return super().synthesize(text)


class HangingEngine(NullEngine):
    """Synthesis that never ends (a stuck model) except for the start-up fallback phrase."""

    name = "hanging"

    def __init__(self):
        super().__init__()
        self.release = get_original("threading", "Event")()
        self.stuck = 0  # syntheses waiting for the release now

    def synthesize(self, text):
        if "answer" in text:
            self.stuck += 1
            self.release.wait(60)  # until the test lets it go
            self.stuck -= 1
        return super().synthesize(text)


# What ends the wait in each case: the log line, and for a timeout the bound it used. The LLM
# client's own timeout (LLM_TIMEOUT) fires first; a stuck engine is cut at the turn's deadline,
# LLM_TIMEOUT + FIRST_AUDIO_MARGIN_S after the turn began.
EXPECTED_FAILURE = {
    "llm_down": ("llm_failed", "LlmUnavailable", "cannot reach"),
    "llm_slow": ("llm_failed", "LlmTimeout", "within 1.5 s"),
    "llm_500": ("llm_failed", "LlmUnavailable", "HTTP 500"),
    "llm_garbage": ("llm_failed", "LlmBadReply", ""),
    "llm_stream_stalls": ("llm_failed", "LlmTimeout", "stalled for 1.5 s"),
    "tts_raises": ("tts_failed", None, "onnx runtime exploded"),
    "tts_hangs": ("tts_too_slow", None, ""),
}


@pytest.mark.parametrize("failure", ["llm_down", "llm_slow", "llm_500", "llm_garbage", "llm_stream_stalls",
                                     "tts_raises", "tts_hangs"])
def test_every_turn_ends_in_the_answer_or_the_fallback_within_llm_timeout_plus_one_second(tmp_path, failure):
    """No clock is read here: the slow LLM and the stuck engine hold until the test lets them
    go, so a fallback that arrives while they still hold was sent by the daemon's own timeout,
    and the log line says which bound that timeout used (LLM_TIMEOUT=1.5, the deadline 2.0 s)."""
    knobs = {"llm_slow": {"hold_reply": True}, "llm_500": {"status": 500}, "llm_garbage": {"body": b"\x00\xffnot json"},
             "llm_stream_stalls": {"stream_hold_after": 2}}.get(failure, {})
    tts = {"tts_raises": RaisingEngine(), "tts_hangs": HangingEngine()}.get(failure)
    turns = TurnLog()
    with FakeLlmServer("ollama", replies="Here is the answer. It has two sentences.", **knobs) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        url = llm.url if failure != "llm_down" else f"http://127.0.0.1:{pick_free_port()}/api/chat"
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=url, LLM_TIMEOUT="1.5")
        with capture_logs() as logs, running_daemon(sim, settings, tts=tts, on_turn=turns) as daemon:
            call = sim.new_call()
            sim.speak(call, "hello")
            command = sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {call} "), 10)
            assert command.line.split()[3] == str(daemon.services.fallback_wav)
            # What the turn waited on is still stuck (the test releases it only below): only the
            # daemon's own bound can have ended the wait.
            if failure == "llm_slow":
                assert len(llm.requests) == 1 and llm.bodies_completed == 0
            if failure == "llm_stream_stalls":
                assert llm.deltas_sent == 2 and llm.stream_outcomes == []
            if failure == "tts_hangs":
                assert tts.stuck == 1
            [turn] = turns.wait(1, call)
            assert turn.used_fallback and turn.wav_path == daemon.services.fallback_wav
            event, error_type, words = EXPECTED_FAILURE[failure]
            [line] = [entry for entry in logs if entry["event"] == event and entry.get("call_uuid") == call]
            assert error_type is None or line["error_type"] == error_type
            assert words in line.get("error", "")
            if failure == "tts_hangs":
                assert line["waited_s"] <= 1.5 + FIRST_AUDIO_MARGIN_S  # the turn's deadline, no later
            llm.release_reply.set()
            llm.release_stream.set()
            if isinstance(tts, HangingEngine):
                tts.release.set()


def test_an_engine_that_cannot_say_the_fallback_phrase_fails_start_up(tmp_path):
    class Mute(TtsEngine):
        name, voice_id = "mute", "mute"

        def synthesize(self, text):
            return numpy.zeros(0, dtype=numpy.float32), 8000

    with FreeswitchSimulator() as sim:
        with pytest.raises(TtsModelUnavailable, match="FALLBACK_PHRASE"):
            build_conversation_daemon(settings_for(sim, tmp_path), tts=Mute())


# --- Hostile input -------------------------------------------------------------------------

INJECTION = "x\r\napi uuid_kill 00000000-0000-0000-0000-000000000000\r\n\r\napi hupall\r\n"


def test_caller_controlled_values_never_reach_the_socket_except_through_the_builder(tmp_path):
    with FakeLlmServer("ollama", replies=lambda req: "Reply to " + req["messages"][-1]["content"]) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        turns = TurnLog()
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            good = sim.new_call()
            hostile_ids = [good, good + INJECTION, INJECTION]
            for n, uuid in enumerate(hostile_ids):
                # Every header decodes to a value with CR/LF and api commands in it, except the
                # ones that make it a final DETECTED_SPEECH of that Unique-ID.
                sim.send_event_frame(captured_event(
                    DETECTED_SPEECH, "hello" + INJECTION, transform=lambda k, v: v + INJECTION,
                    Event_Name="DETECTED_SPEECH", Speech_Type="detected-speech", Unique_ID=uuid,
                    Event_Sequence=str(90_000 + n)))
            # Everything the three frames can cause: two refused Unique-IDs, one whole turn.
            wait_until(lambda: daemon.router.foreign_ids == 2)
            [turn] = turns.wait(1, good)
            wait_idle(daemon)
            assert len(llm.requests) == 1  # the two hostile Unique-IDs were not even taken for calls
            assert len(broadcasts(sim)) == turn.sentences >= 1
            sent = [c.line for c in sim.commands]
            assert not any("uuid_kill" in line or "hupall" in line for line in sent)
            api = [line for line in sent if line.startswith("api ")]
            assert api and all(line.startswith(f"api uuid_broadcast {good} ") and line.endswith(" aleg") for line in api)
            assert all("\r" not in line and "\n" not in line for line in sent)
            # The transcript with CR/LF only ever went to the LLM, as data.
            assert llm.requests[0]["messages"][-1]["content"].startswith("hello")


# --- Shutdown and several daemons ----------------------------------------------------------


def test_sigterm_finishes_the_turn_in_flight_exits_cleanly_and_leaves_no_files(tmp_path):
    tts_dir = tmp_path / "tts"
    with FakeLlmServer("ollama", replies="Goodbye and thank you.", hold_reply=True) as llm, FreeswitchSimulator() as sim:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "LOG_", "HTTP_"))}
        env.update({"FREESWITCH_PORT": str(sim.port), "LLM_PROVIDER": "ollama", "LLM_API_URL": llm.url,
                    "TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(tts_dir), "TTS_CACHE_MAX_MB": "0", "LOG_FORMAT": "json",
                    "GREETING": "", "SILENCE_TIMEOUT_S": "0", "HTTP_PORT": "0"})
        log_path = tmp_path / "daemon.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([str(Path(sys.executable).parent / "ivr-daemon"), "--env-file", os.devnull, "run"],
                                    env=env, stderr=log_file, stdout=log_file)

        def logged(event: str) -> bool:
            return f'"event": "{event}"' in log_path.read_text()

        try:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=60)
            call, other = sim.new_call(), sim.new_call()
            sim.speak(call, "one last thing")
            wait_until(lambda: len(llm.requests) == 1)  # the turn is in flight, its LLM holds
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: logged("daemon_shutting_down"), 10)
            sim.speak(other, "and another")  # after SIGTERM: not answered
            wait_until(lambda: logged("turn_refused_shutting_down"), 10)
            llm.release_reply.set()  # the turn in flight ends now, and still speaks
            assert proc.wait(10) == 0  # SIGTERM to exit within 10 s
        finally:
            proc.kill()
        lines = [c.line for c in sim.commands]
        assert len([line for line in lines if line.startswith(f"api uuid_broadcast {call} ")]) == 1
        assert not [line for line in lines if line.startswith(f"api uuid_broadcast {other} ")]
        assert len(llm.requests) == 1
        assert lines[-1] == "exit"
        # The call's WAVs are gone; only the pinned phrases (the fallback) stay, for other shards.
        assert sorted(p.name for p in tts_dir.iterdir()) == ["cache", "phrases"]
        assert list((tts_dir / "cache").iterdir()) == []  # TTS_CACHE_MAX_MB=0: an empty, private dir
        assert logged("daemon_shut_down")


def test_two_daemons_with_shards_answer_each_call_exactly_once(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("ollama", replies="Hello there.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        common = dict(LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        first = settings_for(sim, tmp_path / "a", DAEMON_SHARD="0/2", **common)
        second = settings_for(sim, tmp_path / "b", DAEMON_SHARD="1/2", **common)
        with running_daemon(sim, first, on_turn=turns) as one, running_daemon(sim, second, on_turn=turns) as two:
            seen = [routed_events(one), routed_events(two)]  # both are subscribed already
            # Six calls per shard, whatever the random UUIDs: 12 drawn at random all fell in one
            # shard once in a while (2 in 2^12), and then one daemon had no work to show.
            uuids = (str(uuid_lib.uuid4()) for _ in iter(int, 1))
            per_shard = {0: [], 1: []}
            for candidate in uuids:
                if len(per_shard[shard_of(candidate, 2)]) < 6:
                    per_shard[shard_of(candidate, 2)].append(candidate)
                if all(len(chosen) == 6 for chosen in per_shard.values()):
                    break
            calls = [sim.new_call(uuid=uuid) for uuid in per_shard[0] + per_shard[1]]
            spoken = {call: sim.speak(call, "hi") for call in calls}

            def both_copies_reached(events) -> bool:
                copies = [e for e in events if e.name == "DETECTED_SPEECH" and spoken.get(e.unique_id) == e.sequence]
                return len(copies) == 2 * len(calls)  # the simulator sends each one twice while parked

            # Each daemon has read every utterance (and its duplicate) and finished what it started.
            wait_until(lambda: all(both_copies_reached(events) for events in seen))
            wait_idle(one)
            wait_idle(two)
            assert sorted(t.call_uuid for t in turns.results) == sorted(calls)
            assert len(llm.requests) == 12
            assert sorted(line.split()[2] for line in broadcasts(sim)) == sorted(calls)
            assert {shard_of(c, 2) for c in calls} == {0, 1}  # both daemons had work


def test_non_uuid_unique_ids_are_ignored_and_never_name_files(tmp_path):
    tts_dir = tmp_path / "a" / "b" / "tts"
    victim = tmp_path / "a" / "b" / "victim.wav"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"keep me")
    with FakeLlmServer("ollama", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tts_dir, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_CACHE_MAX_MB="0")
        with running_daemon(sim, settings) as daemon:
            for n, bad in enumerate(["*", "../*", "../evil", "/etc/passwd", "**"]):
                for name, body in (("DETECTED_SPEECH", "hello"), ("CHANNEL_HANGUP_COMPLETE", None)):
                    sim.send_event_frame(captured_event(DETECTED_SPEECH, body, Unique_ID=bad, Event_Name=name,
                                                        Event_Sequence=str(80_000 + 2 * n + (body is None))))
            wait_until(lambda: daemon.router.foreign_ids == 10)
            call = sim.new_call()  # a real call still works
            sim.speak(call, "hello")
            wait_until(lambda: len(broadcasts(sim, call)) == 1)
            assert len(llm.requests) == 1 and daemon.router.calls.keys() == {call}
            assert victim.read_bytes() == b"keep me" and daemon.services.fallback_wav.exists()
            # Every file the daemon wrote is inside TTS_OUTPUT_DIR.
            assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and p != victim) == \
                sorted(p for p in tts_dir.rglob("*") if p.is_file())


@pytest.mark.parametrize("trouble", ["disconnect_notice", "over_cap_content_length"])
def test_a_switch_that_says_goodbye_or_corrupts_the_stream_mid_turn_gets_a_reconnect_not_a_spin(tmp_path, trouble):
    from ivr_daemon.esl.protocol import build_disconnect_notice

    junk = build_disconnect_notice() if trouble == "disconnect_notice" else \
        b"Content-Length: 100000000000000000000\nContent-Type: text/event-plain\n\n"
    with FakeLlmServer("ollama", replies="Your answer.", delay_s=0.3) as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "hello")
            wait_until(lambda: len(llm.requests) == 1)
            sim.inject_raw(junk)
            if trouble == "disconnect_notice":
                wait_until(lambda: not daemon.esl.connected)
                sim.drop_connections()  # FreeSWITCH closes the socket after its notice
            # (A stream that claims 10**20 bytes is dropped by the daemon itself.)
            wait_until(lambda: daemon.esl.connections_made >= 2, 10)
            wait_until(lambda: len(broadcasts(sim, call)) == 1, 10)  # the pending answer, once


def test_a_router_drops_duplicates_with_the_deduplicator_it_is_given_even_an_empty_one():
    # An empty EventDeduplicator is falsy (it has __len__): "dedup or EventDeduplicator()" once
    # dropped the one passed in, and with it its caps.
    from ivr_daemon.calls import CallRouter
    from ivr_daemon.esl.dedup import EventDeduplicator
    from ivr_daemon.esl.protocol import EslEvent

    handled = []

    class Handler:
        busy = False

        def interrupt(self, event):
            pass

        def handle(self, event):
            handled.append(event.sequence)

        def close(self):
            pass

        def after_reconnect(self):
            pass

    def speech(sequence):
        return EslEvent(headers={"Event-Name": "DETECTED_SPEECH", "Unique-ID": "03362ffb-115a-4a3d-9eb6-770e2089d43f",
                                 "Core-UUID": "core", "Event-Sequence": str(sequence)})

    dedup = EventDeduplicator(max_keys=2)
    assert len(dedup) == 0 and not dedup
    router = CallRouter(lambda uuid, log: Handler(), dedup=dedup)
    for sequence in (1, 1, 2, 3, 1):  # 1 is forgotten once two newer keys took its place
        router.route(speech(sequence))
    router.end_call("03362ffb-115a-4a3d-9eb6-770e2089d43f", "TEST")
    assert router.join(5)
    assert handled == [1, 2, 3, 1, None]
    assert dedup.dropped == 1 and len(dedup) == 2
