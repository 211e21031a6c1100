"""SIGTERM ends the daemon within its documented 10 s even when a turn hangs, and leaves no call WAV."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from gevent.monkey import get_original
import psutil
from structlog.testing import capture_logs

from harness import settings_for, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.daemon import SHUTDOWN_BUDGET_S, build_conversation_daemon
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts.null import NullEngine

DOCUMENTED_SHUTDOWN_S = 10.0


def test_sigterm_with_a_hung_turn_exits_within_the_budget(tmp_path):
    tts_dir = tmp_path / "tts"
    # The LLM never answers within the turn: the turn stays in flight until shutdown cuts it.
    with FakeLlmServer("ollama", replies="Too late.", delay_s=60) as llm, FreeswitchSimulator() as sim:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "LOG_", "HTTP_"))}
        env.update({"FREESWITCH_PORT": str(sim.port), "LLM_PROVIDER": "ollama", "LLM_API_URL": llm.url,
                    "LLM_TIMEOUT": "60", "TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(tts_dir),
                    "TTS_CACHE_MAX_MB": "0", "LOG_FORMAT": "json", "GREETING": "", "SILENCE_TIMEOUT_S": "0",
                    "HTTP_PORT": "0"})
        log_path = tmp_path / "daemon.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([str(Path(sys.executable).parent / "ivr-daemon"), "--env-file", os.devnull, "run"],
                                    env=env, stderr=log_file, stdout=log_file)
        try:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=60)
            call = sim.new_call()
            sim.speak(call, "are you there")
            wait_until(lambda: len(llm.requests) == 1)  # the turn is in flight, and will hang
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            proc.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    events = {line["event"]: line for line in lines}
    assert "shutdown_grace_over" in events  # the hung turn was cut, not waited for
    assert events["daemon_shut_down"]["seconds"] <= SHUTDOWN_BUDGET_S + 0.5 <= DOCUMENTED_SHUTDOWN_S
    assert [c.line for c in sim.commands][-1] == "exit"
    assert list(tts_dir.glob(f"{call}-*")) == []


STUCK_ANSWER = "This answer never finishes synthesizing."


class StuckEngine(NullEngine):
    """Null audio, but the answer's synthesis waits until the test lets it go."""

    def __init__(self):
        self.started = get_original("threading", "Event")()
        self.release = get_original("threading", "Event")()

    def synthesize(self, text):
        if text == STUCK_ANSWER:
            self.started.set()
            self.release.wait(60)
        return super().synthesize(text)


def test_shutdown_fits_the_budget_when_the_turn_the_synthesis_and_the_switch_all_hang(tmp_path, monkeypatch):
    with FakeLlmServer("ollama", replies=STUCK_ANSWER) as llm, \
            FreeswitchSimulator() as sim:
        dispatch = sim._dispatch
        # A switch too busy to answer "exit".
        monkeypatch.setattr(sim, "_dispatch", lambda conn, packet: (None, []) if packet.line.lower().startswith("exit")
                            else dispatch(conn, packet))
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, LLM_TIMEOUT="60",
                                TTS_CACHE_MAX_MB="0")
        engine = StuckEngine()
        daemon = build_conversation_daemon(settings, tts=engine)
        daemon.start()
        try:
            assert daemon.esl.wait_connected(10)
            call = sim.new_call()
            sim.speak(call, "hello")
            wait_until(engine.started.is_set)
            with capture_logs() as logs:
                daemon.shutdown()
        finally:
            engine.release.set()
            daemon.stop()
        seconds = next(line["seconds"] for line in logs if line["event"] == "daemon_shut_down")
        assert seconds <= SHUTDOWN_BUDGET_S + 0.5 <= DOCUMENTED_SHUTDOWN_S
        assert any(line["event"] == "shutdown_syntheses_abandoned" for line in logs)
        # The synthesis that lands after the shutdown still has its WAV deleted.
        wait_until(lambda: not list(tmp_path.glob(f"{call}-*.wav")), 10)


def _start_piper_daemon(sim, tmp_path, log_file) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "LOG_"))}
    env.update({"FREESWITCH_PORT": str(sim.port), "TTS_ENGINE": "piper", "TTS_OUTPUT_DIR": str(tmp_path / "tts"),
                "LOG_FORMAT": "json", "GREETING": "", "SILENCE_TIMEOUT_S": "0"})
    return subprocess.Popen([str(Path(sys.executable).parent / "ivr-daemon"), "--env-file", os.devnull, "run"],
                            env=env, stderr=log_file, stdout=log_file)


def _tts_workers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children() if "ivr_daemon.tts.worker" in " ".join(p.cmdline())]


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigterm_ends_the_tts_workers_with_the_daemon(tmp_path):
    with FreeswitchSimulator() as sim, open(tmp_path / "daemon.log", "wb") as log_file:
        proc = _start_piper_daemon(sim, tmp_path, log_file)
        try:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=120)
            workers = _tts_workers(proc.pid)
            assert len(workers) == max(1, os.cpu_count() or 1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            proc.kill()
    assert all(_gone(worker) for worker in workers)  # killed and reaped before the daemon exited


def test_tts_workers_do_not_outlive_a_daemon_killed_outright(tmp_path):
    with FreeswitchSimulator() as sim, open(tmp_path / "daemon.log", "wb") as log_file:
        proc = _start_piper_daemon(sim, tmp_path, log_file)
        try:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=120)
            workers = _tts_workers(proc.pid)
            assert workers
        finally:
            proc.kill()  # SIGKILL: no clean-up runs; the kernel closes the daemon's ends of the pipes
            proc.wait(30)
    wait_until(lambda: all(_gone(worker) for worker in workers), 60)
