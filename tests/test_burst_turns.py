"""Turns at the same instant: a turn's first broadcast goes out before anyone's later sentences
are read (the idle lane), no sentence is lost, and barge-in still cuts a reply at any point.

The loop is kept busy by a greenlet that is ready again at every pass (as a burst of turns
keeps it), except when a reply's first sentence waits to be read (the lane's ``first`` waiters,
let go before any other): the rest of a reply then waits, and is read as soon as the loop has
nothing else to do.
"""

import gevent
import gevent.event
import pytest
from gevent.monkey import get_original

from harness import TurnLog, broadcasts, running_daemon, settings_for, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon import idle_lane as idle_lane_module
from ivr_daemon.idle_lane import IdleLane, idle_lane
from ivr_daemon.llm import paced
from ivr_daemon.llm.ollama import OllamaClient
from ivr_daemon.llm.openai import OpenAiClient
from ivr_daemon.replay.simulator import FreeswitchSimulator

release_the_gil = get_original("time", "sleep")  # blocks this thread only, holding no GIL
GIL_BREATH_S = 0.0002

THREE = "We open at nine. Saturdays from ten. Goodbye for now."
SENTENCES = ["We open at nine.", "Saturdays from ten.", "Goodbye for now."]


@pytest.fixture
def patient_lane(monkeypatch):
    """A lane of the test's own (no waiter of an earlier test in it) that waits for an idle loop
    however long the test keeps it busy (with LLM_TIMEOUT=60, which bounds a first waiter), and
    that every LLM answer goes through."""
    lane = IdleLane(max_wait_cpu_s=60.0)
    monkeypatch.setattr(idle_lane_module, "_lane", lane)
    # As in a burst of hundreds: every answer waits in the lane, however few this test awaits.
    monkeypatch.setattr(paced, "QUIET_AWAITED_ANSWERS_MAX", 0)
    return lane


def keep_the_loop_busy(until, let_first_go: bool = True) -> gevent.Greenlet:
    """A greenlet ready again at every pass of the loop until ``until()``, except while a first
    sentence waits to be read (``let_first_go``): it then waits for the lane to let that one go
    (the loop may go idle meanwhile, and the lane lets ``first`` waiters go before any other).

    Each pass it also lets go of the GIL for a moment without yielding to the loop, as a burst's
    loop does in every socket call: spinning in pure Python alone, it starved the synthesis
    threads (each of their GIL requests waited a switch interval), and a null-voice sentence took
    up to 9 s to write, past the test's 10 s wait for its broadcast."""
    lane = idle_lane()

    def spin():
        while not until():
            waiting_first = [ticket for ticket in lane._waiting_first if not ticket.is_set()]
            if waiting_first and let_first_go:
                waiting_first[0].wait()
            else:
                release_the_gil(GIL_BREATH_S)  # not a yield: the loop stays busy
                gevent.sleep(0)

    return gevent.spawn(spin)


def handler_of(daemon, call):
    return daemon.router.calls[call].handler


def expected_paths(daemon, call, sentences=SENTENCES):
    services = handler_of(daemon, call).services
    return [str(services.cache.path_for(services.tts, sentence)) for sentence in sentences]


def test_the_rest_of_a_reply_is_read_once_the_loop_is_idle_and_every_sentence_is_said(tmp_path, patient_lane):
    turns = TurnLog()
    with FakeLlmServer("openai", replies=THREE) as llm, FreeswitchSimulator(playback_speed=0.0) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="openai", LLM_API_URL=llm.url, LLM_TIMEOUT="60")
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            read_by_then = []

            def first_broadcast_out():
                if not broadcasts(sim, call):
                    return False
                read_by_then.append(handler_of(daemon, call)._reply.queued)
                return True

            sim.speak(call, "when do you open")
            keep_the_loop_busy(first_broadcast_out).join(timeout=10)
            # The whole reply was in the socket; only its first sentence had been read.
            assert read_by_then == [1] and patient_lane.overdue == 0
            [turn] = turns.wait(1, call)  # the loop went idle: the rest was read and said
            assert [line.split()[3] for line in broadcasts(sim, call)] == expected_paths(daemon, call)
            assert turn.sentences == 3 and turn.reply == THREE and not turn.interrupted
            assert handler_of(daemon, call).history.messages()[-1] == {"role": "assistant", "content": THREE}


