"""Syntheses wait for the pool's threads in the SynthesisQueue: a caller's first words before any
call's later sentences, nothing blocking the greenlet that asks, work nobody waits for dropped."""

from __future__ import annotations

import gevent
import gevent.threadpool
import pytest
from gevent.monkey import get_original

from harness import broadcasts, running_daemon, settings_for, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts.base import TtsEngine, TtsSynthesisFailed
from ivr_daemon.tts.null import NullEngine
from ivr_daemon.turn_services import SynthesisQueue

native_event = get_original("threading", "Event")


@pytest.fixture
def one_thread():
    """A queue over a pool of one thread, and a gate that holds that thread until set."""
    pool = gevent.threadpool.ThreadPool(1)
    gate = native_event()
    try:
        yield SynthesisQueue(pool), gate
    finally:
        gate.set()
        pool.kill()


def test_urgent_work_goes_before_later_sentences_queued_earlier(one_thread):
    queue, gate = one_thread
    ran: list[str] = []
    holding = queue.submit(lambda: (gate.wait(10), ran.append("holding"))[1])
    wait_until(lambda: queue.waiting == 0)  # handed to the only thread, which the gate holds
    later = [queue.submit(ran.append, f"later {i}", urgent=False) for i in range(3)]
    first = queue.submit(ran.append, "first words")
    assert queue.waiting == 4
    gate.set()
    gevent.joinall([holding, *later, first], timeout=10, raise_error=True)
    assert ran == ["holding", "first words", "later 0", "later 1", "later 2"]
    assert queue.waiting == 0


def test_submit_returns_at_once_while_every_thread_is_busy(one_thread):
    queue, gate = one_thread
    queue.submit(gate.wait, 10)
    wait_until(lambda: queue.waiting == 0)  # handed to the only thread, which the gate holds
    asked = []

    def ask() -> None:
        for i in range(5):
            asked.append(queue.submit(lambda: None, urgent=bool(i % 2)))

    asker = gevent.spawn(ask)
    asker.join(timeout=1)
    assert asker.dead and len(asked) == 5  # ThreadPool.spawn would have held it at the first one
    assert not any(result.ready() for result in asked) and queue.waiting == 5
    gate.set()
    gevent.joinall(asked, timeout=10, raise_error=True)


def test_cancelled_work_never_runs_and_its_result_says_so(one_thread):
    queue, gate = one_thread
    ran: list[str] = []
    running = queue.submit(lambda: (gate.wait(10), ran.append("running"))[1])
    wait_until(lambda: queue.waiting == 0)
    queued = queue.submit(ran.append, "queued", urgent=False)
    kept = queue.submit(ran.append, "kept", urgent=False)
    assert queue.cancel(queued) is True
    assert queue.cancel(queued) is False  # once
    assert queue.cancel(running) is False  # handed to its thread: it runs to its end
    assert queue.cancel(gevent.event.AsyncResult()) is False  # not ours
    with pytest.raises(TtsSynthesisFailed, match="cancelled"):
        queued.get(timeout=1)
    assert queue.waiting == 1
    gate.set()
    kept.get(timeout=10)
    running.get(timeout=10)
    assert ran == ["running", "kept"]


def test_failed_work_fails_its_result_and_frees_its_thread(one_thread):
    queue, _gate = one_thread

    def fail() -> None:
        raise ValueError("the voice choked")

    failed = queue.submit(fail)
    after = queue.submit(lambda: "next")
    with pytest.raises(ValueError, match="choked"):
        failed.get(timeout=10)
    assert after.get(timeout=10) == "next"


class OrderedEngine(TtsEngine):
    """Null audio; records the order syntheses start in, and holds the first one until ``gate`` is set."""

    name = "ordered"
    voice_id = "ordered:test"

    def __init__(self, held: str):
        self.inner = NullEngine()
        self.held = held
        self.gate = native_event()
        self.started: list[str] = []

    def synthesize(self, text):
        self.started.append(text)
        if text == self.held:
            self.gate.wait(30)
        return self.inner.synthesize(text)


def test_a_new_callers_first_sentence_is_synthesized_before_another_calls_later_ones(tmp_path):
    replies = {"first caller": "Alpha one. Alpha two. Alpha three.", "second caller": "Bravo one. Bravo two."}
    engine = OrderedEngine(held="Alpha one.")

    def reply(request) -> str:
        said = request["messages"][-1]["content"]
        return replies[said]

    with FakeLlmServer("ollama", replies=reply) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_CACHE_MAX_MB="0")
        with running_daemon(sim, settings, tts=engine, synth_threads=1) as daemon:
            queue = daemon.services.synth_queue
            engine.started.clear()  # the daemon's own phrases, said at start-up
            first, second = sim.new_call(), sim.new_call()
            sim.speak(first, "first caller")
            # The only thread says "Alpha one."; the first call's later sentences wait behind it.
            wait_until(lambda: engine.started == ["Alpha one."] and queue.waiting == 2)
            sim.speak(second, "second caller")
            wait_until(lambda: queue.waiting == 4)  # both of the second call's sentences too
            engine.gate.set()
            wait_until(lambda: len(broadcasts(sim, first)) == 3 and len(broadcasts(sim, second)) == 2)
            assert engine.started == ["Alpha one.", "Bravo one.", "Alpha two.", "Alpha three.", "Bravo two."]


class _RefusesOnce(gevent.threadpool.ThreadPool):
    """A pool whose first spawn fails, as a pool being shut down does."""

    refused = False

    def spawn(self, function, *args, **kwargs):
        if not self.refused:
            self.refused = True
            raise RuntimeError("pool is shutting down")
        return super().spawn(function, *args, **kwargs)


def test_work_the_pool_refuses_fails_and_the_queue_goes_on():
    pool = _RefusesOnce(1)
    queue = SynthesisQueue(pool)
    try:
        refused = queue.submit(lambda: "never ran")
        with pytest.raises(RuntimeError, match="shutting down"):
            refused.get(timeout=10)  # it fails: nobody waits for ever
        assert queue.submit(lambda: "ran").get(timeout=10) == "ran"  # the thread it held is free again
        assert queue.waiting == 0
    finally:
        pool.kill()
