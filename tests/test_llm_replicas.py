"""LLM_API_URL with several URLs: replicas of one model behind one client (ivr_daemon.llm.replicas).

Real fake servers on real sockets; the back-off runs on a clock the test turns, so "after its
back-off" is a step of the test, not a wait.
"""

import re

import gevent
import pytest
import requests
import urllib3.exceptions
from structlog.testing import capture_logs

from harness import TurnLog, http_server, running_daemon, settings_for, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.config import ConfigError, load_settings
from ivr_daemon.llm import LlmBadReply, LlmTimeout, LlmUnavailable, OllamaClient, OpenAiClient, make_llm_client
from ivr_daemon.llm.replicas import ReplicaSet, replica_label, retryable, split_urls
from ivr_daemon.replay.simulator import FreeswitchSimulator

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
FALLBACK = "Sorry, I'm having trouble right now. Could you say that again?"


class Clock:
    def __init__(self):
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def replica_set(*urls, provider="ollama", timeout_s=5.0, clock=None):
    client_class = {"ollama": OllamaClient, "openai": OpenAiClient}[provider]
    return ReplicaSet([client_class(url, "llama3", timeout_s=timeout_s) for url in urls], clock=clock or Clock())


def test_one_url_is_the_plain_client_as_before(tmp_path):
    settings = load_settings(environ={"LLM_API_URL": " http://127.0.0.1:11434/api/chat ",
                                      "TTS_OUTPUT_DIR": str(tmp_path)})
    assert settings.llm_api_url == "http://127.0.0.1:11434/api/chat"
    client = make_llm_client(settings)
    assert type(client) is OllamaClient and client.api_url == "http://127.0.0.1:11434/api/chat"


def test_several_urls_make_a_replica_set_named_by_host_and_port(tmp_path):
    settings = load_settings(environ={
        "LLM_PROVIDER": "openai", "TTS_OUTPUT_DIR": str(tmp_path),
        "LLM_API_URL": "http://10.0.0.1:8080 , https://user:secret@gpu2.example/v1,http://[::1]:9000/v1"})
    assert settings.llm_api_url == "http://10.0.0.1:8080,https://user:secret@gpu2.example/v1,http://[::1]:9000/v1"
    client = make_llm_client(settings)
    assert isinstance(client, ReplicaSet) and client.supports_tools and client.provider == "openai"
    assert [r.client.api_url for r in client.replicas] == [
        "http://10.0.0.1:8080/v1/chat/completions", "https://user:secret@gpu2.example/v1/chat/completions",
        "http://[::1]:9000/v1/chat/completions"]
    # Labels (logs, metrics, /health) never carry the credentials.
    assert [r.label for r in client.replicas] == ["10.0.0.1:8080", "gpu2.example:443", "[::1]:9000"]
    assert "secret" not in client.api_url


@pytest.mark.parametrize("value, says", [
    ("http://a:1,", "entry 2 must be an http(s) URL"),
    ("http://a:1,ftp://b", "entry 2 must be an http(s) URL"),
    ("http://a:1,http://b:99999", "entry 2 has a bad port"),
    ("http://a:1,http://a:1", "listed twice"),
    ("http://a:1, http://b :2", "entry 2 must be an http(s) URL"),
])
def test_a_bad_url_list_is_a_config_error_naming_the_variable(tmp_path, value, says):
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"LLM_API_URL": value, "TTS_OUTPUT_DIR": str(tmp_path)})
    assert caught.value.variable == "LLM_API_URL" and says in str(caught.value)


def test_split_urls_and_labels():
    assert split_urls(" http://a:1/x , http://b ") == ["http://a:1/x", "http://b"]
    assert replica_label("http://h/api/chat") == "h:80"
    assert replica_label("https://k:p@h:8443/v1?x=1") == "h:8443"


def test_requests_are_spread_round_robin_across_idle_replicas():
    with FakeLlmServer("ollama", "one") as a, FakeLlmServer("ollama", "two") as b, \
            FakeLlmServer("ollama", "three") as c:
        client = replica_set(a.url, b.url, c.url)
        answers = [client.complete(MESSAGES) for _ in range(6)]
    assert sorted(answers) == ["one", "one", "three", "three", "two", "two"]
    assert [len(s.requests) for s in (a, b, c)] == [2, 2, 2]
    assert [r.requests for r in client.replicas] == [2, 2, 2]


