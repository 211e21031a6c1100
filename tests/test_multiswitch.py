"""One daemon, several switches (FREESWITCH_HOSTS): two simulators, one daemon, real sockets.

Each switch has its own ESL client: a call's commands go to the switch the call is on, a
switch going down stalls and resyncs only its calls, /health and /metrics say which switch is
which, and the same UUID on two switches is two calls.
"""

from __future__ import annotations

import contextlib

import gevent.event
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import TurnLog, broadcasts, http_server, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.daemon import build_conversation_daemon
from ivr_daemon.replay.simulator import FreeswitchSimulator


def name(sim: FreeswitchSimulator) -> str:
    return f"127.0.0.1:{sim.port}"


def echo(request: dict) -> str:
    """The LLM's answer names what the caller said: who answered whom shows in the history."""
    return f"You said {request['messages'][-1]['content']}."


@contextlib.contextmanager
def two_switch_daemon(sim_a, sim_b, tmp_path, llm, **kwargs):
    settings = settings_for(sim_a, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                            FREESWITCH_HOSTS=f"{name(sim_a)},{name(sim_b)}")
    daemon = build_conversation_daemon(settings, **kwargs)
    daemon.start()
    try:
        assert daemon.wait_connected(10), "the daemon did not connect to both simulators"
        yield daemon
    finally:
        daemon.stop(timeout_s=10)


def scrape(http) -> dict[tuple[str, tuple], float]:
    answer = requests.get(http.url + "/metrics", timeout=10)
    assert answer.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def per_switch(samples: dict, metric: str, sim) -> float:
    return samples[(metric, (("switch", name(sim)),))]


