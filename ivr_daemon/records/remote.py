"""RemoteStore: the daemon's RecordStore, its database work done in a child process.

The SQL of the call records (SQLAlchemy Core, sqlite3 or psycopg) is Python work: on a native
thread of the daemon it held the daemon's GIL, and on a busy 2-core box the OS descheduled that
thread while it held it, the gevent loop waiting for it far longer than the switch interval
(docs/performance.md, "Is it the GIL?"). In a process of its own
(``ivr_daemon/records/db_process.py``) it has a GIL of its own.

The methods are RecordStore's (``write``, ``migrate``, ``call``...), same arguments, same
results, same exceptions (DatabaseUnavailable, RecordRefused raised here as the child raised
them; a bug in the child is a :class:`RecordsProcessError`). A call sends a pickled request
down a pipe and waits for the reply cooperatively (gevent's non-blocking reads and writes of
the pipe, stdlib framing): the calling greenlet waits, the loop does not. One request at a time.

A child that dies (a segfault in the driver, the OOM killer, an operator's kill) is logged
(``records_process_died``) and a fresh one started in its place; a request it had is sent again
to the fresh one (every request is idempotent: writes are upserts), once. The child dies with
the daemon: ``close`` ends it, and a daemon that dies however it dies closes its stdin.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

import gevent
import gevent.lock
import gevent.os
import gevent.subprocess
from gevent.monkey import get_original

from ivr_daemon.child_exit import how_it_ended
from ivr_daemon.logs import get_logger
from ivr_daemon.records.store import RecordRefused, RecordsError, RecordStore

log = get_logger(__name__)

# gevent's os.close (monkey-patched) defers the close to the loop's next check phase, which a loop
# idle in a long wait (a reap's timeout) reaches only when that wait ends: the child would see
# its stdin end seconds late. These pipes are closed only when no greenlet waits on them.
_close_now = get_original("os", "close")

# Importing SQLAlchemy, Alembic and the driver and building the engine: well under a second
# idle; a loaded box may take several.
START_TIMEOUT_S = 60.0
# close(): the child's own close (connections disposed), then its exit, each within this.
CLOSE_S = 1.0
REAP_S = 2.0
# A SIGKILLed process is gone in milliseconds unless stuck in the kernel; one still a zombie when
# the daemon exits is reaped by init.
CLOSE_REAP_S = 0.5


class RecordsProcessError(RecordsError):
    """The records process failed a request (a bug there), could not start, or died twice on it."""


class _CooperativeConnection(Connection):
    """multiprocessing's framing and pickling, over non-blocking pipes waited on by gevent."""

    def _send(self, buf, write=gevent.os.nb_write):
        super()._send(buf, write)

    def _recv(self, size, read=gevent.os.nb_read):
        return super()._recv(size, read)

    def _close(self, _close=_close_now):
        _close(self._handle)


class _Child:
    """One records process and its two pipes."""

    def __init__(self, spec: dict):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self.proc = gevent.subprocess.Popen([sys.executable, "-m", "ivr_daemon.records.db_process"],
                                                stdin=to_child_r, stdout=from_child_w, close_fds=True)
        except BaseException:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                _close_now(fd)
            raise
        _close_now(to_child_r)  # the child's ends: its death is then seen as the end of the replies
        _close_now(from_child_w)
        for fd in (to_child_w, from_child_r):
            os.set_blocking(fd, False)
        self.requests = _CooperativeConnection(to_child_w, readable=False)
        self.replies = _CooperativeConnection(from_child_r, writable=False)
        self.pid = self.proc.pid
        self.requests.send(spec)

    def ask(self, message, pickled: bytes | None = None):
        """Send ``message`` (or its ``pickled`` bytes; None: nothing), return the reply;
        EOFError/OSError when the child is gone."""
        if pickled is not None:
            self.requests.send_bytes(pickled)
        elif message is not None:
            self.requests.send(message)
        return self.replies.recv()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def reap(self, timeout_s: float = REAP_S) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except gevent.subprocess.TimeoutExpired:
            return None

    def close_pipes(self) -> None:
        """Closing stdin ends the child (see db_process)."""
        for connection in (self.requests, self.replies):
            with contextlib.suppress(OSError):
                connection.close()


