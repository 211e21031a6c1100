"""The cyclic garbage collector run on the daemon's schedule, from the loop, when it is idle.

CPython collects its young generations when allocations less deallocations pass a threshold,
on whichever thread trips it, holding the GIL throughout. In the daemon the old calls' objects
dying keep that count low while the new calls' pile up, so the collections that do come are
large: at 20 turns a second (``bench/records.py --gc-probe``) generation 0 took up to 7 ms of
CPU, generation 1 3-16 ms every 4-7 s, each stalling every call's events, sometimes from the
records or synthesis thread. And they found nothing: a run of 300 calls with
``gc.DEBUG_SAVEALL`` left no cyclic garbage at all (reference counting frees a call's objects).

So ``ivr-daemon run`` turns automatic collection off and collects everything itself, from the
idle lane (when the loop has nothing ready: an event landing meanwhile waits for it, none that
was ready before): every ``FULL_EVERY_S``, or sooner once ``MAX_NEW_OBJECTS`` more tracked
objects live than at the last collection (a leak of cycles does not grow for long unchecked).
"""

from __future__ import annotations

import gc
import time

import gevent

from ivr_daemon.idle_lane import idle_lane

FULL_EVERY_S = 60.0
CHECK_EVERY_S = 1.0
# gc.get_count()[0]: tracked objects allocated less those freed since the last collection.
MAX_NEW_OBJECTS = 200_000


class CollectorSchedule:
    """Automatic collection off while it runs; full collections on a schedule instead."""

    def __init__(self, full_every_s: float = FULL_EVERY_S, check_every_s: float = CHECK_EVERY_S,
                 max_new_objects: int = MAX_NEW_OBJECTS):
        self.full_every_s = full_every_s
        self.check_every_s = check_every_s
        self.max_new_objects = max_new_objects
        self.collections = 0
        self._greenlet: gevent.Greenlet | None = None
        self._was_enabled = gc.isenabled()

    def start(self) -> "CollectorSchedule":
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._greenlet = gevent.spawn(self._run)
        return self

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        if self._was_enabled:
            gc.enable()

    def _run(self) -> None:
        collected_s = time.monotonic()
        while True:
            gevent.sleep(self.check_every_s)
            due = time.monotonic() - collected_s >= self.full_every_s
            if not due and gc.get_count()[0] < self.max_new_objects:
                continue
            idle_lane().wait()
            gc.collect()  # a finalizer's error goes to sys.unraisablehook, not here
            self.collections += 1
            collected_s = time.monotonic()