def test_a_busy_replica_gets_no_new_request_while_an_idle_one_is_free():
    with FakeLlmServer("ollama", "slow", hold_reply=True) as a, FakeLlmServer("ollama", "quick") as b:
        client = replica_set(a.url, b.url)
        held = gevent.spawn(client.complete, MESSAGES)  # a fresh set starts with its first replica
        wait_until(lambda: len(a.requests) == 1)
        assert client.replicas[0].in_flight == 1
        assert [client.complete(MESSAGES) for _ in range(3)] == ["quick"] * 3
        assert len(a.requests) == 1 and len(b.requests) == 3
        a.release_reply.set()
        assert held.get(timeout=5) == "slow"
    assert [r.in_flight for r in client.replicas] == [0, 0]


def test_a_stopped_replica_is_skipped_the_request_retried_and_used_again_after_its_backoff():
    clock = Clock()
    a = FakeLlmServer("ollama", "from a").start()
    port = a.port
    with FakeLlmServer("ollama", "from b") as b:
        client = replica_set(a.url, b.url, clock=clock)
        a.stop()
        with capture_logs() as logs:
            # Every request is answered, the first one after a retry on b.
            assert [client.complete(MESSAGES) for _ in range(4)] == ["from b"] * 4
        down, back = client.replicas
        assert down.requests == 1 and down.failures == 1 and down.retries == 1 and back.requests == 4
        [line] = [e for e in logs if e["event"] == "llm_replica_down"]
        assert line["replica"] == f"127.0.0.1:{port}" and line["backoff_s"] == 1.0
        assert any(e["event"] == "llm_retry_on_replica" for e in logs)
        assert client.status()[0]["up"] is False and client.status()[1]["up"] is True

        # Back up on the same port; still skipped until its back-off is over.
        with FakeLlmServer("ollama", "from a again", port=port) as again:
            assert client.complete(MESSAGES) == "from b" and not again.requests
            clock.now_s += 1.0
            assert {client.complete(MESSAGES) for _ in range(2)} == {"from a again", "from b"}
            assert len(again.requests) == 1
        assert down.failures_in_row == 0 and client.status()[0]["up"] is True


def test_the_backoff_doubles_per_failure_in_a_row_up_to_its_cap(refusing_url):
    clock = Clock()
    client = ReplicaSet([OllamaClient(refusing_url, "m", 5)], clock=clock, backoff_first_s=1.0, backoff_max_s=4.0)
    seen = []
    for _ in range(5):
        clock.now_s = max(clock.now_s, client.replicas[0].down_until_s)  # its back-off is over
        with pytest.raises(LlmUnavailable, match="cannot reach"):
            client.complete(MESSAGES)  # no other replica to retry on: the error, as with one URL
        seen.append(client.replicas[0].down_until_s - clock.now_s)
    assert seen == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert client.replicas[0].requests == 5 and client.replicas[0].retries == 0


def test_a_503_is_retried_on_the_other_replica_and_that_replica_backs_off():
    clock = Clock()
    with FakeLlmServer("openai", status=503) as a, FakeLlmServer("openai", "Fine, thanks.") as b:
        client = replica_set(a.url, b.url, provider="openai", clock=clock)
        deltas = list(client.stream(MESSAGES))
        assert "".join(deltas) == "Fine, thanks."
        assert len(a.requests) == 1 and len(b.requests) == 1
        assert client.replicas[0].down_until_s == clock.now_s + 1.0
        # While a backs off every request goes to b, streamed or not.
        assert client.complete(MESSAGES) == "Fine, thanks." and len(a.requests) == 1


@pytest.mark.parametrize("status", [429, 500, 502])
def test_overload_and_server_errors_are_retried(status):
    with FakeLlmServer("ollama", status=status) as a, FakeLlmServer("ollama", "ok") as b:
        client = replica_set(a.url, b.url)
        assert client.complete(MESSAGES) == "ok"
        assert len(a.requests) == 1 and client.replicas[0].retries == 1


def test_a_refused_request_is_not_retried_and_the_replica_stays_up():
    # A 400 says the request is wrong: every replica would say so.
    with FakeLlmServer("ollama", status=400) as a, FakeLlmServer("ollama", "ok") as b:
        client = replica_set(a.url, b.url)
        with pytest.raises(LlmUnavailable, match="HTTP 400"):
            client.complete(MESSAGES)
        assert not b.requests and client.status()[0]["up"] is True and client.replicas[0].failures == 1
        a.violations.clear()  # the fake counts its forced 400s as nothing the client did wrong


