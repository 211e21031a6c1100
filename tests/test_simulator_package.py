"""The simulator package's contract: its old import path, instance-patchable hooks, rooms small and labelled."""

from __future__ import annotations

import ast
from pathlib import Path

import ivr_daemon.replay.simulator as simulator_package
from test_simulator import RawPeer, api_response, capture, sim  # noqa: F401  (sim is a fixture)

PACKAGE_DIR = Path(simulator_package.__file__).parent
MAX_MODULE_LINES = 800


def test_every_name_the_project_imports_is_still_exported():
    # What ivr_daemon/, tests/, bench/ and scripts/ import from ivr_daemon.replay.simulator.
    from ivr_daemon.replay.simulator import (  # noqa: F401
        CommandNotReceived,
        CommandPacket,
        CommandPacketParser,
        EventNotEmitted,
        FreeswitchSimulator,
        NoSuchCall,
        NotAnEventFrame,
        PlaybackRecord,
        build_xml_event,
        run_standalone,
    )

    for name in simulator_package.__all__:
        assert getattr(simulator_package, name) is not None, name


def test_each_module_is_small_and_says_its_job_in_one_line():
    modules = sorted(PACKAGE_DIR.glob("*.py"))
    assert {m.stem for m in modules} >= {"__init__", "server", "wire", "api", "channels", "playback", "events", "cli"}
    for module in modules:
        source = module.read_text(encoding="utf-8")
        assert len(source.splitlines()) <= MAX_MODULE_LINES, module.name
        docstring = ast.get_docstring(ast.parse(source))
        assert docstring and docstring.splitlines()[0].strip(), f"{module.name} has no docstring"


def test_the_event_templates_are_still_found():
    from ivr_daemon.replay.event_templates import EVENT_TEMPLATE_FILES, load_channel_row_template, load_event_template

    for kind in EVENT_TEMPLATE_FILES:
        assert load_event_template(kind).event_name, kind
    assert dict(load_channel_row_template())["name"] == "loopback/ai-b"


def test_an_instance_patch_of_api_show_answers_show_channels(sim, monkeypatch):
    monkeypatch.setattr(sim, "_api_show", lambda arg: f"patched {arg}\n")
    peer = RawPeer(sim.port)
    try:
        peer.login()
        peer.send("api show channels as json")
        assert peer.reply().raw == api_response(b"patched channels as json\n")
    finally:
        peer.close()


def test_an_instance_patch_of_run_api_answers_api_and_bgapi(sim, monkeypatch):
    run_api = sim._run_api
    monkeypatch.setattr(sim, "_run_api", lambda name, arg: ("-ERR busy\n", []) if name == "uuid_exists" else run_api(name, arg))
    peer = RawPeer(sim.port)
    try:
        peer.login("event plain BACKGROUND_JOB")
        peer.send("api uuid_exists 00000000-0000-0000-0000-000000000000")
        assert peer.reply().raw == api_response(b"-ERR busy\n")
        peer.send("api echo still here")
        assert peer.reply().raw == api_response(b"still here")
        peer.send("bgapi uuid_exists 00000000-0000-0000-0000-000000000000")
        assert peer.reply().headers["Reply-Text"].startswith("+OK Job-UUID: ")
        _, job = peer.event("BACKGROUND_JOB")
        assert job.body == "-ERR busy\n"
    finally:
        peer.close()


def test_an_instance_patch_of_dispatch_sees_every_command_packet(sim, monkeypatch):
    dispatch = sim._dispatch
    seen: list[str] = []

    def spying_dispatch(conn, packet):
        seen.append(packet.line)
        return dispatch(conn, packet)

    monkeypatch.setattr(sim, "_dispatch", spying_dispatch)
    peer = RawPeer(sim.port)
    try:
        peer.login("event plain CHANNEL_ANSWER")
        peer.send("api status")
        assert peer.reply().body.startswith(b"UP ")
        assert seen == ["auth ClueCon", "event plain CHANNEL_ANSWER", "api status"]
    finally:
        peer.close()


def test_the_greeting_is_still_capture_01(sim):
    peer = RawPeer(sim.port)
    try:
        assert peer.next_frame().raw == capture("01_auth_request.txt")
    finally:
        peer.close()
