"""Fewer log lines keep every line whole: the JSON text, its fields, the lines of foreign stdlib
loggers and of worker threads; a hung-up call's one line says all two said."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import gevent
import gevent.threadpool
from structlog.testing import capture_logs

from harness import running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.logs import configure_logging, get_logger
from ivr_daemon.replay.simulator import FreeswitchSimulator


def test_json_lines_of_structlog_foreign_loggers_and_threads_stay_whole():
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    pool = gevent.threadpool.ThreadPool(2)
    try:
        call_log = get_logger("ivr_daemon.test").bind(call_uuid="03362ffb-115a-4a3d-9eb6-770e2089d43f")
        foreign = logging.getLogger("urllib3.connectionpool")

        def work(index: int) -> bool:
            for i in range(500):
                call_log.info("from_thread", worker=index, i=i, path=Path("/tmp/x.wav"))
                foreign.warning("Connection pool is full, discarding connection: %s", "127.0.0.1")
            return True

        results = [pool.spawn(work, n) for n in range(2)]
        for i in range(500):
            call_log.info("from_hub", i=i)
            gevent.sleep(0)
        with gevent.Timeout(60, AssertionError("logging deadlocked the hub")):
            assert [r.get() for r in results] == [True, True]
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        pool.kill()
        configure_logging("DEBUG", "console")
    threads = [line for line in lines if line["event"] == "from_thread"]
    assert len(threads) == 1000 and threads[0]["path"] == repr(Path("/tmp/x.wav"))  # the fallback
    assert threads[0]["call_uuid"] == "03362ffb-115a-4a3d-9eb6-770e2089d43f" and threads[0]["level"] == "info"
    assert {"timestamp", "logger"} <= set(threads[0])
    pool_full = [line for line in lines if line["logger"] == "urllib3.connectionpool"]
    assert len(pool_full) == 1000 and pool_full[0]["level"] == "warning"
    assert pool_full[0]["event"] == "Connection pool is full, discarding connection: 127.0.0.1"
    assert len([line for line in lines if line["event"] == "from_hub"]) == 500


def test_a_hung_up_call_says_its_hangup_and_clean_up_in_one_line(tmp_path):
    with FakeLlmServer("ollama", replies="Hello there. Bye.") as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            with capture_logs() as logs:
                call = sim.new_call()
                sim.speak(call, "hi")
                wait_heard(sim, call, 2)
                sim.hangup(call, "NORMAL_CLEARING")
                wait_until(lambda: call not in daemon.router.calls)
    mine = [line for line in logs if line.get("call_uuid") == call]
    (hangup,) = [line for line in mine if line["event"] == "call_hangup"]
    assert hangup["log_level"] == "info" and hangup["hangup_cause"] == "NORMAL_CLEARING" and hangup["turns"] == 1
    # Its answer's WAVs went to the phrase cache (none of the call's own to delete).
    assert hangup["wavs_deleted"] == 0 and hangup["syntheses_still_running"] == 0
    assert not [line for line in mine if line["event"] == "call_cleaned_up"]


def test_a_call_closed_without_its_hangup_still_says_its_clean_up():
    from ivr_daemon.conversation import ConversationHandler

    class Services:  # what close() reads of a call's services
        settings = type("S", (), {"system_prompt": "Be brief.", "max_conversation_history": 4})()

    handler = ConversationHandler.__new__(ConversationHandler)  # no turn ever ran: nothing else needed
    handler.__init__("03362ffb-115a-4a3d-9eb6-770e2089d43f", get_logger("ivr_daemon.test"), Services())
    with capture_logs() as logs:
        handler.close()
        handler.close()  # once only
    assert [(line["event"], line["wavs_deleted"], line["syntheses_still_running"]) for line in logs] == [
        ("call_cleaned_up", 0, 0)]
