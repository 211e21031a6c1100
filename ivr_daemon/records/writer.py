"""Call records written off the gevent loop, never in a call's way, never lost silently.

``put_call``/``put_turn`` only put a record into a bounded in-memory queue and return. A
pump greenlet hands batches of it to **one child process** (:mod:`ivr_daemon.records.remote`:
``python -m ivr_daemon.records.db_process``) that does the blocking database work: the SQLite
and libpq calls never hold the loop, and their Python work (SQLAlchemy's) never holds the
daemon's GIL. Every use of the database (writes, migrations, retention, the transcript reads of
``GET /calls/{uuid}/transcript``, the ping) goes to that same process, one request at a time,
and the daemon opens no database connection of its own. A records process that dies is
restarted and the batch it had is sent again: records stay queued until written.

Records are snapshots, keyed (a call by its UUID, a turn by call and index): a newer snapshot
of a record still waiting replaces it in place. A call's row therefore stays ahead of its turns,
and a call whose state changes ten times while the database is down waits as one record.

While the database is down (connection refused, server gone mid-write, file locked) nothing is
dropped: the batch stays queued and is retried with backoff (0.5 s doubling to 10 s), and
``ivr_records_db_up`` is 0. Only a full queue (``RECORDS_QUEUE_MAX`` records waiting: a new
record is refused, the ones waiting are kept) or a record the database itself refuses is
dropped, and each drop is logged and counted in ``ivr_records_dropped_total``. At shutdown the
queue is flushed within the budget it is given; what is left is logged with its count.
"""

from __future__ import annotations

import collections
import datetime
import time
from typing import Callable, TypeVar

import gevent
import gevent.event

from ivr_daemon.logs import get_logger
from ivr_daemon.metrics import DaemonMetrics
from ivr_daemon.records.remote import RecordsProcessError, RemoteStore
from ivr_daemon.records.store import DatabaseUnavailable, RecordRefused, RecordStore, utc_now

log = get_logger(__name__)

T = TypeVar("T")

DEFAULT_QUEUE_MAX = 10_000
BATCH_MAX = 200  # records in one transaction
# One transaction at most every GATHER_S (after the first record of a quiet spell, and between
# two writes while records keep coming): one commit for many records, and a turn's snapshots
# (sent, played out) often become one write. Each commit costs the records thread far more than
# a row (SQLite: the rollback journal created, written, fdatasync'ed and deleted, ~1 ms of kernel
# time in the daemon; PostgreSQL: a round trip and the pool's ping); writing again as soon as the
# last write returned made 20 calls a second ~0.5 commits a call. A record is still in the
# database well within a second; a full batch and the shutdown's flush do not wait.
GATHER_S = 0.25
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 10.0
PROBE_INTERVAL_S = 30.0  # while idle: is the database still there (ivr_records_db_up)?
RETENTION_INTERVAL_S = 24 * 3600.0
RETENTION_RETRY_S = 3600.0

Key = tuple[str, ...]