def test_every_first_broadcast_of_a_burst_goes_out_before_any_second_sentence(tmp_path, patient_lane):
    calls_count = 6
    turns = TurnLog()
    with FakeLlmServer("openai", replies=THREE, hold_reply=True) as llm, FreeswitchSimulator(playback_speed=0.0) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="openai", LLM_API_URL=llm.url, LLM_TIMEOUT="60")
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            calls = [sim.new_call() for _ in range(calls_count)]
            for index, call in enumerate(calls):
                sim.speak(call, f"question {index}")
            wait_until(lambda: len(llm.requests) == calls_count)
            start = sim.commands_received
            read_by_then = []

            def all_first_broadcasts_out():
                if not all(broadcasts(sim, call) for call in calls):
                    return False
                read_by_then.extend(handler_of(daemon, call)._reply.queued for call in calls)
                return True

            busy = keep_the_loop_busy(all_first_broadcasts_out)
            llm.release_reply.set()  # every reply at once, each whole in its socket
            busy.join(timeout=20)
            assert read_by_then == [1] * calls_count and patient_lane.overdue == 0
            turns.wait(calls_count)
            wire = [c.line for c in sim.commands[start:] if c.line.startswith("api uuid_broadcast ")]
            firsts = {call: expected_paths(daemon, call)[0] for call in calls}
            # The first calls_count broadcasts on the wire are the calls' first sentences, one each.
            assert sorted(line.split()[2] for line in wire[:calls_count]) == sorted(calls)
            assert all(line.split()[3] == firsts[line.split()[2]] for line in wire[:calls_count])
            for call in calls:  # and every call said its whole reply, in order
                assert [line.split()[3] for line in broadcasts(sim, call)] == expected_paths(daemon, call)
            assert sorted(t.sentences for t in turns.results) == [3] * calls_count


def test_barge_in_while_the_rest_of_the_reply_waits_for_the_loop_cuts_it(tmp_path, patient_lane):
    turns = TurnLog()  # a turn cut short reports nothing: only the next one
    with FakeLlmServer("openai", replies=[THREE, "Sure."]) as llm, FreeswitchSimulator(playback_speed=1.0) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="openai", LLM_API_URL=llm.url, LLM_TIMEOUT="60")
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            sim.speak(call, "when do you open")
            broke = gevent.event.Event()
            busy = keep_the_loop_busy(broke.is_set)
            try:
                sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {call} "), 10)
                assert handler_of(daemon, call)._reply.queued == 1  # the rest waits in the lane
                sim.speak(call, "wait", final=False)  # mod_vosk's partial while sentence 1 plays
                sim.wait_for_command(f"api uuid_break {call} all", 10)
            finally:
                broke.set()
                busy.join()
            wait_until(lambda: not handler_of(daemon, call).busy)  # killed: no on_turn for it
            assert len(broadcasts(sim, call)) == 1  # nothing of the rest after the barge-in
            assert handler_of(daemon, call).history.messages()[-1]["content"] == "[interrupted by the caller]"
            assert not [ticket for ticket in (*patient_lane._waiting, *patient_lane._waiting_first) if not ticket.is_set()]
            assert patient_lane.overdue == 0
            # The next turn is read and said whole.
            sim.speak(call, "ok thanks")
            [turn] = turns.wait(1, call)
            assert turn.reply == "Sure." and len(broadcasts(sim, call)) == 2
            assert llm.requests[1]["messages"][-2]["content"] == "[interrupted by the caller]"


@pytest.mark.parametrize("provider, client_class", [("openai", OpenAiClient), ("ollama", OllamaClient)])
def test_an_llm_answer_is_read_only_once_the_loop_is_idle(patient_lane, provider, client_class):
    with FakeLlmServer(provider, replies=THREE, stream_gap_s=0.002) as llm:  # deltas a loop pass or more apart
        client = client_class(llm.url, "llama3", 60)
        deltas, whole = [], []
        reader = gevent.spawn(lambda: deltas.extend(client.stream([{"role": "user", "content": "hours?"}])))
        answered = []

        def server_done():  # the whole answer is in the client's socket
            if llm.stream_outcomes != ["complete"]:
                return False
            answered.append(list(deltas))  # what the client had read of it by then
            return True

        keep_the_loop_busy(server_done, let_first_go=False).join(timeout=10)
        reader.join(timeout=10)
        assert answered == [[]]  # sent at once, answered at once, read only once the loop was idle
        assert "".join(deltas) == THREE and patient_lane.let_go >= 1 and patient_lane.overdue == 0
        whole.append(client.complete([{"role": "user", "content": "hours?"}]))  # not streamed: the same way
        assert whole == [THREE]
