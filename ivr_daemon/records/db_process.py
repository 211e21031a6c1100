"""The records' database process: one RecordStore, its requests run one at a time.

Started by :class:`ivr_daemon.records.remote.RemoteStore` as ``python -m
ivr_daemon.records.db_process``. The records' database work (SQLAlchemy Core, sqlite3 or
psycopg) lives outside the daemon's process so that its Python work never holds the daemon's
GIL: as a native thread of the daemon, descheduled by the OS on a busy box while it held the
GIL, it made the gevent loop wait 12-108 ms (docs/performance.md, "Is it the GIL?").

The protocol is pickled, length-prefixed frames (``multiprocessing.connection.Connection`` over
the pipes; both ends are ours). stdin: first the spec ``{"url", "connect_timeout_s",
"log_level", "log_format"}``, then requests ``(method, args, kwargs)``. The replies go to the
file descriptor stdout had at start (stdout itself is pointed at stderr, so a library's stray
print cannot corrupt them): first ``("ready", pid)`` or ``("raise", RecordsError)``, then per
request ``("ok", result)``, ``("raise", RecordsError)`` (DatabaseUnavailable, RecordRefused:
raised again in the daemon) or ``("failed", "Type: message")`` (a bug; its traceback is logged
here).

The process ends when stdin closes: the daemon closed it, or died however it died (even
SIGKILL), since the kernel closes its end of the pipe then; a reader thread notices it even
while a request hangs in the driver. SIGINT and SIGTERM are ignored: a Ctrl-C in a terminal or
systemd's stop reach the whole process group, and the daemon, which flushes the records queued
first, decides when this process goes.

It imports the store's needs only (SQLAlchemy, the driver, Alembic, structlog): not gevent,
not the TTS stack.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection

# What the daemon may ask of the store (RemoteStore's methods).
REQUESTS = frozenset({"migrate", "revision", "ping", "server_version", "write", "delete_older_than",
                      "list_calls", "call", "close"})


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    requests = Connection(0, writable=False)
    replies = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    try:
        spec = requests.recv()
    except (EOFError, OSError):
        return 0
    if not isinstance(spec, dict):
        return 2  # not started by the daemon

    from ivr_daemon.logs import configure_logging, get_logger
    from ivr_daemon.records.store import RecordsError, RecordStore

    configure_logging(spec["log_level"], spec["log_format"])
    log = get_logger("ivr_daemon.records.db_process").bind(records_process_pid=os.getpid())
    try:
        store = RecordStore(spec["url"], connect_timeout_s=spec["connect_timeout_s"])
    except RecordsError as exc:
        replies.send(("raise", exc))
        return 2
    jobs: queue.Queue = queue.Queue()
    threading.Thread(target=_read_requests, args=(requests, jobs), name="records-requests", daemon=True).start()
    replies.send(("ready", os.getpid()))
    while True:
        name, args, kwargs = jobs.get()
        try:
            if name not in REQUESTS:
                raise ValueError(f"unknown request {name!r}")
            reply = ("ok", getattr(store, name)(*args, **kwargs))
        except RecordsError as exc:
            reply = ("raise", exc)
        except Exception as exc:  # a bug must cost one request, not the process
            log.exception("records_request_failed", request=name)
            reply = ("failed", f"{type(exc).__name__}: {str(exc)[:300]}")
        replies.send(reply)


def _read_requests(requests: Connection, jobs: queue.Queue) -> None:
    try:
        while True:
            jobs.put(requests.recv())
    except BaseException:
        pass
    # The daemon closed the pipe or is gone (or wrote nonsense): a request under way has nobody
    # to give its result to. Connections are the kernel's to close.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