class RecordWriter:
    """Owned by the daemon: ``start()``, ``put_*`` from any greenlet, ``stop()`` at shutdown."""

    def __init__(self, store: RecordStore | RemoteStore, metrics: DaemonMetrics | None = None, *,
                 queue_max: int = DEFAULT_QUEUE_MAX, retention_days: int = 90,
                 backoff_base_s: float = BACKOFF_BASE_S, backoff_max_s: float = BACKOFF_MAX_S):
        # The database work in the records process, built from what ``store`` was built from
        # (its URL and options); a RecordStore given is never connected in this process.
        self.store = store if isinstance(store, RemoteStore) else RemoteStore(store)
        self.metrics = metrics if metrics is not None else DaemonMetrics()
        self.queue_max = max(1, queue_max)
        self.retention_days = retention_days
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._waiting: collections.OrderedDict[Key, tuple[str, dict]] = collections.OrderedDict()
        self._wakeup = gevent.event.Event()
        self._retry_now = gevent.event.Event()  # cuts a backoff short: the shutdown's last try
        self._draining = False  # stop() is flushing: write what is left now, no gathering
        self._idle = gevent.event.Event()
        self._idle.set()
        self._greenlets: list[gevent.Greenlet] = []
        self._stopping = False
        self.db_up = False
        self._down_since_s: float | None = None
        self.written = 0
        self.dropped = 0
        self.metrics.watch_records(self)

    def use_metrics(self, metrics: DaemonMetrics) -> None:
        """Count into the daemon's metrics (build_conversation_daemon makes them)."""
        self.metrics = metrics
        metrics.watch_records(self)

    # -- the daemon's side ----------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Records waiting (the batch being written included)."""
        return len(self._waiting)

    def start(self) -> None:
        if not self._greenlets:
            self._greenlets = [gevent.spawn(self._pump)]
            if self.retention_days > 0:
                self._greenlets.append(gevent.spawn(self._retain))

    def put_call(self, row: dict) -> bool:
        """Queue the newest snapshot of a call's row; False when it could not be queued."""
        return self._put(("call", row["uuid"]), ("call", row))

    def put_turn(self, row: dict) -> bool:
        """Queue the newest snapshot of a turn's row; False when it could not be queued."""
        return self._put(("turn", row["call_uuid"], str(row["turn_index"])), ("turn", row))

    def _put(self, key: Key, record: tuple[str, dict]) -> bool:
        if key in self._waiting:
            self._waiting[key] = record  # in place: the call stays ahead of its turns
        elif self._stopping or len(self._waiting) >= self.queue_max:
            self._drop([record], "stopped" if self._stopping else "queue_full")
            return False
        else:
            self._waiting[key] = record
        self._idle.clear()
        self._wakeup.set()
        return True

    def pending_for(self, call_uuid: str) -> bool:
        """Some record of this call is still waiting to be written."""
        return any(key[1] == call_uuid for key in self._waiting)

    def using_store(self, work: Callable[..., T], *args) -> T:
        """``work(*args)``, which uses ``self.store``, with the store to itself: its requests go to
        the records process one after the other; the calling greenlet waits, the loop does not."""
        with self.store.exclusive():
            return work(*args)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued record is written (or dropped), at most ``timeout_s``."""
        return self._idle.wait(timeout_s) and not self._waiting

    def stop(self, timeout_s: float = 1.0) -> None:
        """Write what can be within ``timeout_s`` (records still arriving meanwhile, the last
        calls' clean-ups, are taken too), then take no more and log what is left."""
        if self._waiting:
            self._draining = True
            self._retry_now.set()  # a pump waiting out a backoff or gathering tries once more, now
            self.flush(timeout_s)
        self._stopping = True
        left = list(self._waiting.values())
        if left:
            # The database is down or slow: these were not written. Said loudly, with the calls.
            log.error("records_abandoned_at_shutdown", count=len(left),
                      calls=sorted({row.get("uuid") or row.get("call_uuid") for _kind, row in left})[:20])
            self._drop(left, "shutdown")
            self._waiting.clear()
        # Not waited for: a loop this busy may take a while to run them, and the shutdown has a budget.
        gevent.killall(self._greenlets, block=False)
        self._greenlets = []
        busy = self.store.pending  # greenlets with a request in the records process or waiting to
        if busy:
            # A write or read hangs in the driver (a black-holed server): waiting for it would
            # hold the shutdown. The process is killed; what it was writing is rolled back.
            log.warning("records_process_busy_at_stop", requests=busy)
            self.store.kill()
            return
        self.store.close(timeout_s=1.0)  # the connections closed by the process, which then ends

    # -- the pump -------------------------------------------------------------------------------

    def _pump(self) -> None:
        backoff_s = self.backoff_base_s
        while True:
            if not self._waiting:
                self._idle.set()
                self._wakeup.clear()
                if not self._wakeup.wait(PROBE_INTERVAL_S):
                    self._probe()
                elif not self._stopping:
                    self._gather(time.monotonic() + GATHER_S)
                continue
            batch = list(self._waiting.items())[:BATCH_MAX]
            next_write_s = time.monotonic() + GATHER_S
            try:
                written = self._write([record for _key, record in batch])
            except DatabaseUnavailable as exc:
                self._note_down(exc, len(self._waiting), backoff_s)
                self._retry_now.wait(backoff_s)
                self._retry_now.clear()
                backoff_s = min(self.backoff_max_s, backoff_s * 2)
                continue
            except RecordsProcessError as exc:
                # The records process died on this batch twice, or cannot start (logged by
                # RemoteStore): the batch stays queued and is tried again on a fresh one.
                log.error("records_batch_not_written", batch=len(batch), error=str(exc)[:300], retry_in_s=backoff_s)
                self._retry_now.wait(backoff_s)
                self._retry_now.clear()
                backoff_s = min(self.backoff_max_s, backoff_s * 2)
                continue
            except Exception:  # a bug here must not end the pump: the next records still go
                log.exception("records_writer_failed", batch=len(batch))
                gevent.sleep(backoff_s)
                continue
            backoff_s = self.backoff_base_s
            self._note_up()
            for key, record in batch:
                if self._waiting.get(key) is record:  # not replaced by a newer snapshot meanwhile
                    del self._waiting[key]
            self.written += written
            self.metrics.records_written_total.inc(written)
            if self._waiting and len(batch) < BATCH_MAX:
                # Records that came during the write: gather more with them rather than commit
                # them alone now. A full batch means a backlog: on with it at once.
                self._gather(next_write_s)

    def _gather(self, until_s: float) -> None:
        """Let records gather until ``until_s`` (monotonic), unless stop() is draining the queue."""
        if not self._draining:
            self._retry_now.wait(max(0.0, until_s - time.monotonic()))  # stop() sets it: no gathering then

    def _write(self, records: list[tuple[str, dict]]) -> int:
        """Write the batch; on a refused record, one by one, dropping only the refused ones."""
        try:
            return self.using_store(self.store.write, records)
        except RecordRefused:
            pass
        written = 0
        for record in records:
            try:
                written += self.using_store(self.store.write, [record])
            except RecordRefused as exc:
                log.error("record_refused", kind=record[0], call_uuid=_call_of(record), error=str(exc))
                self._drop([record], "refused")
        return written

    def _drop(self, records: list[tuple[str, dict]], reason: str) -> None:
        self.dropped += len(records)
        self.metrics.records_dropped_total.labels(reason=reason).inc(len(records))
        if reason != "shutdown":  # already logged, all together
            for record in records:
                log.warning("record_dropped", reason=reason, kind=record[0], call_uuid=_call_of(record),
                            queue_max=self.queue_max)

    def _probe(self) -> None:
        try:
            self.using_store(self.store.ping)
        except DatabaseUnavailable as exc:
            self._note_down(exc, 0, PROBE_INTERVAL_S)
        except RecordsProcessError as exc:  # logged by RemoteStore; the database is not to blame
            log.warning("records_probe_failed", error=str(exc)[:300])
        else:
            self._note_up()

    def _note_down(self, exc: Exception, waiting: int, retry_in_s: float) -> None:
        if self.db_up or self._down_since_s is None:
            self._down_since_s = time.monotonic()
            log.error("records_database_down", database=self.store.description, error=str(exc)[:300],
                      records_waiting=waiting, retry_in_s=retry_in_s)
        else:
            log.debug("records_database_still_down", error=str(exc)[:300], records_waiting=waiting,
                      retry_in_s=retry_in_s)
        self.db_up = False

    def _note_up(self) -> None:
        if not self.db_up and self._down_since_s is not None:
            log.info("records_database_back", database=self.store.description,
                     down_s=round(time.monotonic() - self._down_since_s, 1), records_waiting=len(self._waiting))
        elif not self.db_up:
            log.info("records_database_ready", database=self.store.description)
        self.db_up = True
        self._down_since_s = None

    # -- retention ------------------------------------------------------------------------------

    def _retain(self) -> None:
        """Daily: delete the calls (and their turns) older than RECORDS_RETENTION_DAYS."""
        while True:
            wait_s = RETENTION_INTERVAL_S if self.enforce_retention() is not None else RETENTION_RETRY_S
            gevent.sleep(wait_s)

    def enforce_retention(self) -> int | None:
        """Delete what is past retention now; how many calls (None: the database was down)."""
        if self.retention_days <= 0:
            return 0  # kept forever
        cutoff = utc_now() - datetime.timedelta(days=self.retention_days)
        try:
            deleted = self.using_store(self.store.delete_older_than, cutoff)
        except (DatabaseUnavailable, RecordRefused, RecordsProcessError) as exc:
            log.warning("records_retention_failed", error=str(exc)[:300], retry_in_s=RETENTION_RETRY_S)
            return None
        log.info("records_retention", calls_deleted=deleted, retention_days=self.retention_days)
        return deleted


def _call_of(record: tuple[str, dict]) -> str | None:
    row = record[1]
    return row.get("uuid") or row.get("call_uuid")


__all__ = ["DEFAULT_QUEUE_MAX", "RecordWriter"]
