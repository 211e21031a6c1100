"""record -> replay round trip, the replay CLI's exit codes and diff, and the fixture format."""

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
        record_scripted_calls(out, two_turn_call, {"LLM_PROVIDER": "ollama", "LLM_API_URL": llm.url, "TTS_ENGINE": "null"},
                              calls=1, playback_speed=0.1)
    return out


def run_replay(*args):
    return subprocess.run([sys.executable, "-m", "ivr_daemon", "replay", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_recorded_fixture_holds_frames_replies_and_expected_commands(recorded):
    fixture = load_fixture(recorded)
    assert [r.reply for r in fixture.llm_replies] == ["We open at nine.", "Saturdays from ten."]
    assert [r.history for r in fixture.llm_replies] == [0, 2]
    assert [e.text.split()[1] for e in fixture.expected] == ["uuid_broadcast", "uuid_broadcast"]
    assert all("{wav}" in e.text for e in fixture.expected)
    text = recorded.read_bytes()
    assert b"Speech-Type: detected-speech" in text and b"\nwhat are your opening hours\n" in text
    assert fixture.frames[0].offset_s == 0.0


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