def test_a_replica_dying_mid_stream_is_not_retried():
    with FakeLlmServer("openai", "We open at nine tomorrow morning.", stream_break_after=2) as a, \
            FakeLlmServer("openai", "Another answer.") as b:
        client = replica_set(a.url, b.url, provider="openai")
        heard = []
        with pytest.raises(LlmUnavailable, match="broke off"):
            for delta in client.stream(MESSAGES):
                heard.append(delta)
        assert "".join(heard) == "We open"  # what the caller heard, and nothing of a second answer
        assert not b.requests
        # Exactly what one URL does: the same deltas, then the same error.
        alone, alone_heard = OpenAiClient(a.url, "llama3", timeout_s=5), []
        with pytest.raises(LlmUnavailable, match="broke off"):
            for delta in alone.stream(MESSAGES):
                alone_heard.append(delta)
        assert alone_heard == heard
        # It answered: it is up (the next request finds out whether it still is).
        assert client.status()[0]["up"] is True and client.replicas[0].failures == 1


def test_a_timeout_backs_off_but_is_not_retried():
    clock = Clock()
    with FakeLlmServer("ollama", "late", hold_reply=True) as a, FakeLlmServer("ollama", "ok") as b:
        client = replica_set(a.url, b.url, timeout_s=0.3, clock=clock)
        with pytest.raises(LlmTimeout):
            client.complete(MESSAGES)  # the caller's LLM_TIMEOUT is spent: no second wait
        assert not b.requests and client.status()[0]["up"] is False
        a.release_reply.set()


def test_with_every_replica_down_the_one_back_first_is_tried(refusing_url):
    clock = Clock()
    with FakeLlmServer("ollama", "ok") as b:
        client = ReplicaSet([OllamaClient(refusing_url, "m", 5), OllamaClient(b.url, "m", 5)], clock=clock)
        client.replicas[0].down_until_s = clock.now_s + 5
        client.replicas[1].down_until_s = clock.now_s + 2
        assert client.complete(MESSAGES) == "ok"  # b is back first: tried, not failed outright
        assert len(b.requests) == 1 and client.replicas[1].down_until_s == 0.0  # and up again
        client.replicas[1].down_until_s = clock.now_s + 9
        # Now the refusing one is back first: tried, refused, the request retried on b.
        assert client.complete(MESSAGES) == "ok"
        assert client.replicas[0].requests == 1 and client.replicas[0].retries == 1 and len(b.requests) == 2


def test_a_connect_timeout_is_retryable_a_read_timeout_is_not():
    connect = LlmTimeout("no reply")
    connect.__cause__ = requests.ConnectTimeout(urllib3.exceptions.ConnectTimeoutError(None, "timed out"))
    assert retryable(connect)
    assert not retryable(LlmTimeout("no reply"))
    assert retryable(LlmUnavailable("refused")) and retryable(LlmUnavailable("x", status=503))
    assert not retryable(LlmUnavailable("x", status=404)) and not retryable(LlmBadReply("x"))


def test_a_daemon_with_one_replica_stopped_answers_every_turn(tmp_path):
    turns = TurnLog()
    dead = FakeLlmServer("ollama", "never").start()
    dead_url = dead.url
    dead.stop()
    with FakeLlmServer("ollama", "We open at nine.") as good, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=f"{dead_url},{good.url}")
        with running_daemon(sim, settings, on_turn=turns) as daemon, http_server(daemon) as server:
            for number in range(3):
                call = sim.new_call()
                sim.speak(call, "when do you open")
                turns.wait(1, call)
            assert not any(result.used_fallback for result in turns.results)  # the caller heard answers
            assert len(good.requests) == 3
            exposition = daemon.metrics.exposition()[0].decode()
            dead_label, good_label = replica_label(dead_url), replica_label(good.url)
            failures = re.search(rf'ivr_llm_replica_failures_total{{replica="{re.escape(dead_label)}"}} (\S+)',
                                 exposition)
            assert failures and float(failures.group(1)) >= 1
            assert f'ivr_llm_replica_requests_total{{replica="{good_label}"}} 3.0' in exposition
            assert f'ivr_llm_replica_failures_total{{replica="{good_label}"}} 0.0' in exposition
            assert 'ivr_llm_errors_total{kind="connection"} 0.0' in exposition  # no turn failed
            health = requests.get(server.url + "/health", timeout=5).json()
            replicas = {row["replica"]: row for row in health["llm_replicas"]}
            assert replicas[good_label]["up"] is True and replicas[good_label]["last_error"] is None
            assert "cannot reach" in replicas[dead_label]["last_error"]


