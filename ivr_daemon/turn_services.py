"""What every call's turns share (:class:`TurnServices`: settings, the LLM, the voice, the ESL
writer, the phrase cache, the metrics), what one turn did (:class:`TurnResult`), and the
fallback phrase prepared at start-up. The turn itself is ``conversation.py``."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gevent
import gevent.event
import gevent.lock
import gevent.queue
import gevent.threadpool

from ivr_daemon.agents import Agent
from ivr_daemon.config import Settings
from ivr_daemon.esl.commands import EslCommand
from ivr_daemon.esl.connection import CommandReply
from ivr_daemon.llm.base import LlmClient
from ivr_daemon.logs import get_logger, spoken_text
from ivr_daemon.metrics import DaemonMetrics
from ivr_daemon.tts.base import TtsEngine, TtsError, TtsModelUnavailable, TtsSynthesisFailed
from ivr_daemon.tts.cache import PhraseCache
from ivr_daemon.tts.pinned import PinnedPhrases

log = get_logger(__name__)


@dataclass(frozen=True)
class TurnResult:
    """What one turn did, for logs, the demo, tests and benchmarks."""

    call_uuid: str
    turn: int
    transcript: str
    reply: str
    used_fallback: bool
    wav_path: Path | None  # the first sentence's WAV
    broadcast_reply: str | None
    llm_ms: float  # until the first sentence was complete (streaming) or the whole reply (batch)
    tts_ms: float  # synthesis of the first sentence
    total_ms: float
    first_audio_ms: float | None = None  # turn start to the first uuid_broadcast sent
    sentences: int = 0  # broadcasts: a first clause and the rest of its sentence are two
    interrupted: bool = False


@dataclass
class TurnServices:
    """What every call's turns share: settings, the LLM, the TTS engine, the ESL writer."""

    settings: Settings
    llm: LlmClient
    tts: TtsEngine
    send: Callable[[EslCommand], CommandReply]
    synth_pool: gevent.threadpool.ThreadPool
    fallback_wav: Path | None = None
    on_turn: Callable[[TurnResult], None] | None = None
    cache: PhraseCache | None = None
    wait_connected: Callable[[float], bool] | None = None
    accepting_turns: bool = True  # False once shutdown begins
    pinned: PinnedPhrases | None = None  # the phrases the daemon relies on (fallback), never evicted
    agent: Agent | None = None  # whose settings these are: its transfer targets and DTMF map
    # Syntheses started and not finished, all calls together: shutdown waits for them.
    in_flight: set[gevent.event.AsyncResult] = field(default_factory=set)
    # The daemon's, shared by every agent's services (build_conversation_daemon).
    metrics: DaemonMetrics = field(default_factory=DaemonMetrics)
    switch: str = ""  # host:port of the switch its calls are on, their metrics' label ("": on none)
    # Where syntheses wait for synth_pool's threads, most urgent first; one for every agent's services
    # that share the pool (build_conversation_daemon), else its own.
    synth_queue: SynthesisQueue | None = None

    def __post_init__(self) -> None:
        self.metrics.watch_call_series(self.switch)  # its calls' series at 0 from the start
        if self.synth_queue is None:
            self.synth_queue = SynthesisQueue(self.synth_pool)

    @property
    def log_spoken_text(self) -> bool:
        """Callers' words and replies go into INFO lines only with LOG_TRANSCRIPTS (or at DEBUG)."""
        return self.settings.log_transcripts or self.settings.log_level == "DEBUG"

    def spoken(self, field_name: str, text: str | None) -> dict[str, object]:
        """Log fields for caller words or reply text, as LOG_TRANSCRIPTS allows."""
        return spoken_text(field_name, text, verbatim=self.log_spoken_text)

    def spawn_synthesis(self, text: str, per_call_path: Path, urgent: bool = True) -> gevent.event.AsyncResult:
        """Synthesis on a worker thread: through the phrase cache, or into a per-call file. Never
        blocks: the work waits in the pool's :class:`SynthesisQueue`.

        A cache hit is answered here, on the loop, without the pool: a cached phrase must not
        wait behind other calls' long syntheses. ``urgent=False``: a reply's later chunk, needed
        only once the audio before it has played; every urgent synthesis (what a caller is
        waiting to hear: a reply's first chunk, a phrase) starts before it.
        """
        cache, engine = self.cache, self.tts
        if cache is not None:
            hit = cache.lookup(engine, text)
            if hit is not None:
                return _ready(hit)
            return self._on_worker(lambda timed: cache.get_or_synthesize(engine, text, on_synthesized=timed), urgent)
        # A call's own WAV is played at once and deleted at its hangup: no fsync (durable=False).
        return self._on_worker(lambda timed: _timed(timed, engine.synthesize_to_wav, text, per_call_path,
                                                    durable=False), urgent)

    def cancel_synthesis(self, pending: gevent.event.AsyncResult) -> bool:
        """Drop a synthesis that has not started (its call ended, its reply was cut): True if it
        never will, and ``pending`` fails with TtsSynthesisFailed; False if it runs or has run."""
        return self.synth_queue.cancel(pending)

    def pinned_phrase(self, text: str) -> gevent.event.AsyncResult:
        """A phrase the daemon relies on (the fallback): its WAV at once, or re-created on a
        worker thread when someone deleted it (an operator, a full disk clean-up)."""
        if self.pinned is None:
            return _ready(self.fallback_wav)
        path = self.pinned.existing(text)
        if path is not None:
            return _ready(path)
        log.warning("pinned_phrase_missing_recreating", path=str(self.pinned.path_for(text)))
        pinned = self.pinned
        return self._on_worker(lambda timed: pinned.prepare(text, on_synthesized=timed))

    def _on_worker(self, work: Callable[[Callable[[float], None]], Path], urgent: bool = True) -> gevent.event.AsyncResult:
        """Run ``work(timed)`` on a worker thread, in ``in_flight`` until it lands; ``timed(seconds)``
        is called there for each real synthesis, and each is observed once the work has landed.

        Observed on the loop, not on the worker: under monkey-patching prometheus_client's locks
        are gevent's, which a native thread must not take.
        """
        seconds: list[float] = []  # appended on the worker thread, read on the loop after it
        pending = self.synth_queue.submit(work, seconds.append, urgent=urgent)
        self.in_flight.add(pending)

        def landed(done: gevent.event.AsyncResult) -> None:
            self.in_flight.discard(done)
            for synthesis_s in seconds:
                self.metrics.tts_synthesis_seconds.observe(synthesis_s)

        pending.rawlink(landed)
        return pending


