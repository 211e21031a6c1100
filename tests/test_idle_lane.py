"""The idle lane: work that can wait runs only once the loop has nothing else ready."""

import contextlib

import gevent
import gevent.event

from ivr_daemon.idle_lane import IdleLane


def test_a_waiter_goes_on_only_after_every_ready_greenlet_has_run():
    lane, order = IdleLane(max_wait_cpu_s=30), []

    def busy(name, steps):
        for step in range(steps):
            order.append((name, step))
            gevent.sleep(0)  # ready again at once: the loop is not idle

    def waiter():
        assert lane.wait() is True
        order.append("waiter")

    gevent.joinall([gevent.spawn(busy, "a", 50), gevent.spawn(waiter), gevent.spawn(busy, "b", 20)])
    assert order[-1] == "waiter" and len(order) == 71


def test_waiters_go_one_at_a_time_oldest_first_each_after_what_the_one_before_made_ready():
    lane, order, follow_ups = IdleLane(max_wait_cpu_s=30), [], []

    def follow_up(name):
        for step in range(3):
            order.append(f"{name} follow-up {step}")
            gevent.sleep(0)

    def waiter(name):
        lane.wait()
        order.append(name)
        follow_ups.append(gevent.spawn(follow_up, name))  # foreground work: it runs before the next waiter goes

    gevent.joinall([gevent.spawn(waiter, f"w{k}") for k in range(3)])
    gevent.joinall(follow_ups)
    expected = []
    for k in range(3):
        expected += [f"w{k}", *(f"w{k} follow-up {step}" for step in range(3))]
    assert order == expected
    assert lane.let_go == 3 and lane.overdue == 0


@contextlib.contextmanager
def loop_kept_busy():
    """A greenlet ready again at every pass of the loop while the block runs: nobody is let go
    meanwhile; after the block the loop can go idle."""
    stop = gevent.event.Event()

    def spin():
        while not stop.is_set():
            gevent.sleep(0)

    spinner = gevent.spawn(spin)
    try:
        yield
    finally:
        stop.set()
        spinner.join()


def test_a_killed_waiter_is_skipped_and_the_others_still_go():
    lane, done = IdleLane(max_wait_cpu_s=30), []
    with loop_kept_busy():
        doomed = gevent.spawn(lane.wait)
        survivor = gevent.spawn(lambda: done.append(lane.wait()))
        gevent.sleep(0)
        doomed.kill()
    survivor.join()
    assert done == [True] and lane.let_go == 1 and not lane._waiting


def wait_on_a_loop_never_idle(lane: IdleLane, **wait_options) -> list[bool]:
    """What ``lane.wait(**wait_options)`` returned while another greenlet kept the loop busy."""
    outcome = []

    def waiter():
        outcome.append(lane.wait(**wait_options))

    def spin_until_the_waiter_is_back():
        while not outcome:
            gevent.sleep(0)

    gevent.joinall([gevent.spawn(waiter), gevent.spawn(spin_until_the_waiter_is_back)])
    return outcome


def test_a_loop_that_never_goes_idle_lets_a_waiter_go_once_it_has_spent_max_wait_cpu():
    lane = IdleLane(max_wait_cpu_s=0.05)
    assert wait_on_a_loop_never_idle(lane) == [False] and lane.overdue == 1 and lane.let_go == 0


def test_first_waiters_go_before_the_others_whenever_they_came():
    lane, order = IdleLane(max_wait_cpu_s=30), []

    def waiter(name, first):
        lane.wait(first=first)
        order.append(name)

    with loop_kept_busy():  # nobody goes until all have come
        waiters = [gevent.spawn(waiter, "rest 1", False), gevent.spawn(waiter, "first 1", True),
                   gevent.spawn(waiter, "rest 2", False), gevent.spawn(waiter, "first 2", True)]
        gevent.sleep(0)
    gevent.joinall(waiters)
    assert order == ["first 1", "first 2", "rest 1", "rest 2"]


def test_a_waiter_with_a_wall_clock_bound_goes_on_by_it_on_a_loop_never_idle():
    lane = IdleLane(max_wait_cpu_s=30)
    assert wait_on_a_loop_never_idle(lane, first=True, max_wait_s=0.05) == [False]
    assert lane.overdue == 1 and lane.let_go == 0


def test_a_waiter_on_another_thread_goes_on_at_once_and_is_not_queued():
    lane = IdleLane(max_wait_cpu_s=30)
    assert gevent.get_hub().threadpool.apply(lane.wait, (True,)) is True
    assert lane.let_go == 0 and lane.overdue == 0 and not lane._waiting_first


def test_the_process_lane_paces_the_main_loop_even_when_a_thread_asks_for_it_first(monkeypatch):
    import ivr_daemon.idle_lane as idle_lane_module

    monkeypatch.setattr(idle_lane_module, "_lane", None)
    from_thread = gevent.get_hub().threadpool.apply(lambda: (idle_lane_module.idle_lane(),
                                                             idle_lane_module.idle_lane().wait()))
    assert from_thread[1] is True and from_thread[0].let_go == 0  # a thread's waiter goes on at once
    lane = idle_lane_module.idle_lane()
    assert lane is from_thread[0]
    order = []

    def waiter():
        lane.wait()
        order.append("waiter")

    def busy():
        order.append("busy")

    # On the main loop the waiter goes only once the loop is idle: after the ready greenlet.
    gevent.joinall([gevent.spawn(waiter), gevent.spawn(busy)])
    assert order == ["busy", "waiter"] and lane.let_go == 1


