"""Tool calls in fixtures: the @tool / '< ' syntax, recording them, replaying them, and the two LLM-transfer fixtures."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import wait_heard
from llm_fakes import FakeLlmServer, FakeReply, FakeToolCall
from ivr_daemon.llm.base import LlmUnavailable, ToolCall, ToolSpec
from ivr_daemon.llm.openai import OpenAiClient
from ivr_daemon.replay.fixture import (FixtureError, FixtureFrame, LlmReply, ToolResult, load_fixture, render_fixture)
from ivr_daemon.replay.recorder import Recorder, RecordingLlm, record_scripted_calls
from ivr_daemon.replay.replayer import FixtureLlm

FIXTURES = Path(__file__).parent / "fixtures"
ALLOWED = FIXTURES / "llm_transfer_allowed.esl"
REFUSED = FIXTURES / "llm_transfer_refused.esl"
TOOLS = (ToolSpec("transfer_call", "transfer", {"type": "object", "properties": {}}),
         ToolSpec("end_call", "hang up", {"type": "object", "properties": {}}))
SYSTEM = {"role": "system", "content": "be brief"}


def run_replay(*args, env_file=os.devnull):
    return subprocess.run([sys.executable, "-m", "ivr_daemon", "--env-file", str(env_file), "replay", *map(str, args)],
                          capture_output=True, text=True, timeout=180)


def call(name, raw, call_id="call_1"):
    from ivr_daemon.llm.base import parse_tool_arguments

    return ToolCall(name, parse_tool_arguments(raw), raw, call_id)


def write_and_load(tmp_path, timeline):
    path = tmp_path / "tools.esl"
    data = render_fixture([*timeline, FixtureFrame(0.0, b"x", 0, raw=True)])
    path.write_bytes(data)
    return data, load_fixture(path)


# -- the syntax -------------------------------------------------------------------------------

def test_a_tool_call_block_reads_as_written(tmp_path):
    path = tmp_path / "f.esl"
    path.write_text('@fixture v1\n'
                    '@llm history=1 tools=transfer_call,end_call\n'
                    '> can I talk to sales\n'
                    'Let me put you through.\n'
                    '@tool transfer_call id=call_7 {"target": "sales"}\n'
                    '@end\n'
                    '@llm history=3 tools=transfer_call,end_call\n'
                    '< transfer_call {"error": "Transfer refused"}\n'
                    'Sorry.\n'
                    '@end\n')
    first, second = load_fixture(path).llm_replies
    assert (first.transcript, first.reply, first.history, first.tools) == (
        "can I talk to sales", "Let me put you through.", 1, ("transfer_call", "end_call"))
    assert first.tool_calls == (ToolCall("transfer_call", {"target": "sales"}, '{"target": "sales"}', "call_7"),)
    assert first.tool_results == ()
    assert (second.transcript, second.reply, second.history) == ("", "Sorry.", 3)
    assert second.tool_results == (ToolResult("transfer_call", '{"error": "Transfer refused"}'),)
    assert second.tool_calls == ()
    assert path.read_bytes() == render_fixture(load_fixture(path).timeline)


ODD_CALLS = [
    call("transfer_call", '{"target": "sales"}'),
    call("end_call", ""),                                   # no arguments at all
    call("end_call", "{}", call_id=""),                     # an id-less call, as a person may write it
    call("transfer_call", '{\n  "target": "sales"\n}'),     # pretty-printed across lines
    call("transfer_call", ' {"target": "sales"} '),         # blanks around
    call("transfer_call", '"sales"'),                       # a bare JSON string: refused by the daemon
    call("transfer_call", 'raw="x"'),                       # looks like the escape
    call("transfer_call", "id=5 and more"),                 # looks like an id
    call("transfer call", '{"target": "sales"}', call_id="id with spaces"),  # names that are not words
    call('"quoted"', "{}", call_id='"q"'),
    call("transfer_call", '{"target": "s\u00e4les \u2028 \\u0000"}\r'),
]


@pytest.mark.parametrize("tool_call", ODD_CALLS, ids=range(len(ODD_CALLS)))
def test_any_tool_call_survives_render_and_load(tmp_path, tool_call):
    reply = LlmReply("hi", "Text.", None, 0, 0.0, 0, tools=("transfer_call", "end_call"), tool_calls=(tool_call,))
    data, fixture = write_and_load(tmp_path, [reply])
    loaded, = fixture.llm_replies
    assert loaded.tool_calls == (tool_call,)
    assert render_fixture(fixture.timeline) == data  # and renders to the same bytes again


def test_a_plain_call_is_one_readable_line(tmp_path):
    reply = LlmReply("hi", "Text.", None, 0, 0.0, 0, tools=("transfer_call",),
                     tool_calls=(call("transfer_call", '{"target": "sales"}'), call("end_call", "")))
    data, _ = write_and_load(tmp_path, [reply])
    assert (b'@llm history=0 tools=transfer_call\n> hi\nText.\n'
            b'@tool transfer_call id=call_1 {"target": "sales"}\n@tool end_call id=call_1 raw=""\n@end\n') in data


@pytest.mark.parametrize("reply", [
    # A tool round with two results, one of them not a plain line.
    LlmReply("", "Sorry.", None, 5, 0.0, 0, tools=("transfer_call",),
             tool_results=(ToolResult("transfer_call", '{"error": "no"}'), ToolResult("odd name", "two\nlines"))),
    # Only tool calls, no words.
    LlmReply("bye", "", None, 2, 0.0, 0, tools=("end_call",), tool_calls=(call("end_call", "{}"),)),
    # A tool round that failed, and one that broke off after a call.
    LlmReply("", None, "timeout", 3, 0.0, 0, tools=("end_call",), tool_results=(ToolResult("end_call", "ok"),)),
    LlmReply("hi", "One. Tw", None, 0, 0.0, 0, "unavailable", ("end_call",), (call("end_call", "{}"),)),
])
def test_tool_rounds_and_tool_only_replies_survive_render_and_load(tmp_path, reply):
    data, fixture = write_and_load(tmp_path, [reply])
    assert [dataclasses.replace(r, line_no=0) for r in fixture.llm_replies] == [reply]
    assert render_fixture(fixture.timeline) == data


@pytest.mark.parametrize("text, line, words", [
    ("@llm\n> hi\n@tool transfer_call id=c {}\nmore text\n@end\n", 5, "text after a @tool line"),
    ("@llm\n> hi\n@tool \"unclosed {}\n@end\n", 4, "@tool: a quoted name"),
    ("@llm\n> hi\n@tool end_call id=c raw=123\n@end\n", 4, "raw= needs one JSON string"),
    ("@llm\n> hi\n@tool end_call\n@end\n", 4, "nothing after the name"),
    ("@llm tools=a;b\n> hi\nx\n@end\n", 2, "tools= needs tool names"),
    ("@llm\n< \n", 3, "'< ' line: no name"),
    ("@llm\nneither\n", 3, "'< <tool> <result>'"),
])
def test_bad_tool_lines_name_the_line(tmp_path, text, line, words):
    path = tmp_path / "bad.esl"
    path.write_text("@fixture v1\n" + text)
    with pytest.raises(FixtureError) as caught:
        load_fixture(path)
    assert caught.value.line_no == line and words in str(caught.value), str(caught.value)


LIBRARY_WITHOUT_TOOLS = sorted(set(FIXTURES.glob("*.esl")) - {ALLOWED, REFUSED})


@pytest.mark.parametrize("path", LIBRARY_WITHOUT_TOOLS, ids=[p.stem for p in LIBRARY_WITHOUT_TOOLS])
def test_the_fixtures_recorded_without_tools_read_as_before_and_render_byte_for_byte(path):
    fixture = load_fixture(path)
    assert fixture.llm_replies or fixture.expected
    assert not fixture.offers_tools and not FixtureLlm(fixture.llm_replies).supports_tools
    assert all(not r.tool_calls and not r.tool_results for r in fixture.llm_replies)
    assert fixture.render() == path.read_bytes()  # read and written again, byte for byte


# -- the replay's LLM -------------------------------------------------------------------------

TRANSFER = call("transfer_call", '{"target": "billing"}', call_id="call_9")
ASKED = [SYSTEM, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "billing please"}]
ROUND = [*ASKED, {"role": "assistant", "content": "One moment.", "tool_calls": [TRANSFER]},
         {"role": "tool", "tool_call_id": "call_9", "name": "transfer_call", "content": '{"error": "refused"}'}]
RECORDED = [
    LlmReply("billing please", "One moment.", None, 1, 0.0, 10, tools=("transfer_call", "end_call"),
             tool_calls=(TRANSFER,)),
    LlmReply("", "Sorry, I cannot.", None, 3, 0.0, 20, tools=("transfer_call", "end_call"),
             tool_results=(ToolResult("transfer_call", '{"error": "refused"}'),)),
]


def test_the_replay_llm_streams_the_recorded_tool_calls_after_the_text():
    llm = FixtureLlm(RECORDED)
    assert llm.supports_tools
    assert list(llm.stream(ASKED, TOOLS)) == ["One moment.", TRANSFER]
    assert list(llm.stream(ROUND, TOOLS)) == ["Sorry, I cannot."]  # the tool round, matched by its results
    assert llm.problems == []


def test_the_replay_llm_answers_respond_with_the_recorded_tool_calls():
    llm = FixtureLlm(RECORDED)
    assert llm.respond(ASKED, TOOLS) == ("One moment.", [TRANSFER])
    assert llm.respond(ROUND, TOOLS) == ("Sorry, I cannot.", [])
    assert llm.problems == []


def test_a_hand_written_call_without_an_id_gets_one():
    reply = LlmReply("hi", "", None, None, 0.0, 0, tools=("end_call",), tool_calls=(call("end_call", "{}", ""),))
    got, = FixtureLlm([reply]).respond([SYSTEM, {"role": "user", "content": "hi"}], TOOLS[1:])[1]
    assert got.name == "end_call" and got.call_id


def test_the_replay_llm_reports_other_tools_other_results_and_other_history():
    llm = FixtureLlm(RECORDED)
    list(llm.stream(ASKED, TOOLS[1:]))  # transfer_call not offered
    assert llm.problems == ["line 10: the LLM request for 'billing please' offered the tools end_call,"
                            " the fixture expects transfer_call, end_call"]
    other_result = [*ROUND[:-1], {**ROUND[-1], "content": '{"error": "another reason"}'}]
    with pytest.raises(LlmUnavailable):
        list(llm.stream(other_result, TOOLS))
    assert "the tool results transfer_call '{\"error\": \"another reason\"}'" in llm.problems[-1]
    list(llm.stream([SYSTEM, *ROUND[2:]], TOOLS))  # the greeting missing from the history
    assert llm.problems[-1].startswith("line 20: the LLM request for the tool results transfer_call")
    assert "carried 2 earlier messages, the fixture expects history=3" in llm.problems[-1]


def test_a_fixture_without_tools_gives_a_replay_llm_without_tools():
    llm = FixtureLlm([LlmReply("hi", "Hello.", None, 0, 0.0, 0)])
    assert not llm.supports_tools
    assert list(llm.stream([SYSTEM, {"role": "user", "content": "hi"}])) == ["Hello."]
    assert llm.problems == []


# -- recording --------------------------------------------------------------------------------

def scripted(request):
    if request["messages"][-1]["role"] == "tool":
        return FakeReply("Sorry, I cannot.")
    return FakeReply("One moment.", [FakeToolCall("transfer_call", {"target": "billing"}, call_id="call_9")])


@pytest.mark.parametrize("streamed", [True, False])
def test_the_recording_llm_notes_tool_calls_and_tool_rounds(streamed):
    recorder = Recorder()
    with FakeLlmServer("openai", replies=scripted) as server:
        llm = RecordingLlm(OpenAiClient(server.url, "m", timeout_s=5), recorder)
        assert llm.supports_tools

        def ask(messages):
            if not streamed:
                return llm.respond(messages, TOOLS)
            deltas = list(llm.stream(messages, TOOLS))
            return "".join(d for d in deltas if isinstance(d, str)), [d for d in deltas if isinstance(d, ToolCall)]

        text, calls = ask(ASKED)
        assert ask(ROUND) == ("Sorry, I cannot.", [])
    assert [request.get("stream", False) for request in server.requests] == [streamed, streamed]
    assert text == "One moment." and [c.name for c in calls] == ["transfer_call"]
    assert calls[0].arguments == {"target": "billing"} and calls[0].call_id == "call_9"
    noted, told = recorder.llm
    assert (noted.transcript, noted.history, noted.tools, noted.tool_calls) == (
        "billing please", 1, ("transfer_call", "end_call"), tuple(calls))
    assert (told.transcript, told.history, told.reply) == ("", 3, "Sorry, I cannot.")
    assert told.tool_results == (ToolResult("transfer_call", '{"error": "refused"}'),)
    # What it noted replays: the same requests get the same answers.
    replayed = FixtureLlm(recorder.llm)
    assert list(replayed.stream(ASKED, TOOLS)) == ["One moment.", *calls]
    assert list(replayed.stream(ROUND, TOOLS)) == ["Sorry, I cannot."] and replayed.problems == []


def test_a_recording_llm_without_tools_offers_none():
    from ivr_daemon.llm.llama3 import Llama3Client

    assert not RecordingLlm(Llama3Client("http://127.0.0.1:9/chat", "m", timeout_s=1), Recorder()).supports_tools


AGENTS = '[agents.reception.transfer_targets]\nsales = "2000 XML default"\n'


def test_a_batch_recording_with_tools_replays_green(tmp_path):
    """LLM_STREAM=false: the recording asks respond(), the replay answers respond(), both with tools."""
    (tmp_path / "agents.toml").write_text(AGENTS)
    out = tmp_path / "batch.esl"

    def scenario(sim):
        call_uuid = sim.new_call()
        sim.speak(call_uuid, "billing please")
        wait_heard(sim, call_uuid, count=2, timeout_s=30)  # "One moment." and the answer to the refusal
        sim.hangup(call_uuid)

    with FakeLlmServer("openai", replies=scripted) as server:
        record_scripted_calls(out, scenario, {"LLM_PROVIDER": "openai", "LLM_API_URL": server.url, "TTS_ENGINE": "null",
                                              "LLM_STREAM": "false", "GREETING": "", "SILENCE_TIMEOUT_S": "0",
                                              "AGENTS_FILE": str(tmp_path / "agents.toml")},
                              calls=1, playback_speed=0.1, comments=["a batch recording with tools"])
    assert [request.get("stream", False) for request in server.requests] == [False, False]
    fixture = load_fixture(out)
    assert fixture.comments[0] == "a batch recording with tools"
    assert fixture.env["AGENTS_FILE"] == "agents.toml"  # relative to the fixture: the pair can move together
    first, second = fixture.llm_replies
    assert first.tool_calls[0].arguments == {"target": "billing"} and second.tool_results[0].name == "transfer_call"
    assert [e.text.split()[1] for e in fixture.expected] == ["uuid_broadcast", "uuid_broadcast"]
    result = run_replay(out, env_file=_env_file(tmp_path, "LLM_STREAM=false\n"))
    assert result.returncode == 0, result.stdout + result.stderr


def _env_file(tmp_path, text):
    path = tmp_path / "settings.env"
    path.write_text(text)
    return path


# -- the two library fixtures ----------------------------------------------------------------

def test_the_transfer_fixtures_were_recorded_against_the_scripted_llm():
    for path in (ALLOWED, REFUSED):
        fixture = load_fixture(path)
        assert any("FakeLlmServer" in comment for comment in fixture.comments), path
        assert fixture.env["AGENTS_FILE"] == "llm_transfer.agents.toml" and fixture.offers_tools


def test_the_allowed_transfer_fixture_speaks_then_transfers_to_the_allowlisted_destination(replay):
    fixture = load_fixture(ALLOWED)
    asked, = fixture.llm_replies
    assert [(c.name, c.arguments) for c in asked.tool_calls] == [("transfer_call", {"target": "sales"})]
    result = replay(ALLOWED)
    commands = [s.line.split()[1] for s in result.sent]
    # The greeting, the LLM's words, the transfer phrase, then the transfer to sales' destination.
    assert commands == ["uuid_broadcast", "uuid_broadcast", "uuid_broadcast", "uuid_transfer"]
    assert result.sent[-1].line.endswith(" 2000 XML default")


def test_the_refused_transfer_fixture_sends_no_transfer_and_speaks_the_llms_answer(replay):
    fixture = load_fixture(REFUSED)
    asked, told = fixture.llm_replies
    assert [(c.name, c.arguments) for c in asked.tool_calls] == [("transfer_call", {"target": "billing"})]
    assert told.transcript == "" and "not an allowed target" in told.tool_results[0].content
    result = replay(REFUSED)
    assert not [s for s in result.sent if "uuid_transfer" in s.line]
    # The greeting, "One moment.", and the two sentences of the answer to the refusal.
    assert [s.line.split()[1] for s in result.sent] == ["uuid_broadcast"] * 4


def test_the_allowed_fixture_fails_when_the_allowlist_sends_sales_elsewhere(tmp_path):
    agents = tmp_path / "moved.toml"
    agents.write_text('[agents.reception.transfer_targets]\nsales = "2001 XML default"\nsupport = "3000 XML support"\n')
    result = run_replay(ALLOWED, env_file=_env_file(tmp_path, f"AGENTS_FILE={agents}\n"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "command 4 differs" in result.stdout
    assert "2000 XML default" in result.stdout and "got:      api uuid_transfer" in result.stdout
    assert "2001 XML default" in result.stdout


def test_the_allowed_fixture_fails_when_sales_is_not_allowed(tmp_path):
    agents = tmp_path / "no_sales.toml"
    agents.write_text('[agents.reception.transfer_targets]\nsupport = "3000 XML support"\n')
    result = run_replay(ALLOWED, env_file=_env_file(tmp_path, f"AGENTS_FILE={agents}\n"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "uuid_transfer" in result.stdout and "got:      nothing" in result.stdout
    # Refused, the daemon told the LLM so: a round the recording never had.
    assert "asked about the tool results transfer_call" in result.stdout
    assert "is not an allowed target. Allowed: support." in result.stdout and "has no @llm reply for" in result.stdout


def test_the_allowed_fixture_fails_when_its_tool_call_asks_for_another_target(tmp_path):
    copy = tmp_path / "llm_transfer_allowed.esl"
    (tmp_path / "llm_transfer.agents.toml").write_bytes((FIXTURES / "llm_transfer.agents.toml").read_bytes())
    text = ALLOWED.read_bytes()
    assert text.count(b'{"target": "sales"}') == 1
    copy.write_bytes(text.replace(b'{"target": "sales"}', b'{"target": "support"}'))
    result = run_replay(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3000 XML support" in result.stdout and "command 4 differs" in result.stdout


def test_the_transfer_fixtures_fail_when_the_llm_is_offered_no_tools(tmp_path):
    result = run_replay(ALLOWED, env_file=_env_file(tmp_path, "LLM_TOOLS=false\n"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "offered the tools none, the fixture expects transfer_call, end_call" in result.stdout
