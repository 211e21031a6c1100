"""Call-event webhooks: a real local HTTP receiver, the daemon on the simulator, the LLM faked.

The receiver is a gevent WSGI server in the test process. It records each POST, answers with
the statuses a test lines up (then 200), and can hold every answer on an event: a receiver
that never answers, without sleeping. Signatures are checked as a user's receiver would.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import uuid as uuid_lib
from pathlib import Path

import gevent
import gevent.event
import pytest
from gevent.pywsgi import WSGIServer
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from harness import TurnLog, broadcasts, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.config import ConfigError, load_settings
from ivr_daemon.daemon import SHUTDOWN_BUDGET_S
from ivr_daemon.metrics import DaemonMetrics
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.webhooks import WebhookSender

SECRET = "whsec-5b1f0c9e8d7a6b4c"
FAST_BACKOFF_S = 0.001  # retries without waiting seconds


class Receiver:
    """A webhook receiver on 127.0.0.1: ``.requests`` as they arrived; ``statuses`` answer the
    first requests in order (then 200); ``hold`` keeps every answer until ``.release``."""

    def __init__(self, statuses: list[int] | None = None, hold: bool = False):
        self.statuses = list(statuses or [])
        self.hold = hold
        self.requests: list[dict] = []
        self.release = gevent.event.Event()
        self._server = WSGIServer(("127.0.0.1", 0), self._app, log=None, error_log=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/hooks/ivr"

    def _app(self, environ, start_response):
        raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        self.requests.append({"timestamp": environ.get("HTTP_X_IVR_TIMESTAMP"),
                              "signature": environ.get("HTTP_X_IVR_SIGNATURE"),
                              "content_type": environ.get("CONTENT_TYPE"), "body": raw, "json": json.loads(raw)})
        if self.hold:
            self.release.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        start_response(f"{status} X", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    def events(self) -> list[dict]:
        return [request["json"] for request in self.requests]

    def types(self) -> list[str]:
        return [event["type"] for event in self.events()]

    def __enter__(self) -> "Receiver":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._server.stop(timeout=1)


def verified(request: dict, secret: str = SECRET, tolerance_s: int = 300) -> bool:
    """What the README tells a receiver to do: HMAC of "timestamp.body", compared in constant time."""
    timestamp, signature = request["timestamp"], request["signature"] or ""
    expected = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + request["body"],
                                    hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature) and abs(time.time() - int(timestamp)) <= tolerance_s


def metric(daemon_or_metrics, name: str) -> float:
    metrics = getattr(daemon_or_metrics, "metrics", daemon_or_metrics)
    text = metrics.exposition()[0].decode()
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return samples[name]


def webhook_settings(sim, tmp_path, llm, **env):
    values = {"LLM_PROVIDER": "ollama", "LLM_API_URL": llm.url, "WEBHOOK_SECRET": SECRET}
    values.update(env)
    return settings_for(sim, tmp_path / "tts", **values)


# -- a whole call on the simulator ----------------------------------------------------------------

def test_a_call_sends_signed_events_in_order(tmp_path):
    with Receiver() as receiver, FakeLlmServer("ollama", replies="Hello there.") as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = webhook_settings(sim, tmp_path, llm, WEBHOOK_URL=receiver.url, GREETING="Hi, how can I help?")
        with capture_logs() as logs, running_daemon(sim, settings, webhook_backoff_base_s=FAST_BACKOFF_S) as daemon:
            call = sim.new_call(caller_id_number="5550100")
            wait_heard(sim, call)  # the greeting
            sim.speak(call, "hello")
            wait_until(lambda: len(broadcasts(sim, call)) == 2)
            wait_heard(sim, call)
            sim.hangup(call)
            # Counted once the sender has read the answer, a moment after the receiver saw the request.
            wait_until(lambda: metric(daemon, "ivr_webhooks_delivered_total") == 3)
            assert len(receiver.requests) == 3 and metric(daemon, "ivr_webhooks_failed_total") == 0
    assert receiver.types() == ["call.started", "turn.completed", "call.ended"]
    for request in receiver.requests:
        assert verified(request), request
        assert request["content_type"] == "application/json"
    # A receiver with the wrong secret (or a changed body) would not accept them.
    assert not verified(receiver.requests[0], secret="another-secret-123456")
    assert not verified({**receiver.requests[0], "body": receiver.requests[0]["body"] + b" "})
    events = receiver.events()
    assert len({event["id"] for event in events}) == 3
    assert all(uuid_lib.UUID(event["id"]).version == 4 and event["call_uuid"] == call for event in events)
    assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)
    started, turn, ended = (event["data"] for event in events)
    assert started == {"agent": "default", "caller_number": "5550100", "variables": {"destination_number": "ai"},
                       "dynamic_variables": {}}
    assert turn["transcript"] == "hello" and turn["reply"] == "Hello there." and turn["turn"] == 1
    assert turn["interrupted"] is False and turn["used_fallback"] is False
    assert turn["first_audio_ms"] > 0 and turn["llm_ms"] > 0 and turn["total_ms"] >= turn["first_audio_ms"]
    assert ended["turns"] == 1 and ended["hangup_cause"] == "NORMAL_CLEARING" and ended["duration_s"] > 0
    assert ended["transferred_to"] is None
    assert SECRET not in repr(logs)  # the secret is never logged


def test_a_receiver_that_never_answers_does_not_slow_a_call(tmp_path):
    turns = TurnLog()
    with Receiver(hold=True) as receiver, FakeLlmServer("ollama", replies="Still here.") as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = webhook_settings(sim, tmp_path, llm, WEBHOOK_URL=receiver.url, WEBHOOK_TIMEOUT_S="30")
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            wait_until(lambda: len(receiver.requests) == 1)  # call.started is held by the receiver
            sim.speak(call, "are you there")
            turns.wait(1, call)
            wait_until(lambda: len(broadcasts(sim, call)) == 1)
            sim.speak(call, "and now")
            turns.wait(2, call)
            wait_until(lambda: len(broadcasts(sim, call)) == 2)
            # Both turns went through while the receiver still held the first event.
            assert not receiver.release.is_set() and receiver.types() == ["call.started"]
            assert daemon.webhooks.pending == 3
            receiver.release.set()
            wait_until(lambda: len(receiver.requests) == 3)
    assert receiver.types() == ["call.started", "turn.completed", "turn.completed"]
    assert [e["data"]["turn"] for e in receiver.events()[1:]] == [1, 2]


def test_queue_overflow_drops_the_oldest_and_counts_it(tmp_path):
    turns = TurnLog()
    with Receiver(hold=True) as receiver, FakeLlmServer("ollama", replies="Yes.") as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = webhook_settings(sim, tmp_path, llm, WEBHOOK_URL=receiver.url, WEBHOOK_QUEUE_MAX="2",
                                    WEBHOOK_TIMEOUT_S="30")
        with capture_logs() as logs, running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            wait_until(lambda: len(receiver.requests) == 1)  # call.started: in flight, held
            for turn in range(1, 4):
                sim.speak(call, f"question {turn}")
                turns.wait(turn, call)
            sim.hangup(call)
            wait_until(lambda: metric(daemon, "ivr_webhooks_dropped_total") == 2)
            receiver.release.set()
            wait_until(lambda: len(receiver.requests) == 3)
            wait_until(lambda: metric(daemon, "ivr_webhooks_delivered_total") == 3)
    # Turns 1 and 2 waited longest: they were dropped for turn 3 and the hangup.
    assert receiver.types() == ["call.started", "turn.completed", "call.ended"]
    assert receiver.events()[1]["data"]["turn"] == 3
    dropped = [line for line in logs if line["event"] == "webhook_dropped"]
    assert [line["event_type"] for line in dropped] == ["turn.completed", "turn.completed"]


TRANSFER_AGENTS = """
[agents.reception]
greeting = ""
silence_timeout_s = 0
webhook_url = "{url}"