def test_errors_and_log_lines_of_a_replica_carry_no_credentials(refusing_url):
    secret_url = refusing_url.replace("http://", "http://user:hunter2@")
    with FakeLlmServer("ollama", status=503) as b:
        client = ReplicaSet([OllamaClient(secret_url, "m", 5), OllamaClient(b.url, "m", 5)], clock=Clock())
        with capture_logs() as logs, pytest.raises(LlmUnavailable, match="HTTP 503"):
            client.complete(MESSAGES)  # refused on the first, retried on the second: 503
    assert client.replicas[0].last_error and "cannot reach" in client.replicas[0].last_error
    assert refusing_url in client.replicas[0].last_error
    assert "hunter2" not in repr(logs) and "hunter2" not in repr(client.status())


def test_requests_in_flight_failing_together_are_one_failure_of_the_replica():
    clock = Clock()
    with FakeLlmServer("ollama", status=503, hold_reply=True) as a:
        client = ReplicaSet([OllamaClient(a.url, "m", 5)], clock=clock)
        held = [gevent.spawn(client.complete, MESSAGES) for _ in range(3)]
        wait_until(lambda: len(a.requests) == 3)
        a.release_reply.set()
        gevent.joinall(held, timeout=5)
        assert all(isinstance(g.exception, LlmUnavailable) for g in held)
    replica = client.replicas[0]
    assert replica.failures == 3 and replica.failures_in_row == 1
    assert replica.down_until_s == clock.now_s + 1.0  # one outage: the first back-off, not the third


def test_a_stream_its_caller_closes_after_some_text_counts_as_an_answer_and_is_no_longer_in_flight():
    """A barge-in: the caller close()s the stream after its first delta. The replica answered, so
    its failures in a row are cleared at that delta; while the stream is open it is in flight
    (the next request goes elsewhere); after close() it is not, no failure and no retry are
    counted, and the replica's stream is closed (its server sees the client go)."""
    clock = Clock()
    with FakeLlmServer("openai", "We open at nine tomorrow morning.", stream_hold_after=1) as a, \
            FakeLlmServer("openai", "Another answer.") as b:
        client = replica_set(a.url, b.url, provider="openai", clock=clock)
        first, other = client.replicas
        first.failures_in_row, first.down_until_s = 2, clock.now_s  # down twice, its back-off just over
        with capture_logs() as logs:
            stream = client.stream(MESSAGES)
            assert next(stream) == "We"  # a fresh set starts with its first replica
        assert [e["failures_in_row"] for e in logs if e["event"] == "llm_replica_back"] == [2]
        assert first.failures_in_row == 0 and first.down_until_s == 0.0
        assert first.in_flight == 1 and first.requests == 1
        assert client.complete(MESSAGES) == "Another answer."  # the least busy one
        with gevent.Timeout(10, AssertionError("close() waited for the rest of the reply")):
            stream.close()
        assert [r.in_flight for r in client.replicas] == [0, 0]
        assert (first.requests, first.failures, first.retries, first.last_error) == (1, 0, 0, None)
        assert (other.requests, other.failures) == (1, 0) and len(b.requests) == 1
        a.release_stream.set()
        assert a.client_disconnected.wait(timeout=5) and a.stream_outcomes == ["client_closed"]
        assert client.status()[0]["up"] is True


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", ["answered", "refused_then_retried", "failed_nowhere_to_retry", "broke_mid_stream"])
def test_no_attempt_stays_in_flight_whichever_way_it_ends(refusing_url, case, streamed):
    """Streamed or not, every attempt leaves its replica's in-flight count where it found it and
    counts one request to it, however the request ends."""
    with FakeLlmServer("openai", "Fine.") as good, FakeLlmServer("openai", status=503) as unavailable, \
            FakeLlmServer("openai", "We open at nine.", stream_break_after=2) as breaking:
        urls, answer, error = {
            "answered": ([good.url], "Fine.", None),
            "refused_then_retried": ([refusing_url.removesuffix("/api/chat"), good.url], "Fine.", None),
            "failed_nowhere_to_retry": ([unavailable.url], None, "HTTP 503"),
            # Only a stream breaks off; the whole answer comes in one piece.
            "broke_mid_stream": ([breaking.url], None if streamed else "We open at nine.",
                                 "broke off" if streamed else None),
        }[case]
        client = replica_set(*urls, provider="openai")
        heard: list[str] = []

        def ask() -> str:
            if not streamed:
                return client.complete(MESSAGES)
            heard.extend(client.stream(MESSAGES))
            return "".join(heard)

        if error is None:
            assert ask() == answer
        else:
            with pytest.raises(LlmUnavailable, match=error):
                ask()
        assert [r.in_flight for r in client.replicas] == [0] * len(urls)
        assert [r.requests for r in client.replicas] == [1] * len(urls)
        assert [r.failures for r in client.replicas] == ([1, 0] if len(urls) == 2 else [int(error is not None)])
