"""Partial transcripts dropped in the reader lose nothing that matters.

While nothing of ours plays, a DETECTED_SPEECH partial (mod_vosk: one every ~200 ms per caller,
twice while parked) is absorbed by its call in the reader: no dedup entry, no queue, no greenlet
switch, no log line. What it still does: move the silence clock. What still works: barge-in on
a partial while our answer plays, a final transcript after a flood of partials, an agent named
by an event. Real bytes through the simulator, the real daemon.
"""

from __future__ import annotations

import gevent
from structlog.testing import capture_logs

from harness import (TurnLog, broadcasts, captured_event, routed_events, running_daemon, settings_for, wait_heard,
                     wait_until)
from llm_fakes import FakeLlmServer
from ivr_daemon.esl.protocol import FrameParser, build_plain_event, split_plain_event
from ivr_daemon.replay.simulator import FreeswitchSimulator
THREE = "We open at nine. Saturdays from ten. Goodbye for now."
PARTIAL_CAPTURE = "41_event_plain_DETECTED_SPEECH_detected-partial-speech.txt"


AGENTS = """
default_agent = "reception"

[agents.reception]
greeting = ""

[agents.sales]
greeting = ""
system_prompt = "You sell things."
"""


def handler_of(daemon, call):
    return daemon.router.calls[call].handler


def paths_of(sim, call) -> list[str]:
    return [line.split()[3] for line in broadcasts(sim, call)]


def phrase_path(daemon, text: str) -> str:
    return str(daemon.flow.by_agent["default"].pinned.path_for(text))


def partial_frame(call: str, text: str, sequence: int, **extra: str) -> bytes:
    """The captured partial, for this call, with its own Event-Sequence (and extra headers)."""
    frame = captured_event(PARTIAL_CAPTURE, text, Unique_ID=call, Channel_Call_UUID=call, Caller_Unique_ID=call,
                           Event_Sequence=str(sequence))
    if not extra:
        return frame
    pairs, body = split_plain_event(FrameParser().feed(frame)[0].body)
    return build_plain_event([*pairs, *extra.items()], body)