[agents.reception.transfer_targets]
operator = "1000 XML default"

[agents.quiet]
greeting = ""
"""


def test_a_transfer_emits_call_transferred_to_the_agents_own_url(tmp_path):
    with Receiver() as receiver, FakeLlmServer("ollama", replies="Hi.") as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        path = tmp_path / "agents.toml"
        path.write_text(TRANSFER_AGENTS.format(url=receiver.url))
        settings = webhook_settings(sim, tmp_path, llm, AGENTS_FILE=str(path))  # no global WEBHOOK_URL
        with running_daemon(sim, settings, webhook_backoff_base_s=FAST_BACKOFF_S) as daemon:
            quiet = sim.new_call(variables={"ivr_agent": "quiet"})  # an agent without a URL: no events
            call = sim.new_call(variables={"ivr_agent": "reception"})
            wait_until(lambda: len(receiver.requests) == 1)
            sim.dtmf(call, "0")
            sim.wait_for_command(f"api uuid_transfer {call} 1000 XML default", 10)
            wait_until(lambda: len(receiver.requests) == 2)
            sim.hangup(call)
            sim.hangup(quiet)
            wait_until(lambda: len(receiver.requests) == 3)
            wait_until(lambda: not daemon.router.calls)
    assert receiver.types() == ["call.started", "call.transferred", "call.ended"]
    assert {event["call_uuid"] for event in receiver.events()} == {call}
    assert receiver.events()[1]["data"] == {"agent": "reception", "target": "operator", "source": "dtmf"}
    assert receiver.events()[2]["data"]["transferred_to"] == "operator"
    assert all(verified(request) for request in receiver.requests)


def test_shutdown_delivers_the_calls_last_events(tmp_path):
    with Receiver() as receiver, FakeLlmServer("ollama", replies="Hi.") as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = webhook_settings(sim, tmp_path, llm, WEBHOOK_URL=receiver.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            wait_until(lambda: len(receiver.requests) == 1)
            daemon.shutdown(grace_s=1.0)
            # Queued by the call's clean-up during the shutdown, delivered before it returned.
            assert receiver.types() == ["call.started", "call.ended"]
            assert receiver.events()[1]["data"]["hangup_cause"] == "DAEMON_SHUTDOWN"
            assert receiver.events()[1]["call_uuid"] == call


# -- the sender on its own ------------------------------------------------------------------------

def sender(**options) -> WebhookSender:
    options.setdefault("backoff_base_s", FAST_BACKOFF_S)
    options.setdefault("timeout_s", 2.0)
    webhooks = WebhookSender(SECRET, DaemonMetrics(), **options)
    webhooks.start()
    return webhooks


def test_a_500_is_retried_then_delivered_and_a_400_is_not_retried():
    with Receiver(statuses=[500, 503, 400]) as receiver:
        webhooks = sender(concurrency=1)  # one worker: the receiver's answers go to known events
        try:
            first = webhooks.send("call.started", "call-a", {"n": 1}, url=receiver.url)
            second = webhooks.send("turn.completed", "call-a", {"n": 2}, url=receiver.url)
            third = webhooks.send("call.ended", "call-a", {"n": 3}, url=receiver.url)
            assert webhooks.flush(10)
        finally:
            webhooks.stop(timeout_s=1)
    # The first: 500, 503, then 200 (the same event, signed afresh each time); the second: 400,
    # given up at once; the third still goes, after them.
    assert [event["id"] for event in receiver.events()] == [first, first, first, second, third]
    assert all(verified(request) for request in receiver.requests)
    assert metric(webhooks, "ivr_webhooks_delivered_total") == 2
    assert metric(webhooks, "ivr_webhooks_failed_total") == 1


def test_400_is_given_up_at_once():
    with Receiver(statuses=[400]) as receiver:
        webhooks = sender(concurrency=1)
        try:
            refused = webhooks.send("call.started", "call-a", {}, url=receiver.url)
            after = webhooks.send("call.ended", "call-a", {}, url=receiver.url)
            assert webhooks.flush(10)
        finally:
            webhooks.stop(timeout_s=1)
    assert [event["id"] for event in receiver.events()] == [refused, after]
    assert metric(webhooks, "ivr_webhooks_failed_total") == 1
    assert metric(webhooks, "ivr_webhooks_delivered_total") == 1


def test_a_500_is_retried_up_to_five_attempts():
    with Receiver(statuses=[500] * 5) as receiver:
        webhooks = sender(concurrency=1)
        try:
            with capture_logs() as logs:
                event_id = webhooks.send("call.started", "call-a", {}, url=receiver.url)
                assert webhooks.flush(10)
        finally:
            webhooks.stop(timeout_s=1)
    assert [event["id"] for event in receiver.events()] == [event_id] * 5
    assert [line["retry_in_s"] for line in logs if line["event"] == "webhook_retry"] == \
        [FAST_BACKOFF_S, FAST_BACKOFF_S * 2, FAST_BACKOFF_S * 4, FAST_BACKOFF_S * 8]
    assert metric(webhooks, "ivr_webhooks_failed_total") == 1


def test_connection_errors_are_retried_then_given_up():
    with Receiver() as receiver:
        closed_url = receiver.url  # a port nothing listens on once the receiver is gone
    webhooks = sender(concurrency=1)
    try:
        with capture_logs() as logs:
            webhooks.send("call.started", "call-a", {}, url=closed_url)
            assert webhooks.flush(10)
    finally:
        webhooks.stop(timeout_s=1)
    (failed,) = [line for line in logs if line["event"] == "webhook_failed"]
    assert failed["attempts"] == 5 and failed["error"] == "ConnectionError"
    assert metric(webhooks, "ivr_webhooks_failed_total") == 1


def test_each_calls_events_arrive_in_order_with_several_in_flight():
    # Every call's first delivery fails once (retried): later events of the same call wait for it.
    with Receiver(statuses=[500, 500, 500]) as receiver:
        webhooks = sender(concurrency=4)
        try:
            sent = {f"call-{c}": [webhooks.send("turn.completed", f"call-{c}", {"turn": t}, url=receiver.url)
                                  for t in range(10)] for c in range(6)}
            assert webhooks.flush(20)
        finally:
            webhooks.stop(timeout_s=1)
    for call, ids in sent.items():
        arrived = [e["id"] for e in receiver.events() if e["call_uuid"] == call]
        assert list(dict.fromkeys(arrived)) == ids  # first arrivals in the order sent
        assert [e["data"]["turn"] for e in receiver.events() if e["call_uuid"] == call][-1] == 9
    assert metric(webhooks, "ivr_webhooks_delivered_total") == 60


# -- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["ftp://hooks.example.com/x", "hooks.example.com/x", "http://", "http://a b/x",
                                 "http://host:port/x"])
def test_a_webhook_url_that_is_not_http_is_refused(url):
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"WEBHOOK_URL": url, "WEBHOOK_SECRET": SECRET})
    assert caught.value.variable == "WEBHOOK_URL"


def test_a_webhook_url_needs_a_secret_that_is_never_echoed():
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"WEBHOOK_URL": "https://hooks.example.com/ivr"})
    assert caught.value.variable == "WEBHOOK_SECRET"
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"WEBHOOK_URL": "https://hooks.example.com/ivr", "WEBHOOK_SECRET": "short-secret"})
    assert caught.value.variable == "WEBHOOK_SECRET" and "short-secret" not in str(caught.value)
    settings = load_settings(environ={"WEBHOOK_URL": "https://hooks.example.com/ivr", "WEBHOOK_SECRET": SECRET})
    assert settings.webhook_url == "https://hooks.example.com/ivr" and settings.webhook_queue_max == 1000


def test_cli_exits_2_for_a_bad_webhook_url(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "ivr_daemon", "--env-file", os.devnull, "run"],
        env={"WEBHOOK_URL": "file:///etc/passwd", "WEBHOOK_SECRET": SECRET, "PATH": "/usr/bin:/bin",
             "PYTHONPATH": str(root)},
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "WEBHOOK_URL" in result.stderr and SECRET not in result.stderr


def test_sigterm_with_a_receiver_that_never_answers_exits_within_the_budget(tmp_path):
    with Receiver(hold=True) as receiver, FakeLlmServer("ollama", replies="Hi.") as llm, FreeswitchSimulator() as sim:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "LOG_", "HTTP_", "WEBHOOK_"))}
        env.update({"FREESWITCH_PORT": str(sim.port), "LLM_PROVIDER": "ollama", "LLM_API_URL": llm.url,
                    "TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(tmp_path / "tts"), "TTS_CACHE_MAX_MB": "0",
                    "LOG_FORMAT": "json", "GREETING": "", "SILENCE_TIMEOUT_S": "0", "HTTP_PORT": "0",
                    "WEBHOOK_URL": receiver.url, "WEBHOOK_SECRET": SECRET, "WEBHOOK_TIMEOUT_S": "60",
                    "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        log_path = tmp_path / "daemon.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "ivr_daemon", "--env-file", os.devnull, "run"],
                                    env=env, stderr=log_file, stdout=log_file)
        try:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=60)
            sim.new_call()
            wait_until(lambda: len(receiver.requests) == 1, timeout_s=30)  # held: call.ended queues behind it
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            proc.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    events = {line["event"]: line for line in lines}
    assert events["webhooks_abandoned_at_shutdown"]["count"] == 2  # call.started in flight, call.ended queued
    assert events["daemon_shut_down"]["seconds"] <= SHUTDOWN_BUDGET_S
    assert SECRET not in log_path.read_text()


def test_an_agents_bad_webhook_url_is_a_config_error_naming_the_agent(tmp_path):
    from ivr_daemon.agents import load_agents

    path = tmp_path / "agents.toml"
    path.write_text('[agents.reception]\nwebhook_url = "gopher://crm.example.com/hooks"\n')
    with pytest.raises(ConfigError) as caught:
        load_agents(load_settings(environ={"AGENTS_FILE": str(path), "WEBHOOK_SECRET": SECRET}))
    assert caught.value.variable == "AGENTS_FILE"
    assert "[agents.reception]" in caught.value.problem and "webhook_url" in caught.value.problem
    path.write_text('[agents.reception]\nwebhook_url = "https://crm.example.com/hooks"\n')
    with pytest.raises(ConfigError) as caught:  # signed with the global secret: it must be set
        load_agents(load_settings(environ={"AGENTS_FILE": str(path)}))
    assert "WEBHOOK_SECRET" in caught.value.problem


def test_a_stuck_receiver_keeps_the_queue_bounded_and_the_newest_events():
    with Receiver(hold=True) as receiver:
        webhooks = sender(concurrency=2, queue_max=5, timeout_s=30)
        try:
            first = webhooks.send("call.started", "call-a", {}, url=receiver.url)
            wait_until(lambda: len(receiver.requests) == 1)  # in flight, held
            ids = [webhooks.send("turn.completed", "call-a", {"turn": turn}, url=receiver.url) for turn in range(100)]
            # Nothing is kept beyond the bound, not even in the worker's own queue.
            assert webhooks.pending == 6 and sum(len(shard) for shard in webhooks._shards) == 5
            assert metric(webhooks, "ivr_webhooks_dropped_total") == 95
            receiver.release.set()
            assert webhooks.flush(10)
        finally:
            webhooks.stop(timeout_s=1)
    assert [event["id"] for event in receiver.events()] == [first, *ids[-5:]]


def test_stop_with_a_receiver_that_never_answers_logs_each_abandoned_event_and_waits_for_no_worker():
    with Receiver(hold=True) as receiver:
        webhooks = sender(concurrency=1, timeout_s=30)
        in_flight = webhooks.send("call.started", "call-a", {}, url=receiver.url)
        wait_until(lambda: len(receiver.requests) == 1)  # held: the next one queues behind it
        queued = webhooks.send("call.ended", "call-a", {}, url=receiver.url)
        worker = webhooks._workers[0]
        with capture_logs() as logs:
            webhooks.stop(timeout_s=0.1)
        [abandoned] = [line for line in logs if line["event"] == "webhooks_abandoned_at_shutdown"]
        assert (abandoned["count"], abandoned["in_flight"], abandoned["queued"]) == (2, 1, 1)
        assert abandoned["calls"] == ["call-a"]
        assert abandoned["events"] == [f"call.started {in_flight}", f"call.ended {queued}"]
        assert webhooks.send("call.ended", "call-b", {}, url=receiver.url) is None  # no more taken
        worker.join(timeout=10)  # cut, though stop() did not wait for it
        assert worker.dead and webhooks.pending == 0
    assert [event["id"] for event in receiver.events()] == [in_flight]


def test_stop_never_waits_for_a_worker_slow_to_die():
    # Under overload a killed worker may take longer than any fixed timeout to run its exit;
    # stop() is part of a shutdown with a budget and must neither wait for it nor raise.
    webhooks = sender(concurrency=1)
    dying = gevent.event.Event()
    may_die = gevent.event.Event()

    def deliver_slow_to_die(event):
        try:
            gevent.event.Event().wait()  # a receiver that never answers
        except gevent.GreenletExit:
            dying.set()
            may_die.wait()  # the exit takes its time, as on a loop too busy to run it
            raise

    webhooks._deliver = deliver_slow_to_die
    webhooks.send("call.started", "call-a", {}, url="http://127.0.0.1:9/hooks")
    wait_until(lambda: webhooks.pending == 1 and not webhooks._shards[0])
    worker = webhooks._workers[0]
    with capture_logs() as logs:
        webhooks.stop(timeout_s=0.0)  # raised gevent.Timeout after 1 s when stop() waited on killall
    assert [line["count"] for line in logs if line["event"] == "webhooks_abandoned_at_shutdown"] == [1]
    assert dying.wait(10)
    assert not worker.dead
    may_die.set()
    worker.join(timeout=10)
    assert worker.dead


def test_events_queued_while_stop_flushes_are_delivered_too():
    # The last calls' clean-up queues their call.ended while the shutdown flush runs: taken and sent.
    with Receiver(hold=True) as receiver:
        webhooks = sender(concurrency=1)
        first = webhooks.send("call.started", "call-a", {}, url=receiver.url)
        wait_until(lambda: len(receiver.requests) == 1)  # held: stop() has something to flush
        flushing = gevent.event.Event()

        def stop():
            flushing.set()  # the waiter wakes once stop() blocks in its flush, not before
            webhooks.stop(timeout_s=30)

        stopper = gevent.spawn(stop)
        assert flushing.wait(10) and not stopper.dead
        late = webhooks.send("call.ended", "call-b", {"hangup_cause": "DAEMON_SHUTDOWN"}, url=receiver.url)
        assert late is not None
        receiver.release.set()
        stopper.join(timeout=30)
        assert stopper.successful()
    assert [event["id"] for event in receiver.events()] == [first, late]
