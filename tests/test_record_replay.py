"""record -> replay round trip, the replay CLI's exit codes and diff, and the fixture format."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from harness import wait_heard
from llm_fakes import FakeLlmServer
from ivr_daemon.replay.fixture import FixtureError, load_fixture
from ivr_daemon.replay.recorder import record_scripted_calls

CAPTURES = Path(__file__).parent / "captures"
# These recordings are about record and replay, not the call flow: no greeting, no re-prompts.
NO_CALL_FLOW_SPEECH = {"GREETING": "", "SILENCE_TIMEOUT_S": "0"}


def two_turn_call(sim):
    call = sim.new_call()
    for text in ("what are your opening hours", "and on saturday"):
        sim.speak(call, text)
        sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {call} "), 30)
        wait_heard(sim, call)  # the caller listens to the one-sentence answer
    sim.hangup(call)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "round_trip.esl"
    with FakeLlmServer("ollama", replies=["We open at nine.", "Saturdays from ten."]) as llm:
        record_scripted_calls(out, two_turn_call, {"LLM_PROVIDER": "ollama", "LLM_API_URL": llm.url, "TTS_ENGINE": "null",
                                                   **NO_CALL_FLOW_SPEECH},
                              calls=1, playback_speed=0.1)
    return out


def run_replay(*args, env_file=os.devnull, cwd=None):
    return subprocess.run([sys.executable, "-m", "ivr_daemon", "--env-file", str(env_file), "replay", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_recorded_fixture_holds_frames_replies_and_expected_commands(recorded):
    fixture = load_fixture(recorded)
    assert [r.reply for r in fixture.llm_replies] == ["We open at nine.", "Saturdays from ten."]
    assert [r.history for r in fixture.llm_replies] == [0, 2]
    assert [e.text.split()[1] for e in fixture.expected] == ["uuid_broadcast", "uuid_broadcast"]
    assert all("{wav}" in e.text for e in fixture.expected)
    text = recorded.read_bytes()
    assert b"Speech-Type: detected-speech" in text and b"\nwhat are your opening hours\n" in text
    assert fixture.frames[0].offset_s == 0.0
    # The settings that shape the commands are noted, so the replay runs with them.
    assert fixture.env["GREETING"] == "" and fixture.env["SILENCE_TIMEOUT_S"] == "0.0"
    assert fixture.env["LLM_STREAM"] == "true"


def test_record_then_replay_is_green(recorded, tmp_path):
    result = run_replay(recorded, "--junit-xml", tmp_path / "junit.xml")
    assert result.returncode == 0, result.stdout + result.stderr
    suite = ElementTree.parse(tmp_path / "junit.xml").getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "0"


def test_changed_expected_command_exits_1_with_a_diff_naming_it(recorded, tmp_path):
    broken = tmp_path / "broken.esl"
    text = recorded.read_bytes()
    last = text.rindex(b"@expect api uuid_broadcast")
    broken.write_bytes(text[:last] + text[last:].replace(b"aleg", b"bleg", 1))
    result = run_replay(broken, "--junit-xml", tmp_path / "junit.xml")
    assert result.returncode == 1
    assert "command 2 differs" in result.stdout
    assert "bleg" in result.stdout and "expected (fixture line" in result.stdout
    assert "after frame" in result.stdout and "DETECTED_SPEECH" in result.stdout and "and on saturday" in result.stdout
    failure = ElementTree.parse(tmp_path / "junit.xml").getroot().find("testcase/failure")
    assert failure is not None and "bleg" in failure.text


def test_replay_checks_the_history_the_llm_was_sent(recorded, tmp_path):
    broken = tmp_path / "history.esl"
    broken.write_bytes(recorded.read_bytes().replace(b"@llm history=2", b"@llm history=4"))
    result = run_replay(broken)
    assert result.returncode == 1 and "carried 2 earlier messages, the fixture expects history=4" in result.stdout


def test_replay_reads_the_env_file_given(recorded, tmp_path):
    env_file = tmp_path / "replay.env"
    env_file.write_text("MAX_CONVERSATION_HISTORY=1\n")
    result = run_replay(recorded, env_file=env_file)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "earlier messages, the fixture expects history=2" in result.stdout


def test_replay_reads_dot_env_in_the_working_directory_by_default(recorded, tmp_path):
    (tmp_path / ".env").write_text("MAX_CONVERSATION_HISTORY=1\n")
    result = subprocess.run([sys.executable, "-m", "ivr_daemon", "replay", str(recorded)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "earlier messages, the fixture expects history=2" in result.stdout


def test_the_replay_keeps_its_own_switch_llm_and_output_dir_whatever_the_env_file_says(recorded, tmp_path):
    env_file = tmp_path / "live.env"
    env_file.write_text("FREESWITCH_HOST=192.0.2.1\nFREESWITCH_PORT=1\nFREESWITCH_PASSWORD=secret\n"
                        "LLM_PROVIDER=openai\nLLM_API_URL=not-a-url\nTTS_OUTPUT_DIR=/nonexistent/tts\n")
    result = run_replay(recorded, env_file=env_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 0 failed" in result.stdout


def test_a_bad_setting_in_the_env_file_exits_2_naming_it(recorded, tmp_path):
    env_file = tmp_path / "bad.env"
    env_file.write_text("BARGE_IN=sometimes\n")
    result = run_replay(recorded, env_file=env_file)
    assert result.returncode == 2
    assert "BARGE_IN" in result.stderr


def test_unreadable_fixture_exits_2_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.esl"
    bad.write_text("@fixture v1\n@frame +0.0\nContent-Length: 10x\nContent-Type: text/event-plain\n\n")
    result = run_replay(bad)
    assert result.returncode == 2
    assert f"{bad}:2:" in result.stdout and "Content-Length" in result.stdout


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("", 1, "empty file"),
        ("@fixture v2\n", 1, "@fixture v1"),
        ("@fixture v1\n@nonsense\n", 2, "unknown directive"),
        ("@fixture v1\n@frame 0.5\n", 2, "time offset"),
        ("@fixture v1\n@raw +0.1 50\nshort\n", 2, "needs 50 bytes"),
        ("@fixture v1\n@llm\nno transcript marker\n", 3, "'> <what the caller said>'"),
        ("@fixture v1\n@llm\n> hi\nreply without end\n", 2, "no @end"),
        ("@fixture v1\n@llm-error sometimes\n> hi\n", 2, "@llm-error needs"),
        ("@fixture v1\n@llm stopped=later\n> hi\nOne.\n@end\n", 2, "stopped= needs one of"),
        ("@fixture v1\n@llm-error timeout stopped=timeout\n> hi\n", 2, "unknown option 'stopped'"),
    ],
)
def test_fixture_errors_name_the_line(tmp_path, text, line, words):
    path = tmp_path / "f.esl"
    path.write_text(text)
    with pytest.raises(FixtureError) as caught:
        load_fixture(path)
    assert caught.value.line_no == line and words in str(caught.value)


def test_a_raw_capture_pasted_after_frame_is_a_fixture(tmp_path):
    capture = (CAPTURES / "40_event_plain_DETECTED_SPEECH_detected-speech.txt").read_bytes()
    path = tmp_path / "pasted.esl"
    path.write_bytes(b"@fixture v1\n@frame +0.000\n" + capture + b"\n@raw +0.100 9\nnot a fr\n\n")
    fixture = load_fixture(path)
    assert fixture.frames[0].data == capture
    assert fixture.frames[1].raw and fixture.frames[1].data == b"not a fr\n"


def _event_frame(name, uuid, sequence, body=None):
    from ivr_daemon.esl.protocol import build_plain_event

    return build_plain_event([("Event-Name", name), ("Unique-ID", uuid), ("Event-Sequence", str(sequence))], body)


@pytest.mark.parametrize("all_calls", [False, True])
def test_recorder_keeps_only_ivr_calls_unless_all_calls(all_calls):
    from ivr_daemon.replay.recorder import Recorder

    ivr, other = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
    recorder = Recorder(all_calls=all_calls, stop_after_calls=1)
    recorder.on_frame(_event_frame("CHANNEL_ANSWER", other, 1), False)
    recorder.on_frame(_event_frame("CHANNEL_ANSWER", ivr, 2), False)
    recorder.on_frame(_event_frame("DETECTED_SPEECH", ivr, 3, "hi"), False)
    recorder.on_frame(b"Content-Length: x\n\n", True)
    recorder.on_frame(_event_frame("CHANNEL_HANGUP_COMPLETE", other, 4), False)
    assert recorder.enough_calls.is_set() == all_calls  # only the IVR's calls count unless --all-calls
    recorder.on_frame(_event_frame("CHANNEL_HANGUP_COMPLETE", ivr, 5), False)
    assert recorder.enough_calls.is_set()
    text = recorder.render()
    assert text.count(ivr.encode()) == 3
    assert (other.encode() in text) == all_calls
    assert b"@raw" in text  # broken bytes are kept whatever the call


TWO_SENTENCES = "We open at nine. On Saturdays we open at ten."
FIRST_SENTENCE_AND_A_WORD = "We open at nine. On"  # the first 6 word-sized deltas the fake LLM streams


def record_one_question(out, llm, stream=True, sentences_heard=1):
    def scenario(sim):
        call = sim.new_call()
        sim.speak(call, "when do you open")
        wait_heard(sim, call, count=sentences_heard, timeout_s=30)
        sim.hangup(call)

    record_scripted_calls(out, scenario, {"LLM_PROVIDER": "ollama", "LLM_API_URL": llm.url, "TTS_ENGINE": "null",
                                          **NO_CALL_FLOW_SPEECH,
                                          "LLM_STREAM": "true" if stream else "false"},
                          calls=1, playback_speed=0.1)
    return load_fixture(out)


def test_a_streaming_recording_records_through_stream_and_replays_green(tmp_path):
    out = tmp_path / "streamed.esl"
    with FakeLlmServer("ollama", replies=[TWO_SENTENCES]) as llm:
        fixture = record_one_question(out, llm, sentences_heard=2)
    assert [request["stream"] for request in llm.requests] == [True]
    assert llm.stream_outcomes == ["complete"]
    assert [(r.reply, r.stopped) for r in fixture.llm_replies] == [(TWO_SENTENCES, None)]
    assert len(fixture.expected) == 2  # one broadcast per sentence, as streaming speaks them
    result = run_replay(out)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_batch_recording_asks_for_the_whole_reply(tmp_path):
    out = tmp_path / "batch.esl"
    with FakeLlmServer("ollama", replies=[TWO_SENTENCES]) as llm:
        fixture = record_one_question(out, llm, stream=False)
    assert [request["stream"] for request in llm.requests] == [False]
    assert [r.reply for r in fixture.llm_replies] == [TWO_SENTENCES]
    assert len(fixture.expected) == 1
    assert run_replay(out, env_file=_env_file(tmp_path, "LLM_STREAM=false\n")).returncode == 0


def _env_file(tmp_path, text):
    path = tmp_path / "settings.env"
    path.write_text(text)
    return path


def test_a_stream_that_broke_off_is_recorded_with_the_text_before_the_break(tmp_path):
    out = tmp_path / "broke.esl"
    with FakeLlmServer("ollama", replies=[TWO_SENTENCES], stream_break_after=6) as llm:
        fixture = record_one_question(out, llm)
    assert llm.stream_outcomes == ["broken"]
    assert [(r.reply, r.stopped) for r in fixture.llm_replies] == [(FIRST_SENTENCE_AND_A_WORD, "unavailable")]
    # Ollama calls tools, so the recording offers them (end_call: this agent has no transfer targets).
    assert b"@llm history=0 stopped=unavailable tools=end_call\n" in out.read_bytes()
    assert len(fixture.expected) == 1  # the first sentence stands; no fallback after it
    result = run_replay(out)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_hangup_while_the_llm_streams_is_recorded_as_abandoned_and_replays_green(tmp_path):
    out = tmp_path / "abandoned.esl"
    # The LLM holds the rest of its reply back after the first sentence; the caller hangs up.
    with FakeLlmServer("ollama", replies=[TWO_SENTENCES], stream_hold_after=6) as llm:
        fixture = record_one_question(out, llm)
    assert [(r.reply, r.stopped) for r in fixture.llm_replies] == [(FIRST_SENTENCE_AND_A_WORD, "abandoned")]
    assert len(fixture.expected) == 1
    result = run_replay(out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 0 failed" in result.stdout


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("stopped, error", [("timeout", "LlmTimeout"), ("unavailable", "LlmUnavailable"),
                                            ("bad-reply", "LlmBadReply")])
def test_the_replay_llm_streams_a_broken_reply_up_to_its_break(tmp_path, stopped, error):
    from ivr_daemon.llm import base
    from ivr_daemon.replay.fixture import FixtureFrame, LlmReply, render_fixture
    from ivr_daemon.replay.replayer import FixtureLlm

    path = tmp_path / "broke.esl"
    path.write_bytes(render_fixture([LlmReply("hi", "One. Tw", None, 0, 0.0, 0, stopped),
                                     FixtureFrame(0.0, b"x", 0, raw=True)]))
    reply, = load_fixture(path).llm_replies
    assert (reply.reply, reply.stopped, reply.error) == ("One. Tw", stopped, None)
    stream = FixtureLlm([reply]).stream(MESSAGES)
    assert next(stream) == "One. Tw"
    with pytest.raises(getattr(base, error)):
        next(stream)
    with pytest.raises(getattr(base, error)):
        FixtureLlm([reply]).complete(MESSAGES)  # batch mode cannot give the part before the break


def test_the_replay_llm_holds_an_abandoned_reply_until_the_turn_is_killed():
    import gevent

    from ivr_daemon.llm.base import LlmTimeout
    from ivr_daemon.replay.fixture import LlmReply
    from ivr_daemon.replay.replayer import FixtureLlm

    reply = LlmReply("hi", "One. Tw", None, 0, 0.0, 0, "abandoned")
    got = []

    def read(llm):
        for delta in llm.stream(MESSAGES):
            got.append(delta)

    reader = gevent.spawn(read, FixtureLlm([reply], timeout_s=3600))
    while not got and not reader.dead:
        gevent.sleep(0)
    assert got == ["One. Tw"] and not reader.dead  # still "writing", as when the recording stopped reading
    reader.kill()
    assert reader.dead and isinstance(reader.value, gevent.GreenletExit)
    # Nobody kills it: after timeout_s it fails like a server that went quiet.
    with pytest.raises(LlmTimeout, match="stopped here"):
        list(FixtureLlm([reply], timeout_s=0.01).stream(MESSAGES))
