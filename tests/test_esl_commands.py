"""The command builder: exact lines for good input, refusal of anything that could smuggle."""

import pytest

from ivr_daemon.esl import commands
from ivr_daemon.esl.commands import EslCommand, UnsafeCommandArgument

UUID = "03362ffb-115a-4a3d-9eb6-770e2089d43f"


def test_exact_lines_match_what_a_real_client_sent():
    # tests/captures/70_cmd_connection_sent.txt holds the bytes fs_cli-style clients wrote.
    assert commands.auth("ClueCon").wire_bytes == b"auth ClueCon\n\n"
    assert commands.status().line == "api status"
    assert commands.show_channels_json().line == "api show channels as json"
    assert commands.uuid_break(UUID).line == f"api uuid_break {UUID} all"
    assert commands.uuid_break(UUID, all_=False).line == f"api uuid_break {UUID}"
    assert commands.uuid_exists(UUID).line == f"api uuid_exists {UUID}"
    assert commands.uuid_getvar(UUID, "fire_asr_events").line == f"api uuid_getvar {UUID} fire_asr_events"
    assert commands.uuid_kill(UUID).line == f"api uuid_kill {UUID}"
    assert commands.exit_().line == "exit"
    sent = open("tests/captures/70_cmd_connection_sent.txt", "rb").read()
    for command in (commands.auth("ClueCon"), commands.status(), commands.show_channels_json(),
                    commands.uuid_break(UUID), commands.uuid_exists(UUID), commands.uuid_kill(UUID),
                    commands.uuid_getvar(UUID, "fire_asr_events"), commands.exit_()):
        assert command.wire_bytes in sent


def test_broadcast_transfer_setvar_originate_lines():
    assert commands.uuid_broadcast(UUID, "/tmp/tts/a.wav").line == f"api uuid_broadcast {UUID} /tmp/tts/a.wav aleg"
    assert commands.uuid_broadcast(UUID, "/tmp/a.wav").reply_type == "api/response"
    assert commands.uuid_transfer(UUID, "1000").line == f"api uuid_transfer {UUID} 1000 XML default"
    assert commands.uuid_setvar(UUID, "ivr_agent", "sales team").line == f"api uuid_setvar {UUID} ivr_agent sales team"
    assert commands.uuid_setvar(UUID, "ivr_agent").line == f"api uuid_setvar {UUID} ivr_agent"
    assert commands.subscribe_events(["DETECTED_SPEECH", "CHANNEL_ANSWER"]).line == "event plain DETECTED_SPEECH CHANNEL_ANSWER"
    bg = commands.originate("loopback/ai/ivr", "playback", "/tmp/a.wav", {"origination_caller_id_number": "5551234"})
    assert bg.line == "bgapi originate {origination_caller_id_number=5551234}loopback/ai/ivr &playback(/tmp/a.wav)"
    assert bg.reply_type == "command/reply"


SMUGGLERS = ["x\r\napi uuid_kill " + UUID, "x\napi status", "x\rbad", "x\0y", "a b", "a;b", "a\tb", "", " lead"]


def _every_slot(value):
    """One call per argument of every builder, with ``value`` in that argument."""
    return [
        lambda: commands.uuid_broadcast(value, "/tmp/a.wav"),
        lambda: commands.uuid_broadcast(UUID, value),
        lambda: commands.uuid_broadcast(UUID, "/tmp/a.wav", value),
        lambda: commands.uuid_break(value),
        lambda: commands.uuid_kill(value),
        lambda: commands.uuid_kill(UUID, value),
        lambda: commands.uuid_transfer(value, "1000"),
        lambda: commands.uuid_transfer(UUID, value),
        lambda: commands.uuid_transfer(UUID, "1000", value),
        lambda: commands.uuid_transfer(UUID, "1000", "XML", value),
        lambda: commands.uuid_setvar(value, "v", "x"),
        lambda: commands.uuid_setvar(UUID, value, "x"),
        lambda: commands.uuid_getvar(value, "v"),
        lambda: commands.uuid_getvar(UUID, value),
        lambda: commands.uuid_exists(value),
        lambda: commands.originate(value, "park"),
        lambda: commands.originate("loopback/ai", value),
        lambda: commands.originate("loopback/ai", "playback", value),
        lambda: commands.originate("loopback/ai", "park", "", {value: "1"}),
        lambda: commands.originate("loopback/ai", "park", "", {"k": value}),
        lambda: commands.subscribe_events([value]),
    ]


@pytest.mark.parametrize("value", SMUGGLERS)
def test_every_argument_refuses_cr_lf_space_semicolon_nul(value):
    slots = _every_slot(value)
    if value == "":
        del slots[17]  # originate's app args may be empty: "&park()"
    for build in slots:
        with pytest.raises(UnsafeCommandArgument):
            build()


@pytest.mark.parametrize("value", ["x\r\napi status", "x\nexit", "a b", "", "\0"])
def test_password_refuses_line_breaks_and_spaces(value):
    # A password may hold ';' or any other printable character: it is the last word of its line.
    with pytest.raises(UnsafeCommandArgument):
        commands.auth(value)
    assert commands.auth("Clue;Con!").line == "auth Clue;Con!"


def test_setvar_value_may_hold_spaces_but_never_line_breaks():
    assert commands.uuid_setvar(UUID, "note", "call me back").line.endswith("call me back")
    for bad in ("a\r\nb", "a\nb", "a\0b", "a\tb"):
        with pytest.raises(UnsafeCommandArgument):
            commands.uuid_setvar(UUID, "note", bad)


def test_uuid_must_be_a_uuid():
    for bad in ("not-a-uuid", UUID + "0", UUID[:-1], "../../etc/passwd", UUID.replace("-", "")):
        with pytest.raises(UnsafeCommandArgument):
            commands.uuid_break(bad)
    assert commands.uuid_break(UUID.upper()).line.endswith("all")


def test_originate_refuses_parentheses_that_freeswitch_would_cut():
    with pytest.raises(UnsafeCommandArgument):
        commands.originate("loopback/ai", "playback", "tone_stream://%(1000,0,440)")


def test_commands_cannot_be_made_outside_the_builders():
    with pytest.raises(TypeError):
        EslCommand("api status\n\napi uuid_kill x", "api/response")
