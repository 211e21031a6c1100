"""LOG_TRANSCRIPTS: callers' words and replies stay out of INFO logs unless asked for."""

from __future__ import annotations

import hashlib
import json

import pytest
from structlog.testing import capture_logs

from harness import broadcasts, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.replay.simulator import FreeswitchSimulator

SECRET_WORDS = "my card number is four one one one"
SECRET_REPLY = "Thanks, I noted the number ending in one one."


def _lines_with(logs, text: str) -> list[dict]:
    return [line for line in logs if text in json.dumps(line, default=str)]


@pytest.mark.parametrize("log_transcripts", ["false", "true"])
def test_transcripts_and_replies_are_logged_only_when_asked(tmp_path, log_transcripts):
    with FakeLlmServer("ollama", replies=SECRET_REPLY) as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                LOG_TRANSCRIPTS=log_transcripts, LOG_LEVEL="INFO")
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            with capture_logs() as logs:
                sim.speak(call, SECRET_WORDS)
                wait_until(lambda: broadcasts(sim, call))
                wait_heard(sim, call)
                wait_until(lambda: not daemon.router.calls[call].handler.busy)
                sim.hangup(call)
                wait_until(lambda: call not in daemon.router.calls)
    complete = [line for line in logs if line["event"] == "turn_complete"]
    assert len(complete) == 1
    if log_transcripts == "true":
        assert complete[0]["transcript"] == SECRET_WORDS and complete[0]["reply"] == SECRET_REPLY
        assert _lines_with(logs, SECRET_WORDS)
    else:
        assert _lines_with(logs, SECRET_WORDS) == [] and _lines_with(logs, SECRET_REPLY) == []
        # Lines of one utterance can still be matched: same length and hash everywhere.
        digest = hashlib.sha256(SECRET_WORDS.encode()).hexdigest()[:12]
        assert complete[0]["transcript_chars"] == len(SECRET_WORDS) and complete[0]["transcript_sha256"] == digest
        assert any(line.get("body_sha256") == digest for line in logs if line["event"] == "esl_event")


def test_debug_level_shows_the_words(tmp_path):
    with FakeLlmServer("ollama", replies=SECRET_REPLY) as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, LOG_LEVEL="DEBUG")
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            with capture_logs() as logs:
                sim.speak(call, SECRET_WORDS)
                wait_until(lambda: broadcasts(sim, call))
                wait_until(lambda: not daemon.router.calls[call].handler.busy)
    assert any(line["event"] == "turn_started" and line.get("transcript") == SECRET_WORDS for line in logs)
