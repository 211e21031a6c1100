"""Every fixture in tests/fixtures/ replays green, through the pytest plugin as test engineers use it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
LIBRARY = sorted(FIXTURES.glob("*.esl"))


def test_the_library_has_the_flows_it_promises():
    assert {p.stem for p in LIBRARY} >= {"one_question", "three_turns_history", "hangup_mid_reply",
                                          "two_calls_interleaved", "llm_failure_fallback", "malformed_frames",
                                          "llm_transfer_allowed", "llm_transfer_refused"}


@pytest.mark.parametrize("path", LIBRARY, ids=[p.stem for p in LIBRARY])
def test_fixture_replays_green(replay, path):
    result = replay(path)
    assert result.ok and result.sent


def test_hangup_mid_reply_sends_nothing_after_the_hangup(replay):
    result = replay(FIXTURES / "hangup_mid_reply.esl")
    assert result.sent and all(s.line.startswith("api uuid_broadcast ") for s in result.sent)
    # Every broadcast answers the first question; the second was cut off by the hangup.
    assert not [s for s in result.sent if "and then what happened" in s.trigger or "HANGUP" in s.trigger]


def test_a_mismatch_fails_the_test_with_the_diff(pytester):
    broken = pytester.path / "broken.esl"
    original = (FIXTURES / "two_calls_interleaved.esl").read_bytes()
    broken.write_bytes(original.replace(b"{wav} aleg", b"{wav} both", 1))
    pytester.makepyfile(f"""
        def test_flow(replay):
            replay({str(broken)!r})
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*command 1 differs*", "*expected (fixture line *{wav} both*", "*got: *aleg*"])


def test_a_library_fixture_with_one_changed_command_makes_the_cli_exit_1(tmp_path):
    copy = tmp_path / "three_turns_changed.esl"
    text = (FIXTURES / "three_turns_history.esl").read_bytes()
    second = text.index(b"@expect", text.index(b"@expect") + 1)
    copy.write_bytes(text[:second] + text[second:].replace(b"uuid_broadcast", b"uuid_break", 1))
    result = subprocess.run([sys.executable, "-m", "ivr_daemon", "--env-file", os.devnull, "replay", str(copy)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "command 2 differs" in result.stdout and "uuid_break" in result.stdout


def test_replay_with_a_real_tts_engine(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ivr_daemon", "--env-file", os.devnull, "replay",
                             str(FIXTURES / "one_question.esl")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "TTS_ENGINE": "piper"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 0 failed" in result.stdout
