"""WorkerEngine: a voice synthesized in worker processes, so that syntheses never hold the
daemon's GIL and always yield the CPU to the daemon's loop.

Each worker (``ivr_daemon/tts/worker.py``) loads the voice once and writes one WAV at a time
at the path it is given; only the text and the path cross the process boundary. The workers
run at TTS_WORKER_PRIORITY (niceness 10 by default, or SCHED_IDLE), so when every core is
synthesizing, the loop (a cached phrase's broadcast, a barge-in) is scheduled first. The
daemon itself loads no model; it learns the voice's name and id (part of every phrase-cache
key) from the workers.

Everything about the workers happens on the gevent loop (gevent.subprocess, cooperative
pipes); ``synthesize_to_wav`` called from a native thread (the synthesis pool, where the phrase
cache's locks live) hands its request to the loop and waits without holding the GIL.

A worker that dies (a segfault in native code, the OOM killer) costs the sentence it was
saying a TtsSynthesisFailed, and a fresh worker loads in its place; one that dies idle is
replaced before a sentence needs it. The workers die with the daemon: ``close`` kills them,
and a daemon that dies however it dies closes their stdin, which ends them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gevent
import gevent.queue
import gevent.subprocess
from gevent.monkey import get_original

from ivr_daemon.child_exit import how_it_ended
from ivr_daemon.logs import get_logger
from ivr_daemon.tts.base import TtsEngine, TtsModelUnavailable, TtsSynthesisFailed, native_lock, one_line

log = get_logger(__name__)

__all__ = ["WorkerEngine", "WorkerDied"]

# Loading a voice: Piper takes ~1 s, Coqui (importing torch, maybe a download) far longer.
WORKER_START_TIMEOUT_S = 600.0
# A killed worker is reaped within this, or left to the kernel (it cannot outlive SIGKILL).
WORKER_REAP_S = 2.0
# close() reaps all its killed workers within this, together: it runs inside the daemon's 10 s
# shutdown budget. A SIGKILLed process is gone in milliseconds unless stuck in the kernel (D state);
# one that is still a zombie when the daemon exits is reaped by init.
CLOSE_REAP_S = 0.5

_native_thread_id = get_original("_thread", "get_ident")


class WorkerDied(Exception):
    """The worker process ended while it had (or was given) a request."""


class _Worker:
    """One worker process and its pipes; used by one greenlet at a time."""

    def __init__(self, spec: dict):
        self.proc = gevent.subprocess.Popen(
            [sys.executable, "-m", "ivr_daemon.tts.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
        )
        self.pid = self.proc.pid
        self.name = self.voice_id = ""
        self.busy = False  # a greenlet is reading or writing the pipes
        self._send(spec)

    @contextlib.contextmanager
    def _in_use(self):
        self.busy = True
        try:
            yield
        finally:
            self.busy = False

    def wait_ready(self, timeout_s: float) -> None:
        """The voice loaded: name and voice_id set. Raises TtsModelUnavailable with the worker's reason."""
        try:
            with self._in_use(), gevent.Timeout(timeout_s):
                hello = self._receive()
        except gevent.Timeout:
            raise TtsModelUnavailable(f"TTS worker {self.pid} did not load the voice within {timeout_s:.0f} s") \
                from None
        except WorkerDied as exc:
            raise TtsModelUnavailable(str(exc)) from None
        if "error" in hello:
            raise TtsModelUnavailable(hello["error"])
        self.name, self.voice_id = hello["name"], hello["voice_id"]

    def synthesize(self, text: str, path: str, durable: bool) -> None:
        """Raises TtsSynthesisFailed as the engine did, WorkerDied when the process is gone."""
        with self._in_use():
            self._send({"text": text, "path": path, "durable": durable})
            reply = self._receive()
        if "error" in reply:
            raise TtsSynthesisFailed(reply["error"])

    def kill(self) -> None:
        """SIGKILL; whoever is reading the replies sees the end of the pipe and reports it."""
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def reap(self, timeout_s: float = WORKER_REAP_S) -> int | None:
        """The exit status, once the process is gone (None if it lingers past ``timeout_s``)."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except gevent.subprocess.TimeoutExpired:
            return None

    def close_pipes(self) -> None:
        """Only when no greenlet reads or writes them: gevent refuses to close a pipe in use."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def _send(self, message: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (ValueError, OSError):  # BrokenPipeError, or closed
            raise WorkerDied(self._death()) from None

    def _receive(self) -> dict:
        try:
            line = self.proc.stdout.readline()
        except (ValueError, OSError):
            line = b""
        if not line:
            raise WorkerDied(self._death())
        try:
            reply = json.loads(line)
            if not isinstance(reply, dict):
                raise ValueError("not an object")
        except ValueError:
            # Not our protocol any more (native code wrote to the pipe): the worker cannot be trusted.
            self._death()
            raise WorkerDied(f"TTS worker {self.pid} broke the protocol ({line[:60]!r}) and was stopped") from None
        return reply

    def _death(self) -> str:
        self.kill()
        code = self.reap()
        self.close_pipes()
        return _ended(self.pid, code)


