"""GET /health, /metrics, /calls and the Bearer token, on the real daemon and the simulator."""

from __future__ import annotations

import datetime

import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import TurnLog, http_server, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.replay.simulator import FreeswitchSimulator

TOKEN = "test-token-0123456789abcdef"


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text, parsed by prometheus_client."""
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def test_every_route_but_health_needs_the_bearer_token(tmp_path):
    with FakeLlmServer("ollama", replies="Fine.") as llm, FreeswitchSimulator() as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                HTTP_API_TOKEN=TOKEN)
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            routes = [("GET", "/calls"), ("GET", "/calls/0e8c4b5a-0000-4000-8000-000000000000"), ("GET", "/metrics"),
                      ("DELETE", "/test/calls/x"), ("POST", "/test/transcription"), ("GET", "/no/such/route"),
                      ("POST", "/health")]
            wrong = [{}, {"Authorization": "Bearer wrong-token-0123456789abc"}, {"Authorization": TOKEN},
                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"},
                     {"Authorization": f"Bearer {TOKEN[:-1]}"}]
            for method, path in routes:
                for headers in wrong:
                    answer = requests.request(method, http.url + path, headers=headers, timeout=10,
                                              json={"call_uuid": "a", "transcription": "hi"})
                    assert answer.status_code == 401, (method, path, headers)
                    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
                    assert answer.json()["title"] == "401 Unauthorized"
            assert llm.requests == []
            health = requests.get(http.url + "/health", timeout=10)
            assert health.status_code == 200 and health.json()["esl_connected"] is True
            assert requests.head(http.url + "/health", timeout=10).status_code == 200
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert requests.get(http.url + "/calls", headers=good, timeout=10).status_code == 200
            assert requests.get(http.url + "/metrics", headers=good, timeout=10).status_code == 200
            turn = requests.post(http.url + "/test/transcription", headers=good, timeout=10,
                                 json={"call_uuid": "a", "transcription": "hi"})
            assert turn.status_code == 200 and len(llm.requests) == 1


def test_health_is_503_while_the_switch_is_away_and_200_after_the_reconnect(tmp_path):
    with FakeLlmServer("ollama", replies="Fine.") as llm:
        sim = FreeswitchSimulator().start()
        port = sim.port
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        try:
            with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
                up = requests.get(http.url + "/health", timeout=10)
                assert up.status_code == 200
                body = up.json()
                assert body["status"] == "ok" and body["esl_connected"] is True
                assert (body["tts_engine"], body["llm_provider"], body["calls_active"]) == ("null", "ollama", 0)
                assert body["uptime_s"] >= 0 and body["last_llm_error"] is None

                sim.stop()
                wait_until(lambda: not daemon.esl.connected)
                down = requests.get(http.url + "/health", timeout=10)
                assert down.status_code == 503
                assert down.json()["status"] == "esl_disconnected" and down.json()["esl_connected"] is False
                assert requests.head(http.url + "/health", timeout=10).status_code == 503

                sim = FreeswitchSimulator(port=port).start()
                assert daemon.esl.wait_connected(30)
                back = requests.get(http.url + "/health", timeout=10)
                assert back.status_code == 200 and back.json()["esl_connected"] is True
        finally:
            sim.stop()


def test_metrics_are_prometheus_text_and_show_the_live_calls(tmp_path):
    with FakeLlmServer("ollama", replies="Fine.") as llm, FreeswitchSimulator() as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            def scrape() -> str:
                answer = requests.get(http.url + "/metrics", timeout=10)
                assert answer.status_code == 200
                assert answer.headers["Content-Type"].startswith("text/plain; version=")
                return answer.text

            assert sample(scrape(), "ivr_calls_active", switch=f"127.0.0.1:{sim.port}") == 0
            call = sim.new_call()
            wait_until(lambda: call in daemon.router.calls)
            assert sample(scrape(), "ivr_calls_active", switch=f"127.0.0.1:{sim.port}") == 1
            sim.hangup(call)
            wait_until(lambda: call not in daemon.router.calls)
            assert sample(scrape(), "ivr_calls_active", switch=f"127.0.0.1:{sim.port}") == 0


def test_metrics_count_a_phone_turn_and_a_test_turn(tmp_path):
    """A test turn is counted like a phone turn: the same turn machinery; under switch="test",
    apart from the switch's calls."""
    turns = TurnLog()
    with FakeLlmServer("ollama", replies="Fine.") as llm, FreeswitchSimulator() as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings, on_turn=turns) as daemon, http_server(daemon) as http:
            phone = f"127.0.0.1:{sim.port}"

            def answered(switch: str = phone) -> float:
                return sample(requests.get(http.url + "/metrics", timeout=10).text, "ivr_turns_total",
                              switch=switch, outcome="answered")

            assert answered() == 0
            call = sim.new_call()
            sim.speak(call, "hello")
            turns.wait(1, call)
            wait_heard(sim, call)
            wait_until(lambda: answered() == 1)  # counted once the answer has played
            turn = requests.post(http.url + "/test/transcription", timeout=10,
                                 json={"call_uuid": "metrics", "transcription": "hello"})
            assert turn.status_code == 200
            assert answered("test") == 1 and answered() == 1


def test_calls_lists_the_live_calls_with_their_state_and_one_calls_history(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("ollama", replies="Sure thing, one moment.", hold_reply=True) as llm, \
            FreeswitchSimulator() as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings, on_turn=turns) as daemon, http_server(daemon) as http:
            def calls() -> list[dict]:
                answer = requests.get(http.url + "/calls", timeout=10)
                assert answer.status_code == 200
                return answer.json()["calls"]

            def state() -> str:
                return calls()[0]["state"]

            assert calls() == []
            before = datetime.datetime.now(datetime.timezone.utc)
            call = sim.new_call(caller_id_number="5550100")
            wait_until(lambda: len(calls()) == 1 and calls()[0]["caller_number"] == "5550100")
            [listed] = calls()
            started = datetime.datetime.fromisoformat(listed.pop("started").replace("Z", "+00:00"))
            assert started.tzinfo is not None and abs((started - before).total_seconds()) < 60
            assert listed == {"uuid": call, "switch": f"127.0.0.1:{sim.port}", "agent": "default",
                              "caller_number": "5550100", "turns": 0, "state": "listening"}

            sim.speak(call, "I need help")
            wait_until(lambda: len(llm.requests) == 1)
            assert state() == "thinking"  # the LLM holds its reply
            llm.release_reply.set()
            wait_until(lambda: state() == "speaking")  # broadcast, and the simulator plays it
            turns.wait(1, call)
            wait_heard(sim, call)
            wait_until(lambda: state() == "listening")
            assert calls()[0]["turns"] == 1

            one = requests.get(f"{http.url}/calls/{call}", timeout=10)
            assert one.status_code == 200
            assert one.json()["uuid"] == call and one.json()["history"] == [
                {"role": "user", "content": "I need help"},
                {"role": "assistant", "content": "Sure thing, one moment."},
            ]
            missing = requests.get(f"{http.url}/calls/0e8c4b5a-0000-4000-8000-000000000000", timeout=10)
            assert missing.status_code == 404 and missing.json()["title"] == "404 Not Found"

            sim.hangup(call)
            wait_until(lambda: calls() == [])
            assert requests.get(f"{http.url}/calls/{call}", timeout=10).status_code == 404