class SynthesisQueue:
    """Work for a synthesis pool's threads, handed to them as threads free up: urgent work first,
    first come first served within each kind. One per pool: all agents' calls together, and
    everything else the daemon runs on that pool.

    ThreadPool.spawn blocks the calling greenlet while every thread is busy and wakes the waiting
    greenlets first come, first served. Under load a turn's first sentence then waited behind every
    later sentence of the other turns, sentences with seconds of slack (the audio before them is
    still playing), while its caller heard nothing: at 100 turns a second (bench/multiswitch.py,
    the null voice) that wait was most of the overhead's tail, and with Piper's ~0.1-0.3 s a
    sentence a handful of busy calls is enough. Here nothing waits in spawn: the work waits in a
    priority queue, and one dispatcher greenlet gives the pool the most urgent as soon as a thread
    frees.
    """

    def __init__(self, pool: gevent.threadpool.ThreadPool):
        self._pool = pool
        self._threads = gevent.lock.Semaphore(pool.maxsize)  # ours to hand out: the pool's never blocks us
        self._queue: gevent.queue.PriorityQueue = gevent.queue.PriorityQueue()
        self._order = itertools.count()  # first come first served among equals (and no function compared)
        self._queued: set[gevent.event.AsyncResult] = set()  # not handed to a thread, not cancelled
        self._dispatcher: gevent.Greenlet | None = None

    @property
    def waiting(self) -> int:
        """Work not yet handed to a thread."""
        return len(self._queued)

    def submit(self, function: Callable, *args, urgent: bool = True) -> gevent.event.AsyncResult:
        """``function(*args)`` on one of the pool's threads, once its turn comes; at once, its result."""
        result = gevent.event.AsyncResult()
        self._queued.add(result)
        self._queue.put((0 if urgent else 1, next(self._order), function, args, result))
        if self._dispatcher is None or self._dispatcher.dead:
            self._dispatcher = gevent.spawn(self._dispatch)
        return result

    def cancel(self, result: gevent.event.AsyncResult) -> bool:
        """Drop work that has not been handed to a thread: True, and ``result`` fails with
        TtsSynthesisFailed; False if it was handed over (it runs to its end) or is unknown."""
        if result not in self._queued:
            return False
        self._queued.discard(result)  # left in the queue, skipped when its turn comes
        result.set_exception(TtsSynthesisFailed("cancelled before it started: nobody waits for it any more"))
        return True

    def _dispatch(self) -> None:
        while True:
            self._threads.acquire()  # a thread is free (or will be once the pool's other users let go)
            try:
                _urgency, _order, function, args, result = self._queue.get()
                if result not in self._queued:  # cancelled
                    self._threads.release()
                    continue
                self._queued.discard(result)
                running = self._pool.spawn(function, *args)
            except Exception as exc:  # the pool refused the work (shutting down): it fails, the rest goes on
                self._threads.release()
                result.set_exception(exc)
                continue
            except BaseException:  # killed while waiting for work
                self._threads.release()
                raise

            def landed(done: gevent.event.AsyncResult, result=result) -> None:
                self._threads.release()
                if done.successful():
                    result.set(done.value)
                else:
                    result.set_exception(done.exception, done.exc_info)

            running.rawlink(landed)


def _timed(timed: Callable[[float], None], synthesize: Callable[..., Path], *args, **kwargs) -> Path:
    """``synthesize(*args, **kwargs)``, its seconds given to ``timed`` when it succeeded. On a worker thread."""
    started_s = time.monotonic()
    path = synthesize(*args, **kwargs)
    timed(time.monotonic() - started_s)
    return path


def _ready(path: Path | None) -> gevent.event.AsyncResult:
    result = gevent.event.AsyncResult()
    result.set(path)
    return result


def prepare_fallback_wav(pinned: PinnedPhrases, settings: Settings) -> Path:
    """Synthesize FALLBACK_PHRASE once at start-up, pinned, so it plays even when the LLM or TTS fails."""
    try:
        return pinned.prepare(settings.fallback_phrase)
    except TtsError as exc:
        # An engine that cannot say the fallback phrase at start-up cannot serve callers.
        raise TtsModelUnavailable(f"cannot synthesize FALLBACK_PHRASE: {exc}") from exc