class _Slot:
    """A place for one worker. After a crash a fresh worker loads in it (``replacing``); if that
    fails the slot stays empty with the reason in ``error``, and the next request tries again."""

    def __init__(self, worker: _Worker | None):
        self.worker = worker
        self.error = ""
        self.in_use = False  # a request holds it: a death is that request's to report
        self.replacing: gevent.Greenlet | None = None


class WorkerEngine(TtsEngine):
    """A voice (``settings.tts_engine`` with its model settings) spoken by ``workers`` processes.

    As many syntheses run at once as there are workers; more wait for one to be free.
    """

    def __init__(self, settings, workers: int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._spec = {
            "voice": {field: getattr(settings, field) for field in
                      ("tts_engine", "coqui_model", "coqui_model_path", "coqui_config_path", "piper_voice")},
            "priority": settings.tts_worker_priority,
            "log_level": settings.log_level,
            "log_format": settings.log_format,
        }
        self.name = self._spec["voice"]["tts_engine"]
        self._loop = gevent.get_hub().loop
        self._loop_thread = _native_thread_id()
        self._closed = False
        self._all: set[_Worker] = set()
        self._slots: gevent.queue.Queue = gevent.queue.Queue()
        self._helpers: set[gevent.Greenlet] = set()  # exit watchers and restarts, killed at close
        started_s = time.monotonic()
        try:
            starting = [self._spawn() for _ in range(workers)]
            loading = [gevent.spawn(_ready_or_error, w) for w in starting]
            gevent.joinall(loading)
            failed = next((g.value for g in loading if g.value is not None), None)
            if failed is not None:
                raise failed
        except BaseException:
            self.close()
            raise
        self.voice_id = starting[0].voice_id
        for worker in starting:
            slot = _Slot(worker)
            self._watch(worker, slot)
            self._slots.put(slot)
        self.workers = workers
        log.info("tts_workers_ready", engine=self.name, voice_id=self.voice_id, workers=workers,
                 priority=settings.tts_worker_priority, pids=[w.pid for w in starting],
                 seconds=round(time.monotonic() - started_s, 2))

    @property
    def pids(self) -> list[int]:
        """The worker processes there are now, loading or ready."""
        return sorted(w.pid for w in self._all)

    @property
    def busy_pids(self) -> list[int]:
        """The workers given a request (or loading the voice) and not done with it yet."""
        return sorted(w.pid for w in self._all if w.busy)

    def synthesize(self, text: str):
        raise NotImplementedError("WorkerEngine synthesizes in its worker processes: use synthesize_to_wav")

    def synthesize_to_wav(self, text: str, path: str | os.PathLike, *, durable: bool = True) -> Path:
        """As the engine in the workers does; from the loop or from any native thread."""
        if not text or not text.strip():
            raise TtsSynthesisFailed(f"{self.name}: nothing to say (empty text)")
        if _native_thread_id() == self._loop_thread:
            return self._synthesize(text, str(path), durable)
        return self._from_thread(text, str(path), durable)

    def close(self) -> None:
        """Kill every worker; syntheses under way fail with TtsSynthesisFailed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # At once: a restart waiting for its worker's hello lets go of the pipe.
        gevent.killall(list(self._helpers))
        workers = list(self._all)
        for worker in workers:
            worker.kill()
        deadline_s = time.monotonic() + CLOSE_REAP_S
        for worker in workers:
            worker.reap(max(0.0, deadline_s - time.monotonic()))
            if not worker.busy:  # a synthesis under way sees the end of the pipe and closes it
                worker.close_pipes()
        self._all.clear()
        self._slots.put(None)  # wakes whoever waits for a worker: there will be none
        log.info("tts_workers_stopped", engine=self.name, pids=sorted(w.pid for w in workers))

    def _spawn(self) -> _Worker:
        worker = _Worker(self._spec)
        self._all.add(worker)
        return worker

    def _helper(self, function, *args) -> gevent.Greenlet:
        greenlet = gevent.spawn(function, *args)
        self._helpers.add(greenlet)
        greenlet.link(self._helpers.discard)
        return greenlet

    def _stopped(self) -> TtsSynthesisFailed:
        return TtsSynthesisFailed(f"{self.name}: the TTS workers are stopped")

    def _synthesize(self, text: str, path: str, durable: bool) -> Path:
        slot = self._slots.get()
        if slot is None or self._closed:
            self._slots.put(None)
            raise self._stopped()
        slot.in_use = True
        try:
            if slot.replacing is not None:
                slot.replacing.join()  # a fresh worker is loading: it gets this sentence
            if self._closed:
                raise self._stopped()
            if slot.worker is None:
                self._restart(slot)  # the last restart failed: try again, for this sentence
                if slot.worker is None:
                    raise TtsSynthesisFailed(f"{self.name}: no TTS worker: {slot.error}")
            worker = slot.worker
            try:
                worker.synthesize(text, path, durable)
            except WorkerDied as exc:
                self._lost(slot, worker, str(exc), text_chars=len(text))
                if self._closed:
                    raise self._stopped() from None
                raise TtsSynthesisFailed(f"{self.name} failed on {text[:60]!r}: {exc}") from None
            return Path(path)
        finally:
            slot.in_use = False
            self._slots.put(slot)

    def _watch(self, worker: _Worker, slot: _Slot) -> None:
        """Replace ``worker`` if it dies idle (the OOM killer, an operator), before a sentence needs it."""
        def wait_exit() -> None:
            code = worker.proc.wait()
            if self._closed or slot.in_use or slot.worker is not worker:
                return  # stopping, or the request using it reports the death
            worker.close_pipes()
            self._lost(slot, worker, f"{_ended(worker.pid, code)} while idle")

        self._helper(wait_exit)

    def _lost(self, slot: _Slot, worker: _Worker, error: str, **fields) -> None:
        """``worker`` is dead: a fresh one starts loading in its slot (unless the engine is closing)."""
        self._all.discard(worker)
        slot.worker = None
        if self._closed:
            return
        log.error("tts_worker_died", engine=self.name, error=error, pid=worker.pid, **fields)
        slot.replacing = self._helper(self._restart, slot)

    def _restart(self, slot: _Slot) -> None:
        """Start a worker in ``slot``; on failure the slot stays empty with the reason in ``error``."""
        if self._closed:
            return
        worker = self._spawn()
        try:
            worker.wait_ready(WORKER_START_TIMEOUT_S)
            if worker.voice_id != self.voice_id:
                # Cache keys name the voice: a different model on disk needs a restart of the daemon.
                raise TtsModelUnavailable(f"the voice changed on disk: now {worker.voice_id}, was {self.voice_id}")
        except TtsModelUnavailable as exc:
            worker.kill()
            worker.reap()
            worker.close_pipes()
            self._all.discard(worker)
            slot.error = one_line(exc)
            log.error("tts_worker_start_failed", engine=self.name, error=slot.error)
            return
        finally:
            slot.replacing = None
        slot.worker, slot.error = worker, ""
        self._watch(worker, slot)
        log.info("tts_worker_started", engine=self.name, pid=worker.pid)

    def _from_thread(self, text: str, path: str, durable: bool) -> Path:
        """Run the request on the loop (where the workers live) and wait for it without the GIL."""
        done = native_lock()
        done.acquire()
        outcome: list[tuple[bool, object]] = []

        def run() -> None:
            # Caught here and raised in the calling thread (gevent would print it too otherwise).
            try:
                outcome.append((True, self._synthesize(text, path, durable)))
            except BaseException as exc:
                outcome.append((False, exc))
            finally:
                done.release()

        self._loop.run_callback_threadsafe(gevent.spawn, run)
        done.acquire()
        succeeded, value = outcome[0]
        if succeeded:
            return value
        raise value


def _ended(pid: int, code: int | None) -> str:
    return how_it_ended("TTS worker", pid, code)


def _ready_or_error(worker: _Worker) -> TtsModelUnavailable | None:
    try:
        worker.wait_ready(WORKER_START_TIMEOUT_S)
    except TtsModelUnavailable as exc:
        return exc
    return None
