"""FIRST_CHUNK=clause on the simulator: a streamed reply's first broadcast is its first clause.

Behaviour only (which broadcasts, in which order, what the history keeps); how much sooner the
first audio comes is measured by ``bench/latency.py --only first-clause``.
"""

from gevent.monkey import get_original

from harness import TurnLog, broadcasts, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts.null import NullEngine

REPLY = "We open at nine tomorrow, and we close at six tonight. Goodbye for now."
CHUNKS = ["We open at nine tomorrow,", "and we close at six tonight.", "Goodbye for now."]
# Deltas are word-sized ("We", " open", ...): after 7 the clause and the next word have come.
HOLD_AFTER_CLAUSE = 7


def handler_of(daemon, call):
    return daemon.router.calls[call].handler


def history_of(daemon, call):
    return [(m["role"], m["content"]) for m in handler_of(daemon, call).history.messages()[1:]]


def paths_of(daemon, call, texts):
    handler = handler_of(daemon, call)
    return [str(handler.services.cache.path_for(handler.services.tts, text)) for text in texts]


def test_the_first_clause_is_broadcast_before_its_sentence_is_written_and_the_history_keeps_the_whole_reply(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("ollama", replies=REPLY, stream_hold_after=HOLD_AFTER_CLAUSE) as llm, \
            FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        assert settings.first_chunk == "clause"  # the default
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            sim.speak(call, "when are you open")
            first = sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {call} "), 10)
            # The first sentence is not finished yet: its first clause is already on its way.
            assert llm.deltas_sent == HOLD_AFTER_CLAUSE and not llm.release_stream.is_set()
            expected = paths_of(daemon, call, CHUNKS)
            assert first.line.split()[3] == expected[0]
            llm.release_stream.set()
            wait_until(lambda: len(broadcasts(sim, call)) == 3)
            wait_heard(sim, call, 3)
            assert [line.split()[3] for line in broadcasts(sim, call)] == expected
            assert sim.played_files(call) == expected
            [turn] = turns.wait(1, call)
            assert turn.reply == " ".join(CHUNKS) and not turn.interrupted
            assert history_of(daemon, call) == [("user", "when are you open"), ("assistant", REPLY)]


def test_max_reply_sentences_counts_the_first_clause_and_its_rest_as_one_sentence(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("ollama", replies=REPLY) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, MAX_REPLY_SENTENCES="1")
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            sim.speak(call, "when are you open")
            [turn] = turns.wait(1, call)
            assert [line.split()[3] for line in broadcasts(sim, call)] == paths_of(daemon, call, CHUNKS[:2])
            # What the caller is told: the whole first sentence, not a runaway model's rest.
            assert history_of(daemon, call)[-1] == ("assistant", "We open at nine tomorrow, and we close at six tonight.")


def test_first_chunk_sentence_broadcasts_whole_sentences_only(tmp_path):
    with FakeLlmServer("ollama", replies=REPLY) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, FIRST_CHUNK="sentence")
        turns = TurnLog()
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            sim.speak(call, "when are you open")
            turns.wait(1, call)
            sentences = ["We open at nine tomorrow, and we close at six tonight.", "Goodbye for now."]
            assert [line.split()[3] for line in broadcasts(sim, call)] == paths_of(daemon, call, sentences)


def test_a_batch_reply_stays_one_broadcast(tmp_path):
    with FakeLlmServer("ollama", replies=REPLY) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, LLM_STREAM="false")
        turns = TurnLog()
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            sim.speak(call, "when are you open")
            turns.wait(1, call)
            assert [line.split()[3] for line in broadcasts(sim, call)] == paths_of(daemon, call, [REPLY])


def test_barge_in_after_the_first_clause_played_keeps_that_clause_as_heard(tmp_path):
    with FakeLlmServer("ollama", replies=[REPLY, "Sure, go ahead."]) as llm, \
            FreeswitchSimulator(playback_speed=0.5, playback_gap_s=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "when are you open")
            # The clause played to the end, the rest of its sentence has started.
            stop = sim.wait_for_event(lambda e: e.name == "PLAYBACK_STOP" and e.unique_id == call, 10)
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call
                               and e.sequence > stop.sequence, 10)
            sim.speak(call, "hold", final=False)
            sim.wait_for_command(f"api uuid_break {call} all", 5)
            wait_until(lambda: sim.playing(call) is None)
            status = {r.path: r.status for r in sim.playback_log(call)}
            assert [status.get(path) for path in paths_of(daemon, call, CHUNKS)] == ["done", "break", "flushed"]
            heard = "We open at nine tomorrow, [interrupted by the caller]"
            assert history_of(daemon, call) == [("user", "when are you open"), ("assistant", heard)]
            sim.speak(call, "hold on a second")
            wait_until(lambda: len(llm.requests) == 2)
            assert llm.requests[1]["messages"][2]["content"] == heard


class GatedEngine(NullEngine):
    """Records the reply's chunks it is asked to say (not the daemon's own phrases, pinned at
    start-up); the first clause's synthesis waits for ``gate``."""

    def __init__(self):
        super().__init__()
        self.texts = []
        self.gate = get_original("threading", "Event")()  # waited on by a native worker thread

    def synthesize(self, text):
        if text in CHUNKS:
            self.texts.append(text)
        if text == CHUNKS[0]:
            assert self.gate.wait(10)
        return super().synthesize(text)


def test_the_rest_is_synthesized_only_once_the_first_clause_is(tmp_path):
    engine = GatedEngine()
    with FakeLlmServer("ollama", replies=REPLY) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_CACHE_MAX_MB="0")
        turns = TurnLog()
        with running_daemon(sim, settings, tts=engine, on_turn=turns) as daemon:
            call = sim.new_call()
            sim.speak(call, "when are you open")
            def reply():
                routed = daemon.router.calls.get(call)
                return routed.handler._reply if routed is not None else None

            wait_until(lambda: reply() is not None and reply().llm_done and engine.texts)
            # The whole reply is written and queued (3 chunks): only the clause is being synthesized,
            # the other two wait for it to land (they are not in the pool at all).
            assert reply().queued == 3
            assert [g.dead for g in reply().waiting_syntheses] == [False, False]
            assert engine.texts == [CHUNKS[0]] and broadcasts(sim, call) == []
            engine.gate.set()
            wait_until(lambda: len(broadcasts(sim, call)) == 3)
            turns.wait(1, call)
            assert engine.texts == CHUNKS
