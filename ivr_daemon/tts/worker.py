"""One TTS worker process: loads a voice once, then writes one WAV per request, one at a time.

Started by :class:`ivr_daemon.tts.workers.WorkerEngine` as ``python -m ivr_daemon.tts.worker``.
Synthesis lives outside the daemon's process so that the gevent loop never waits behind it:
the worker drops to TTS_WORKER_PRIORITY (a niceness, or SCHED_IDLE) once its voice is loaded,
so the daemon's short bursts of work preempt it. That is only safe in a process of its own: a
low-priority thread of the daemon could be preempted while it holds the daemon's GIL
(phonemization, numpy), and stall the loop behind it.

The protocol is one JSON object per line. stdin: the voice spec first, then requests
``{"text": ..., "path": ...}``. The replies go to the file descriptor stdout had at start (stdout
itself is pointed at stderr, so a library's stray print cannot corrupt them): first
``{"name": ..., "voice_id": ...}`` or ``{"error": ...}``, then ``{"ok": true}`` or
``{"error": ...}`` per request. The WAV is written atomically at ``path`` (temp file, rename),
so the daemon adopts only complete files; fsynced first unless the request says
``"durable": false`` (a call's own WAV, deleted at its hangup, unlike the phrase cache's files).

The worker ends when stdin closes: the daemon closed it, or died however it died (even
SIGKILL), since the kernel closes its end of the pipe then. SIGINT and SIGTERM are ignored: a
Ctrl-C in a terminal or systemd's stop reach the whole process group, and the daemon, which
lets turns in flight finish first, decides when its workers go.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from types import SimpleNamespace


def lower_priority(priority: str) -> None:
    """TTS_WORKER_PRIORITY: ``idle`` (SCHED_IDLE) or a niceness to add, for every thread.

    Priorities are per thread on Linux, and loading the voice may have started some (torch's
    pool for Coqui); threads started later inherit it. Lowering needs no privilege.
    """
    for tid in sorted(int(name) for name in os.listdir("/proc/self/task")):
        try:
            if priority == "idle":
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + int(priority)))
        except ProcessLookupError:
            pass  # a thread that has just ended


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    spec = json.loads(sys.stdin.buffer.readline() or b"null")
    if not isinstance(spec, dict):
        return 2  # not started by the daemon
    jobs: queue.Queue = queue.Queue()
    threading.Thread(target=_read_requests, args=(jobs,), name="tts-worker-requests", daemon=True).start()

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")

    from ivr_daemon.logs import configure_logging, get_logger
    from ivr_daemon.tts import make_tts_engine
    from ivr_daemon.tts.base import TtsModelUnavailable, one_line

    configure_logging(spec["log_level"], spec["log_format"])
    log = get_logger(__name__).bind(tts_worker_pid=os.getpid())
    try:
        engine = make_tts_engine(SimpleNamespace(**spec["voice"]))
    except TtsModelUnavailable as exc:
        reply({"error": str(exc)})
        return 2
    # Before the daemon is told the worker is ready, so the first call's sentences are not the
    # model's first runs; a failure here is logged, and the real sentences will say if it persists.
    warm_started_s = time.monotonic()
    try:
        engine.warm_up()
    except Exception as exc:
        log.warning("tts_warm_up_failed", engine=engine.name, error=one_line(exc))
    else:
        log.info("tts_warmed_up", engine=engine.name, warm_up_ms=round((time.monotonic() - warm_started_s) * 1000))
    # Lowered once the voice is loaded and warm: a start-up must finish however busy the box is,
    # and no unprivileged process can raise its priority again.
    lower_priority(spec["priority"])
    reply({"name": engine.name, "voice_id": engine.voice_id})
    while True:
        reply(serve(engine, jobs.get(), log))


def serve(engine, request: dict, log) -> dict:
    """One request: the WAV written (fsynced unless ``durable`` is false), and the reply to send."""
    from ivr_daemon.tts.base import TtsError, one_line

    try:
        engine.synthesize_to_wav(request["text"], request["path"], durable=request.get("durable", True))
    except TtsError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # a bug must cost one sentence, not the worker
        log.exception("tts_worker_request_failed")
        return {"error": f"{engine.name} worker failed: {one_line(exc)}"}
    return {"ok": True}


def _read_requests(jobs: queue.Queue) -> None:
    try:
        for line in sys.stdin.buffer:
            jobs.put(json.loads(line))
    finally:
        # The daemon closed the pipe or is gone (or wrote nonsense): a synthesis under way has
        # nobody to give it to.
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
