"""Logging: JSON lines with call_uuid, and no deadlock between worker threads and the hub."""

import io
import json
import logging

import gevent
import gevent.threadpool

from ivr_daemon.logs import configure_logging, get_logger


def test_json_lines_carry_the_bound_call_uuid():
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    try:
        get_logger("ivr_daemon.test").bind(call_uuid="03362ffb-115a-4a3d-9eb6-770e2089d43f").info("turn_complete", llm_ms=12.5)
        line = json.loads(stream.getvalue().strip().splitlines()[-1])
        assert line["event"] == "turn_complete" and line["call_uuid"] == "03362ffb-115a-4a3d-9eb6-770e2089d43f"
        assert line["llm_ms"] == 12.5 and line["level"] == "info"
    finally:
        configure_logging("DEBUG", "console")


def test_worker_threads_and_greenlets_logging_at_once_do_not_hang_the_hub():
    # Synthesis runs in native threads and logs (Coqui does too); gevent's RLock in a handler
    # used to deadlock the hub against them. 4 threads x 5000 lines against a logging greenlet.
    stream = io.StringIO()
    configure_logging("DEBUG", "console", stream=stream)
    logger = logging.getLogger("ivr_daemon.test.threads")
    pool = gevent.threadpool.ThreadPool(2)
    try:
        def work():
            for i in range(5000):
                logger.debug("worker %d", i)
            return True

        def hub_logger():
            count = 0
            while not all(r.ready() for r in results):
                logger.debug("hub")
                count += 1
                gevent.sleep(0)
            return count

        results = [pool.spawn(work) for _ in range(4)]
        ticker = gevent.spawn(hub_logger)
        with gevent.Timeout(60, AssertionError("logging deadlocked the hub")):
            assert [r.get() for r in results] == [True] * 4
            assert ticker.get() > 0
    finally:
        pool.kill()
        configure_logging("DEBUG", "console")
