"""Fast turns: sentence streaming, barge-in, the phrase cache in the daemon (behaviour, not timing)."""

from pathlib import Path

import pytest

from harness import (TurnLog, broadcasts, captured_event, routed_events, running_daemon, settings_for, wait_heard,
                     wait_idle, wait_until)
from llm_fakes import FakeLlmServer
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts.null import NullEngine

THREE = "We open at nine. Saturdays from ten. Goodbye for now."
SENTENCES = ["We open at nine.", "Saturdays from ten.", "Goodbye for now."]
CAPTURES = Path(__file__).parent / "captures"


class CountingEngine(NullEngine):
    def __init__(self):
        super().__init__()
        self.texts = []

    def synthesize(self, text):
        self.texts.append(text)
        return super().synthesize(text)


def handler_of(daemon, call):
    return daemon.router.calls[call].handler


def history_of(daemon, call):
    return [(m["role"], m["content"]) for m in handler_of(daemon, call).history.messages()[1:]]


def test_first_sentence_is_broadcast_while_the_llm_is_still_writing_and_all_play_in_order(tmp_path):
    # The fake LLM stops after " Saturdays" (the word that proves sentence 1 ended) until released.
    turns = TurnLog()
    with FakeLlmServer("ollama", replies=THREE, stream_hold_after=6) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            sim.speak(call, "when do you open")
            first = sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {call} "), 10)
            assert llm.deltas_sent == 6 and not llm.release_stream.is_set()  # the rest does not exist yet
            llm.release_stream.set()
            wait_until(lambda: len(broadcasts(sim, call)) == 3)
            wait_heard(sim, call, 3)
            cache = handler_of(daemon, call).services.cache
            tts = handler_of(daemon, call).services.tts
            expected = [str(cache.path_for(tts, sentence)) for sentence in SENTENCES]
            assert [line.split()[3] for line in broadcasts(sim, call)] == expected
            assert first.line.split()[3] == expected[0]
            assert sim.played_files(call) == expected  # FreeSWITCH played them in order
            [turn] = turns.wait(1, call)  # the history is written before the turn reports
            assert turn.sentences == 3 and not turn.interrupted
            assert history_of(daemon, call) == [("user", "when do you open"), ("assistant", THREE)]


def test_batch_mode_waits_for_the_whole_reply_and_plays_one_file(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("ollama", replies=THREE) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, LLM_STREAM="false")
        with running_daemon(sim, settings, on_turn=turns):
            call = sim.new_call()
            sim.speak(call, "when do you open")
            [turn] = turns.wait(1, call)  # the turn is over: it broadcasts nothing more
            assert turn.sentences == 1 and turn.reply == THREE
            assert [line.split()[3] for line in broadcasts(sim, call)] == [str(turn.wav_path)]
            assert llm.requests[0]["stream"] is False


def _play_until_second_sentence(sim, call):
    """Wait until sentence 1 played to the end and sentence 2 started."""
    stop = sim.wait_for_event(lambda e: e.name == "PLAYBACK_STOP" and e.unique_id == call, 10)
    sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call and e.sequence > stop.sequence, 10)


def test_barge_in_breaks_drops_the_rest_and_history_keeps_what_was_heard(tmp_path):
    with FakeLlmServer("ollama", replies=[THREE, "Sure, go ahead."]) as llm, \
            FreeswitchSimulator(playback_speed=0.5, playback_gap_s=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "when do you open")
            _play_until_second_sentence(sim, call)
            sim.speak(call, "hold", final=False)  # mod_vosk's partial while sentence 2 plays
            sim.wait_for_command(f"api uuid_break {call} all", 5)
            wait_until(lambda: sim.playing(call) is None)
            cache, tts = handler_of(daemon, call).services.cache, handler_of(daemon, call).services.tts
            status = {r.path: r.status for r in sim.playback_log(call)}
            assert [status.get(str(cache.path_for(tts, s))) for s in SENTENCES] == ["done", "break", "flushed"]
            assert sim.played_files(call) == [str(cache.path_for(tts, s)) for s in SENTENCES[:2]]  # 3 never played
            assert history_of(daemon, call) == [("user", "when do you open"),
                                                ("assistant", "We open at nine. [interrupted by the caller]")]
            # The caller's new utterance starts the next turn, which knows what was heard.
            sim.speak(call, "hold on a second")
            wait_until(lambda: len(llm.requests) == 2)
            assert llm.requests[1]["messages"][2]["content"] == "We open at nine. [interrupted by the caller]"
            assert llm.requests[1]["messages"][3]["content"] == "hold on a second"