def test_a_thousand_partials_are_absorbed_and_the_final_transcript_still_starts_a_turn(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("ollama", replies="We open at nine.") as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            wait_until(lambda: call in daemon.router.calls)
            router = daemon.router
            routed, remembered, absorbed = router.events_routed, len(router.dedup), router.events_absorbed
            with capture_logs() as logs:
                for i in range(1000):
                    sim.speak(call, f"when do you {i}", final=False)  # twice each: the leg is parked
                wait_until(lambda: router.events_absorbed == absorbed + 2000)
            # None reached the dedup, the queue (events_routed counts puts) or a log line.
            assert router.events_routed == routed and len(router.dedup) == remembered
            assert router.calls[call].queue.empty()
            assert not [line for line in logs if not line["event"].startswith("sim_")]
            sim.speak(call, "when do you open")
            [turn] = turns.wait(1, call)
            assert turn.transcript == "when do you open" and turn.reply == "We open at nine."
            assert [m["content"] for m in llm.requests[0]["messages"][1:]] == ["when do you open"]
            assert router.events_routed == routed + 1  # the final (its copy was a duplicate)


def test_a_partial_while_the_answer_plays_still_barges_in_and_idle_ones_are_absorbed_again(tmp_path):
    with FakeLlmServer("ollama", replies=[THREE, "Okay."]) as llm, \
            FreeswitchSimulator(playback_speed=1.0, playback_gap_s=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            wait_until(lambda: call in daemon.router.calls)
            for i in range(200):
                sim.speak(call, f"when do {i}", final=False)
            wait_until(lambda: daemon.router.events_absorbed == 400)
            sim.speak(call, "when do you open")
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 10)
            sim.speak(call, "hold on", final=False)  # while sentence 1 plays: not absorbed
            sim.wait_for_command(f"api uuid_break {call} all", 5)
            assert handler_of(daemon, call).barge_ins == 1
            assert daemon.router.events_absorbed == 400
            # Nothing plays any more: the caller's next partials are absorbed, no second break.
            wait_until(lambda: not handler_of(daemon, call).playing)
            for i in range(10):
                sim.speak(call, f"hold on a {i}", final=False)
            wait_until(lambda: daemon.router.events_absorbed >= 410)
            assert handler_of(daemon, call).barge_ins == 1
            assert sum(c.line.startswith("api uuid_break") for c in sim.commands) == 1
            assert len(llm.requests) == 1


def test_the_copy_of_an_absorbed_partial_is_still_a_copy_once_the_answer_plays(tmp_path):
    # While parked FreeSWITCH sends each partial twice, the copy a little later (capture
    # 80_plain): if our answer starts in between, the copy must not barge in on it.
    with FakeLlmServer("ollama", replies=[THREE, "Okay."]) as llm, \
            FreeswitchSimulator(playback_speed=1.0, playback_gap_s=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            wait_until(lambda: call in daemon.router.calls)
            earlier = partial_frame(call, "when do you", 90_001)
            sim.send_event_frame(earlier)
            wait_until(lambda: daemon.router.events_absorbed == 1)
            sim.speak(call, "when do you open")
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 10)
            routed = routed_events(daemon)
            sim.send_event_frame(earlier)  # its copy, now that the answer plays
            wait_until(lambda: any(e.sequence == 90_001 for e in routed))
            assert handler_of(daemon, call).barge_ins == 0 and daemon.router.dedup.dropped >= 1
            sim.send_event_frame(partial_frame(call, "wait", 90_002))  # new speech does barge in
            sim.wait_for_command(f"api uuid_break {call} all", 5)
            assert handler_of(daemon, call).barge_ins == 1


def test_absorbed_partials_restart_the_silence_clock_and_reset_the_reprompt_count(tmp_path):
    with FakeLlmServer("ollama", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, GREETING="Hello.",
                                SILENCE_TIMEOUT_S="1.5", MAX_REPROMPTS="1", REPROMPT_PHRASE="Are you there?",
                                GOODBYE_PHRASE="Goodbye then.")
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            wait_heard(sim, call)  # the greeting: from now on the clock runs
            greeting = phrase_path(daemon, "Hello.")
            reprompt = phrase_path(daemon, "Are you there?")
            # The caller talks for 3 s (twice the timeout), a partial every 0.1 s: no re-prompt.
            position = sim.commands_received
            for i in range(30):
                last = sim.speak(call, f"well I {i}", final=False)
                gevent.sleep(0.1)  # the caller's pace, not a wait for the daemon
            assert daemon.router.events_absorbed >= 60
            assert paths_of(sim, call) == [greeting]
            said = sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {call} "), 10,
                                        start_index=position, consume=False)
            assert said.line.split()[3] == reprompt
            assert said.t_monotonic - sim.written_at(last) >= 1.5  # counted from the last partial
            wait_heard(sim, call)
            assert handler_of(daemon, call).reprompts == 1
            # One re-prompt is all MAX_REPROMPTS allows, but speech (absorbed) resets the count:
            # the next silence gets a re-prompt again, not the goodbye.
            sim.speak(call, "umm", final=False)
            wait_until(lambda: handler_of(daemon, call).reprompts == 0)
            wait_until(lambda: len(broadcasts(sim, call)) == 3, 10)
            assert paths_of(sim, call) == [greeting, reprompt, reprompt]
            assert not llm.requests


def test_a_partial_that_names_the_agent_is_not_absorbed_before_the_agent_is_known(tmp_path):
    agents = tmp_path / "agents.toml"
    agents.write_text(AGENTS)
    with FakeLlmServer("ollama", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                AGENTS_FILE=str(agents))
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()  # no ivr_agent: the default agent, and none named
            wait_until(lambda: call in daemon.router.calls)
            assert handler_of(daemon, call).agent_name is None
            sim.send_event_frame(partial_frame(call, "hello", 90_001, variable_ivr_agent="sales"))
            wait_until(lambda: handler_of(daemon, call).agent_name == "sales")
            assert handler_of(daemon, call).agent.name == "sales" and daemon.router.events_absorbed == 0
            sim.send_event_frame(partial_frame(call, "hello", 90_002, variable_ivr_agent="reception"))
            wait_until(lambda: daemon.router.events_absorbed == 1)  # known now: nothing more to learn
            assert handler_of(daemon, call).agent_name == "sales"
