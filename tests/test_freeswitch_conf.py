"""Checks the FreeSWITCH files shipped for administrators: well-formed XML saying what ivr_daemon relies on."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote

import pytest

from ivr_daemon.config import DEFAULT_ESL_PASSWORD, VARIABLES

REPO = Path(__file__).resolve().parent.parent
AUTOLOAD_DIR = REPO / "freeswitch_conf" / "autoload_configs"
EVENT_SOCKET_CONF = AUTOLOAD_DIR / "event_socket.conf.xml"
VOSK_CONF = AUTOLOAD_DIR / "vosk.conf.xml"
MODULES_FRAGMENT = AUTOLOAD_DIR / "modules.conf.xml"
DIALPLAN = REPO / "dialplan" / "ai_ivr.xml"
ADMIN_README = REPO / "freeswitch_conf" / "README.md"
# Every event of a real call through this dialplan (see tests/captures/README.md).
ALL_EVENTS_CAPTURE = REPO / "tests" / "captures" / "80_all_events_full_stream.txt"

SHIPPED_XML = (EVENT_SOCKET_CONF, VOSK_CONF, MODULES_FRAGMENT, DIALPLAN)
REQUIRED_MODULES = {"mod_event_socket", "mod_vosk", "mod_sndfile", "mod_dptools", "mod_commands"}
# The agent is picked in the dialplan; the capture's switch ran the extension without it.
AGENT_ACTION = ("set", "ivr_agent=default")
EXPECTED_IVR_ACTIONS = [
    ("answer", ""),
    ("set", "fire_asr_events=true"),
    ("detect_speech", "vosk default default"),
    ("park", ""),
]
EXAMPLE_RE = re.compile(r"<!-- BEGIN default-context example\n(.*?)\nEND default-context example -->", re.S)


def _default_of(variable: str) -> str:
    return next(default for name, _, default, _ in VARIABLES if name == variable)


def _comments(path: Path) -> list[str]:
    return re.findall(r"<!--(.*?)-->", path.read_text(encoding="utf-8"), re.S)


def _settings(path: Path, config_name: str) -> dict[str, str]:
    root = ET.parse(path).getroot()
    assert root.tag == "configuration"
    # FreeSWITCH finds a module's file by this name, not by the file name: a typo means "ignored".
    assert root.get("name") == config_name
    params = root.findall("./settings/param")
    names = [p.get("name") for p in params]
    assert len(names) == len(set(names)), f"duplicate params in {path.name}: {names}"
    return {p.get("name"): p.get("value") for p in params}


def _ivr_context() -> ET.Element:
    contexts = ET.parse(DIALPLAN).getroot().findall("context")
    assert [c.get("name") for c in contexts] == ["ivr"]
    return contexts[0]


def _ai_extension_condition() -> ET.Element:
    extensions = _ivr_context().findall("extension")
    assert [e.get("name") for e in extensions] == ["ai_default_agent", "ai"]
    conditions = extensions[1].findall("condition")
    assert len(conditions) == 1
    return conditions[0]


def test_the_default_agent_is_set_only_on_a_channel_without_one():
    """An outbound call names its agent in the originate; the dialplan must not overwrite it."""
    extension = _ivr_context().findall("extension")[0]
    assert extension.get("continue") == "true"  # on to the "ai" extension after it
    destination, agent = extension.findall("condition")
    assert destination.get("field") == "destination_number" and re.search(destination.get("expression"), "ai")
    assert agent.get("field") == "${ivr_agent}" and agent.get("expression") == "^$"
    assert agent.get("break") in (None, "on-false")  # both conditions must hold
    assert [(a.get("application"), a.get("data", "")) for a in agent] == [AGENT_ACTION]


def _capture_events(path: Path) -> list[dict[str, str]]:
    """Plain events of a raw ESL byte stream, header values URL-decoded."""
    data = path.read_bytes()
    events, pos = [], 0
    while pos < len(data):
        end = data.index(b"\n\n", pos)
        frame = dict(line.split(": ", 1) for line in data[pos:end].decode("utf-8").split("\n"))
        pos = end + 2
        length = int(frame.get("Content-Length", "0"))
        body, pos = data[pos:pos + length], pos + length
        if frame.get("Content-Type") == "text/event-plain":
            head = body.decode("utf-8").split("\n\n", 1)[0]
            events.append({k: unquote(v) for k, v in (line.split(": ", 1) for line in head.split("\n"))})
    return events


@pytest.mark.parametrize("path", SHIPPED_XML, ids=lambda p: p.name)
def test_shipped_xml_is_well_formed_and_safe_for_the_preprocessor(path):
    ET.parse(path)  # raises on malformed XML, including "--" inside a comment
    # FreeSWITCH's preprocessor runs X-PRE-PROCESS lines even inside comments.
    assert "<x-pre-process" not in path.read_text(encoding="utf-8").lower()


def test_event_socket_listens_on_loopback_where_the_daemon_connects():
    params = _settings(EVENT_SOCKET_CONF, "event_socket.conf")
    assert params["listen-ip"] == "127.0.0.1" == _default_of("FREESWITCH_HOST")
    assert params["listen-port"] == "8021" == _default_of("FREESWITCH_PORT")
    assert params["apply-inbound-acl"] == "loopback.auto"
    assert params["nat-map"] == "false"


def test_event_socket_password_is_a_placeholder_not_the_well_known_default():
    password = _settings(EVENT_SOCKET_CONF, "event_socket.conf")["password"]
    assert password and not any(c.isspace() for c in password)  # what FREESWITCH_PASSWORD accepts
    assert password != DEFAULT_ESL_PASSWORD
    assert any("FREESWITCH_PASSWORD" in c and DEFAULT_ESL_PASSWORD in c for c in _comments(EVENT_SOCKET_CONF))


def test_vosk_points_at_local_vosk_server_with_only_the_params_mod_vosk_reads():
    params = _settings(VOSK_CONF, "vosk.conf")
    assert params == {"server-url": "ws://127.0.0.1:2700", "return-json": "0"}
    # mod_vosk reads return-json with atoi(): "true" would silently mean 0.
    assert re.fullmatch(r"[01]", params["return-json"])


def test_modules_fragment_loads_what_the_daemon_needs_and_says_it_is_a_fragment():
    root = ET.parse(MODULES_FRAGMENT).getroot()
    assert root.get("name") == "modules.conf"
    loaded = [load.get("module") for load in root.findall("./modules/load")]
    assert REQUIRED_MODULES <= set(loaded)
    assert "mod_loopback" not in loaded
    comments = _comments(MODULES_FRAGMENT)
    assert any('<load module="mod_loopback"/>' in c for c in comments)
    assert "merge" in comments[0].lower() and "fragment" in comments[0].lower()


def test_ivr_extension_matches_ai_and_runs_the_measured_actions_in_order():
    condition = _ai_extension_condition()
    assert condition.get("field") == "destination_number"
    assert re.search(condition.get("expression"), "ai")
    assert not re.search(condition.get("expression"), "7000")
    actions = [(a.get("application"), a.get("data", "")) for a in condition]
    assert actions == EXPECTED_IVR_ACTIONS
    assert not any(a.get("inline") for a in condition)


def test_ivr_actions_are_what_a_real_freeswitch_executed_for_this_dialplan():
    executed = [
        (e["Application"], e.get("Application-Data", ""))
        for e in _capture_events(ALL_EVENTS_CAPTURE)
        if e["Event-Name"] == "CHANNEL_EXECUTE" and e.get("Channel-Name") == "loopback/ai-b"
    ]
    assert len(executed) > len(EXPECTED_IVR_ACTIONS) - 1  # the capture ran more after park (a broadcast)
    # The capture's dialplan predates the agent: its first extension set nothing.
    dialplan_actions = [(a.get("application"), a.get("data", "")) for a in _ai_extension_condition()]
    assert executed[:len(dialplan_actions)] == dialplan_actions


def test_dialplan_file_does_not_shadow_a_stock_context():
    # FreeSWITCH uses the first context of a name; ai_ivr.xml is read before default.xml.
    names = {c.get("name") for c in ET.parse(DIALPLAN).getroot().iter("context")}
    assert names.isdisjoint({"default", "public", "features"})


def test_default_context_example_transfers_into_the_ivr_extension():
    match = EXAMPLE_RE.search(DIALPLAN.read_text(encoding="utf-8"))
    assert match, "the commented default-context example is missing its BEGIN/END markers"
    example = ET.fromstring(match.group(1))
    assert example.tag == "include" and example.find("context") is None  # a dialplan/default/ file
    condition = example.find("./extension/condition")
    assert condition.get("field") == "destination_number"
    for dialled in ("7000", "ai"):
        assert re.search(condition.get("expression"), dialled)
    (transfer,) = condition.findall("action")
    assert transfer.get("application") == "transfer"
    destination, dialplan, context = transfer.get("data").split()
    assert dialplan == "XML"
    assert context == _ivr_context().get("name")
    assert re.search(_ai_extension_condition().get("expression"), destination)


def test_admin_readme_names_every_shipped_file_and_the_reload_commands():
    readme = ADMIN_README.read_text(encoding="utf-8")
    for path in SHIPPED_XML:
        assert str(path.relative_to(REPO)) in readme
    for command in ("reload mod_event_socket", "reloadxml", "load mod_vosk", "originate loopback/ai/ivr"):
        assert command in readme


SYSTEMD_UNIT = REPO / "freeswitch_conf" / "systemd" / "ivr-daemon-asr.service"
DAEMON_UNIT = REPO / "freeswitch_conf" / "systemd" / "ivr-daemon.service"


def test_mod_vosk_is_pointed_at_where_the_asr_server_listens_by_default():
    server_url = _settings(VOSK_CONF, "vosk.conf")["server-url"]
    assert server_url == f"ws://{_default_of('ASR_HOST')}:{_default_of('ASR_PORT')}"
    assert _default_of("ASR_SAMPLE_RATE") == "8000"  # mod_vosk sends the calls' rate and says nothing


def test_the_systemd_unit_runs_the_asr_server_and_does_not_restart_on_a_bad_setting():
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(SYSTEMD_UNIT.read_text(encoding="utf-8"))
    command = unit["Service"]["ExecStart"].split()
    assert command[0].endswith("/ivr-daemon") and command[-1] == "asr-server"
    assert "--env-file" in command and command.index("--env-file") < command.index("asr-server")
    assert unit["Service"]["RestartPreventExitStatus"] == "2"  # cli.EXIT_CONFIG
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    names = {name for name, *_ in VARIABLES}
    for unit_file in (SYSTEMD_UNIT, DAEMON_UNIT):
        for documented in re.findall(r"^#\s+([A-Z_]+)=", unit_file.read_text(encoding="utf-8"), re.M):
            assert documented in names, f"{unit_file.name}: {documented}"
        assert str(unit_file.relative_to(REPO)) in ADMIN_README.read_text(encoding="utf-8")