def test_barge_in_while_the_llm_still_streams_closes_the_stream_and_drops_pending_sentences(tmp_path):
    with FakeLlmServer("ollama", replies=[THREE, "Okay."], stream_hold_after=6) as llm, \
            FreeswitchSimulator(playback_speed=1.0, playback_gap_s=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "when do you open")
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 10)
            sim.speak(call, "no wait", final=False)
            sim.wait_for_command(f"api uuid_break {call} all", 5)
            # The held server notices a closed stream when it next writes: let it write.
            llm.release_stream.set()
            assert llm.client_disconnected.wait(5)  # the daemon closed the LLM stream
            wait_until(lambda: not handler_of(daemon, call).busy)
            assert len(broadcasts(sim, call)) == 1  # nothing after the barge-in
            assert history_of(daemon, call)[-1] == ("assistant", "[interrupted by the caller]")


def _speech_frame(call, speech_type, text, sequence):
    """A DETECTED_SPEECH frame from the real capture, for the Speech-Types the simulator lacks."""
    return captured_event("41_event_plain_DETECTED_SPEECH_detected-partial-speech.txt", text,
                          Unique_ID=call, Channel_Call_UUID=call, Caller_Unique_ID=call,
                          Speech_Type=speech_type, Event_Sequence=str(sequence))


@pytest.mark.parametrize(
    "mode, min_words, speech, breaks",
    [
        ("off", "1", ("detected-partial-speech", "stop stop stop"), False),
        ("off", "1", ("detected-speech", "stop stop stop"), False),
        ("partial", "3", ("detected-partial-speech", "stop now"), False),
        ("partial", "3", ("detected-partial-speech", "stop right now"), True),
        ("partial", "1", ("begin-speaking", None), True),  # other ASR modules announce speech
        ("final", "1", ("detected-partial-speech", "stop"), False),
        ("final", "1", ("detected-speech", "stop"), True),
    ],
)
def test_barge_in_settings(tmp_path, mode, min_words, speech, breaks):
    with FakeLlmServer("ollama", replies=[THREE, "Okay."]) as llm, \
            FreeswitchSimulator(playback_speed=1.0, playback_gap_s=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                BARGE_IN=mode, BARGE_IN_MIN_WORDS=min_words)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "when do you open")
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 10)
            routed = routed_events(daemon)
            sim.send_event_frame(_speech_frame(call, speech[0], speech[1], 10_000))
            wait_until(lambda: any(e.sequence == 10_000 for e in routed))  # the daemon has seen this very frame
            if breaks:
                sim.wait_for_command(f"api uuid_break {call} all", 5)
            else:
                wait_idle(daemon)  # whatever the frame started (a turn, a uuid_break) has run
                assert not any(c.line.startswith("api uuid_break") for c in sim.commands)
            assert handler_of(daemon, call).barge_ins == (1 if breaks else 0)


def test_the_same_answer_is_synthesized_once_across_calls(tmp_path):
    engine = CountingEngine()
    with FakeLlmServer("ollama", replies="We open at nine.") as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings, tts=engine) as daemon:
            for _ in range(3):
                call = sim.new_call()
                sim.speak(call, "when do you open")
                sim.wait_for_command(lambda c, call=call: c.line.startswith(f"api uuid_broadcast {call} "), 10)
                wait_heard(sim, call)
                cache = handler_of(daemon, call).services.cache
                sim.hangup(call)
            assert engine.texts.count("We open at nine.") == 1
            assert cache.stats().hits == 2
            assert len({line.split()[3] for line in broadcasts(sim)}) == 1
            assert Path(broadcasts(sim)[0].split()[3]).exists()  # cached files outlive the calls


def test_speech_after_the_answer_played_is_not_barge_in_even_if_playback_beat_the_reply(tmp_path):
    # With no gap and instant playback, PLAYBACK_START/STOP reach the daemon before the
    # uuid_broadcast's own reply does: the sentence must already be known as spoken by then.
    with FakeLlmServer("ollama", replies=["We open at nine.", "Yes."]) as llm, \
            FreeswitchSimulator(playback_speed=0.0, playback_gap_s=0.0) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            for _ in range(5):
                count = len(llm.requests)
                sim.speak(call, "when do you open")
                wait_until(lambda c=count: len(llm.requests) == c + 1)
                wait_heard(sim, call)
                wait_until(lambda: not handler_of(daemon, call).busy)
                sim.speak(call, "and what else", final=False)
                sim.speak(call, "and what else")
                wait_until(lambda c=count: len(llm.requests) == c + 2)
                wait_heard(sim, call)
                wait_until(lambda: not handler_of(daemon, call).busy)
            assert not any(c.line.startswith("api uuid_break") for c in sim.commands)
            assert handler_of(daemon, call).barge_ins == 0
            assert INTERRUPTED not in str(handler_of(daemon, call).history.messages())


INTERRUPTED = "[interrupted by the caller]"
