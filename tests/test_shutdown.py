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
from llm_fakes import FakeLlmServer, split_into_deltas
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


def _start_piper_daemon(sim, tmp_path, log_file, **extra_env: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "LOG_", "HTTP_"))}
    env.update({"FREESWITCH_PORT": str(sim.port), "TTS_ENGINE": "piper", "TTS_OUTPUT_DIR": str(tmp_path / "tts"),
                "LOG_FORMAT": "json", "GREETING": "", "SILENCE_TIMEOUT_S": "0", "HTTP_PORT": "0", **extra_env})
    return subprocess.Popen([str(Path(sys.executable).parent / "ivr-daemon"), "--env-file", os.devnull, "run"],
                            env=env, stderr=log_file, stdout=log_file)


def _tts_workers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children() if "ivr_daemon.tts.worker" in " ".join(p.cmdline())]


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait (with a deadline) for every process to end; returns those still running. A zombie has
    ended: only its parent's wait is missing."""
    gone, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


HUNG_SENTENCE = "This sentence never gets its audio, since every worker that could say it is stopped."
# One sentence that keeps a worker busy for seconds: it is still being said when the daemon dies.
LONG_SENTENCE = ("This one sentence goes on and on, through the opening hours of every branch, the way to "
                 "each car park, the prices of all the parking tickets, and the names of the people who "
                 "answer the phone on each day of the week, so that its worker is busy for a long while.")


def test_sigterm_with_hung_workers_a_hung_turn_and_a_mute_switch_exits_within_the_budget(tmp_path, monkeypatch):
    """The worst case with worker processes: the turn is still streaming, its sentence's worker
    never answers (SIGSTOP) and the switch never answers exit. Every step runs to its limit, the
    workers are killed and reaped last, and it all fits the 10 s."""
    # The sentence is whole once the next one starts (" And"): then the stream holds.
    deltas = len(split_into_deltas(HUNG_SENTENCE)) + 1
    with FakeLlmServer("ollama", replies=HUNG_SENTENCE + " And the rest never comes.",
                       stream_hold_after=deltas) as llm, \
            FreeswitchSimulator() as sim, open(tmp_path / "daemon.log", "wb") as log_file:
        dispatch = sim._dispatch
        monkeypatch.setattr(sim, "_dispatch", lambda conn, packet: (None, []) if packet.line.lower().startswith("exit")
                            else dispatch(conn, packet))
        proc = _start_piper_daemon(sim, tmp_path, log_file, LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                   LLM_TIMEOUT="60", TTS_CACHE_MAX_MB="0", FIRST_CHUNK="sentence")
        try:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=120)
            workers = _tts_workers(proc.pid)
            assert len(workers) == max(1, os.cpu_count() or 1)
            for worker in workers:  # stopped before the call speaks: whichever gets the sentence hangs
                worker.suspend()
            call = sim.new_call()
            sim.speak(call, "tell me everything")
            # The sentence is on its way to the daemon, which gives it to a (stopped) worker within the grace.
            wait_until(lambda: llm.deltas_sent >= deltas, 30)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            llm.release_stream.set()
            proc.kill()
    events = {line["event"]: line for line in _json_lines(tmp_path / "daemon.log")}
    assert "shutdown_grace_over" in events and "shutdown_syntheses_abandoned" in events
    assert sorted(events["tts_workers_stopped"]["pids"]) == sorted(w.pid for w in workers)
    assert events["daemon_shut_down"]["seconds"] <= SHUTDOWN_BUDGET_S + 0.5 <= DOCUMENTED_SHUTDOWN_S
    assert _wait_gone(workers, 10) == []  # killed and reaped by the daemon: no orphans
    assert list((tmp_path / "tts").glob(f"{call}-*")) == []


def test_tts_workers_do_not_outlive_a_daemon_killed_outright(tmp_path):
    """SIGKILL runs no clean-up: the kernel closes the daemon's ends of the pipes, and each
    worker, busy or idle, ends when its stdin does."""
    with FakeLlmServer("ollama", replies=LONG_SENTENCE) as llm, \
            FreeswitchSimulator() as sim, open(tmp_path / "daemon.log", "wb") as log_file:
        proc = _start_piper_daemon(sim, tmp_path, log_file, LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                   LLM_TIMEOUT="60", TTS_CACHE_MAX_MB="0", FIRST_CHUNK="sentence")
        try:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=120)
            workers = _tts_workers(proc.pid)
            assert workers
            loaded_s = {w.pid: sum(w.cpu_times()[:2]) for w in workers}
            call = sim.new_call()
            sim.speak(call, "tell me everything")
            # A worker is synthesizing: it has used CPU time since its voice loaded (seconds for the whole sentence).
            wait_until(lambda: any(sum(w.cpu_times()[:2]) > loaded_s[w.pid] + 0.2 for w in workers), 60)
            assert not list((tmp_path / "tts").glob(f"{call}-*.wav"))  # not done yet
        finally:
            proc.kill()
            proc.wait(30)
    assert _wait_gone(workers, 30) == []