def _lane_of_the_test(monkeypatch, burst: bool) -> IdleLane:
    """A lane of the test's own; ``burst``: every LLM answer goes through it, as in a burst."""
    import ivr_daemon.idle_lane as idle_lane_module
    from ivr_daemon.llm import paced

    lane = IdleLane(max_wait_cpu_s=60)
    monkeypatch.setattr(idle_lane_module, "_lane", lane)
    if burst:
        monkeypatch.setattr(paced, "QUIET_AWAITED_ANSWERS_MAX", 0)
    return lane


def _first_delta_and_lane_wait(client) -> tuple[str, float]:
    """A streamed answer's first delta, and how long this greenlet's answers waited in the lane."""
    from ivr_daemon.llm.paced import lane_wait_s

    stream = client.stream([{"role": "user", "content": "hi"}])
    try:
        return next(stream), lane_wait_s()
    finally:
        stream.close()


def test_an_llm_answers_wait_in_the_lane_is_counted_for_its_greenlet_alone(monkeypatch):
    """What a turn's llm_ms leaves out and turn_complete's lane_wait_ms says: the time its LLM
    answer, already there, waited for a loop with nothing more urgent to do."""
    import time

    from llm_fakes import FakeLlmServer
    from ivr_daemon.llm.openai import OpenAiClient
    from ivr_daemon.llm.paced import lane_wait_s

    lane = _lane_of_the_test(monkeypatch, burst=True)
    held_s = 0.1
    with FakeLlmServer("openai", replies="Hello there.") as server:
        client = OpenAiClient(server.url, "m", timeout_s=10)
        with loop_kept_busy():
            asker = gevent.spawn(_first_delta_and_lane_wait, client)
            with gevent.Timeout(10):
                while not lane._waiting_first:  # its request is written; its answer waits
                    gevent.sleep(0.001)
            held_until_s = time.monotonic() + held_s
            while time.monotonic() < held_until_s:
                gevent.sleep(0.001)
        first, waited_s = asker.get(timeout=10)
        client.close()
    assert first == "Hello" and lane.let_go == 1
    assert waited_s >= held_s - 0.01, waited_s
    assert gevent.spawn(lane_wait_s).get(timeout=5) == 0.0  # a greenlet that asked nothing waited nothing


def test_an_llm_answer_still_to_come_waits_on_its_socket_not_in_the_lane(monkeypatch):
    """While the LLM thinks, the turn's greenlet waits for the answer's first bytes, not in the
    lane: a busy loop then holds nothing back, and the LLM's time is not counted as the daemon's
    queueing (lane_wait_s). The lane holds the answer once it has come."""
    import time

    from llm_fakes import FakeLlmServer
    from ivr_daemon.llm.openai import OpenAiClient

    lane = _lane_of_the_test(monkeypatch, burst=True)
    thinking_s = 0.3
    with FakeLlmServer("openai", replies="Hello there.", hold_reply=True) as server:
        client = OpenAiClient(server.url, "m", timeout_s=10)
        asker = gevent.spawn(_first_delta_and_lane_wait, client)
        with gevent.Timeout(10):
            while not server.requests:
                gevent.sleep(0.001)
        with loop_kept_busy():
            thinking_until_s = time.monotonic() + thinking_s
            while time.monotonic() < thinking_until_s:
                assert not lane._waiting_first, "a request whose answer has not come waits in the lane"
                gevent.sleep(0.001)
        server.release_reply.set()
        first, waited_s = asker.get(timeout=10)
        client.close()
    assert first == "Hello" and lane.let_go == 1  # it went through the lane once its answer had come
    assert waited_s < thinking_s, waited_s  # the LLM's thinking is not the lane's wait


def test_out_of_a_burst_an_answer_is_read_at_once_unless_another_waits_in_the_lane(monkeypatch):
    """Few answers awaited and none waiting in the lane: the answer is read as soon as it comes,
    however busy the loop; with another answer already waiting there, it queues behind it."""
    from llm_fakes import FakeLlmServer
    from ivr_daemon.llm import paced
    from ivr_daemon.llm.openai import OpenAiClient

    lane = _lane_of_the_test(monkeypatch, burst=False)
    assert paced.QUIET_AWAITED_ANSWERS_MAX >= 1
    with FakeLlmServer("openai", replies="Hello there.") as server:
        client = OpenAiClient(server.url, "m", timeout_s=10)
        with loop_kept_busy():
            # read at once, the loop busy
            assert gevent.spawn(_first_delta_and_lane_wait, client).get(timeout=10) == ("Hello", 0.0)
            assert lane.let_go == 0 and lane.overdue == 0

            # Another answer waiting in the lane (a first waiter): this one goes behind it.
            other = gevent.spawn(lane.wait, first=True)
            with gevent.Timeout(10):
                while not lane.first_waiters():
                    gevent.sleep(0.001)
            asker = gevent.spawn(_first_delta_and_lane_wait, client)
            with gevent.Timeout(10):
                while lane.first_waiters() < 2:
                    gevent.sleep(0.001)
        assert other.get(timeout=10) is True
        first, waited_s = asker.get(timeout=10)
        client.close()
    assert first == "Hello" and waited_s > 0 and lane.let_go == 2
