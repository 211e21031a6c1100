"""The conversational turn on the simulator: history, fallback, hangup, concurrency."""

import numpy
from gevent.monkey import get_original
import pytest
import soundfile
from structlog.testing import capture_logs

from harness import TurnLog, broadcasts, routed_events, running_daemon, settings_for, wait_heard, wait_idle, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.conversation import ConversationHistory, transcript_of
from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts.base import TtsEngine
from ivr_daemon.tts.null import NullEngine

FALLBACK = "Sorry, I'm having trouble right now. Could you say that again?"


def speech(body, speech_type="detected-speech"):
    return EslEvent(headers={"Event-Name": "DETECTED_SPEECH", "Speech-Type": speech_type}, body=body)


def test_transcript_of_accepts_plain_text_and_vosk_json_only_for_final_speech():
    assert transcript_of(speech("  hello world \n")) == "hello world"
    assert transcript_of(speech('{"text" : "what time is it"}')) == "what time is it"
    assert transcript_of(speech('{"text": ""}')) is None
    assert transcript_of(speech("   ")) is None
    assert transcript_of(speech(None)) is None
    assert transcript_of(speech("hello", "detected-partial-speech")) is None
    assert transcript_of(speech(None, "closed")) is None
    assert transcript_of(speech("hi", "begin-speaking")) is None
    assert transcript_of(EslEvent(headers={"Event-Name": "DTMF"}, body="1")) is None


def test_history_keeps_system_prompt_and_last_n_messages():
    history = ConversationHistory("be brief", 4)
    for i in range(5):
        history.add("user", f"q{i}")
        history.add("assistant", f"a{i}")
    messages = history.messages()
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert [m["content"] for m in messages[1:]] == ["q3", "a3", "q4", "a4"]


def _read_wav_when_broadcast(sim, call_uuid, count, timeout_s=15):
    """Wait for ``count`` broadcasts and read each WAV the moment its command arrives."""
    infos = []
    for i in range(count):
        command = sim.wait_for_command(
            lambda c: c.line.startswith(f"api uuid_broadcast {call_uuid} ") and c.line not in [x[0] for x in infos],
            timeout_s,
        )
        path = command.line.split()[3]
        infos.append((command.line, soundfile.info(path)))
    return infos


def test_two_turns_second_request_carries_first_exchange(tmp_path):
    with FakeLlmServer("ollama", replies=["We open at nine.", "Yes, on Saturdays too."]) as llm, \
            FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, MAX_CONVERSATION_HISTORY="10")
        with running_daemon(sim, settings) as daemon:
            routed = routed_events(daemon)
            call = sim.new_call()
            asked = [sim.speak(call, "when do you open")]
            first = _read_wav_when_broadcast(sim, call, 1)
            wait_heard(sim, call)  # the caller listens to the answer before asking again
            asked.append(sim.speak(call, "and on weekends"))
            both = first + _read_wav_when_broadcast(sim, call, 1)
            for line, info in both:
                assert line.endswith(" aleg")
                assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
            # Each utterance came twice (the leg was parked): both copies reached the daemon,
            # and whatever they started has ended.
            wait_until(lambda: sorted(e.sequence for e in routed if e.name == "DETECTED_SPEECH") ==
                       sorted(asked * 2))
            wait_idle(daemon)
            assert len(llm.requests) == 2  # each utterance answered once despite the duplicates
            assert len(broadcasts(sim, call)) == 2
            second = llm.requests[1]["messages"]
            assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
            assert [m["content"] for m in second[1:]] == ["when do you open", "We open at nine.", "and on weekends"]


def test_history_is_capped_in_what_the_llm_receives(tmp_path):
    with FakeLlmServer("ollama", replies=lambda req: f"answer {len(req['messages'])}") as llm, \
            FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, MAX_CONVERSATION_HISTORY="3")
        with running_daemon(sim, settings):
            call = sim.new_call()
            for i in range(4):
                sim.speak(call, f"question {i}")
                sim.wait_for_command(lambda c, n=i + 1: len(broadcasts(sim, call)) >= n, 10)
                wait_heard(sim, call)
            assert [len(r["messages"]) for r in llm.requests] == [2, 4, 4, 4]
            assert llm.requests[-1]["messages"][-1]["content"] == "question 3"


@pytest.mark.parametrize("provider", ["ollama", "llama3"])
@pytest.mark.parametrize("failure", ["timeout", "malformed", "http500"])
def test_llm_failure_plays_fallback_within_timeout_plus_one_second(tmp_path, provider, failure):
    # A slow LLM holds its reply until the test lets it go: a fallback heard while it still holds
    # was sent because the daemon stopped waiting after LLM_TIMEOUT (the log says so), not by luck.
    knobs = {"timeout": {"hold_reply": True}, "malformed": {"body": b"{not json"}, "http500": {"status": 500}}[failure]
    expected = {"timeout": ("LlmTimeout", "within 1 s"), "malformed": ("LlmBadReply", ""),
                "http500": ("LlmUnavailable", "HTTP 500")}[failure]
    turns = TurnLog()
    with FakeLlmServer(provider, replies="never used", **knobs) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER=provider, LLM_API_URL=llm.url, LLM_TIMEOUT="1")
        with capture_logs() as logs, running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            sim.speak(call, "hello")
            command = sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {call} "), 10)
            if failure == "timeout":
                assert len(llm.requests) == 1 and llm.bodies_completed == 0  # the LLM still holds its reply
            fallback_wav = command.line.split()[3]
            handler = daemon.router.calls[call].handler
            assert fallback_wav == str(handler.services.fallback_wav)  # synthesized at start-up
            assert soundfile.info(fallback_wav).samplerate == 8000
            [failed] = [e for e in logs if e["event"] == "llm_failed" and e.get("call_uuid") == call]
            assert failed["error_type"] == expected[0] and expected[1] in failed["error"]
            # The user's words stay in history once; the fallback is not stored as the model's reply.
            [turn] = turns.wait(1, call)
            assert turn.used_fallback
            assert [m["content"] for m in handler.history.messages()[1:]] == ["hello"]
            llm.release_reply.set()