def test_each_calls_commands_go_to_the_switch_it_is_on(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("ollama", replies=echo) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim_a, FreeswitchSimulator(playback_speed=0.02) as sim_b:
        with two_switch_daemon(sim_a, sim_b, tmp_path, llm, on_turn=turns) as daemon:
            assert [switch.name for switch in daemon.switches] == [name(sim_a), name(sim_b)]
            on_a, on_b = sim_a.new_call(), sim_b.new_call()
            sim_a.speak(on_a, "hello from a")
            sim_b.speak(on_b, "hello from b")
            turns.wait(1, on_a)
            turns.wait(1, on_b)
            wait_until(lambda: broadcasts(sim_a, on_a) and broadcasts(sim_b, on_b))
            # Every command about a call went to its own switch, none to the other one.
            assert not [c.line for c in sim_a.commands if on_b in c.line]
            assert not [c.line for c in sim_b.commands if on_a in c.line]
            assert daemon.switch(name(sim_a)).router.calls.keys() == {on_a}
            assert daemon.switch(name(sim_b)).router.calls.keys() == {on_b}
            history_b = daemon.switch(name(sim_b)).router.calls[on_b].handler.history.messages()
            assert history_b[-2:] == [{"role": "user", "content": "hello from b"},
                                      {"role": "assistant", "content": "You said hello from b."}]
            sim_b.hangup(on_b)
            wait_until(lambda: on_b not in daemon.switch(name(sim_b)).router.calls)
            assert on_a in daemon.switch(name(sim_a)).router.calls  # a hangup on B ends nothing on A


def test_the_same_uuid_on_two_switches_is_two_calls(tmp_path):
    uuid = "4f0d6a3e-8a56-4c1f-9e1b-2f7d1c0a9b11"
    turns = TurnLog()
    with FakeLlmServer("ollama", replies=echo) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim_a, FreeswitchSimulator(playback_speed=0.02) as sim_b:
        with two_switch_daemon(sim_a, sim_b, tmp_path, llm, on_turn=turns) as daemon, http_server(daemon) as http:
            sim_a.new_call(uuid=uuid, caller_id_number="5550001")
            sim_b.new_call(uuid=uuid, caller_id_number="5550002")
            sim_a.speak(uuid, "this is alice")
            turns.wait(1)
            sim_b.speak(uuid, "this is bob")
            turns.wait(2)
            wait_until(lambda: broadcasts(sim_a, uuid) and broadcasts(sim_b, uuid))

            listed = requests.get(http.url + "/calls", timeout=10).json()["calls"]
            assert sorted((c["uuid"], c["switch"], c["caller_number"]) for c in listed) == sorted(
                [(uuid, name(sim_a), "5550001"), (uuid, name(sim_b), "5550002")])
            ambiguous = requests.get(f"{http.url}/calls/{uuid}", timeout=10)
            assert ambiguous.status_code == 409 and name(sim_a) in ambiguous.json()["description"]
            for sim, said in ((sim_a, "this is alice"), (sim_b, "this is bob")):
                one = requests.get(f"{http.url}/calls/{uuid}", params={"switch": name(sim)}, timeout=10)
                assert one.status_code == 200 and one.json()["switch"] == name(sim)
                assert one.json()["history"] == [{"role": "user", "content": said},
                                                 {"role": "assistant", "content": f"You said {said}."}]
            assert requests.get(f"{http.url}/calls/{uuid}", params={"switch": "127.0.0.1:1"},
                                timeout=10).status_code == 404

            sim_a.hangup(uuid)  # ends A's call, not B's of the same UUID
            wait_until(lambda: uuid not in daemon.switch(name(sim_a)).router.calls)
            assert uuid in daemon.switch(name(sim_b)).router.calls
            sim_b.speak(uuid, "still here")
            turns.wait(3)
            assert requests.get(f"{http.url}/calls/{uuid}", timeout=10).json()["switch"] == name(sim_b)
            samples = scrape(http)
            assert per_switch(samples, "ivr_calls_total", sim_a) == 1
            assert per_switch(samples, "ivr_calls_total", sim_b) == 1
            assert per_switch(samples, "ivr_calls_active", sim_a) == 0
            assert per_switch(samples, "ivr_calls_active", sim_b) == 1


def test_a_switch_going_down_affects_only_its_calls(tmp_path):
    backoff_over = gevent.event.Event()

    def backoff(delay_s: float) -> None:  # a lost switch is retried when the test says, not by a clock
        backoff_over.wait()

    turns = TurnLog()
    with FakeLlmServer("ollama", replies=echo, hold_reply=True) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim_a, FreeswitchSimulator(playback_speed=0.02) as sim_b:
        with two_switch_daemon(sim_a, sim_b, tmp_path, llm, on_turn=turns, sleep=backoff) as daemon, \
                http_server(daemon) as http:
            on_a, on_b = sim_a.new_call(), sim_b.new_call()
            wait_until(lambda: on_a in daemon.switch(name(sim_a)).router.calls
                       and on_b in daemon.switch(name(sim_b)).router.calls)
            sim_b.speak(on_b, "what time is it")
            wait_until(lambda: llm.requests)  # B's turn is waiting for the LLM
            port_a = sim_a.port
            sim_a.stop()  # switch A goes away (a restart loses its calls)
            wait_until(lambda: not daemon.switch(f"127.0.0.1:{port_a}").connected)

            health = requests.get(http.url + "/health", timeout=10)
            assert health.status_code == 200  # B still answers its calls: not taken out of service
            body = health.json()
            assert body["status"] == "degraded" and body["esl_connected"] is False
            assert body["switches"] == [
                {"switch": f"127.0.0.1:{port_a}", "esl_connected": False, "calls_active": 1},
                {"switch": name(sim_b), "esl_connected": True, "calls_active": 1}]
            samples = scrape(http)
            assert samples[("ivr_esl_connected", (("switch", f"127.0.0.1:{port_a}"),))] == 0
            assert per_switch(samples, "ivr_esl_connected", sim_b) == 1

            llm.release_reply.set()  # B's turn completes while A is down
            [turn] = turns.wait(1, on_b)
            assert not turn.used_fallback
            wait_until(lambda: broadcasts(sim_b, on_b))
            wait_heard(sim_b, on_b)
            sim_b.speak(on_b, "and tomorrow")
            turns.wait(2, on_b)

            # A comes back empty, as a restarted FreeSWITCH does: its call is resynced away, B's stays.
            with FreeswitchSimulator(port=port_a, playback_speed=0.02) as sim_a2:
                backoff_over.set()
                wait_until(lambda: on_a not in daemon.switch(name(sim_a2)).router.calls)
                assert daemon.switch(name(sim_a2)).connected
                assert on_b in daemon.switch(name(sim_b)).router.calls
                assert [c.line for c in sim_a2.commands if c.line.startswith("api uuid_exists")] == [
                    f"api uuid_exists {on_a}"]
                assert not [c.line for c in sim_b.commands if c.line.startswith("api uuid_exists")]
                samples = scrape(http)
                assert samples[("ivr_esl_reconnects_total", (("switch", name(sim_a2)),))] == 1
                assert per_switch(samples, "ivr_esl_reconnects_total", sim_b) == 0
                assert requests.get(http.url + "/health", timeout=10).json()["status"] == "ok"
                fresh = sim_a2.new_call()  # the restarted switch's new calls are answered
                sim_a2.speak(fresh, "i am new")
                turns.wait(1, fresh)
                wait_until(lambda: broadcasts(sim_a2, fresh))


def test_health_is_503_only_when_every_switch_is_down(tmp_path):
    with FakeLlmServer("ollama", replies="Hello.") as llm, \
            FreeswitchSimulator() as sim_a, FreeswitchSimulator() as sim_b:
        with two_switch_daemon(sim_a, sim_b, tmp_path, llm, sleep=lambda _s: gevent.sleep(3600)) as daemon, \
                http_server(daemon) as http:
            sim_a.drop_connections()
            sim_b.drop_connections()
            wait_until(lambda: not any(switch.connected for switch in daemon.switches))
            down = requests.get(http.url + "/health", timeout=10)
            assert down.status_code == 503 and down.json()["status"] == "esl_disconnected"


def test_an_outbound_call_goes_to_the_switch_asked_for(tmp_path):
    with FakeLlmServer("ollama", replies="Hello.") as llm, \
            FreeswitchSimulator() as sim_a, FreeswitchSimulator() as sim_b:
        sim_a.registered_users.add("1001")
        sim_b.registered_users.add("1001")
        with two_switch_daemon(sim_a, sim_b, tmp_path, llm) as daemon, http_server(daemon) as http:
            first = requests.post(http.url + "/calls", json={"destination": "user/1001"}, timeout=10)
            assert first.status_code == 201 and first.json()["switch"] == name(sim_a)  # the default: the first
            second = requests.post(http.url + "/calls", json={"destination": "user/1001", "switch": name(sim_b)},
                                   timeout=10)
            assert second.status_code == 201 and second.json()["switch"] == name(sim_b)
            assert len(sim_a.originate_args) == 1 and first.json()["uuid"] in sim_a.originate_args[0]
            assert len(sim_b.originate_args) == 1 and second.json()["uuid"] in sim_b.originate_args[0]
            unknown = requests.post(http.url + "/calls", json={"destination": "user/1001", "switch": "nowhere:8021"},
                                    timeout=10)
            assert unknown.status_code == 404 and name(sim_b) in unknown.json()["description"]
            assert len(sim_a.originate_args) == 1 and len(sim_b.originate_args) == 1
            wait_until(lambda: second.json()["uuid"] in daemon.switch(name(sim_b)).router.calls)


def test_every_line_about_a_call_names_its_switch(tmp_path):
    from structlog.testing import capture_logs

    turns = TurnLog()
    with FakeLlmServer("ollama", replies=echo) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim_a, FreeswitchSimulator(playback_speed=0.02) as sim_b:
        with two_switch_daemon(sim_a, sim_b, tmp_path, llm, on_turn=turns):
            with capture_logs() as logs:
                call = sim_b.new_call()
                sim_b.speak(call, "hello")
                turns.wait(1, call)
            about_call = [line for line in logs if line.get("call_uuid") == call
                          and not line["event"].startswith("sim_")]  # the simulator's own lines
            assert any(line["event"] == "turn_complete" for line in about_call)
            assert about_call and all(line.get("switch") == name(sim_b) for line in about_call), \
                [line for line in about_call if line.get("switch") != name(sim_b)][:3]


def test_a_wrong_password_at_start_up_stops_the_daemon_naming_the_switch(tmp_path):
    from ivr_daemon.esl.connection import AuthenticationFailed

    with FakeLlmServer("ollama", replies="Hello.") as llm, \
            FreeswitchSimulator() as sim_a, FreeswitchSimulator(password="other") as sim_b:
        settings = settings_for(sim_a, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                FREESWITCH_HOSTS=f"{name(sim_a)},{name(sim_b)}")
        daemon = build_conversation_daemon(settings)
        runner = daemon.start()
        runner.join(timeout=10)
        assert runner.dead and isinstance(runner.exception, AuthenticationFailed)
        assert name(sim_b) in str(runner.exception)
        wait_until(lambda: not sim_a.connections)  # the other switch's client is closed too


def test_a_password_refused_later_stops_only_that_switch(tmp_path):
    from structlog.testing import capture_logs

    turns = TurnLog()
    with FakeLlmServer("ollama", replies=echo) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim_a, FreeswitchSimulator(playback_speed=0.02) as sim_b:
        with two_switch_daemon(sim_a, sim_b, tmp_path, llm, on_turn=turns, sleep=lambda _s: None) as daemon:
            with capture_logs() as logs:
                sim_b.refuse_auth = True  # B's password was changed on the switch
                sim_b.drop_connections()
                wait_until(lambda: any(line["event"] == "esl_switch_given_up" for line in logs))
            assert [line["switch"] for line in logs if line["event"] == "esl_switch_given_up"] == [name(sim_b)]
            assert not daemon._greenlet.dead and daemon.switch(name(sim_a)).connected
            call = sim_a.new_call()
            sim_a.speak(call, "are you there")
            turns.wait(1, call)
            wait_until(lambda: broadcasts(sim_a, call))


def test_shutdown_says_exit_to_every_switch_and_ends_every_call(tmp_path):
    with FakeLlmServer("ollama", replies="Hello.") as llm, \
            FreeswitchSimulator() as sim_a, FreeswitchSimulator() as sim_b:
        with two_switch_daemon(sim_a, sim_b, tmp_path, llm) as daemon:
            on_a, on_b = sim_a.new_call(), sim_b.new_call()
            wait_until(lambda: all(switch.router.calls for switch in daemon.switches))
            daemon.shutdown(grace_s=1)
            assert not any(switch.router.calls for switch in daemon.switches)
            for sim in (sim_a, sim_b):
                assert [c.line for c in sim.commands][-1] == "exit"
            assert sim_a.call_exists(on_a) and sim_b.call_exists(on_b)  # FreeSWITCH keeps the calls


def test_cli_call_places_the_call_on_the_switch_named(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    def call(*args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "LOG_"))}
        env.update({"FREESWITCH_HOSTS": f"{name(sim_a)},{name(sim_b)}", "TTS_ENGINE": "null",
                    "TTS_OUTPUT_DIR": str(tmp_path / "tts"), "LOG_LEVEL": "WARNING",
                    "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        return subprocess.run([sys.executable, "-m", "ivr_daemon", "--env-file", "/nonexistent/.env", "call",
                               "user/1001", *args], env=env, capture_output=True, text=True, timeout=60)

    with FreeswitchSimulator() as sim_a, FreeswitchSimulator() as sim_b:
        sim_a.registered_users.add("1001")
        sim_b.registered_users.add("1001")
        placed = call("--switch", name(sim_b))
        assert placed.returncode == 0, placed.stderr
        assert sim_b.originate_args and placed.stdout.strip() in sim_b.originate_args[0]
        assert sim_a.originate_args == []
        unknown = call("--switch", "127.0.0.1:1")
        assert unknown.returncode == 2 and name(sim_b) in unknown.stderr
        default = call()
        assert default.returncode == 0 and len(sim_a.originate_args) == 1 and len(sim_b.originate_args) == 1


