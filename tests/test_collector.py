"""The garbage collector on the daemon's schedule (ivr_daemon/collector.py): automatic collection
off; everything collected now and then, or sooner when many new objects live, from the idle lane."""

import gc
import weakref

import gevent
import gevent.event

from ivr_daemon.collector import CollectorSchedule


class _Cycle:
    def __init__(self):
        self.me = self


def _watch_collections():
    """(generations seen, an event set at the first one, the gc callback)."""
    seen: list[int] = []
    first = gevent.event.Event()

    def on_collection(phase: str, info: dict) -> None:
        if phase == "stop":
            seen.append(info["generation"])
            first.set()

    return seen, first, on_collection


def test_automatic_collection_is_off_while_it_runs_and_back_after():
    was_enabled = gc.isenabled()
    schedule = CollectorSchedule(full_every_s=3600, check_every_s=0.01).start()
    try:
        assert not gc.isenabled()
    finally:
        schedule.stop()
    assert gc.isenabled() == was_enabled


def test_a_full_collection_once_its_time_has_come_and_cycles_are_freed():
    seen, first, on_collection = _watch_collections()
    schedule = CollectorSchedule(full_every_s=0.05, check_every_s=0.01, max_new_objects=10**9)
    gc.callbacks.append(on_collection)
    try:
        schedule.start()
        cycle = _Cycle()
        gone = gevent.event.Event()
        ref = weakref.ref(cycle, lambda _: gone.set())
        del cycle  # only a collection can free it: it refers to itself
        assert gone.wait(timeout=30)
        assert ref() is None
    finally:
        schedule.stop()
        gc.callbacks.remove(on_collection)
    assert seen and set(seen) == {2}  # only full collections: no young ones by allocation counts
    assert schedule.collections >= 1


def test_many_new_objects_bring_the_collection_forward():
    seen, first, on_collection = _watch_collections()
    schedule = CollectorSchedule(full_every_s=3600, check_every_s=0.01, max_new_objects=5_000)
    gc.collect()  # the count of new objects starts from nothing
    gc.callbacks.append(on_collection)
    try:
        schedule.start()
        assert not first.wait(timeout=0.1)  # not due, few new objects: nothing collected
        cycles = [_Cycle() for _ in range(10_000)]  # past the bound, alive
        assert first.wait(timeout=30)
        del cycles
    finally:
        schedule.stop()
        gc.callbacks.remove(on_collection)
    assert seen[0] == 2


def test_a_collection_waits_for_the_loop_to_be_idle():
    """Each collection is let go by the idle lane: never while other greenlets are ready to run."""
    schedule = CollectorSchedule(full_every_s=0.0, check_every_s=0.005)
    busy_when_collected: list[bool] = []
    running = [False]
    enough = gevent.event.Event()

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start":
            busy_when_collected.append(running[0])
            if len(busy_when_collected) >= 5:
                enough.set()

    def busy_for_a_while() -> None:
        # Ready again at every pass of the loop for 5,000 passes (several of the schedule's
        # periods): no idle loop meanwhile.
        running[0] = True
        for _ in range(5000):
            gevent.sleep(0)
        running[0] = False

    gc.callbacks.append(on_collection)
    try:
        schedule.start()
        while not enough.is_set():
            gevent.spawn(busy_for_a_while).join()
            gevent.sleep(0.001)  # an idle loop: the lane lets a collection go now
    finally:
        schedule.stop()
        gc.callbacks.remove(on_collection)
    assert busy_when_collected and not any(busy_when_collected)
