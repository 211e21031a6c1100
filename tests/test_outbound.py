"""Outbound calls: ``ivr-daemon call`` and ``POST /calls`` on the simulator, end to end.

The simulator answers ``bgapi originate`` as FreeSWITCH does (capture 20's reply, capture 21's
BACKGROUND_JOB) and, for a registered ``user/NAME``, runs the IVR extension on the answered leg
(its uuid is origination_uuid) with the originate's channel variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from harness import broadcasts, http_server, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.esl import commands
from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.outbound import (BadCallRequest, JobWaiters, OriginateFailed, check_variables, fill, job_result,
                                 placeholders)
from ivr_daemon.replay.simulator import FreeswitchSimulator

REPO = Path(__file__).resolve().parent.parent

AGENTS = """
default_agent = "reception"

[agents.reception]
greeting = "Hello, this is reception."

[agents.sales]
greeting = "Hi {customer_name}, this is Acme about order {order_id}."
system_prompt = "You are calling {customer_name} about order {order_id}."
"""

# Each one would break out of originate's {k=v,...} block or the command line if sent as is.
INJECTIONS = [
    "a,origination_caller_id_number=666",
    "x}user/666 &bridge(sofia/gateway/evil/1)",
    "}bgapi originate user/666 &park()",
    "{evil=1}",
    "it's",
    'say "hi"',
    "line\nbgapi originate user/666 &park()",
    "line\r\napi uuid_kill all",
    "^^:a=b:c=d",
    "a=b",
    " padded",
    "padded ",
    "tab\there",
    "Zoë",
    "日本",
    "x" * 300,
    "",
    "a[b]",
    "a|b",
    "back\\slash",
]


@pytest.fixture
def agents_file(tmp_path):
    path = tmp_path / "agents.toml"
    path.write_text(AGENTS)
    return str(path)


def flow_settings(sim, tmp_path, llm, agents_file, **env):
    return settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                        AGENTS_FILE=agents_file, **env)


def cli_env(sim, tmp_path, agents_file, llm_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "LOG_", "HTTP_"))}
    env.update({"FREESWITCH_PORT": str(sim.port), "TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(tmp_path / "cli-tts"),
                "LOG_FORMAT": "json", "LOG_LEVEL": "WARNING", "AGENTS_FILE": agents_file,
                "LLM_PROVIDER": "ollama", "LLM_API_URL": llm_url, "PYTHONPATH": str(REPO)})
    return env


def run_cli(sim, tmp_path, agents_file, llm_url, *args):
    return subprocess.run([sys.executable, "-m", "ivr_daemon", "--env-file", "/nonexistent/.env", "call", *args],
                          env=cli_env(sim, tmp_path, agents_file, llm_url), capture_output=True, text=True,
                          timeout=60)


def originates(sim) -> list[str]:
    return [c.line for c in sim.commands if " originate " in c.line]


# -- builders and checks ----------------------------------------------------------------------


def test_originate_builder_targets_the_extension_and_quotes_a_value_with_a_space():
    command = commands.originate_extension("user/1001", "ai", "XML", "ivr",
                                           {"origination_uuid": "u1", "ivr_agent": "sales", "customer_name": "Ann Lee"})
    assert command.line == "bgapi originate {origination_uuid=u1,ivr_agent=sales,customer_name='Ann Lee'}user/1001 ai XML ivr"
    assert command.reply_type == commands.COMMAND_REPLY


@pytest.mark.parametrize("value", INJECTIONS)
def test_every_injection_is_refused_by_the_checks_and_by_the_builder(value):
    with pytest.raises(BadCallRequest) as caught:
        check_variables({"customer_name": value})
    assert "customer_name" in str(caught.value)
    with pytest.raises(commands.UnsafeCommandArgument):
        commands.originate_extension("user/1001", "ai", "XML", "ivr", {"customer_name": value})


@pytest.mark.parametrize("key", ["Name", "a-b", "a b", "", "x" * 65, "ivr_agent", "origination_uuid", "é"])
def test_bad_or_reserved_keys_are_refused(key):
    with pytest.raises(BadCallRequest):
        check_variables({key: "ok"})


@pytest.mark.parametrize("endpoint", ["{a=b}user/1", "user/1 &park()", "user/1,user/2", "&park()", "user/1\napi x"])
def test_an_endpoint_that_smuggles_anything_is_refused(endpoint):
    with pytest.raises(commands.UnsafeCommandArgument):
        commands.originate_extension(endpoint, "ai", "XML", "ivr", {})


def test_placeholders_are_plain_names_only_and_fill_leaves_a_template_with_a_missing_value_alone():
    assert placeholders("You are calling {customer_name} about {order_id}.") == {"customer_name", "order_id"}
    for bad in ("{customer.__class__}", "{a[0]}", "{0}", "{}", "{a!r}", "{a:>10}", "{unclosed"):
        with pytest.raises(BadCallRequest):
            placeholders(bad)
    assert fill("Hi {name}.", {"name": "Ann {x}"}) == ("Hi Ann {x}.", [])  # a value is never formatted again
    assert fill("Hi {name} {order}.", {"name": "Ann"}) == ("Hi {name} {order}.", ["order"])
    assert fill("{{literal}} braces", {}) == ("{{literal}} braces", [])


def test_job_waiters_match_by_job_uuid_keep_an_early_result_and_stay_bounded():
    waiters = JobWaiters(max_jobs=2)

    def job(job_uuid, body):
        return EslEvent({"Event-Name": "BACKGROUND_JOB", "Job-UUID": job_uuid}, body)

    for n in range(3):
        assert waiters.on_event(job(f"j{n}", f"+OK u{n}\n"))
    assert waiters.wait("j2", 1) == "+OK u2\n"  # arrived before it was asked for
    with pytest.raises(Exception):
        waiters.wait("j0", 0.05)  # dropped: only the latest two are kept
    assert job_result("+OK 7238f352-c251-4b17-9ee4-9b0b82980f46\n") == "7238f352-c251-4b17-9ee4-9b0b82980f46"
    with pytest.raises(OriginateFailed, match="-ERR USER_NOT_REGISTERED"):
        job_result("-ERR USER_NOT_REGISTERED\n")


# -- end to end on the simulator --------------------------------------------------------------


def _greeted_call(sim, llm, call_uuid):
    """The call the originate made: up, greeted, then one caller turn so the LLM sees the prompt."""
    wait_until(lambda: broadcasts(sim, call_uuid), timeout_s=15)
    wait_heard(sim, call_uuid)  # played to the end: the caller's words are not a barge-in
    sim.speak(call_uuid, "yes that is me")
    wait_until(lambda: llm.requests, timeout_s=15)
    return llm.requests[0]["messages"]


def test_cli_call_originates_into_the_ivr_with_its_variables_and_the_call_is_greeted_with_them(tmp_path, agents_file):
    with FakeLlmServer("ollama", replies="Great.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        sim.registered_users.add("1001")
        with running_daemon(sim, flow_settings(sim, tmp_path, llm, agents_file)) as daemon:
            result = run_cli(sim, tmp_path, agents_file, llm.url, "user/1001", "--agent", "sales",
                             "--var", "customer_name=Ann Lee", "--var", "order_id=A-1042", "--caller-id", "5551234")
            assert result.returncode == 0, result.stderr
            call_uuid = result.stdout.strip()
            (line,) = originates(sim)
            assert line == (f"bgapi originate {{origination_uuid={call_uuid},ivr_agent=sales,customer_name='Ann Lee',"
                            "order_id=A-1042,origination_caller_id_number=5551234}user/1001 ai XML ivr")
            messages = _greeted_call(sim, llm, call_uuid)
            assert messages[0] == {"role": "system", "content": "You are calling Ann Lee about order A-1042."}
            assert messages[1] == {"role": "assistant", "content": "Hi Ann Lee, this is Acme about order A-1042."}
            handler = daemon.router.calls[call_uuid].handler
            assert handler.variables["customer_name"] == "Ann Lee" and handler.variables["order_id"] == "A-1042"
            # Not pinned: the per-call greeting went through the phrase cache, not the pinned dir.
            assert not daemon.flow.by_agent["sales"].pinned.existing("Hi {customer_name}, this is Acme about order {order_id}.")


def test_cli_call_to_an_unregistered_user_exits_1_with_freeswitchs_error(tmp_path, agents_file):
    with FakeLlmServer("ollama") as llm, FreeswitchSimulator() as sim:
        result = run_cli(sim, tmp_path, agents_file, llm.url, "user/1002", "--agent", "reception")
        assert result.returncode == 1
        assert "-ERR USER_NOT_REGISTERED" in result.stderr and result.stdout == ""
        assert len(originates(sim)) == 1 and not sim.calls()


@pytest.mark.parametrize("args,needle", [
    (["--agent", "nobody"], "unknown agent 'nobody'"),
    (["--agent", "sales", "--var", "customer_name=Ann"], "order_id"),  # a placeholder without a value
    (["--agent", "sales", "--var", "customer_name=a,b=c", "--var", "order_id=1"], "customer_name"),
    (["--agent", "sales", "--var", "customer_name=}bgapi originate user/666 &park()", "--var", "order_id=1"], "customer_name"),
    (["--agent", "sales", "--var", "customer_name=Ann", "--var", "order_id=1\nbgapi x"], "order_id"),
    (["--var", "nokey"], "KEY=VALUE"),
    (["--var", "Bad-Key=1"], "Bad-Key"),
    (["--caller-id", "555 1234"], "caller id"),
])
def test_cli_call_refuses_a_bad_request_with_exit_2_and_dials_nothing(tmp_path, agents_file, args, needle):
    with FakeLlmServer("ollama") as llm, FreeswitchSimulator() as sim:
        sim.registered_users.add("1001")
        result = run_cli(sim, tmp_path, agents_file, llm.url, "user/1001", *args)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr
        assert originates(sim) == [] and sim.originate_args == []


def test_post_calls_places_the_call_through_the_daemon_and_greets_it(tmp_path, agents_file):
    with FakeLlmServer("ollama", replies="Great.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        sim.registered_users.add("1001")
        with running_daemon(sim, flow_settings(sim, tmp_path, llm, agents_file)) as daemon, \
                http_server(daemon) as server:
            response = requests.post(f"{server.url}/calls", timeout=10, json={
                "destination": "user/1001", "agent": "sales",
                "variables": {"customer_name": "Bob", "order_id": "77"}})
            assert response.status_code == 201, response.text
            call_uuid = response.json()["uuid"]
            assert response.json()["agent"] == "sales"
            messages = _greeted_call(sim, llm, call_uuid)
            assert messages[0]["content"] == "You are calling Bob about order 77."
            assert messages[1]["content"] == "Hi Bob, this is Acme about order 77."
            # Only the daemon's own connection wrote it: one writer.
            assert [c.connection_id for c in sim.commands if " originate " in c.line] == \
                   [c.connection_id for c in sim.commands if c.line.startswith("event ")][:1]


def test_post_calls_gives_502_with_freeswitchs_error_and_404_for_an_unknown_agent(tmp_path, agents_file):
    with FakeLlmServer("ollama") as llm, FreeswitchSimulator() as sim:
        with running_daemon(sim, flow_settings(sim, tmp_path, llm, agents_file)) as daemon, \
                http_server(daemon) as server:
            response = requests.post(f"{server.url}/calls", json={"destination": "user/1002"}, timeout=10)
            assert response.status_code == 502
            assert "-ERR USER_NOT_REGISTERED" in response.json()["description"]
            response = requests.post(f"{server.url}/calls", json={"destination": "user/1002", "agent": "x"}, timeout=10)
            assert response.status_code == 404 and "unknown agent" in response.json()["description"]
            assert len(originates(sim)) == 1


@pytest.mark.parametrize("value", INJECTIONS)
def test_post_calls_refuses_every_injection_with_400_naming_the_key_and_dials_nothing(tmp_path, agents_file, value):
    with FakeLlmServer("ollama") as llm, FreeswitchSimulator() as sim:
        sim.registered_users.add("1001")
        with running_daemon(sim, flow_settings(sim, tmp_path, llm, agents_file)) as daemon, \
                http_server(daemon) as server:
            response = requests.post(f"{server.url}/calls", timeout=10, json={
                "destination": "user/1001", "agent": "sales", "variables": {"customer_name": value, "order_id": "1"}})
            assert response.status_code == 400
            assert "customer_name" in response.json()["description"]
            bad = [{"destination": "user/1001", "agent": "sales", "variables": {"customer_name": "Ann"}},  # order_id missing
                   {"destination": "user/1001", "variables": {"Bad": "1"}},
                   {"destination": "user/1001 &park()"},
                   {"destination": "user/1001", "variables": ["a"]},
                   {"destination": "user/1001", "extra": 1},
                   {}]
            for body in bad:
                assert requests.post(f"{server.url}/calls", json=body, timeout=10).status_code == 400, body
            assert originates(sim) == [] and sim.originate_args == []


def test_an_inbound_call_without_the_values_is_not_greeted_with_a_template_and_says_so(tmp_path, agents_file):
    from structlog.testing import capture_logs

    with FakeLlmServer("ollama", replies="Hello.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        with running_daemon(sim, flow_settings(sim, tmp_path, llm, agents_file)) as daemon, capture_logs() as logs:
            call = sim.new_call(variables={"ivr_agent": "sales", "customer_name": "Cy"})
            wait_until(lambda: any(e["event"] == "greeting_not_said_placeholders_unfilled" for e in logs))
            sim.speak(call, "hello")
            wait_until(lambda: llm.requests)
            messages = llm.requests[0]["messages"]
            # The prompt as written (never half-filled), no greeting in the history, nothing spoken before the turn.
            assert messages[0]["content"] == "You are calling {customer_name} about order {order_id}."
            assert messages[1:] == [{"role": "user", "content": "hello"}]
            warned = [e for e in logs if e["event"] in ("greeting_not_said_placeholders_unfilled",
                                                         "system_prompt_placeholders_unfilled")]
            assert {e["event"] for e in warned} == {"greeting_not_said_placeholders_unfilled",
                                                    "system_prompt_placeholders_unfilled"}
            assert all(e["missing"] == ["order_id"] for e in warned)
            assert daemon.router.calls[call].handler.variables["customer_name"] == "Cy"


def test_variables_named_in_ivr_variables_reach_the_tools_context(tmp_path, agents_file):
    with FakeLlmServer("ollama", replies="Hello.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        with running_daemon(sim, flow_settings(sim, tmp_path, llm, agents_file)) as daemon:
            call = sim.new_call(variables={"ivr_agent": "reception", "ivr_variables": "ticket:tier:Bad-Name",
                                           "ticket": "T-9", "tier": "gold", "unrelated": "x"})
            wait_until(lambda: call in daemon.router.calls and broadcasts(sim, call))
            variables = daemon.router.calls[call].handler.variables
            assert variables["ticket"] == "T-9" and variables["tier"] == "gold"
            assert "unrelated" not in variables