class GatedEngine(TtsEngine):
    """A real engine (null) whose synthesis waits for the test to let it finish."""

    name = "gated"
    voice_id = "gated"

    def __init__(self):
        # Native events: synthesis waits on them in a real worker thread, not a greenlet.
        native_event = get_original("threading", "Event")
        self.inner = NullEngine()
        self.started = native_event()
        self.release = native_event()

    def synthesize(self, text):
        self.started.set()
        self.release.wait(10)
        return self.inner.synthesize(text)


@pytest.mark.parametrize("cache_mb", ["0", "200"])
def test_hangup_mid_synthesis_sends_no_broadcast_and_deletes_the_wavs(tmp_path, cache_mb):
    engine = GatedEngine()
    engine.release.set()  # let the start-up fallback through
    with FakeLlmServer("ollama", replies="A long answer.") as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_CACHE_MAX_MB=cache_mb)
        with running_daemon(sim, settings, tts=engine) as daemon:
            engine.release.clear()
            engine.started.clear()
            call = sim.new_call()
            sim.speak(call, "tell me a story")
            wait_until(engine.started.is_set)
            handler = daemon.router.calls[call].handler
            sim.hangup(call)
            wait_until(lambda: handler.hung_up)
            # The synthesis thread finishes only after the hangup: its WAV must go too.
            engine.release.set()
            wait_until(lambda: call not in daemon.router.calls)
            # Landed: its WAV is written by then, and deleted as it lands (the deletion is linked
            # to the synthesis after in_flight's own link, so both have run once this is true).
            # The call leaves the router at once, before the worker thread is done: waiting for
            # that alone, a loaded machine found the WAV written and not yet deleted.
            wait_until(lambda: not handler.services.in_flight)
            assert broadcasts(sim, call) == []
            assert list(tmp_path.glob(f"{call}-*.wav")) == []
            # Shared files (the fallback phrase, the phrase cache) are never deleted on hangup.
            assert handler.services.fallback_wav.exists()
            if cache_mb != "0":
                # The late answer lands in the cache (the fallback is pinned, outside it).
                wait_until(lambda: handler.services.cache.stats().files == 1)


def test_two_calls_at_once_do_not_share_history(tmp_path):
    def reply(request):
        return "You said: " + request["messages"][-1]["content"]

    with FakeLlmServer("ollama", replies=reply) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings):
            a, b = sim.new_call(), sim.new_call()
            sim.speak(a, "apples")
            sim.speak(b, "bananas")
            sim.wait_for_command(lambda c: len(broadcasts(sim)) >= 2, 10)
            wait_heard(sim, a)
            wait_heard(sim, b)
            sim.speak(a, "more apples")
            sim.speak(b, "more bananas")
            sim.wait_for_command(lambda c: len(broadcasts(sim)) >= 4, 10)
            by_last = {r["messages"][-1]["content"]: r["messages"] for r in llm.requests}
            assert [m["content"] for m in by_last["more apples"][1:]] == ["apples", "You said: apples", "more apples"]
            assert [m["content"] for m in by_last["more bananas"][1:]] == ["bananas", "You said: bananas", "more bananas"]
            assert len(broadcasts(sim, a)) == 2 and len(broadcasts(sim, b)) == 2


class BrokenEngine(TtsEngine):
    name = "broken"
    voice_id = "broken"

    def synthesize(self, text):
        if text == "first":
            raise RuntimeError("model exploded")
        return numpy.zeros(800, dtype=numpy.float32), 8000


def test_tts_failure_plays_the_fallback_and_the_next_turn_works(tmp_path):
    engine = BrokenEngine()
    with FakeLlmServer("ollama", replies=["first", "second"]) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        turns = []
        with running_daemon(sim, settings, tts=engine, on_turn=turns.append) as daemon:
            call = sim.new_call()
            sim.speak(call, "one")
            wait_until(lambda: len(turns) == 1)
            wait_heard(sim, call)
            sim.speak(call, "two")
            wait_until(lambda: len(turns) == 2)
            handler = daemon.router.calls[call].handler
            # Turn 1's answer could not be synthesized: the caller heard the fallback phrase.
            assert turns[0].used_fallback and turns[0].wav_path == handler.services.fallback_wav
            assert not turns[1].used_fallback and turns[1].reply == "second"
            assert [line.split()[3] for line in broadcasts(sim, call)] == [str(turns[0].wav_path), str(turns[1].wav_path)]
            # The unheard answer is not in history; the next exchange is.
            assert [m["content"] for m in handler.history.messages()[1:]] == ["one", "two", "second"]
