"""LLM_STREAM_BATCH_MS: after a reply's first chunk, the rest of the LLM stream is read in batches.

What is proven here: every delta arrives, in order; reads that find data waiting never pause;
a read that waited is followed by a pause; on a real HTTP stream of tokens in their own packets
the reader wakes far less often than once a token. How much CPU it saves is measured by the
benchmarks (bench/latency.py, bench/multiswitch.py: daemon CPU per turn).
"""

import time

import gevent
import gevent.event
import greenlet
import pytest

from harness import TurnLog, broadcasts, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer, split_into_deltas
from ivr_daemon.llm.openai import OpenAiClient
from ivr_daemon.llm.paced import BatchedReads
from ivr_daemon.replay.simulator import FreeswitchSimulator

MESSAGES = [{"role": "user", "content": "when are you open"}]
REPLY = ("Sure, we open at nine. On Saturdays we open at ten and close at four in the afternoon. "
         "Is there anything else I can help you with today?")


class SwitchCounter:
    """How many times ``target`` was switched into (each one a wake-up of that greenlet)."""

    def __init__(self, target: greenlet.greenlet):
        self.target = target
        self.count = 0

    def __enter__(self):
        def trace(event, args):
            if event in ("switch", "throw") and args[1] is self.target:
                self.count += 1
            if previous is not None:
                previous(event, args)

        previous = greenlet.settrace(trace)
        self._previous = previous
        return self

    def __exit__(self, *exc_info):
        greenlet.settrace(self._previous)


def read_all(reads: BatchedReads, batch_after: int = 1) -> list:
    got = []
    for item in reads:
        got.append(item)
        if len(got) == batch_after:
            reads.batch_from_now()
    return got


def test_items_already_there_are_read_without_a_pause():
    reads = BatchedReads(["a", "b", "c", "d"], pause_s=5.0)
    me = gevent.getcurrent()
    with SwitchCounter(me) as switches:
        assert read_all(reads) == ["a", "b", "c", "d"]
    assert switches.count == 0  # never left this greenlet: no read waited, so no pause


def test_a_read_that_waited_is_followed_by_a_pause_once_batching():
    arrived = gevent.event.Event()
    asked_at: dict[str, float] = {}

    def items():
        yield "first"
        asked_at["second"] = time.monotonic()
        arrived.wait()  # the network: this read waits
        yield "second"
        asked_at["third"] = time.monotonic()
        yield "third"

    # The loop's clock is stale after the tests before (libev caches "now" per pass): renewed,
    # the read of "second" really waits its 10 ms.
    gevent.get_hub().loop.update_now()
    gevent.spawn_later(0.01, arrived.set)
    reads = BatchedReads(items(), pause_s=0.2)
    got, handed_at = [], {}
    for item in reads:
        got.append(item)
        handed_at[item] = time.monotonic()
        reads.batch_from_now()
    assert got == ["first", "second", "third"]
    # "first" came at once: no pause before "second" was asked for.
    assert asked_at["second"] - handed_at["first"] < 0.2
    # "second" waited: the next read came after the pause (libev's clock may run a little ahead).
    assert asked_at["third"] - handed_at["second"] >= 0.2 - 0.02


def test_no_pause_before_batching_starts_or_when_it_is_off():
    arrived = gevent.event.Event()

    def items():
        yield "first"
        arrived.wait()
        yield "second"
        yield "third"

    for pause_s, batch_after in ((5.0, 99), (0.0, 1)):
        arrived.clear()
        gevent.get_hub().loop.update_now()
        gevent.spawn_later(0.01, arrived.set)
        started_s = time.monotonic()
        assert read_all(BatchedReads(items(), pause_s=pause_s), batch_after=batch_after) == ["first", "second", "third"]
        assert time.monotonic() - started_s < 5.0


@pytest.mark.parametrize("pause_s", [0.1])
def test_a_real_token_stream_is_read_in_far_fewer_wake_ups_than_tokens(pause_s):
    deltas = split_into_deltas(REPLY)
    # One token every 10 ms, each in its own HTTP chunk and packet: 0.3 s of stream.
    with FakeLlmServer("openai", replies=REPLY, stream_gap_s=0.01) as server:
        client = OpenAiClient(server.url, "m", timeout_s=10)
        got = []
        wake_ups = []

        def consume():
            reads = BatchedReads(client.stream(MESSAGES), pause_s=pause_s)
            with SwitchCounter(gevent.getcurrent()) as switches:
                got.extend(read_all(reads))
            wake_ups.append(switches.count)

        gevent.spawn(consume).get(timeout=30)
        client.close()
    assert "".join(got) == REPLY
    assert server.deltas_sent == len(deltas)
    # Read a token at a time, the consumer would wake once a token (32). Batched, it wakes
    # about twice per pause (the pause, then the read that waited): the stream lasts ~0.3 s.
    assert wake_ups[0] <= len(deltas) // 2, wake_ups


def test_a_turn_with_batched_reads_speaks_the_whole_reply_in_order(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("ollama", replies=REPLY, stream_gap_s=0.01) as llm, \
            FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                FIRST_CHUNK="sentence", LLM_STREAM_BATCH_MS="100")
        assert settings.llm_stream_batch_ms == 100
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            sim.speak(call, "when are you open")
            [turn] = turns.wait(1, call)
            handler = daemon.router.calls[call].handler
            sentences = ["Sure, we open at nine.", "On Saturdays we open at ten and close at four in the afternoon.",
                         "Is there anything else I can help you with today?"]
            expected = [str(handler.services.cache.path_for(handler.services.tts, s)) for s in sentences]
            wait_until(lambda: len(broadcasts(sim, call)) == 3)
            wait_heard(sim, call, 3)
            assert [line.split()[3] for line in broadcasts(sim, call)] == expected
            assert turn.reply == REPLY and not turn.interrupted
            assert handler.history.messages()[-1] == {"role": "assistant", "content": REPLY}
