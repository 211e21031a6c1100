"""HTTP tools in the agents file: every mistake is a start-up error naming the file, the agent and the tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ivr_daemon.agents import load_agents
from ivr_daemon.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
GOOD_TOOL = '''
[[agents.a.tools]]
name = "order_status"
description = "Look up an order."
url = "http://127.0.0.1:9/orders"
parameters = { type = "object", properties = { order_id = { type = "string" } }, required = ["order_id"] }
'''


def agents_from(tmp_path, text: str, environ=None, **env):
    path = tmp_path / "agents.toml"
    path.write_text(text)
    return load_agents(load_settings(environ={"AGENTS_FILE": str(path), **env}), environ=environ or {})


def tool_file(**replace: str) -> str:
    """GOOD_TOOL with some lines replaced or added (key = TOML value)."""
    lines = [line for line in GOOD_TOOL.strip().splitlines()
             if line.split(" = ")[0] not in replace]
    return "[agents.a]\n" + "\n".join(lines + [f"{key} = {value}" for key, value in replace.items() if value])


def test_a_good_tool_joins_the_agent_with_its_defaults(tmp_path):
    (tool,) = agents_from(tmp_path, "[agents.a]\n" + GOOD_TOOL).agents["a"].tools
    assert (tool.name, tool.method, tool.timeout_s, dict(tool.headers)) == ("order_status", "POST", 5.0, {})
    spec = tool.spec()
    assert spec.name == "order_status" and spec.parameters["required"] == ["order_id"]


@pytest.mark.parametrize("replace, says", [
    ({"parameters": '{ type = "object", properties = { order_id = { type = "strin" } } }'},
     "parameters is not a valid JSON Schema"),
    ({"parameters": '{ type = "object", required = "order_id" }'}, "parameters is not a valid JSON Schema"),
    ({"parameters": '{ type = "array" }'}, 'type = "object"'),
    ({"parameters": '"order_id"'}, 'type = "object"'),
    ({"name": '"transfer_call"'}, "is a built-in tool"),
    ({"name": '"end_call"'}, "is a built-in tool"),
    ({"name": '"order status"'}, "name must be 1-64 of letters"),
    ({"name": f'"{"x" * 65}"'}, "name must be 1-64 of letters"),
    ({"url": '"ftp://crm.example.com/x"'}, "http:// or https://"),
    ({"url": '"file:///etc/passwd"'}, "http:// or https://"),
    ({"url": '"http:///no-host"'}, "http:// or https://"),
    ({"method": '"DELETE"'}, "method must be one of POST, GET"),
    ({"timeout_s": "0"}, "timeout_s must be"),
    ({"timeout_s": '"soon"'}, "timeout_s must be"),
    ({"description": '""'}, "description must be"),
    ({"secret": '"x"'}, "unknown key 'secret'"),
    ({"headers": '{ Authorization = "Bearer ${CRM_TOKEN}" }'}, "environment variable CRM_TOKEN is not set"),
    ({"headers": '{ "Bad Header" = "x" }'}, "is not a header name"),
    ({"method": '"GET"', "parameters": '{ type = "object", properties = { call_uuid = { type = "string" } } }'},
     "must not be named call_uuid"),
])
def test_a_bad_tool_names_the_file_the_agent_and_the_tool(tmp_path, replace, says):
    with pytest.raises(ConfigError) as caught:
        agents_from(tmp_path, tool_file(**replace))
    message = str(caught.value)
    assert caught.value.variable == "AGENTS_FILE"
    assert str(tmp_path / "agents.toml") in message and "[agents.a]" in message and "tools[0]" in message, message
    assert says in message, message


def test_two_tools_of_one_name_and_tools_without_tool_calling_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="a second tool of that name"):
        agents_from(tmp_path, "[agents.a]\n" + GOOD_TOOL + GOOD_TOOL)
    with pytest.raises(ConfigError, match="tools need llm_tools = true"):
        agents_from(tmp_path, "[agents.a]\nllm_tools = false\n" + GOOD_TOOL)
    with pytest.raises(ConfigError, match="tools need llm_provider openai or ollama"):
        agents_from(tmp_path, "[agents.a]\n" + GOOD_TOOL, LLM_PROVIDER="llama3", LLM_API_URL="http://127.0.0.1:9/chat")
    with pytest.raises(ConfigError, match=r"tools: must be an array of tables"):
        agents_from(tmp_path, '[agents.a]\ntools = "order_status"\n')


def test_header_variables_are_expanded_from_the_environment(tmp_path):
    text = tool_file(headers='{ Authorization = "Bearer ${CRM_TOKEN}", X-Tenant = "${TENANT}-eu" }')
    (tool,) = agents_from(tmp_path, text, environ={"CRM_TOKEN": "s3cret", "TENANT": "acme"}).agents["a"].tools
    assert dict(tool.headers) == {"Authorization": "Bearer s3cret", "X-Tenant": "acme-eu"}
    assert "s3cret" not in repr(tool)  # headers are left out of the repr (and so of any log of it)
    with pytest.raises(ConfigError, match="must be one line"):
        agents_from(tmp_path, text, environ={"CRM_TOKEN": "a\r\nX-Evil: 1", "TENANT": "acme"})


def test_the_cli_exits_2_naming_the_file_agent_and_tool_and_never_the_secret(tmp_path):
    path = tmp_path / "agents.toml"
    path.write_text(tool_file(headers='{ Authorization = "Bearer ${CRM_TOKEN}" }',
                              parameters='{ type = "object", properties = { n = { type = 5 } } }'))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "AGENTS_FILE": str(path), "CRM_TOKEN": "tok-visible-never",
           "TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(tmp_path / "tts"), "FREESWITCH_PASSWORD": "not-the-default",
           "PYTHONPATH": str(ROOT)}  # this checkout's ivr_daemon, the one the tests import
    result = subprocess.run([sys.executable, "-m", "ivr_daemon", "--env-file", str(tmp_path / "none.env"), "run"],
                            env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and "[agents.a]" in lines[0] and "'order_status'" in lines[0], lines[0]
    assert "not a valid JSON Schema" in lines[0]
    assert "tok-visible-never" not in result.stderr + result.stdout
    # The variable missing: named, and the daemon does not start either.
    env.pop("CRM_TOKEN")
    path.write_text(tool_file(headers='{ Authorization = "Bearer ${CRM_TOKEN}" }'))
    result = subprocess.run([sys.executable, "-m", "ivr_daemon", "--env-file", str(tmp_path / "none.env"), "run"],
                            env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "environment variable CRM_TOKEN is not set" in result.stderr
