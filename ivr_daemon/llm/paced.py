"""Pacing the LLM's answers on the gevent loop.

The LLM session's connections each send their request at once and read the answer once the
loop has nothing more urgent to do (the idle lane, ``ivr_daemon/idle_lane.py``). Plugged into
requests through its adapter (``LanePacedAdapter``, mounted on the session of
``ivr_daemon/llm/transport.py``, which takes the pool from it and posts into it directly):
urllib3 pools whose connection class waits in the lane in ``getresponse``, between the request
written and its status line read.

Once a reply's first chunk is out, the rest of its stream is read in batches
(:class:`BatchedReads`).
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, TypeVar

import gevent
import gevent.local
import gevent.socket
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.response

from ivr_daemon.idle_lane import idle_lane

Delta = TypeVar("Delta")

# A read that took longer than this waited for the network (a buffered one takes ~50 us).
READ_WAITED_S = 0.001

# Answers awaited at once (requests written, their answers not yet past the lane) up to which
# the daemon is not in a burst: an answer that comes then, with no other answer waiting in the
# lane, is read at once, first come first served, instead of after the loop's next idle moment
# (which at 20 turns a second came 0.5 ms later at p50 and 4-14 ms at p99: the daemon's own
# queueing, counted in every overhead). A client used from a thread of its own (which skips the
# lane) is counted too: at worst the loop's answers then wait in the lane as in a burst. At 20
# turns a second with an LLM answering in 200 ms about 4 answers are awaited, at 100 a second
# (bench/multiswitch.py's 4 x 250) about 20, more while answers come together: at 16 that load counted
# as a burst and its answers' lane waits were most of its overhead p99 (7-8 of 9-11 ms; 5-6 ms
# at 64, the burst's own figure no worse). In a burst of turns, hundreds.
QUIET_AWAITED_ANSWERS_MAX = 64
_awaited_answers = 0

# Per greenlet: how long its requests' answers have waited in the lane (a turn's producer is a
# greenlet of its own, so what it reads is its turn's wait).
_lane_waits = gevent.local.local()


def lane_wait_s() -> float:
    """Seconds this greenlet's LLM answers have waited in the idle lane so far: the daemon's own
    queueing, not the LLM's time (a turn's llm_ms leaves it out; turn_complete says it apart)."""
    return getattr(_lane_waits, "s", 0.0)


class _LanePacedConnection(urllib3.connection.HTTPConnection):
    """Sends its request at once; reads the answer, once it has come, when the loop has nothing
    more urgent to do.

    In a burst of turns the answers come back while other turns' requests are still to be sent:
    parsing an answer's headers and reading its first sentence (~0.5 ms of the loop each) would
    run before them, first come first served, and the last requests would go out late by all of
    it. Waiting in the idle lane (idle_lane.py) as a first waiter, between the answer's first
    bytes arriving and its status line read, puts every request first, then the first sentences,
    then the rest of the replies. At most a quarter of the read timeout: well within the client's
    own deadline.

    Only an answer that has come waits in the lane: waiting there while the LLM still thinks
    would hold nothing back (the read after it blocks anyway) and would count the LLM's time as
    the daemon's queueing (``lane_wait_s``). And only in a burst: with few answers awaited
    (``QUIET_AWAITED_ANSWERS_MAX``) and none waiting in the lane, an answer is read at once.
    """

    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        global _awaited_answers
        timeout_s = self.timeout if isinstance(self.timeout, (int, float)) else None
        _awaited_answers += 1
        try:
            if self.sock is not None and not _has_buffered_bytes(self.sock):
                # Its timeout is a socket.timeout, as the read's own: urllib3 reports it the same way.
                gevent.socket.wait_read(self.sock.fileno(), timeout=timeout_s)
            lane = idle_lane()
            if _awaited_answers > QUIET_AWAITED_ANSWERS_MAX or lane.first_waiters():
                started_s = time.monotonic()
                lane.wait(first=True, max_wait_s=timeout_s / 4 if timeout_s else None)
                _lane_waits.s = lane_wait_s() + time.monotonic() - started_s
        finally:
            _awaited_answers -= 1
        return super().getresponse()


def _has_buffered_bytes(sock) -> bool:
    """A TLS socket may hold decrypted bytes of the answer already: its fd has nothing to say."""
    pending = getattr(sock, "pending", None)
    return bool(pending and pending())


class _LanePacedHttpsConnection(_LanePacedConnection, urllib3.connection.HTTPSConnection):
    pass


class _LanePacedPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _LanePacedConnection


class _LanePacedHttpsPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _LanePacedHttpsConnection


class LanePacedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections read their answers from the idle lane."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _LanePacedPool, "https": _LanePacedHttpsPool}


class BatchedReads(Iterable[Delta]):
    """The items of an LLM stream; after :meth:`batch_from_now`, a read that had to wait for the
    network is followed by a pause of ``pause_s`` before the next read.

    A server writes each token in its own packet, and every packet read as it lands costs the
    loop a wake-up of the reading greenlet (~60 us in gevent alone, ~135 us with the HTTP
    client around it: bench/llm_stream.py), ~30 a reply. Only the first chunk of a reply is
    urgent: the rest is needed once that chunk has played, a second or more later. Pausing after
    a read that waited lets the tokens that arrive meanwhile pile up in the socket, and the next
    reads take them all from one wake-up: one wake-up and one timer per pause instead of one
    wake-up per token. A sentence is handed on at most ``pause_s`` later than it would have been.
    Reads that find data already buffered never pause: a fast stream is read at full speed.
    """

    def __init__(self, items: Iterable[Delta], pause_s: float):
        self._items = items
        self._pause_s = pause_s
        self._batching = False

    def batch_from_now(self) -> None:
        self._batching = self._pause_s > 0

    def __iter__(self) -> Iterator[Delta]:
        items = iter(self._items)
        while True:
            asked_s = time.monotonic()
            try:
                item = next(items)
            except StopIteration:
                return
            waited = time.monotonic() - asked_s > READ_WAITED_S
            yield item
            if waited and self._batching:
                gevent.sleep(self._pause_s)
