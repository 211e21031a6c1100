"""``ivr-daemon run`` records its calls in a real PostgreSQL (flushed at SIGTERM), and
``ivr-daemon calls list|show|export`` reads them back."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import wait_heard, wait_until
from llm_fakes import FakeLlmServer
from pg_server import free_port
from ivr_daemon import cli
from ivr_daemon.records.cli import parse_since
from ivr_daemon.replay.simulator import FreeswitchSimulator


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--env-file", os.devnull, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_records_calls_and_calls_reads_them_back(tmp_path, postgres, monkeypatch, capsys):
    url = postgres.new_database()
    replies = ["We open at nine.", "Yes, on Sundays too.", "Hello again."]
    with FakeLlmServer("ollama", replies=replies) as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "LOG_", "HTTP_"))}
        env.update({"FREESWITCH_PORT": str(sim.port), "LLM_PROVIDER": "ollama", "LLM_API_URL": llm.url,
                    "TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(tmp_path / "tts"), "LOG_FORMAT": "json",
                    "GREETING": "", "SILENCE_TIMEOUT_S": "0", "HTTP_PORT": "0", "DATABASE_URL": url})
        log_path = tmp_path / "daemon.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([str(Path(sys.executable).parent / "ivr-daemon"), "--env-file", os.devnull, "run"],
                                    env=env, stderr=log_file, stdout=log_file)
        try:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=60)
            ended = sim.new_call(caller_id_number="5550101")
            sim.speak(ended, "when do you open")
            wait_heard(sim, ended)
            sim.speak(ended, "on sundays too")
            wait_heard(sim, ended)
            sim.hangup(ended)
            live = sim.new_call(caller_id_number="5550102")
            sim.speak(live, "hello")
            wait_heard(sim, live)
            proc.send_signal(signal.SIGTERM)  # the live call's record is finished by the shutdown
            assert proc.wait(30) == 0
        finally:
            proc.kill()
    events = [json.loads(line)["event"] for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert "records_database_ready" in events and "records_abandoned_at_shutdown" not in events

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", url)
    code, out, err = run_cli(capsys, "calls", "list")
    assert code == 0, err
    header, first, second = out.splitlines()
    assert header.split()[:3] == ["started", "(UTC)", "uuid"]
    assert live in first and "DAEMON_SHUTDOWN" in first and "5550102" in first  # newest first
    assert ended in second and "NORMAL_CLEARING" in second and " 2 " in second

    code, out, _ = run_cli(capsys, "calls", "show", ended)
    assert code == 0
    assert f"call {ended}" in out and "from 5550101" in out and "(NORMAL_CLEARING)" in out
    assert "caller:    when do you open\nbot:       We open at nine." in out
    assert "caller:    on sundays too\nbot:       Yes, on Sundays too." in out

    code, out, _ = run_cli(capsys, "calls", "export", "--format", "jsonl")
    exported = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [c["uuid"] for c in exported] == [ended, live]  # oldest first
    assert [t["heard"] for t in exported[0]["turns"]] == ["We open at nine.", "Yes, on Sundays too."]
    assert exported[1]["hangup_cause"] == "DAEMON_SHUTDOWN" and exported[1]["turns"][0]["transcript"] == "hello"

    code, out, _ = run_cli(capsys, "calls", "export", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [(r["call_uuid"], r["turn"], r["transcript"]) for r in rows] == [
        (ended, "1", "when do you open"), (ended, "2", "on sundays too"), (live, "1", "hello")]

    code, _, err = run_cli(capsys, "calls", "list", "--agent", "sales")
    assert code == 0 and "no calls recorded that match" in err
    code, out, _ = run_cli(capsys, "calls", "list", "--since", "1h", "--agent", "default")
    assert code == 0 and len(out.splitlines()) == 3
    code, _, err = run_cli(capsys, "calls", "show", "no-such-call")
    assert code == 1 and "no recorded call no-such-call" in err


def test_calls_says_when_the_database_is_unreachable(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres:pw-never-shown@127.0.0.1:{free_port()}/x")
    code, _, err = run_cli(capsys, "calls", "list")
    assert code == 1 and "records database unavailable" in err and "Connection refused" in err
    assert "pw-never-shown" not in err


def test_since_takes_relative_and_absolute_times():
    now = datetime.datetime(2026, 12, 1, 12, 0)
    assert parse_since("24h", now) == datetime.datetime(2026, 11, 30, 12, 0)
    assert parse_since("7d", now) == datetime.datetime(2026, 11, 24, 12, 0)
    assert parse_since("2026-11-30", now) == datetime.datetime(2026, 11, 30)
    assert parse_since("2026-11-30T08:00+01:00", now) == datetime.datetime(2026, 11, 30, 7, 0)
    with pytest.raises(Exception, match="expected e.g. 24h"):
        parse_since("yesterday", now)
