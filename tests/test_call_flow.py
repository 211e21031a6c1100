"""The whole call on the simulator: agents, greeting, silence, goodbye, DTMF and transfers."""

from __future__ import annotations

import uuid as uuid_lib

import pytest
from structlog.testing import capture_logs

from harness import broadcasts, captured_event, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.replay.simulator import FreeswitchSimulator

AGENTS = """
default_agent = "reception"

[agents.reception]
greeting = "Hello, this is reception."
goodbye_phrase = "Goodbye from reception."
transfer_phrase = "Transferring you now."

[agents.reception.transfer_targets]
sales = "2000 XML default"
operator = "1000 XML default"

[agents.reception.dtmf]
"0" = "transfer:operator"
"9" = "hangup"
"*" = "repeat"
"2" = "llm"

[agents.sales]
greeting = "Hi, sales here."
system_prompt = "You sell things."
"""


@pytest.fixture
def agents_file(tmp_path):
    path = tmp_path / "agents.toml"
    path.write_text(AGENTS)
    return str(path)


def flow_settings(sim, tmp_path, llm, **env):
    return settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url, **env)


def paths_of(sim, call) -> list[str]:
    return [line.split()[3] for line in broadcasts(sim, call)]


def phrase_path(daemon, agent: str, text: str) -> str:
    return str(daemon.flow.by_agent[agent].pinned.path_for(text))


def handler_of(daemon, call):
    return daemon.router.calls[call].handler


