"""Long stretches of work on the gevent loop are cut: others get the loop in between.

A turn's event, its LLM answer or its synthesis result waits, once its bytes have landed, for
whatever runs on the loop to switch out. The rest of an LLM reply, handed on a batch at a time,
was one such stretch (bench/loop_slices.py measures them): it now lets the loop poll every few
items. Proven here by who runs when (what a greenlet waiting on a socket saw when it got its
bytes), never by clocks; what it does to latency is measured by bench/loop_slices.py.
"""

import gevent
import gevent.event
import gevent.socket

from ivr_daemon.idle_lane import idle_lane
from ivr_daemon.llm.paced import BATCH_ITEMS_PER_SLICE, BatchedReads

def _read_batch_beside_io(reads: BatchedReads, batch_after: int):
    """Read ``reads`` while a greenlet waits on a socket whose bytes are already there: the index
    of the item handed on last when that greenlet got its bytes (None: only after the end)."""
    got = []
    when_io_ran = []
    ours, theirs = gevent.socket.socketpair()

    def io_waiter():
        ours.recv(16)
        when_io_ran.append(len(got))

    try:
        waiter = gevent.spawn(io_waiter)
        gevent.sleep(0)  # it waits on its socket now: only a poll of the loop wakes it
        theirs.sendall(b"x")

        for item in reads:
            got.append(item)
            if len(got) == batch_after:
                reads.batch_from_now()
        done_at = len(got)
        waiter.join(10)
    finally:
        ours.close()
        theirs.close()
    return got, (when_io_ran[0] if when_io_ran and when_io_ran[0] < done_at else None)


def test_a_long_batch_lets_the_loop_poll_every_few_items():
    """Batching, a run of buffered items is handed on BATCH_ITEMS_PER_SLICE at a time, and the
    loop polls in between: a greenlet whose socket got bytes during the first run gets them
    before the second, not at the end."""
    items = [f"t{i}" for i in range(10 * BATCH_ITEMS_PER_SLICE)]
    for _ in range(3):
        got, io_ran_after = _read_batch_beside_io(BatchedReads(items, pause_s=5.0), batch_after=1)
        assert got == items
        assert io_ran_after == BATCH_ITEMS_PER_SLICE


def test_before_batching_a_run_of_items_is_never_cut():
    """The first sentence is urgent: until batch_from_now, and with batching off, nothing yields."""
    items = [f"t{i}" for i in range(3 * BATCH_ITEMS_PER_SLICE)]
    for pause_s, batch_after in ((5.0, 10_000), (0.0, 1)):
        got, io_ran_after = _read_batch_beside_io(BatchedReads(items, pause_s=pause_s), batch_after=batch_after)
        assert got == items
        assert io_ran_after is None  # the socket's greenlet ran only once the reading was over


def test_an_answer_waiting_in_the_idle_lane_goes_before_the_rest_of_a_batch():
    """The rest of a reply is the lane's least urgent work: an LLM answer waiting in the idle
    lane as a first waiter (someone waits for its first sentence) goes at the batch's first
    yield, not after the whole batch (a bare yield kept the loop busy through every run of
    items, and the lane's waiters waited for all of them)."""
    items = [f"t{i}" for i in range(3 * BATCH_ITEMS_PER_SLICE)]
    got, answer_went_after = [], []

    def answer():
        idle_lane().wait(first=True)
        answer_went_after.append(len(got))

    reads = BatchedReads(items, pause_s=5.0)
    reads.batch_from_now()
    waiter = None
    for item in reads:
        got.append(item)
        if waiter is None:
            waiter = gevent.spawn(answer)  # comes while the batch is being handed on
    waiter.join(10)
    assert got == items
    assert answer_went_after == [BATCH_ITEMS_PER_SLICE]