class RemoteStore:
    """A :class:`RecordStore` (its URL and options) served by a child process, started at the first request."""

    def __init__(self, store: RecordStore, *, log_level: str = "INFO", log_format: str = "json"):
        self.description = store.description
        # What the store was built from: the child builds its own (the password only crosses the pipe).
        self._spec = {"url": store.url.render_as_string(hide_password=False),
                      "connect_timeout_s": store.connect_timeout_s,
                      "log_level": log_level, "log_format": log_format}
        self._lock = gevent.lock.Semaphore(1)  # one request at a time on the pipes
        self._owner: gevent.Greenlet | None = None  # the greenlet in exclusive(), whose requests pass
        self._child: _Child | None = None
        self._watchers: set[gevent.Greenlet] = set()
        self._closed = False
        self.pending = 0  # greenlets using the store or waiting to (see exclusive)
        self.writes = 0  # write transactions the child has committed

    @property
    def pid(self) -> int | None:
        """The records process's pid (None: none running now)."""
        return None if self._child is None else self._child.pid

    @contextlib.contextmanager
    def exclusive(self):
        """The store to the calling greenlet alone (requests inside are not interleaved with others')."""
        me = gevent.getcurrent()
        if self._owner is me:
            yield  # a request inside using_store's work: the store is already this greenlet's
            return
        self.pending += 1
        try:
            with self._lock:
                self._owner = me
                try:
                    yield
                finally:
                    self._owner = None
        finally:
            self.pending -= 1

    # -- RecordStore's methods ------------------------------------------------------------------

    def migrate(self) -> str:
        return self._request("migrate")

    def revision(self) -> str | None:
        return self._request("revision")

    def ping(self) -> None:
        return self._request("ping")

    def server_version(self) -> str:
        return self._request("server_version")

    def write(self, records: list[tuple[str, dict]]) -> int:
        written = self._request("write", records)
        self.writes += 1
        return written

    def delete_older_than(self, cutoff):
        return self._request("delete_older_than", cutoff)

    def list_calls(self, **filters) -> list[dict]:
        return self._request("list_calls", **filters)

    def call(self, call_uuid: str) -> dict | None:
        return self._request("call", call_uuid)

    def close(self, timeout_s: float = CLOSE_S) -> None:
        """The child closes its connections and ends; killed if it does not within ``timeout_s``.
        Idempotent; a request after it starts a fresh child."""
        gevent.killall(list(self._watchers), block=False)
        child, self._child = self._child, None
        if child is None:
            return
        deadline_s = time.monotonic() + timeout_s  # the whole close: it runs in the shutdown's budget
        try:
            with gevent.Timeout(timeout_s):
                with self._lock:
                    _check(child.ask(("close", (), {})), "close")
        except (gevent.Timeout, EOFError, OSError, RecordsError) as exc:
            log.warning("records_process_close_failed", pid=child.pid, error=repr(exc)[:200])
        child.close_pipes()  # its stdin's end: it exits
        if child.reap(max(0.05, deadline_s - time.monotonic())) is None:
            child.kill()
            child.reap(CLOSE_REAP_S)
        log.info("records_process_stopped", pid=child.pid)

    def kill(self) -> None:
        """SIGKILL the child now (a request hanging in the driver at shutdown); its requester sees it gone."""
        self._closed = True
        gevent.killall(list(self._watchers), block=False)
        child, self._child = self._child, None
        if child is not None:
            child.kill()
            child.reap(REAP_S)
            log.warning("records_process_killed", pid=child.pid)

    # -- the child ------------------------------------------------------------------------------

    def _request(self, name: str, *args, **kwargs):
        with self.exclusive():
            if self._closed:
                raise RecordsProcessError(f"{self.description}: the records process is stopped")
            try:
                # Pickled before the pipe is touched: a value that cannot cross it refuses the
                # request (a record: dropped, as a value the database refuses), not the process.
                pickled = bytes(ForkingPickler.dumps((name, args, kwargs)))
            except Exception as exc:
                raise RecordRefused(f"{self.description}: {name} cannot be sent to the records process: "
                                    f"{type(exc).__name__}: {str(exc)[:200]}") from None
            for attempt in (1, 2):
                child = self._child or self._start()
                try:
                    reply = child.ask(None, pickled)
                except (EOFError, OSError):
                    self._lost(child, request=name, attempt=attempt)
                    continue
                except BaseException:
                    # Interrupted between request and reply (a greenlet killed, a Timeout): the
                    # reply would be read by the next request. This child cannot be trusted.
                    self._discard(child, request=name)
                    raise
                return _check(reply, name)
            raise RecordsProcessError(f"{self.description}: the records process died twice on {name}")

    def _start(self) -> _Child:
        started_s = time.monotonic()
        try:
            child = _Child(self._spec)
        except OSError as exc:
            raise RecordsProcessError(f"the records process could not start: {exc}") from None
        try:
            with gevent.Timeout(START_TIMEOUT_S):
                hello = child.ask(None)
        except (gevent.Timeout, EOFError, OSError) as exc:
            child.kill()
            code = child.reap()
            child.close_pipes()
            how = "did not start in time" if isinstance(exc, gevent.Timeout) else _ended(child.pid, code)
            log.error("records_process_start_failed", pid=child.pid, error=how)
            raise RecordsProcessError(f"{self.description}: the records process {how}") from None
        if hello[0] != "ready":
            child.close_pipes()
            child.reap()
            _check(hello, "start")
        self._child = child
        watcher = gevent.spawn(self._watch, child)
        self._watchers.add(watcher)
        watcher.link(self._watchers.discard)
        log.info("records_process_started", pid=child.pid, database=self.description,
                 seconds=round(time.monotonic() - started_s, 2))
        return child

    def _watch(self, child: _Child) -> None:
        """A child that dies idle is replaced at once, before a request needs it."""
        code = child.proc.wait()
        with self._lock:
            if self._closed or self._child is not child:
                return  # stopping, or a request saw it die and replaced it
            self._lost(child, code=code)
            try:
                self._start()
            except RecordsError:
                pass  # logged; the next request tries again

    def _discard(self, child: _Child, **fields) -> None:
        if self._child is child:
            self._child = None
        child.kill()
        child.close_pipes()
        gevent.spawn(child.reap)  # not waited for here: the interrupted greenlet must go on
        log.warning("records_process_discarded", pid=child.pid, reason="request interrupted", **fields)

    def _lost(self, child: _Child, code: int | None = None, **fields) -> None:
        """``child`` is gone: reaped and forgotten, its death said once."""
        if self._child is child:
            self._child = None
        child.kill()
        if code is None:
            code = child.reap()
        child.close_pipes()
        log.error("records_process_died", pid=child.pid, error=_ended(child.pid, code), database=self.description,
                  **fields)


def _check(reply: tuple, request: str):
    """The child's reply to ``request``: its result, or its exception raised here."""
    kind, value = reply
    if kind == "ok":
        return value
    if kind == "raise" and isinstance(value, RecordsError):
        raise value
    raise RecordsProcessError(f"records process failed {request}: {value}")


def _ended(pid: int, code: int | None) -> str:
    return how_it_ended("records process", pid, code)


__all__ = ["RecordsProcessError", "RemoteStore"]