def test_the_ivr_leg_is_greeted_by_its_agent_and_the_greeting_starts_the_history(tmp_path, agents_file):
    with FakeLlmServer("ollama", replies="We sell everything.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = flow_settings(sim, tmp_path, llm, AGENTS_FILE=agents_file)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call(variables={"ivr_agent": "sales"})
            wait_until(lambda: broadcasts(sim, call))
            assert paths_of(sim, call) == [phrase_path(daemon, "sales", "Hi, sales here.")]
            wait_heard(sim, call)
            sim.speak(call, "what do you sell")
            wait_until(lambda: len(broadcasts(sim, call)) == 2)
            sent = llm.requests[0]["messages"]
            assert sent[0] == {"role": "system", "content": "You sell things."}  # the sales agent's prompt
            assert sent[1:] == [{"role": "assistant", "content": "Hi, sales here."},
                                {"role": "user", "content": "what do you sell"}]


def test_only_the_leg_that_runs_speech_detection_is_greeted(tmp_path, agents_file):
    with FakeLlmServer("ollama", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = flow_settings(sim, tmp_path, llm, AGENTS_FILE=agents_file)
        with running_daemon(sim, settings) as daemon:
            # A PBX parking a call for its own reasons: neither ivr_agent nor fire_asr_events.
            pbx_call = str(uuid_lib.uuid4())
            sim.send_event_frame(captured_event("dtmf/event_plain_CHANNEL_PARK_loopback_a_leg.txt", Unique_ID=pbx_call,
                                                transform=lambda k, v: None if k == "variable_ivr_agent" else v))
            call = sim.new_call(variables={"ivr_agent": "sales"}, loopback_a_leg=True)
            wait_until(lambda: broadcasts(sim, call))
            a_leg = next(uuid for uuid in daemon.router.calls if uuid not in (call, pbx_call))
            wait_until(lambda: pbx_call in daemon.router.calls)
            assert handler_of(daemon, a_leg).agent_name == "sales"  # it has the variable, yet no greeting
            assert broadcasts(sim, a_leg) == [] and broadcasts(sim, pbx_call) == []
            assert len(broadcasts(sim)) == 1


def test_an_unknown_agent_gets_the_default_and_a_warning(tmp_path, agents_file):
    with FakeLlmServer("ollama", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = flow_settings(sim, tmp_path, llm, AGENTS_FILE=agents_file)
        with running_daemon(sim, settings) as daemon:
            with capture_logs() as logs:
                call = sim.new_call(variables={"ivr_agent": "nobody"})
                wait_until(lambda: broadcasts(sim, call))
            assert paths_of(sim, call) == [phrase_path(daemon, "reception", "Hello, this is reception.")]
            assert any(line["event"] == "unknown_agent" and line["agent"] == "nobody" and line["call_uuid"] == call
                       for line in logs)


def test_barge_in_over_the_greeting_keeps_only_what_was_heard(tmp_path):
    with FakeLlmServer("ollama", replies="Sure.") as llm, \
            FreeswitchSimulator(playback_speed=1.0, playback_gap_s=0.02) as sim:
        settings = flow_settings(sim, tmp_path, llm, GREETING="Hello and welcome to the long greeting of our company.")
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 10)
            sim.speak(call, "operator", final=False)
            sim.wait_for_command(f"api uuid_break {call} all", 5)
            sim.speak(call, "i want the operator")
            wait_until(lambda: llm.requests)
            assert llm.requests[0]["messages"][1:] == [
                {"role": "assistant", "content": "[interrupted by the caller]"},
                {"role": "user", "content": "i want the operator"}]


def test_a_hangup_during_the_greeting_ends_the_call_cleanly(tmp_path):
    with FakeLlmServer("ollama", replies="Sure.") as llm, FreeswitchSimulator(playback_speed=1.0) as sim:
        settings = flow_settings(sim, tmp_path, llm, GREETING="Hello and welcome to the long greeting of our company.",
                                 SILENCE_TIMEOUT_S="0.2")
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 10)
            sim.hangup(call)
            wait_until(lambda: call not in daemon.router.calls)
            assert len(broadcasts(sim, call)) == 1 and not llm.requests
            assert not any(c.line.startswith(f"api uuid_kill {call}") for c in sim.commands)


def test_silence_reprompts_twice_then_says_goodbye_and_hangs_up(tmp_path):
    with FakeLlmServer("ollama", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = flow_settings(sim, tmp_path, llm, GREETING="Hello.", SILENCE_TIMEOUT_S="0.3", MAX_REPROMPTS="2",
                                 REPROMPT_PHRASE="Are you there?", GOODBYE_PHRASE="Goodbye then.")
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            kill = sim.wait_for_command(f"api uuid_kill {call} NORMAL_CLEARING", 15)
            phrases = ["Hello.", "Are you there?", "Are you there?", "Goodbye then."]
            assert paths_of(sim, call) == [phrase_path(daemon, "default", p) for p in phrases]
            # The hangup comes after the goodbye was heard to its end.
            goodbye_stop = sim.wait_for_event(lambda e: e.name == "PLAYBACK_STOP" and e.unique_id == call
                                              and e.get("Playback-File-Path") == paths_of(sim, call)[-1], 5)
            assert goodbye_stop.t_monotonic <= kill.t_monotonic
            wait_until(lambda: call not in daemon.router.calls)
            assert not llm.requests


def test_speech_resets_the_reprompt_count_and_the_clock_stops_while_the_llm_thinks(tmp_path):
    with FakeLlmServer("ollama", replies="A slow answer.", delay_s=1.0) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = flow_settings(sim, tmp_path, llm, GREETING="", SILENCE_TIMEOUT_S="0.4", MAX_REPROMPTS="1",
                                 REPROMPT_PHRASE="Are you there?", GOODBYE_PHRASE="Goodbye then.")
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            reprompt = phrase_path(daemon, "default", "Are you there?")
            wait_until(lambda: paths_of(sim, call) == [reprompt], 10)
            wait_heard(sim, call)
            sim.speak(call, "sorry, what are your hours")  # resets the count; the LLM takes 1 s > 0.4 s
            wait_until(lambda: len(broadcasts(sim, call)) == 2, 10)
            assert paths_of(sim, call)[1] != reprompt  # no re-prompt while the LLM was thinking
            wait_heard(sim, call)
            # Silent again: one re-prompt is allowed again before the goodbye.
            sim.wait_for_command(f"api uuid_kill {call} NORMAL_CLEARING", 10)
            assert paths_of(sim, call)[2:] == [reprompt, phrase_path(daemon, "default", "Goodbye then.")]


def test_goodbye_words_end_the_call_for_an_llm_without_tools(tmp_path):
    with FakeLlmServer("llama3", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="llama3", LLM_API_URL=llm.url,
                                GOODBYE_WORDS="goodbye, that's all", GOODBYE_PHRASE="Bye now.")
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "That's all!")
            sim.wait_for_command(f"api uuid_kill {call} NORMAL_CLEARING", 10)
            assert paths_of(sim, call) == [phrase_path(daemon, "default", "Bye now.")]
            assert not llm.requests  # nothing to ask


def test_dtmf_zero_transfers_to_the_operator_after_the_transfer_phrase(tmp_path, agents_file):
    with FakeLlmServer("ollama", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = flow_settings(sim, tmp_path, llm, AGENTS_FILE=agents_file)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call(variables={"ivr_agent": "reception"})
            wait_until(lambda: broadcasts(sim, call))
            sim.dtmf(call, "0")
            transfer = sim.wait_for_command(f"api uuid_transfer {call} 1000 XML default", 10)
            assert paths_of(sim, call)[-1] == phrase_path(daemon, "reception", "Transferring you now.")
            stop = sim.wait_for_event(lambda e: e.name == "PLAYBACK_STOP" and e.unique_id == call
                                      and e.get("Playback-File-Path") == paths_of(sim, call)[-1], 5)
            assert stop.t_monotonic <= transfer.t_monotonic
            assert sim.transfers(call) == ["1000 XML default"]
            # After the transfer the call is the switch's: no more turns.
            sim.speak(call, "hello?")
            wait_until(lambda: daemon.router.calls[call].queue.empty())
            assert not llm.requests and handler_of(daemon, call).transferred_to == "operator"


def test_dtmf_hangup_repeat_and_llm(tmp_path, agents_file):
    with FakeLlmServer("ollama", replies=["We open at nine.", "Option two is billing."]) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = flow_settings(sim, tmp_path, llm, AGENTS_FILE=agents_file, TTS_CACHE_MAX_MB="0")
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call(variables={"ivr_agent": "reception"})
            wait_until(lambda: broadcasts(sim, call))
            wait_heard(sim, call)
            sim.speak(call, "when do you open")
            wait_until(lambda: len(broadcasts(sim, call)) == 2)
            wait_heard(sim, call)
            sim.dtmf(call, "*")  # repeat
            wait_until(lambda: len(broadcasts(sim, call)) == 3)
            wait_heard(sim, call)
            sim.dtmf(call, "2")  # to the LLM
            wait_until(lambda: len(llm.requests) == 2)
            assert llm.requests[1]["messages"][-1] == {"role": "user", "content": "[the caller pressed 2]"}
            wait_until(lambda: len(broadcasts(sim, call)) == 4)
            wait_heard(sim, call)
            sim.dtmf(call, "7")  # not mapped: nothing happens
            sim.dtmf(call, "9")  # hang up
            sim.wait_for_command(f"api uuid_kill {call} NORMAL_CLEARING", 10)
            assert paths_of(sim, call)[-1] == phrase_path(daemon, "reception", "Goodbye from reception.")
            assert len(broadcasts(sim, call)) == 5 and len(llm.requests) == 2


def test_a_key_cuts_what_plays(tmp_path, agents_file):
    with FakeLlmServer("ollama", replies="A long answer that takes its time to say, really.") as llm, \
            FreeswitchSimulator(playback_speed=1.0, playback_gap_s=0.02) as sim:
        settings = flow_settings(sim, tmp_path, llm, AGENTS_FILE=agents_file)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call(variables={"ivr_agent": "reception"})
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 10)
            sim.dtmf(call, "0")
            sim.wait_for_command(f"api uuid_break {call} all", 5)
            sim.wait_for_command(f"api uuid_transfer {call} 1000 XML default", 15)


def test_operator_words_transfer_when_the_llm_has_no_tools(tmp_path):
    with FakeLlmServer("openai", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="openai", LLM_API_URL=llm.url, LLM_TOOLS="false",
                                OPERATOR_DESTINATION="1000 XML default")
        with running_daemon(sim, settings):
            call = sim.new_call()
            sim.speak(call, "what time is it")  # no operator word: a normal turn, offered no tools
            wait_until(lambda: len(broadcasts(sim, call)) == 1)
            assert "tools" not in llm.requests[0]
            wait_heard(sim, call)
            sim.speak(call, "I want to talk to a real person")
            sim.wait_for_command(f"api uuid_transfer {call} 1000 XML default", 10)
            assert len(llm.requests) == 1
