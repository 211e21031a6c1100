"""Call records: real calls on the simulator written to SQLite and to a real PostgreSQL server.

The PostgreSQL server is the session's own (tests/pg_server.py: initdb + pg_ctl on a free
port); each test gets a fresh database on it. ``pg_ctl stop`` takes the database away under a
live call and ``start`` brings it back: nothing is mocked.
"""

from __future__ import annotations

import datetime
import time
import uuid as uuid_lib

import gevent
import gevent.event
import pytest
import requests
import sqlalchemy
from prometheus_client.parser import text_string_to_metric_families

from harness import broadcasts, http_server, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer, FakeReply, FakeToolCall
from pg_server import free_port
from ivr_daemon.config import ConfigError, load_settings
from ivr_daemon.daemon import build_conversation_daemon, open_records
from ivr_daemon.records import RecordStore, RecordWriter, check_database
from ivr_daemon.records import writer as records_writer
from ivr_daemon.records.store import DatabaseUnavailable, database_url, utc_now
from ivr_daemon.replay.simulator import FreeswitchSimulator

TOKEN = "records-test-token-0123456789"
FAST_BACKOFF = {"backoff_base_s": 0.05, "backoff_max_s": 0.5}
LONG_SENTENCE = "The second part is a much longer sentence that keeps on going and going for a while."


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/records.db"
    return request.getfixturevalue("postgres").new_database()


def writer_for(url: str, **kwargs) -> RecordWriter:
    return RecordWriter(RecordStore(url, connect_timeout_s=2), **{**FAST_BACKOFF, **kwargs})


def read_call(writer: RecordWriter, call_uuid: str) -> dict | None:
    return writer.using_store(writer.store.call, call_uuid)


def samples(daemon) -> dict[tuple[str, tuple], float]:
    text = daemon.metrics.exposition()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(daemon, name: str, **labels) -> float:
    return samples(daemon)[(name, tuple(sorted(labels.items())))]


def records_settings(sim, tmp_path, llm, url, **env):
    return settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url, DATABASE_URL=url, **env)


# -- a whole call, on both databases -----------------------------------------------------------------

def test_a_call_is_recorded_with_what_the_caller_heard(tmp_path, db_url):
    replies = ["We open at nine. See you soon.", f"First part is short. {LONG_SENTENCE}", "Sure."]
    with FakeLlmServer("ollama", replies=replies) as llm, FreeswitchSimulator(playback_speed=0.2) as sim:
        settings = records_settings(sim, tmp_path, llm, db_url)
        records = writer_for(db_url)
        with running_daemon(sim, settings, records=records) as daemon:
            call = sim.new_call(caller_id_number="5550142",
                                variables={"ivr_variables": "customer", "customer": "Ann"})
            sim.speak(call, "when do you open")
            wait_heard(sim, call, 2)
            sim.speak(call, "and on sundays")
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 10)
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_STOP" and e.unique_id == call, 10)
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 10)
            sim.speak(call, "wait", final=False)  # barge-in during the long second sentence
            sim.wait_for_command(f"api uuid_break {call} all", 5)
            sim.hangup(call)
            wait_until(lambda: call not in daemon.router.calls)
            assert records.flush(10)
            found = read_call(records, call)
            assert sample(daemon, "ivr_records_db_up") == 1 and sample(daemon, "ivr_records_queued") == 0
            assert sample(daemon, "ivr_records_written_total") >= 3
            assert all(value == 0 for (name, _), value in samples(daemon).items()
                       if name == "ivr_records_dropped_total")
    assert found["agent"] == "default" and found["caller_number"] == "5550142"
    assert found["variables"] == {"customer": "Ann"}
    assert found["started_at"] <= found["answered_at"] <= found["ended_at"]
    assert found["hangup_cause"] == "NORMAL_CLEARING" and found["transferred_to"] is None
    first, second = found["turns"]
    assert (first["turn_index"], first["transcript"]) == (1, "when do you open")
    assert first["reply"] == first["heard"] == "We open at nine. See you soon."
    assert not first["interrupted"] and not first["used_fallback"] and first["tool_calls"] == []
    assert first["llm_ms"] > 0 and first["first_audio_ms"] > 0 and first["tts_ms"] is not None
    assert second["transcript"] == "and on sundays"
    assert second["reply"] == f"First part is short. {LONG_SENTENCE}"  # both were sent to be played
    assert second["heard"] == "First part is short." and second["interrupted"]  # the caller cut the second


