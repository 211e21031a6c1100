"""Work that can wait yields to everything else on the gevent loop: the idle lane.

gevent runs ready greenlets first in, first out, and has no priorities. In a burst of turns
(many callers finishing a sentence in the same instant) the reading of one turn's LLM reply
past its first sentence, most of a turn's CPU, would then run before another turn has sent
its request or its first broadcast has reached the switch: every caller's first audio comes
late by everybody's whole replies.

A greenlet that calls :meth:`IdleLane.wait` waits until the loop has nothing else to do
(libev's idle watcher, ``gevent.idle()``: no callback, no ready socket, no timer pending), and
the waiters are let go one at a time, oldest first, so that each finds the loop idle and the
work it does next delays nothing that was ready before it. ``first=True`` waiters (a reply's
first sentence, which someone waits to hear) go before the others (the rest of a reply, needed
only once that sentence has played). A waiter goes on after ``max_wait_s`` at the latest: a
loop that is never idle must not starve it.
"""

from __future__ import annotations

import collections

import gevent
import gevent.event

# The most a waiter waits for an idle loop: a loop busy for longer lets it go anyway. The rest
# of a reply is needed once its first sentence has played (a second or more). Wall-clock time,
# and a daemon on a loaded box gets a fraction of a core: with 0.25 s every waiter of a
# 200-turn burst went on by its timeout (600 of 603, load 4.8 on 2 cores), all at once.
IDLE_LANE_MAX_WAIT_S = 1.0


class IdleLane:
    """Waiters let go one at a time, each when the loop is idle (or after ``max_wait_s``)."""

    def __init__(self, max_wait_s: float = IDLE_LANE_MAX_WAIT_S):
        self.max_wait_s = max_wait_s
        # A ticket is set when its waiter is let go, or has gone (timed out, killed): then skipped.
        self._waiting: collections.deque[gevent.event.Event] = collections.deque()
        self._waiting_first: collections.deque[gevent.event.Event] = collections.deque()
        self._pump: gevent.Greenlet | None = None
        self.let_go = 0  # waiters let go on an idle loop
        self.timed_out = 0  # waiters that went on after max_wait_s

    def wait(self, first: bool = False, max_wait_s: float | None = None) -> bool:
        """Block until the loop is idle and this waiter's turn has come (``first``: before every
        waiter without it): True; False when the lane's ``max_wait_s`` (or this smaller one)
        passed first. Killing the caller meanwhile is safe."""
        ticket = gevent.event.Event()
        (self._waiting_first if first else self._waiting).append(ticket)
        if self._pump is None or self._pump.dead:
            self._pump = gevent.spawn(self._let_go)
        try:
            if ticket.wait(self.max_wait_s if max_wait_s is None else min(max_wait_s, self.max_wait_s)):
                return True
            self.timed_out += 1
            return False
        finally:
            ticket.set()  # the pump skips it if it is still queued

    def _let_go(self) -> None:
        while self._waiting_first or self._waiting:
            gevent.idle()
            ticket = self._next_ticket()
            if ticket is not None:
                # Its wake-up is a callback: the loop is busy again until the waiter has run up
                # to its next block, so the next one is let go only after it.
                ticket.set()
                self.let_go += 1

    def _next_ticket(self) -> gevent.event.Event | None:
        for queue in (self._waiting_first, self._waiting):
            while queue:
                ticket = queue.popleft()
                if not ticket.is_set():  # else it has gone already
                    return ticket
        return None


_lane: IdleLane | None = None


def idle_lane() -> IdleLane:
    """The process's lane (one gevent hub, one loop)."""
    global _lane
    if _lane is None:
        _lane = IdleLane()
    return _lane