def test_replay_and_record_stay_on_one_switch(tmp_path):
    """A replay's switch is its simulator whatever FREESWITCH_HOSTS says; record refuses several."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from ivr_daemon.replay.fixture import load_fixture
    from ivr_daemon.replay.replayer import replay_environment, replay_fixture

    fixtures = Path(__file__).parent / "fixtures"
    base_env = replay_environment(environ={"FREESWITCH_HOSTS": "127.0.0.1:1,127.0.0.1:2"})
    assert "FREESWITCH_HOSTS" not in base_env
    result = replay_fixture(load_fixture(fixtures / "greeting.esl"),
                            base_env={**base_env, "FREESWITCH_HOSTS": "127.0.0.1:1,127.0.0.1:2"})
    assert result.ok, result.report

    env = {k: v for k, v in os.environ.items() if not k.startswith("FREESWITCH_")}
    env.update({"FREESWITCH_HOSTS": "127.0.0.1:1,127.0.0.1:2", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    record = subprocess.run([sys.executable, "-m", "ivr_daemon", "--env-file", "/nonexistent/.env", "record",
                             "--out", str(tmp_path / "x.esl")], env=env, capture_output=True, text=True, timeout=60)
    assert record.returncode == 2 and "FREESWITCH_HOSTS" in record.stderr
    assert not (tmp_path / "x.esl").exists()


def test_turn_metrics_are_per_switch(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("ollama", replies=echo) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim_a, FreeswitchSimulator(playback_speed=0.02) as sim_b:
        with two_switch_daemon(sim_a, sim_b, tmp_path, llm, on_turn=turns) as daemon, \
                http_server(daemon) as http:
            before = scrape(http)
            for sim in (sim_a, sim_b):  # every switch's series, at 0 before its first call
                assert before[("ivr_turns_total", (("outcome", "answered"), ("switch", name(sim))))] == 0
                assert per_switch(before, "ivr_turn_first_audio_seconds_count", sim) == 0
                assert per_switch(before, "ivr_barge_ins_total", sim) == 0
            calls = [sim_a.new_call(), sim_a.new_call(), sim_b.new_call()]
            for call, sim in zip(calls, (sim_a, sim_a, sim_b)):
                sim.speak(call, "hello")
                turns.wait(1, call)
                wait_heard(sim, call)

            def answered(sim) -> float:
                return scrape(http)[("ivr_turns_total", (("outcome", "answered"), ("switch", name(sim))))]

            wait_until(lambda: (answered(sim_a), answered(sim_b)) == (2, 1))
            samples = scrape(http)
            for sim, count in ((sim_a, 2), (sim_b, 1)):
                assert per_switch(samples, "ivr_turn_first_audio_seconds_count", sim) == count
                assert per_switch(samples, "ivr_llm_first_sentence_seconds_count", sim) == count
            # No series without a switch: every call-metric sample names one of the two.
            switches = {name(sim_a), name(sim_b)}
            for (metric, labels), _ in samples.items():
                if metric.startswith(("ivr_turns_total", "ivr_turn_first_audio", "ivr_llm_first_sentence",
                                      "ivr_barge_ins", "ivr_transfers", "ivr_hangups_by_ivr")):
                    assert dict(labels)["switch"] in switches, (metric, labels)