def test_tool_calls_and_the_daemon_hanging_up_are_recorded(tmp_path):
    url = f"sqlite:///{tmp_path}/records.db"
    reply = FakeReply("Goodbye.", [FakeToolCall("end_call")])
    with FakeLlmServer("ollama", replies=reply) as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        records = writer_for(url)
        with running_daemon(sim, records_settings(sim, tmp_path, llm, url), records=records) as daemon:
            call = sim.new_call()
            sim.speak(call, "that is all thanks")
            sim.wait_for_command(f"api uuid_kill {call}", 10)
            wait_until(lambda: call not in daemon.router.calls)
            assert records.flush(10)
            found = read_call(records, call)
    (turn,) = found["turns"]
    assert turn["tool_calls"] == [{"name": "end_call", "arguments": {}}]
    assert turn["heard"] == "Goodbye." and found["ended_at"] is not None


def test_the_database_going_away_mid_call_loses_nothing(tmp_path, postgres):
    url = postgres.new_database()
    with FakeLlmServer("ollama", replies=["One.", "Two.", "Three."]) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        records = writer_for(url)
        with running_daemon(sim, records_settings(sim, tmp_path, llm, url), records=records) as daemon:
            call = sim.new_call()
            sim.speak(call, "first")
            wait_heard(sim, call)
            assert records.flush(10) and len(read_call(records, call)["turns"]) == 1
            postgres.stop()  # connections cut, as when the server shuts down
            try:
                # The call goes on as if nothing happened: answered, heard.
                sim.speak(call, "second")
                wait_until(lambda: len(broadcasts(sim, call)) == 2)
                wait_heard(sim, call)
                wait_until(lambda: sample(daemon, "ivr_records_db_up") == 0)
                sim.speak(call, "third")
                wait_heard(sim, call)
                sim.hangup(call)
                wait_until(lambda: call not in daemon.router.calls)
                assert sample(daemon, "ivr_records_queued") > 0 and not records.flush(0.2)
                with pytest.raises(DatabaseUnavailable):
                    read_call(records, call)
            finally:
                postgres.start()
            assert records.flush(20), "records were not written once the database was back"
            assert sample(daemon, "ivr_records_db_up") == 1 and sample(daemon, "ivr_records_queued") == 0
            found = read_call(records, call)
            assert records.dropped == 0
    assert [(t["transcript"], t["heard"]) for t in found["turns"]] == [
        ("first", "One."), ("second", "Two."), ("third", "Three.")]
    assert found["hangup_cause"] == "NORMAL_CLEARING"


