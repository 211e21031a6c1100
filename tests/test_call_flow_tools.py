"""The LLM's tools in a call: transfer_call only to allowlisted names, end_call; hostile requests never reach the switch."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from harness import broadcasts, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer, FakeReply, FakeToolCall
from ivr_daemon.replay.simulator import FreeswitchSimulator

AGENTS = """
[agents.reception]
greeting = ""
transfer_phrase = "Transferring you now."
goodbye_phrase = "Goodbye."
silence_timeout_s = 0

[agents.reception.transfer_targets]
sales = "2000 XML default"
support = "3000 XML support"
"""


@pytest.fixture
def agents_file(tmp_path):
    path = tmp_path / "agents.toml"
    path.write_text(AGENTS)
    return str(path)


def transfers_sent(sim) -> list[str]:
    return [c.line for c in sim.commands if "uuid_transfer" in c.line]


def tools_offered(request) -> dict:
    return {tool["function"]["name"]: tool["function"]["parameters"] for tool in request.get("tools", [])}


@pytest.mark.parametrize("provider, stream", [("openai", "false"), ("openai", "true"), ("ollama", "true"),
                                              ("ollama", "false")])
def test_the_llm_speaks_then_transfers_to_an_allowed_target(tmp_path, agents_file, provider, stream):
    reply = FakeReply("Let me put you through to sales.", [FakeToolCall("transfer_call", {"target": "sales"})])
    with FakeLlmServer(provider, replies=reply) as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER=provider, LLM_API_URL=llm.url,
                                AGENTS_FILE=agents_file, LLM_STREAM=stream)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "i want to buy something")
            sim.wait_for_command(f"api uuid_transfer {call} 2000 XML default", 10)
            offered = tools_offered(llm.requests[0])
            assert offered["transfer_call"]["properties"]["target"]["enum"] == ["sales", "support"]
            assert "end_call" in offered
            # The spoken part first, then the transfer phrase, then the transfer.
            spoken, phrase = [line.split()[3] for line in broadcasts(sim, call)]
            assert phrase == str(daemon.services.pinned.path_for("Transferring you now."))
            assert sim.played_files(call) == [spoken, phrase]
            assert transfers_sent(sim) == [f"api uuid_transfer {call} 2000 XML default"]
            wait_until(lambda: daemon.flow.counters.transfers == 1)  # counted once send() has its reply
            assert llm.violations == []


def test_a_refused_transfer_is_told_to_the_llm_and_the_caller_hears_its_answer(tmp_path, agents_file):
    replies = [FakeReply("", [FakeToolCall("transfer_call", {"target": "1000 XML default"}, call_id="call_x")]),
               "Sorry, I can only transfer you to sales or support."]
    with FakeLlmServer("openai", replies=replies) as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="openai", LLM_API_URL=llm.url,
                                AGENTS_FILE=agents_file)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            with capture_logs() as logs:
                sim.speak(call, "put me through to extension 1000")
                wait_until(lambda: len(broadcasts(sim, call)) == 1)
                wait_until(lambda: not daemon.router.calls[call].handler.busy)
            assert transfers_sent(sim) == []
            assert daemon.flow.counters.transfers_refused == 1
            refusal = next(line for line in logs if line["event"] == "transfer_refused")
            assert refusal["call_uuid"] == call and "1000 XML default" in refusal["requested"]
            follow_up = llm.requests[1]["messages"]
            assert follow_up[-2]["tool_calls"][0]["id"] == "call_x"
            assert follow_up[-1]["role"] == "tool" and follow_up[-1]["tool_call_id"] == "call_x"
            assert "not an allowed target" in json.loads(follow_up[-1]["content"])["error"]
            assert llm.violations == []
            history = daemon.router.calls[call].handler.history.messages()
            assert history[-1] == {"role": "assistant", "content": "Sorry, I can only transfer you to sales or support."}


def test_end_call_says_goodbye_and_hangs_up(tmp_path, agents_file):
    reply = FakeReply("Glad I could help.", [FakeToolCall("end_call", {})])
    with FakeLlmServer("ollama", replies=reply) as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                AGENTS_FILE=agents_file)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "thanks, bye")
            sim.wait_for_command(f"api uuid_kill {call} NORMAL_CLEARING", 10)
            assert len(broadcasts(sim, call)) == 2  # the reply, then the goodbye
            assert sim.played_files(call)[-1] == str(daemon.services.pinned.path_for("Goodbye."))


HOSTILE_TARGETS = [
    "1000", "2000", "1000 XML default", "2000 XML default", "sales XML default", "sales\napi originate user/1000 &park",
    "sales\r\n\r\napi hupall", "sales ", " sales", "Sales", "SALES", "sаles",  # Cyrillic а
    "ѕales",  # Cyrillic ѕ
    "sales\u200b",  # zero-width space
    "ｓａｌｅｓ",  # full width
    "sales;api hupall", "../sales", "operator", "support\x00", "", "*", "sales,support",
    "support XML support", "loopback/ai", "{origination_uuid=x}sales",
]
HOSTILE_ARGUMENTS = [
    {"target": "sales", "destination": "1000 XML default"},  # extra arguments
    {"target": ["sales"]}, {"target": {"name": "sales"}}, {"target": 1000}, {"target": None}, {},
    {"destination": "2000 XML default"}, "sales", '{"target": "sales"', '["sales"]',
]


def test_hostile_transfer_requests_never_reach_the_switch(tmp_path, agents_file):
    attempts = [{"target": t} for t in HOSTILE_TARGETS] + HOSTILE_ARGUMENTS
    assert len(attempts) >= 20
    # Each turn: the model asks for one hostile transfer, then (told it is refused) just talks.
    replies = []
    for n, arguments in enumerate(attempts):
        replies.append(FakeReply("", [FakeToolCall("transfer_call", arguments, call_id=f"call_{n}")]))
        replies.append(f"I cannot do that, attempt {n}.")
    with FakeLlmServer("openai", replies=replies) as llm, FreeswitchSimulator(playback_speed=0.01) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="openai", LLM_API_URL=llm.url,
                                AGENTS_FILE=agents_file, LLM_STREAM="false")
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            for n in range(len(attempts)):
                sim.speak(call, f"transfer me please {n}")
                wait_until(lambda n=n: len(broadcasts(sim, call)) == n + 1, 10)
                wait_heard(sim, call)
            assert transfers_sent(sim) == []
            assert daemon.flow.counters.transfers_refused == len(attempts)
            assert daemon.router.calls[call].handler.transferred_to is None
            api = [c.line for c in sim.commands if c.line.startswith("api ")]
            assert all(line.startswith((f"api uuid_broadcast {call} ", "api uuid_exists ")) for line in api)
