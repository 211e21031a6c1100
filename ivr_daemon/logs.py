"""Logging: structlog for every line, JSON by default, console on request.

Modules take a logger with ``get_logger(__name__)`` and bind ``call_uuid`` for anything
about a call, so every line of a call can be found with one grep.
"""

from __future__ import annotations

import hashlib
import logging
import sys

import structlog


def use_native_logging_locks() -> None:
    """Give the logging module and every handler OS locks, not gevent's.

    Synthesis runs in native worker threads, and it logs (our engines, Coqui itself). Under
    monkey-patching ``threading.RLock`` is gevent's, which cannot be shared between the hub
    and other threads: a worker and a greenlet logging at once can hang the whole daemon.
    An OS lock is held only for one write to stderr, which never yields to the hub.
    """
    from gevent.monkey import get_original

    native_rlock = get_original("_thread", "RLock")

    def create_native_lock(handler: logging.Handler) -> None:
        handler.lock = native_rlock()

    logging.Handler.createLock = create_native_lock
    logging._lock = native_rlock()  # the module's own lock (logger and handler registries)
    for reference in list(logging._handlerList):
        handler = reference()
        if handler is not None:
            handler.lock = native_rlock()


def configure_logging(level: str = "INFO", fmt: str = "json", stream=None) -> None:
    """Route structlog and the stdlib (greenswitch, requests, TTS) through one renderer."""
    use_native_logging_locks()
    stream = stream or sys.stderr
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        # A line below the level is dropped first, before any processor has worked on it: a
        # DEBUG line on the hot path (every event of a burst) then costs a level check.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    # Nothing we render uses the caller's file and line, thread or process names: the stdlib
    # then skips its stack walk and lookups for every record (logging's documented switches).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


def spoken_text(field: str, text: str | None, *, verbatim: bool) -> dict[str, object]:
    """Log fields for a caller's words or a reply: the text itself only when ``verbatim``.

    Otherwise only its length and a short SHA-256, enough to match lines of the same
    utterance without putting what callers said in every log (``LOG_TRANSCRIPTS``; their words
    belong in call records).
    """
    if text is None:
        return {field: None}
    if verbatim:
        return {field: text}
    return {f"{field}_chars": len(text), f"{field}_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]}