def test_shutdown_writes_the_calls_still_up(tmp_path, db_url):
    with FakeLlmServer("ollama", replies="Hello.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        records = writer_for(db_url)
        daemon = build_conversation_daemon(records_settings(sim, tmp_path, llm, db_url), records=records)
        daemon.start()
        try:
            assert daemon.esl.wait_connected(10)
            call = sim.new_call()
            sim.speak(call, "hi")
            wait_heard(sim, call)
            daemon.shutdown()  # what SIGTERM runs
        finally:
            daemon.stop()
        check = RecordStore(db_url)
        try:
            found = check.call(call)
        finally:
            check.close()
    assert found["hangup_cause"] == "DAEMON_SHUTDOWN" and found["ended_at"] is not None
    assert [t["heard"] for t in found["turns"]] == ["Hello."]


# -- GET /calls/{uuid}/transcript ---------------------------------------------------------------------

def test_the_transcript_of_an_ended_call_over_http(tmp_path):
    url = f"sqlite:///{tmp_path}/records.db"
    with FakeLlmServer("ollama", replies="Nine to five.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = records_settings(sim, tmp_path, llm, url, HTTP_API_TOKEN=TOKEN)
        records = writer_for(url)
        with running_daemon(sim, settings, records=records) as daemon, http_server(daemon) as server:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            call = sim.new_call(caller_id_number="5550199")
            sim.speak(call, "opening hours")
            wait_heard(sim, call)
            live = requests.get(f"{server.url}/calls/{call}/transcript", headers=auth, timeout=5)
            assert live.status_code == 409
            sim.hangup(call)
            wait_until(lambda: call not in daemon.router.calls)
            assert records.flush(10)
            assert requests.get(f"{server.url}/calls/{call}/transcript", timeout=5).status_code == 401
            answer = requests.get(f"{server.url}/calls/{call}/transcript", headers=auth, timeout=5)
            missing = requests.get(f"{server.url}/calls/{uuid_lib.uuid4()}/transcript", headers=auth, timeout=5)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["uuid"] == call and body["caller_number"] == "5550199" and body["ended"].endswith("Z")
    assert [(t["turn"], t["transcript"], t["heard"], t["interrupted"]) for t in body["turns"]] == [
        (1, "opening hours", "Nine to five.", False)]
    assert missing.status_code == 404 and missing.json()["title"] == "404 Not Found"


# -- the writer on its own ----------------------------------------------------------------------------

def call_row(call_uuid: str, started_at: datetime.datetime | None = None, **changes) -> dict:
    row = {"uuid": call_uuid, "agent": "default", "caller_number": "5551234", "variables": {},
           "started_at": started_at or utc_now(), "answered_at": None, "ended_at": None, "hangup_cause": None,
           "transferred_to": None}
    row.update(changes)
    return row


def turn_row(call_uuid: str, index: int, **changes) -> dict:
    row = {"call_uuid": call_uuid, "turn_index": index, "started_at": utc_now(), "transcript": f"question {index}",
           "reply": f"answer {index}", "heard": f"answer {index}", "interrupted": False, "used_fallback": False,
           "llm_ms": 100.0, "tts_ms": 20.0, "first_audio_ms": 150.0, "tool_calls": []}
    row.update(changes)
    return row


def test_a_full_queue_drops_new_records_and_counts_them(tmp_path):
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"  # nothing listens there
    writer = writer_for(unreachable, queue_max=3)
    writer.start()
    try:
        for index in range(5):
            writer.put_call(call_row(f"call-{index}"))
        assert writer.put_call(call_row("call-0", hangup_cause="NORMAL_CLEARING"))  # a newer snapshot: in place
        wait_until(lambda: writer.metrics.records_dropped_total.labels(reason="queue_full")._value.get() == 2)
        wait_until(lambda: not writer.db_up and writer._down_since_s is not None)
        assert writer.queued == 3 and writer.written == 0
        assert [row["hangup_cause"] for _kind, row in writer._waiting.values()] == ["NORMAL_CLEARING", None, None]
    finally:
        writer.stop(timeout_s=0.2)
    assert writer.metrics.records_dropped_total.labels(reason="shutdown")._value.get() == 3


def test_a_record_the_database_refuses_is_dropped_and_the_rest_written(postgres):
    writer = writer_for(postgres.new_database())
    writer.start()
    try:
        writer.put_call(call_row("good"))
        writer.put_turn(turn_row("no-such-call", 1))  # the foreign key refuses it
        writer.put_turn(turn_row("good", 1))
        assert writer.flush(10)
        assert [t["turn_index"] for t in read_call(writer, "good")["turns"]] == [1]
        assert writer.metrics.records_dropped_total.labels(reason="refused")._value.get() == 1
    finally:
        writer.stop()


def test_a_database_down_at_start_up_gets_its_tables_when_it_is_back(tmp_path, postgres):
    url = postgres.new_database()
    postgres.stop()
    try:
        writer = open_records(load_settings(environ={"DATABASE_URL": url, "TTS_OUTPUT_DIR": str(tmp_path / "tts")}))
        assert writer is not None and not writer.db_up  # the daemon starts anyway
        writer.backoff_base_s, writer.backoff_max_s = 0.05, 0.5
        writer.start()
        writer.put_call(call_row("early"))
        wait_until(lambda: writer._down_since_s is not None)
        assert writer.queued == 1
    finally:
        postgres.start()
    try:
        assert writer.flush(20) and writer.db_up
        assert read_call(writer, "early")["caller_number"] == "5551234"
    finally:
        writer.stop()


def test_writes_are_upserts_one_statement_per_kind(db_url):
    store = RecordStore(db_url, connect_timeout_s=2)
    statements: list[str] = []
    sqlalchemy.event.listen(store.engine, "before_cursor_execute",
                            lambda _conn, _cursor, statement, *_rest: statements.append(statement.split()[0]))
    try:
        store.migrate()
        statements.clear()
        row = call_row("upserted")
        del row["variables"]  # a column with a default, left out: the default, not NULL
        turn = turn_row("upserted", 1)
        del turn["tool_calls"]
        # Two snapshots of the same turn in one batch: the last one is the row.
        assert store.write([("call", row), ("turn", turn), ("turn", turn_row("upserted", 1, heard="cut"))]) == 3
        assert statements == ["INSERT", "INSERT"]  # one per kind, calls first, no SELECT/UPDATE round trips
        store.write([("call", call_row("upserted", hangup_cause="NORMAL_CLEARING", variables={"lang": "en"})),
                     ("turn", turn_row("upserted", 2))])
        written = store.call("upserted")
        assert (written["hangup_cause"], written["variables"]) == ("NORMAL_CLEARING", {"lang": "en"})
        assert [(t["turn_index"], t["heard"], t["tool_calls"]) for t in written["turns"]] == [(1, "cut", []),
                                                                                            (2, "answer 2", [])]
        assert len(store.list_calls()) == 1
    finally:
        store.close()


def test_retention_deletes_old_calls_and_their_turns(db_url):
    writer = writer_for(db_url, retention_days=0)  # 0: kept forever, no daily run
    writer.start()
    try:
        writer.put_call(call_row("old", started_at=utc_now() - datetime.timedelta(days=91)))
        writer.put_turn(turn_row("old", 1))
        writer.put_call(call_row("recent", started_at=utc_now() - datetime.timedelta(days=89)))
        writer.put_turn(turn_row("recent", 1))
        assert writer.flush(10)
        assert writer.enforce_retention() == 0 and read_call(writer, "old") is not None
        writer.retention_days = 90
        assert writer.enforce_retention() == 1
        assert read_call(writer, "old") is None and len(read_call(writer, "recent")["turns"]) == 1
        listed = writer.using_store(writer.store.list_calls)
        assert [(c["uuid"], c["turns"]) for c in listed] == [("recent", 1)]
        writer.put_call(call_row("older", started_at=utc_now() - datetime.timedelta(days=200)))
        assert writer.flush(10)
    finally:
        writer.stop()
    daily = writer_for(db_url, retention_days=90)  # a daemon starting: its first daily run is now
    daily.start()
    try:
        wait_until(lambda: daily.using_store(daily.store.call, "older") is None)
        assert daily.using_store(daily.store.call, "recent") is not None
    finally:
        daily.stop()


# -- the database, its URL and its schema ---------------------------------------------------------------

def test_check_database_says_what_it_found_and_why_it_failed(tmp_path, postgres):
    url = postgres.new_database()
    assert "no tables yet" in check_database(url) and "PostgreSQL 15" in check_database(url)
    store = RecordStore(url)
    assert store.migrate() == "0001" and store.migrate() == "0001"  # again: nothing to do
    store.close()
    assert "schema at revision 0001, the newest" in check_database(url)
    assert "SQLite" in check_database(f"sqlite:///{tmp_path}/new.db")
    with pytest.raises(DatabaseUnavailable, match="Connection refused"):
        check_database(f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/x")
    try:
        check_database(f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/x")
    except DatabaseUnavailable as exc:
        assert "s3cret" not in str(exc)


def test_database_url_setting(tmp_path):
    tts = tmp_path / "data" / "tts"
    assert load_settings(environ={"TTS_OUTPUT_DIR": str(tts)}).database_url == f"sqlite:///{tmp_path}/data/ivr_daemon.db"
    assert load_settings(environ={"DATABASE_URL": "off", "TTS_OUTPUT_DIR": str(tts)}).database_url == ""
    assert database_url("postgresql://u:p@db.example/ivr").drivername == "postgresql+psycopg"
    assert database_url("postgres://u:p@db.example/ivr").drivername == "postgresql+psycopg"
    for bad, problem in (("mysql://u@h/db", "only sqlite"), ("nonsense", "not a database URL"),
                         ("sqlite://", "needs a file path"), ("postgresql://u:hidden@/db", "names no host")):
        with pytest.raises(ConfigError, match=problem) as caught:
            load_settings(environ={"DATABASE_URL": bad, "TTS_OUTPUT_DIR": str(tts)})
        assert caught.value.variable == "DATABASE_URL" and "hidden" not in str(caught.value)
    with pytest.raises(ConfigError, match="RECORDS_RETENTION_DAYS"):
        load_settings(environ={"RECORDS_RETENTION_DAYS": "-1", "TTS_OUTPUT_DIR": str(tts)})


def test_the_sqlite_file_is_private_and_never_a_planted_link(tmp_path):
    import os

    RecordStore(f"sqlite:///{tmp_path}/deep/er/records.db").close()
    assert oct(os.stat(tmp_path / "deep" / "er" / "records.db").st_mode & 0o777) == "0o600"
    (tmp_path / "elsewhere.db").touch()
    (tmp_path / "link.db").symlink_to(tmp_path / "elsewhere.db")
    from ivr_daemon.records import BadDatabaseUrl

    with pytest.raises(BadDatabaseUrl, match="symlink"):
        RecordStore(f"sqlite:///{tmp_path}/link.db")


def test_the_migrations_make_the_schema_the_code_uses(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from ivr_daemon.records.schema import metadata

    store = RecordStore(db_url)
    try:
        store.migrate()
        with store.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), metadata)
    finally:
        store.close()
    assert differences == []  # a change to schema.py needs a migration in records/migrations/versions/


def test_a_calls_times_are_freeswitchs_and_are_read_only_until_known():
    from ivr_daemon.records.recorder import CallRecorder

    class CountingHeaders(dict):
        reads = 0

        def get(self, key, default=None):
            CountingHeaders.reads += 1
            return super().get(key, default)

    created_us, answered_us = 1_764_600_000_000_000, 1_764_600_002_500_000
    recorder = CallRecorder(None, str(uuid_lib.uuid4()))
    recorder.learn_times(CountingHeaders({"Caller-Channel-Created-Time": str(created_us),
                                          "Caller-Channel-Answered-Time": "0"}))  # ringing: not answered yet
    assert recorder.started_at == datetime.datetime(2025, 12, 1, 14, 40)
    assert recorder.answered_at is None

    recorder.active = True  # the IVR leg parked: the call's row is written from now on
    later = {"Caller-Channel-Created-Time": str(created_us + 9_000_000),
             "Caller-Channel-Answered-Time": str(answered_us)}
    recorder.learn_times(CountingHeaders(later))
    assert recorder.started_at == datetime.datetime(2025, 12, 1, 14, 40)  # kept once recorded
    assert recorder.answered_at == datetime.datetime(2025, 12, 1, 14, 40, 2, 500000)

    CountingHeaders.reads = 0
    for _ in range(10):  # every other event of the call: nothing left to learn, nothing read
        recorder.learn_times(CountingHeaders(later, **{"Caller-Channel-Answered-Time": str(answered_us + 1)}))
    assert CountingHeaders.reads == 0
    assert recorder.answered_at == datetime.datetime(2025, 12, 1, 14, 40, 2, 500000)


# -- how records are batched into transactions ----------------------------------------------------------

class count_commits:
    """The write transactions the records process committed from now on (one per RemoteStore.write)."""

    def __init__(self, writer: RecordWriter):
        self.writer, self.before = writer, writer.store.writes

    def __getitem__(self, _index: int) -> int:
        return self.writer.store.writes - self.before


def test_records_coming_during_a_write_wait_for_the_next_gathered_one(tmp_path, db_url):
    # A record every 10 ms and a database taking 50 ms a write (a busy box's SQLite commit): before,
    # the records that came during a write went as soon as it returned, a commit every 50 ms
    # (~0.5 commits a call at 20 calls/s in the daemon); now one transaction at most every
    # GATHER_S, and every row is there.
    writer = writer_for(db_url, retention_days=0)  # no retention run's commit among the counted
    writer.start()
    writer.using_store(writer.store.migrate)
    commits = count_commits(writer)
    write = writer.store.write

    def slow_write(records):
        gevent.sleep(0.05)  # the records process busy 50 ms a write, as a slow commit keeps it
        return write(records)

    writer.store.write = slow_write
    try:
        started_s = time.monotonic()
        for index in range(60):
            writer.put_call(call_row(f"gathered-{index}"))
            writer.put_turn(turn_row(f"gathered-{index}", 1))
            gevent.sleep(0.01)
        assert writer.flush(10)
        elapsed_s = time.monotonic() - started_s
        # The first write GATHER_S after the first record, then at least GATHER_S apart: a slower
        # box only stretches elapsed_s, so this holds however busy it is.
        assert 1 <= commits[0] <= int(elapsed_s / records_writer.GATHER_S) + 1, (commits[0], elapsed_s)
        assert commits[0] < 60  # not a commit per call
        assert writer.written == 120 and writer.dropped == 0
        found = {row["uuid"]: row for row in writer.using_store(lambda: writer.store.list_calls(limit=None))}
        assert sorted(found) == sorted(f"gathered-{index}" for index in range(60))
        assert all(row["turns"] == 1 for row in found.values())
    finally:
        writer.stop()


def test_a_backlog_is_written_in_full_batches_without_gathering(tmp_path, monkeypatch):
    monkeypatch.setattr(records_writer, "GATHER_S", 60.0)  # a wait for gathering would fail the flush below
    writer = writer_for(f"sqlite:///{tmp_path}/records.db", retention_days=0)
    writer.using_store(writer.store.migrate)
    commits = count_commits(writer)
    try:
        calls = 2 * records_writer.BATCH_MAX + 50
        for index in range(calls):  # queued before the pump starts: a backlog, as after the database was down
            writer.put_call(call_row(f"backlog-{index}"))
        writer.start()
        assert writer.flush(30)
        assert commits[0] == 3 and writer.written == calls
        assert len(writer.using_store(lambda: writer.store.list_calls(limit=None))) == calls
    finally:
        writer.stop()


def test_stop_writes_the_records_gathering_after_a_write_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(records_writer, "GATHER_S", 60.0)
    url = f"sqlite:///{tmp_path}/records.db"
    writer = writer_for(url, retention_days=0)
    writer.using_store(writer.store.migrate)
    release = gevent.event.Event()
    holding = gevent.spawn(writer.using_store, release.wait, 30)  # the records process busy, as in a slow write
    wait_until(lambda: writer.store.pending == 1)
    writer.put_call(call_row("first"))
    writer.start()  # a record waiting: written at once (no gathering), its write queued behind the busy process...
    wait_until(lambda: writer.store.pending == 2)
    writer.put_call(call_row("second"))  # ...and this one comes during that write: it gathers for the next one
    release.set()
    holding.join(10)
    wait_until(lambda: writer.written == 1)
    assert writer.queued == 1
    started_s = time.monotonic()
    writer.stop(timeout_s=10)
    assert time.monotonic() - started_s < 30  # not the 60 s gathering
    assert writer.dropped == 0
    store = RecordStore(url)
    try:
        assert {row["uuid"] for row in store.list_calls(limit=None)} == {"first", "second"}
    finally:
        store.close()
