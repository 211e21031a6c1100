"""Long stretches of work on the gevent loop are cut: others get the loop in between.

A turn's event, its LLM answer or its synthesis result waits, once its bytes have landed, for
whatever runs on the loop to switch out. Two loops could run long at a time (bench/loop_slices.py
measures it): the ESL reader routing a read that holds many frames, and the rest of an LLM reply
handed on a batch at a time. Proven here by who runs when (greenlet switches, the order of
what each greenlet saw), never by clocks; what it does to latency is measured by
bench/loop_slices.py.
"""

import gevent
import gevent.event
import gevent.socket

from harness import captured_event
from ivr_daemon.esl import connection as esl_connection
from ivr_daemon.esl.connection import READER_FRAMES_PER_SLICE, EslConnection
from ivr_daemon.llm import paced
from ivr_daemon.llm.paced import BATCH_ITEMS_PER_SLICE, BatchedReads

CALL = "8a5c6a1b-1f5e-4a4e-9a4b-3c2d1e0f9a8b"


def speech_frames(count: int) -> bytes:
    return b"".join(captured_event("40_event_plain_DETECTED_SPEECH_detected-speech.txt", body=f"words {i}",
                                   Unique_ID=CALL, Event_Sequence=str(1000 + i)) for i in range(count))


def test_the_reader_lets_the_greenlets_it_woke_run_between_frames_of_one_read():
    """Three slices' worth of frames in one read: the greenlet woken by the first frame runs
    after READER_FRAMES_PER_SLICE frames are routed, not after all of them; every frame still
    arrives, in order."""
    count = 3 * READER_FRAMES_PER_SLICE
    routed, seen_by_woken = [], []
    first_routed = gevent.event.Event()

    def on_event(event):
        routed.append(event.body)
        first_routed.set()  # wakes `woken` (as a call's queue wakes its greenlet)

    def woken():
        first_routed.wait()
        seen_by_woken.append(len(routed))

    ours, theirs = gevent.socket.socketpair()
    conn = EslConnection("127.0.0.1", 0, "ClueCon", on_event)
    conn.sock = ours
    try:
        theirs.sendall(speech_frames(count))  # all there before the reader's first recv: one read
        waiter = gevent.spawn(woken)
        reader = gevent.spawn(conn.receive_events)
        waiter.join(10)
        assert seen_by_woken == [READER_FRAMES_PER_SLICE]
        theirs.close()  # the reader ends at EOF
        reader.join(10)
        assert reader.dead
    finally:
        ours.close()
    assert routed == [f"words {i}" for i in range(count)]


def test_the_reader_routes_a_short_read_in_one_go():
    """A read of up to READER_FRAMES_PER_SLICE frames (the usual case) costs no extra switch."""
    routed, seen_by_woken = [], []
    first_routed = gevent.event.Event()

    def on_event(event):
        routed.append(event.body)
        first_routed.set()

    def woken():
        first_routed.wait()
        seen_by_woken.append(len(routed))

    ours, theirs = gevent.socket.socketpair()
    conn = EslConnection("127.0.0.1", 0, "ClueCon", on_event)
    conn.sock = ours
    try:
        theirs.sendall(speech_frames(READER_FRAMES_PER_SLICE))
        waiter = gevent.spawn(woken)
        reader = gevent.spawn(conn.receive_events)
        waiter.join(10)
        assert seen_by_woken == [READER_FRAMES_PER_SLICE]
        theirs.close()
        reader.join(10)
    finally:
        ours.close()
    assert esl_connection.READER_FRAMES_PER_SLICE == READER_FRAMES_PER_SLICE


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
    loop polls in between: a greenlet whose socket has bytes gets them before the run's end."""
    items = [f"t{i}" for i in range(3 * BATCH_ITEMS_PER_SLICE)]
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


def test_the_yield_lets_the_sockets_ready_meanwhile_go_first():
    """sleep(0) would run only greenlets already ready (not the socket's: the loop has not
    polled), and a plain timer would run before the sockets polled with it: either way the
    socket's greenlet would get its bytes only after a second run of items."""
    assert paced.LET_IO_IN_PRIORITY < 0
    items = [f"t{i}" for i in range(10 * BATCH_ITEMS_PER_SLICE)]
    for _ in range(3):
        got, io_ran_after = _read_batch_beside_io(BatchedReads(items, pause_s=5.0), batch_after=1)
        assert got == items and io_ran_after == BATCH_ITEMS_PER_SLICE
