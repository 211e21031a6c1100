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

from harness import broadcasts, http_server, running_daemon, settings_for, wait_until
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
