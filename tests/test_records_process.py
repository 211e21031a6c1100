"""The records' database work in its child process: killed, it is restarted and nothing is lost;
the daemon's shutdown leaves none behind; the child imports only what the store needs.

Real processes, a real SQLite file and a real PostgreSQL server (tests/pg_server.py); the
records process is killed with SIGKILL as the OOM killer would.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from structlog.testing import capture_logs

from harness import running_daemon, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from test_records import call_row, read_call, records_settings, turn_row, writer_for
from ivr_daemon.records.remote import _Child
from ivr_daemon.records.store import RecordRefused
from ivr_daemon.replay.simulator import FreeswitchSimulator


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/records.db"
    return request.getfixturevalue("postgres").new_database()


def records_children() -> list[int]:
    """The records processes this test process has now (reaped ones are gone from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if parent == os.getpid() and b"ivr_daemon.records.db_process" in command:
            found.append(int(entry))
    return found


class held_write_lock:
    """Another client holds the lock a write needs: the records process's write waits in the driver."""

    def __init__(self, url: str):
        if url.startswith("sqlite"):
            self.connection = sqlite3.connect(url.split("///", 1)[1], isolation_level=None)
            self.connection.execute("BEGIN IMMEDIATE")
        else:
            from ivr_daemon.records.store import _psycopg

            self.connection = _psycopg().connect(url)  # imported the way the records code does
            self.connection.execute("LOCK TABLE calls IN EXCLUSIVE MODE")

    def release(self) -> None:
        self.connection.commit() if not isinstance(self.connection, sqlite3.Connection) else \
            self.connection.execute("COMMIT")
        self.connection.close()


def test_a_records_process_killed_mid_write_is_restarted_and_the_batch_written(db_url):
    writer = writer_for(db_url, retention_days=0)
    writer.using_store(writer.store.migrate)
    first_pid = writer.store.pid
    writer.start()
    lock = held_write_lock(db_url)
    released = False
    try:
        with capture_logs() as logs:
            writer.put_call(call_row("survivor"))
            writer.put_turn(turn_row("survivor", 1))
            wait_until(lambda: writer.store.pending == 1)  # the pump's write is with the process, held by the lock
            os.kill(first_pid, signal.SIGKILL)
            wait_until(lambda: any(e["event"] == "records_process_started" for e in logs))
            lock.release()
            released = True
            assert writer.flush(20)
        assert writer.store.pid not in (None, first_pid)
        died = [e for e in logs if e["event"] == "records_process_died"]
        assert len(died) == 1 and died[0]["pid"] == first_pid and died[0]["request"] == "write"
        assert "was killed by SIGKILL" in died[0]["error"] and died[0]["log_level"] == "error"
        found = read_call(writer, "survivor")
        assert [t["turn_index"] for t in found["turns"]] == [1]
        assert writer.written == 2 and writer.dropped == 0
    finally:
        if not released:
            lock.release()
        writer.stop()
    assert records_children() == []


def test_a_records_process_killed_during_a_call_is_replaced_and_the_call_recorded(tmp_path, db_url):
    with FakeLlmServer("ollama", replies=["We open at nine.", "Sure."]) as llm, \
            FreeswitchSimulator(playback_speed=0.2) as sim:
        records = writer_for(db_url)
        with capture_logs() as logs:
            with running_daemon(sim, records_settings(sim, tmp_path, llm, db_url), records=records) as daemon:
                call = sim.new_call(caller_id_number="5550199")
                sim.speak(call, "when do you open")
                wait_heard(sim, call, 1)
                assert records.flush(10)  # the call's first records written: the process is there
                first_pid = records.store.pid
                assert records_children() == [first_pid]
                os.kill(first_pid, signal.SIGKILL)  # idle between turns: replaced before it is needed
                wait_until(lambda: records.store.pid not in (None, first_pid))
                sim.speak(call, "and on sundays")
                wait_heard(sim, call, 1)
                sim.hangup(call)
                wait_until(lambda: call not in daemon.router.calls)
                assert records.flush(10)
                found = read_call(records, call)
                second_pid = records.store.pid
        # The daemon's shutdown flushed, closed and reaped its records process.
        assert records_children() == []
        with pytest.raises(ProcessLookupError):
            os.kill(second_pid, 0)
    died = [e for e in logs if e["event"] == "records_process_died"]
    assert len(died) == 1 and died[0]["pid"] == first_pid and "SIGKILL" in died[0]["error"]
    assert any(e["event"] == "records_process_stopped" and e["pid"] == second_pid for e in logs)
    assert found["caller_number"] == "5550199" and found["hangup_cause"] == "NORMAL_CLEARING"
    assert [t["transcript"] for t in found["turns"]] == ["when do you open", "and on sundays"]
    assert records.dropped == 0


def test_the_records_process_ends_when_the_daemon_is_gone_and_ignores_sigterm(tmp_path):
    child = _Child({"url": f"sqlite:///{tmp_path}/records.db", "connect_timeout_s": 2,
                    "log_level": "INFO", "log_format": "console"})
    try:
        assert child.ask(None) == ("ready", child.pid)
        child.proc.send_signal(signal.SIGTERM)  # systemd's stop reaches the process group: the daemon decides
        assert child.ask(("ping", (), {})) == ("ok", None)
        assert child.ask(("migrate", (), {})) == ("ok", "0001")
        assert child.ask(("no_such_request", (), {})) == ("failed", "ValueError: unknown request 'no_such_request'")
        kind, refused = child.ask(("write", ([("nonsense", {})],), {}))
        assert kind == "raise" and isinstance(refused, RecordRefused)  # raised again in the daemon as it was
    finally:
        child.requests.close()  # the daemon gone: the write end of the child's stdin closed
    assert child.reap(10) == 0
    child.close_pipes()


def test_the_records_process_imports_only_what_the_store_needs():
    # The modules the child loads before its first request, in a fresh interpreter as it runs.
    probe = ("import sys; "
             "import ivr_daemon.records.db_process, ivr_daemon.records.store, ivr_daemon.logs; "
             "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                check=True).stdout.split())
    assert "sqlalchemy" in loaded and "alembic" in loaded
    for heavy in ("gevent", "falcon", "torch", "numpy", "ivr_daemon.tts", "ivr_daemon.metrics", "prometheus_client"):
        assert heavy not in loaded, heavy


def test_a_record_that_cannot_cross_to_the_records_process_is_dropped_and_the_rest_written(tmp_path):
    writer = writer_for(f"sqlite:///{tmp_path}/records.db", retention_days=0)
    writer.start()
    try:
        writer.using_store(writer.store.migrate)
        pid = writer.store.pid
        writer.put_call(call_row("fine"))
        writer.put_call(call_row("odd", variables={"handle": lambda: None}))  # no pickle for a function
        writer.put_turn(turn_row("fine", 1))
        assert writer.flush(10)
        assert writer.dropped == 1 and writer.written == 2
        assert writer.metrics.records_dropped_total.labels(reason="refused")._value.get() == 1
        assert read_call(writer, "fine")["turns"][0]["turn_index"] == 1 and read_call(writer, "odd") is None
        assert writer.store.pid == pid  # the process was never at fault
    finally:
        writer.stop()
