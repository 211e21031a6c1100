"""Agents from AGENTS_FILE: validation that names the file, the agent and the key; defaults from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from ivr_daemon.agents import DtmfAction, TransferTarget, load_agents
from ivr_daemon.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def agents_from(tmp_path, text: str, **env):
    path = tmp_path / "agents.toml"
    path.write_text(text)
    return load_agents(load_settings(environ={"AGENTS_FILE": str(path), **env}))


def test_without_a_file_there_is_one_default_agent_from_the_environment():
    settings = load_settings(environ={"GREETING": "Hi there.", "OPERATOR_DESTINATION": "1000 XML default"})
    book = load_agents(settings)
    assert list(book.agents) == ["default"] and book.default.settings == settings
    assert book.default.settings.greeting == "Hi there."
    assert book.default.transfer_targets["operator"] == TransferTarget("operator", "1000", "XML", "default")
    assert book.default.dtmf == {"0": DtmfAction("transfer", "operator")}


def test_no_operator_no_default_dtmf():
    book = load_agents(load_settings(environ={}))
    assert book.default.transfer_targets == {} and book.default.dtmf == {}


def test_the_shipped_example_loads(tmp_path):
    book = load_agents(load_settings(environ={"AGENTS_FILE": str(ROOT / "agents.example.toml")}),
                       environ={"CRM_TOKEN": "example-token"})
    assert set(book.agents) == {"reception", "sales"} and book.default_name == "reception"
    reception, sales = book.agents["reception"], book.agents["sales"]
    assert reception.settings.tts_engine == "piper" and reception.settings.silence_timeout_s == 8
    assert reception.settings.goodbye_words == ("goodbye", "bye", "that's all")
    assert set(reception.transfer_targets) == {"sales", "support", "operator"}
    assert reception.dtmf["1"] == DtmfAction("transfer", "sales") and reception.dtmf["9"] == DtmfAction("hangup")
    assert sales.settings.barge_in == "final" and sales.dtmf["2"] == DtmfAction("llm")
    assert sales.transfer_targets["order_desk"] == TransferTarget("order_desk", "2100", "XML", "default")
    # What an agent does not set comes from the environment, not from another agent.
    assert sales.settings.tts_engine == "coqui"
    (tool,) = sales.tools
    assert (tool.name, tool.method, tool.timeout_s) == ("order_status", "POST", 5.0)
    assert tool.headers == {"Authorization": "Bearer example-token"} and reception.tools == ()
    assert sales.settings.tool_filler_phrase == "One moment, let me check." and sales.settings.max_tool_calls == 3


def test_agent_values_override_only_their_keys(tmp_path):
    book = agents_from(tmp_path, '[agents.a]\nllm_model = "small"\n', LLM_MODEL="big", GREETING="Hey.")
    assert book.default.settings.llm_model == "small" and book.default.settings.greeting == "Hey."


@pytest.mark.parametrize("text, says", [
    ("[agents.a\n", "not valid TOML"),
    ('defaults = "a"\n[agents.a]\n', "unknown key 'defaults'"),
    ("", "no [agents.NAME] table"),
    ('default_agent = "b"\n[agents.a]\n', "default_agent 'b' is not one of the agents (a)"),
    ('[agents.a]\ngreting = "hi"\n', "[agents.a]: unknown key 'greting'"),
    ('[agents.a]\nGREETING = "hi"\n', "[agents.a]: unknown key 'GREETING'"),
    ('[agents.a]\nfreeswitch_host = "evil"\n', "[agents.a]: unknown key 'freeswitch_host'"),
    ('[agents.a]\nbarge_in = "sometimes"\n', "[agents.a]: barge_in: must be one of off | partial | final"),
    ('[agents.a]\ngreeting = "hi\\nthere"\n', "[agents.a]: greeting: must be a single line"),
    ('[agents.a]\nsilence_timeout_s = "soon"\n', "[agents.a]: silence_timeout_s: must be a number"),
    ('[agents.a]\npiper_voice = "/nope.onnx"\n', "[agents.a]: piper_voice: file not found"),
    ('[agents.a]\ngoodbye_phrase = {x = 1}\n', "[agents.a]: goodbye_phrase: must be a string"),
    ('[agents.a.transfer_targets]\n"Sales Desk" = "2000"\n', "transfer_targets: name 'Sales Desk'"),
    ('[agents.a.transfer_targets]\nsales = "2000 XML default; api hupall"\n', "transfer_targets.sales: must be"),
    ('[agents.a.transfer_targets]\nsales = "2000 XML de fault"\n', "transfer_targets.sales: must be"),
    ('[agents.a.dtmf]\n"11" = "hangup"\n', "dtmf: '11' is not a DTMF digit"),
    ('[agents.a.dtmf]\n"1" = "dance"\n', "must be transfer:<target>, hangup, repeat or llm"),
    ('[agents.a.dtmf]\n"1" = "transfer:nowhere"\n', "transfer target 'nowhere' is not in transfer_targets"),
    ('[agents."bad name"]\n', "agent names are letters"),
])
def test_a_bad_file_names_the_file_the_agent_and_the_key(tmp_path, text, says):
    with pytest.raises(ConfigError) as caught:
        agents_from(tmp_path, text)
    assert caught.value.variable == "AGENTS_FILE"
    assert str(tmp_path / "agents.toml") in str(caught.value) and says in str(caught.value)


def test_a_missing_agents_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="AGENTS_FILE: file not found"):
        load_settings(environ={"AGENTS_FILE": str(tmp_path / "none.toml")})


def test_operator_destination_must_be_plain_words():
    with pytest.raises(ConfigError, match="OPERATOR_DESTINATION"):
        load_settings(environ={"OPERATOR_DESTINATION": "1000 XML default\napi hupall"})


def test_an_agent_may_speak_whole_sentences_only(tmp_path):
    book = agents_from(tmp_path, '[agents.a]\n[agents.b]\nfirst_chunk = "sentence"\n')
    assert book.agents["a"].settings.first_chunk == "clause" and book.agents["b"].settings.first_chunk == "sentence"
    with pytest.raises(ConfigError, match=r"\[agents.c\]: first_chunk: must be one of clause \| sentence"):
        agents_from(tmp_path, '[agents.c]\nfirst_chunk = "word"\n')
