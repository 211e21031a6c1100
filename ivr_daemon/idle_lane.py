"""Work that can wait yields to everything else on the gevent loop: the idle lane.

gevent runs ready greenlets first in, first out, and has no priorities. In a burst of turns
(many callers finishing a sentence in the same instant) the reading of one turn's LLM reply,
most of a turn's CPU, would then run before another turn has sent its request or its first
broadcast has reached the switch: every caller's first audio comes late by everybody's replies.

A greenlet that calls :meth:`IdleLane.wait` waits until the loop has nothing else to do
(libev's idle watcher, ``gevent.idle()``: no callback, no ready socket, no timer pending), and
the waiters are let go one at a time, oldest first, so that each finds the loop idle and the
work it does next delays nothing that was ready before it. ``first=True`` waiters (an answer
and its first sentence, which someone waits to hear) go before the others (the rest of a
reply, needed only once that sentence has played).

A loop that is never idle must not starve a waiter: one that has waited while the loop's
thread spent ``max_wait_cpu_s`` of CPU goes on anyway. CPU time, not wall-clock time: on a
loaded box the daemon gets a fraction of a core, and a wall-clock bound of 0.25 s let 600 of
the 603 waiters of a 200-turn burst go by their timeout, all at once (load 4.8 on 2 cores).
"""

from __future__ import annotations

import collections
import threading
import time

import gevent
import gevent.event

# CPU seconds of the loop's thread a waiter waits at most for an idle loop. A 200-turn burst
# costs the loop ~0.7 s in all: its first waiters wait ~0.1 s, the rest of its replies longer.
IDLE_LANE_MAX_WAIT_CPU_S = 1.0
# How often the lane looks for waiters past that bound while the loop is busy.
OVERDUE_CHECK_S = 0.05
# A wall-clock bound besides (e.g. a lane that stopped working): never hit in normal running.
IDLE_LANE_BACKSTOP_S = 30.0


class _Ticket(gevent.event.Event):
    """A waiter's place in the lane: set when it goes on, or has gone (killed): then skipped."""

    __slots__ = ("cpu_s", "overdue")

    def __init__(self):
        super().__init__()
        self.cpu_s = time.thread_time()  # when it came, in the loop thread's CPU time
        self.overdue = False  # let go because it waited too long, not on an idle loop


class IdleLane:
    """Waiters let go one at a time, each when the loop is idle (or once overdue)."""

    def __init__(self, max_wait_cpu_s: float = IDLE_LANE_MAX_WAIT_CPU_S, backstop_s: float = IDLE_LANE_BACKSTOP_S):
        self.max_wait_cpu_s = max_wait_cpu_s
        self.backstop_s = backstop_s
        self._waiting: collections.deque[_Ticket] = collections.deque()
        self._waiting_first: collections.deque[_Ticket] = collections.deque()
        self._pump: gevent.Greenlet | None = None
        # The loop it paces: the main thread's, the daemon's loop, even when a worker thread is
        # the first to ask for the lane (its own hub would leave the loop unpaced for good).
        self._hub = None
        self.let_go = 0  # waiters let go on an idle loop
        self.overdue = 0  # waiters let go after max_wait_cpu_s of a busy loop (or the backstop)

    def wait(self, first: bool = False, max_wait_s: float | None = None) -> bool:
        """Block until the loop is idle and this waiter's turn has come (``first``: before every
        waiter without it): True; False when it went on overdue, or after ``max_wait_s`` of
        wall-clock time if that comes first. Killing the caller meanwhile is safe. On a thread
        of its own (its own hub, e.g. a client used from a worker thread) it returns at once."""
        # The OS thread (current_thread() names each greenlet under monkey-patching).
        if threading.get_native_id() != threading.main_thread().native_id:
            return True
        if self._hub is None:
            self._hub = gevent.get_hub()
        elif gevent.get_hub() is not self._hub:
            return True  # a hub the main thread made anew (a test's): not the loop this lane paces
        ticket = _Ticket()
        (self._waiting_first if first else self._waiting).append(ticket)
        if self._pump is None or self._pump.dead:
            self._pump = gevent.spawn(self._let_go)
        wall_s = self.backstop_s if max_wait_s is None else min(max_wait_s, self.backstop_s)
        try:
            if ticket.wait(wall_s) and not ticket.overdue:
                return True
            if not ticket.is_set():
                self.overdue += 1
            return False
        finally:
            ticket.set()  # the pump skips it if it is still queued

    def first_waiters(self) -> int:
        """``first`` waiters still waiting: a newcomer that skipped the lane would go before them."""
        return sum(1 for ticket in self._waiting_first if not ticket.is_set())

    def _let_go(self) -> None:
        while self._waiting_first or self._waiting:
            if self._idle_within(OVERDUE_CHECK_S):
                ticket = self._next_ticket()
                if ticket is not None:
                    # Its wake-up is a callback: the loop is busy again until the waiter has run
                    # up to its next block, so the next one is let go only after it.
                    ticket.set()
                    self.let_go += 1
            else:
                self._let_overdue_go()

    @staticmethod
    def _idle_within(seconds: float) -> bool:
        with gevent.Timeout(seconds, False):
            gevent.idle()
            return True
        return False

    def _next_ticket(self) -> _Ticket | None:
        for queue in (self._waiting_first, self._waiting):
            while queue:
                ticket = queue.popleft()
                if not ticket.is_set():  # else it has gone already
                    return ticket
        return None

    def _let_overdue_go(self) -> None:
        """Every waiter that has waited ``max_wait_cpu_s`` of the loop's CPU goes on, oldest first."""
        now_cpu_s = time.thread_time()
        for queue in (self._waiting_first, self._waiting):
            while queue and (queue[0].is_set() or now_cpu_s - queue[0].cpu_s >= self.max_wait_cpu_s):
                ticket = queue.popleft()
                if not ticket.is_set():
                    ticket.overdue = True
                    ticket.set()
                    self.overdue += 1


_lane: IdleLane | None = None


def idle_lane() -> IdleLane:
    """The process's lane (one gevent hub, one loop)."""
    global _lane
    if _lane is None:
        _lane = IdleLane()
    return _lane
