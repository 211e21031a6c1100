"""The FreeSWITCH simulator against the captured wire: greeting, replies, events, playback, faults."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import gevent
import gevent.event
import gevent.socket
import numpy as np
import pytest
import soundfile

from ivr_daemon.esl import commands
from ivr_daemon.esl.connection import EslClient
from ivr_daemon.esl.protocol import Frame, FrameParser, MalformedEvent, parse_event, parse_header_pairs
from ivr_daemon.replay.simulator import (
    CommandNotReceived,
    CommandPacket,
    CommandPacketParser,
    EventNotEmitted,
    FreeswitchSimulator,
    NoSuchCall,
    NotAnEventFrame,
    PlaybackRecord,
)

CAPTURES = Path(__file__).parent / "captures"
PLAYBACK = CAPTURES / "playback"
DEAD_UUID = "00000000-0000-0000-0000-000000000000"
READ_TIMEOUT_S = 5.0


def capture(name: str) -> bytes:
    path = CAPTURES / name if (CAPTURES / name).exists() else PLAYBACK / name
    return path.read_bytes()


def frames_of(data: bytes) -> list[Frame]:
    items = FrameParser().feed(data)
    assert all(isinstance(item, Frame) for item in items)
    return items


def header_names(frame: Frame) -> list[str]:
    """The event's own header names in wire order (Content-Length of a body included)."""
    if frame.content_type == "text/event-json":
        return list(json.loads(frame.body))
    head = frame.body.split(b"\n\n", 1)[0].decode("utf-8")
    return [key for key, _ in parse_header_pairs(head, url_decoded=True)]


def variable_names(frame: Frame) -> list[str]:
    return [name for name in header_names(frame) if name.startswith("variable_")]


def captured_event(stream: str, name: str, **headers: str) -> Frame:
    """The first event called ``name`` (with these headers) in a whole-connection capture."""
    for frame in frames_of(capture(stream)):
        if frame.content_type.startswith("text/event-"):
            event = parse_event(frame)
            if event.name == name and all(event.get(k.replace("_", "-")) == v for k, v in headers.items()):
                return frame
    raise AssertionError(f"no {name} in {stream}")


class RawPeer:
    """A bare gevent socket that reads whole frames: what FreeSWITCH sent, byte for byte."""

    def __init__(self, port: int):
        self.sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S)
        self.parser = FrameParser()
        self.pending: list[Frame] = []
        self.received = bytearray()

    def close(self) -> None:
        self.sock.close()

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(f"{line}\n\n" for line in lines).encode("utf-8"))

    def next_frame(self) -> Frame:
        while not self.pending:
            data = self.sock.recv(65536)  # bounded by the socket timeout
            assert data, "connection closed while a frame was expected"
            self.received += data
            for item in self.parser.feed(data):
                assert isinstance(item, Frame), item
                self.pending.append(item)
        return self.pending.pop(0)

    def frames(self, count: int) -> list[Frame]:
        return [self.next_frame() for _ in range(count)]

    def reply(self) -> Frame:
        """The next command/reply or api/response, skipping events."""
        while True:
            frame = self.next_frame()
            if not frame.content_type.startswith("text/event-"):
                return frame

    def event(self, name: str | None = None, **headers: str):
        """The next event frame (named ``name``, with these headers) and its parsed form."""
        while True:
            frame = self.next_frame()
            if not frame.content_type.startswith("text/event-"):
                continue
            try:
                event = parse_event(frame)
            except MalformedEvent:
                continue  # injected junk
            if (name is None or event.name == name) and all(event.get(k.replace("_", "-")) == v for k, v in headers.items()):
                return frame, event

    def read_to_eof(self) -> bytes:
        data = bytearray()
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return bytes(data)
            data += chunk

    def login(self, *subscription: str) -> None:
        assert self.next_frame().raw == capture("01_auth_request.txt")
        self.send("auth ClueCon")
        assert self.next_frame().raw == capture("02_auth_reply_ok.txt")
        for line in subscription:
            self.send(line)
            assert self.next_frame().headers["Reply-Text"].startswith("+OK event listener enabled")


def api_response(text: bytes) -> bytes:
    return b"Content-Type: api/response\nContent-Length: %d\n\n" % len(text) + text


def write_wav(path: Path, seconds: float) -> str:
    soundfile.write(str(path), np.zeros(int(seconds * 8000), dtype="int16"), 8000, subtype="PCM_16")
    return str(path)


@pytest.fixture
def sim():
    with FreeswitchSimulator(playback_gap_s=0.01, playback_speed=0.0, break_latency_s=0.0, duplicate_speech_delay_s=0.0) as simulator:
        yield simulator


@pytest.fixture
def peer(sim):
    connection = RawPeer(sim.port)
    yield connection
    connection.close()


# -- connection level -----------------------------------------------------------------------


def test_a_commands_time_is_when_it_reached_the_host_not_when_the_simulators_loop_read_it(sim, peer):
    """Benchmarks time the daemon by the commands' times: the simulator's own lag (its loop busy
    with a thousand calls) must not be charged to the daemon."""
    from gevent.monkey import get_original

    blocking_sleep = get_original("time", "sleep")
    peer.login()
    # Linux turns its receive stamps on a moment after the first socket asks for them (a static
    # key flipped by deferred work, net_enable_timestamp()), later still on a busy box: the
    # packets before that come unstamped and get the time of their read. So: until one is stamped.
    for _attempt in range(50):
        read_before = sim.commands_received
        peer.send("api status")  # on loopback it is in the simulator's socket before send returns
        sent_s = time.monotonic()
        blocking_sleep(0.1)  # the simulator's loop (this process's) cannot read it meanwhile
        loop_free_s = time.monotonic()
        command = sim.wait_for_command("api status", 5, start_index=read_before)
        if command.t_monotonic < loop_free_s - 0.08:
            break
    assert command.t_monotonic < loop_free_s - 0.08  # when it came, not when it was read
    assert command.t_monotonic >= sent_s - 0.05


def test_greeting_is_capture_01_byte_for_byte(sim, peer):
    assert peer.next_frame().raw == capture("01_auth_request.txt")


def test_command_connection_reproduces_capture_70(sim, peer):
    sent = capture("70_cmd_connection_sent.txt").decode().split("\n\n")
    wanted = list(dict.fromkeys(line for line in sent if line.split(" ")[0] in ("auth", "nosuchverb", "exit")
                                or line in ("api status", "api show channels as json", f"api uuid_break {DEAD_UUID} all", "api nosuchcommand")))
    assert wanted == ["auth ClueCon", "api status", "api show channels as json", f"api uuid_break {DEAD_UUID} all",
                      "api nosuchcommand", "nosuchverb", "exit"]
    peer.send(*wanted)
    got = frames_of(peer.read_to_eof())
    expected = frames_of(capture("70_cmd_connection_full_stream.txt"))
    expected = expected[:7] + expected[-2:]  # the live-call part (bgapi originate ...) left out
    assert len(got) == len(expected) == 9
    for index, (mine, real) in enumerate(zip(got, expected)):
        if index == 2:  # status: uptime and counters differ, the shape may not
            assert mine.raw.startswith(b"Content-Type: api/response\nContent-Length: ")
            lines = mine.body.decode().split("\n")
            assert re.fullmatch(r"UP \d+ years?, \d+ days?, \d+ hours?, \d+ minutes?, \d+ seconds?, \d+ milliseconds?, \d+ microseconds?", lines[0])
            real_lines = real.body.decode().split("\n")
            assert lines[1] == real_lines[1] == "FreeSWITCH (Version 1.11.3-dev  64bit) is ready"
            assert [re.sub(r"\d+", "N", line) for line in lines[2:]] == [re.sub(r"\d+", "N", line) for line in real_lines[2:]]
        else:
            assert mine.raw == real.raw, index


def test_wrong_password_is_capture_07_then_close(sim, peer):
    peer.send("auth not-the-password")
    assert peer.read_to_eof() == capture("07_auth_reply_bad_password_full_stream.txt")


def test_refuse_auth_and_changed_password(sim):
    sim.password = "secret"
    first = RawPeer(sim.port)
    first.send("auth secret")
    assert first.frames(2)[1].headers["Reply-Text"] == "+OK accepted"
    sim.refuse_auth = True
    second = RawPeer(sim.port)
    second.send("auth secret")
    assert second.read_to_eof() == capture("07_auth_reply_bad_password_full_stream.txt")
    first.close()


def test_commands_before_auth_get_command_not_found_and_the_socket_stays(sim, peer):
    peer.send("api status", "event plain ALL")
    frames = peer.frames(3)
    assert frames[1].raw == frames[2].raw == capture("14_unknown_esl_verb_reply.txt")
    peer.send("auth ClueCon")
    assert peer.next_frame().raw == capture("02_auth_reply_ok.txt")


def test_subscribe_replies_are_captures_03_04_06(sim, peer):
    peer.login()
    for line, name in [("event plain DETECTED_SPEECH CHANNEL_ANSWER CHANNEL_HANGUP_COMPLETE", "03_event_plain_subscribe_reply.txt"),
                       ("event json DETECTED_SPEECH CHANNEL_ANSWER CHANNEL_HANGUP_COMPLETE", "04_event_json_subscribe_reply.txt"),
                       ("event plain ALL", "06_event_plain_ALL_subscribe_reply.txt")]:
        peer.send(line)
        assert peer.next_frame().raw == capture(name)
    peer.send("event plain NOT_AN_EVENT")
    assert peer.next_frame().headers["Reply-Text"] == "-ERR no keywords supplied"


def test_garbage_and_split_commands_do_not_break_the_connection(sim, peer):
    peer.login()
    peer.sock.sendall(b"\xff\xfe garbage \x00\n\n")
    assert peer.next_frame().raw == capture("14_unknown_esl_verb_reply.txt")
    for byte in b"api uuid_exists " + DEAD_UUID.encode() + b"\r\n\r\n":
        peer.sock.sendall(bytes([byte]))
    assert peer.next_frame().raw == capture("64_api_uuid_exists_false.txt")
    assert [c.line for c in sim.commands][-2:] == ["\ufffd\ufffd garbage \x00", f"api uuid_exists {DEAD_UUID}"]


def test_auth_timeout_sends_the_disconnect_notice_and_closes():
    with FreeswitchSimulator(auth_timeout_s=0.05) as quiet:
        peer = RawPeer(quiet.port)
        stream = peer.read_to_eof()
    notice = capture("07_auth_reply_bad_password_full_stream.txt").split(b"Reply-Text: -ERR invalid\n\n")[1]
    assert stream == capture("01_auth_request.txt") + notice


def test_command_packet_parser_reads_headers_bodies_and_crlf():
    parser = CommandPacketParser()
    assert parser.feed(b"\r\n\nsendmsg abc\r\ncall-command: execute\r\nexecute-app-name: playback\r\n") == []
    packets = parser.feed(b"content-length: 5\r\n\r\nhel") + parser.feed(b"lobgapi status\nJob-UUID: j1\n\n")
    assert packets == [
        CommandPacket("sendmsg abc", (("call-command", "execute"), ("execute-app-name", "playback"), ("content-length", "5")), b"hello"),
        CommandPacket("bgapi status", (("Job-UUID", "j1"),), b""),
    ]
    assert packets[0].header("Execute-App-Name") == "playback"


# -- api replies, byte for byte ---------------------------------------------------------------


def test_api_replies_for_live_and_dead_uuids_match_the_captures(sim, peer):
    peer.login()
    call = sim.new_call()

    def api(line: str) -> bytes:
        peer.send(line)
        return peer.reply().raw

    assert api(f"api uuid_broadcast {call} tone_stream://%(200,0,500) aleg") == capture("50_api_uuid_broadcast_aleg.txt")
    assert api(f"api uuid_broadcast {DEAD_UUID} /tmp/a.wav aleg") == api_response(b"-ERR invalid uuid\n")
    assert api(f"api uuid_break {call} all") == capture("52_api_uuid_break_all.txt")
    assert api(f"api uuid_break {DEAD_UUID} all") == capture("12_api_uuid_break_no_such_channel.txt")
    assert api(f"api uuid_exists {call}") == capture("53_api_uuid_exists_true.txt")
    assert api(f"api uuid_getvar {call} fire_asr_events") == capture("54_api_uuid_getvar.txt")
    assert api(f"api uuid_getvar {call} ivr_agent") == api_response(b"_undef_")
    assert api(f"api uuid_setvar {call} ivr_agent sales team") == api_response(b"+OK\n")
    assert api(f"api uuid_getvar {call} ivr_agent") == api_response(b"sales team")
    assert api(f"api uuid_setvar {call} ivr_agent") == api_response(b"+OK\n")
    assert api(f"api uuid_getvar {call} ivr_agent") == api_response(b"_undef_")
    assert api(f"api uuid_setvar {DEAD_UUID} ivr_agent x") == capture("12_api_uuid_break_no_such_channel.txt")
    assert api(f"api uuid_transfer {call} nosuchext XML default") == api_response(b"+OK\n")
    assert api(f"api uuid_transfer {DEAD_UUID} 1000 XML default") == capture("12_api_uuid_break_no_such_channel.txt")
    assert api("api nosuchcommand") == capture("13_api_unknown_command.txt")
    assert api("api uuid_broadcast") == api_response(b"-USAGE: <uuid> <path> [aleg|bleg|holdb|both]\n")
    assert api(f"api uuid_kill {call}") == capture("60_api_uuid_kill.txt")
    assert api(f"api uuid_exists {call}") == capture("64_api_uuid_exists_false.txt")
    assert api(f"api uuid_kill {call}") == capture("12_api_uuid_break_no_such_channel.txt")
    assert api("api show channels as json") == capture("11_api_show_channels_as_json_empty.txt")


def test_show_channels_json_has_the_captured_row_shape(sim, peer):
    peer.login()
    first = sim.new_call("5551234")
    second = sim.new_call("5550000", caller_id_name="Alice")
    peer.send("api show channels as json")
    reply = peer.reply()
    assert not reply.body.endswith(b"\n")  # a live list has no trailing LF (capture 51)
    shown = json.loads(reply.body)
    real = json.loads(frames_of(capture("51_api_show_channels_as_json_live.txt"))[0].body)
    assert shown["row_count"] == 2 and [row["uuid"] for row in shown["rows"]] == [first, second]
    assert [list(row) for row in shown["rows"]] == [list(real["rows"][1])] * 2
    row = shown["rows"][1]
    assert (row["cid_num"], row["cid_name"], row["application"], row["name"], row["context"]) == ("5550000", "Alice", "park", "loopback/ai-b", "ivr")
    assert b'":"' in reply.body and b", " not in reply.body  # cJSON_PrintUnformatted
    peer.send("api show channels")
    csv = peer.reply().body.decode()
    assert csv.startswith("uuid,direction,created,") and csv.endswith("\n\n2 total.\n") and first in csv


def test_bgapi_replies_at_once_then_fires_background_job(sim, peer):
    peer.login("event plain BACKGROUND_JOB CHANNEL_ANSWER")
    peer.send("bgapi originate {origination_caller_id_number=5551234}loopback/ai/ivr &park()")
    reply = peer.next_frame()
    job = reply.headers["Job-UUID"]
    assert reply.raw == b"Content-Type: command/reply\nReply-Text: +OK Job-UUID: %s\nJob-UUID: %s\n\n" % (job.encode(), job.encode())
    assert list(reply.headers) == list(frames_of(capture("20_bgapi_originate_reply.txt"))[0].headers)
    answer_frame, answer = peer.event("CHANNEL_ANSWER")
    frame, event = peer.event("BACKGROUND_JOB")
    real = frames_of(capture("21_event_plain_BACKGROUND_JOB_originate.txt"))[0]
    assert header_names(frame) == header_names(real)
    assert event.get("Job-UUID") == job and event.get("Job-Command") == "originate"
    assert event.get("Job-Command-Arg") == "{origination_caller_id_number=5551234}loopback/ai/ivr &park()"
    assert event.body == f"+OK {answer.get('variable_other_loopback_leg_uuid')}\n"
    assert answer.get("Caller-Caller-ID-Number") == "5551234" and sim.calls() == [answer.unique_id]
    # A Job-UUID header on the command is used as the job's uuid.
    peer.sock.sendall(b"bgapi nosuchcommand\nJob-UUID: my-job\n\n")
    assert peer.next_frame().headers["Job-UUID"] == "my-job"
    _, failed = peer.event("BACKGROUND_JOB")
    assert (failed.get("Job-UUID"), failed.body, failed.get("Job-Command-Arg")) == ("my-job", "-ERR nosuchcommand Command not found!\n", None)


def test_uuid_dump_json_is_the_channel_data(sim, peer):
    peer.login()
    call = sim.new_call()
    peer.send(f"api uuid_dump {call} json")
    dump = json.loads(peer.reply().body)
    real = json.loads(frames_of(capture("56_api_uuid_dump_json.txt"))[0].body)
    assert dump["Event-Name"] == "CHANNEL_DATA" and dump["Unique-ID"] == call
    assert [k for k in dump if not k.startswith("variable_")] == [k for k in real if not k.startswith("variable_")]
    assert dump["variable_current_application"] == "park"


# -- events ------------------------------------------------------------------------------------


def test_new_call_and_speech_on_a_plain_all_subscription(sim, peer):
    peer.login("event plain ALL")
    call = sim.new_call("5551234")
    answer_frame, answer = peer.event("CHANNEL_ANSWER")
    assert header_names(answer_frame) == header_names(frames_of(capture("31_event_plain_CHANNEL_ANSWER_ivr_leg.txt"))[0])
    assert (answer.unique_id, answer.get("Channel-Call-UUID"), answer.get("Caller-Unique-ID"), answer.get("variable_uuid")) == (call,) * 4
    assert answer.get("Core-UUID") == sim.core_uuid and answer.get("Caller-Caller-ID-Number") == "5551234"
    _, execute = peer.event("CHANNEL_EXECUTE")
    assert (execute.get("Application"), execute.get("Application-Data")) == ("park", None)
    park_frame, park = peer.event("CHANNEL_PARK")
    assert header_names(park_frame) == header_names(captured_event("80_all_events_full_stream.txt", "CHANNEL_PARK"))
    assert variable_names(park_frame) == [
        "variable_direction", "variable_uuid", "variable_session_id", "variable_channel_name", "variable_read_codec",
        "variable_read_rate", "variable_write_codec", "variable_write_rate", "variable_origination_caller_id_number",
        "variable_other_loopback_leg_uuid", "variable_loopback_leg", "variable_call_uuid", "variable_endpoint_disposition",
        "variable_fire_asr_events", "variable_current_application"]
    assert park.get("variable_current_application") == "park"
    assert answer.sequence < execute.sequence < park.sequence

    sequence = sim.speak(call, "hello world")
    first_frame, first = peer.event("DETECTED_SPEECH")
    second_frame, second = peer.event("DETECTED_SPEECH")
    assert first_frame.raw == second_frame.raw and first.sequence == second.sequence == sequence
    assert header_names(first_frame) == header_names(frames_of(capture("40_event_plain_DETECTED_SPEECH_detected-speech.txt"))[0])
    assert (first.get("Speech-Type"), first.body, first.unique_id) == ("detected-speech", "hello world", call)

    sim.speak(call, "hel", final=False)
    partial_frame, partial = peer.event("DETECTED_SPEECH")
    assert peer.event("DETECTED_SPEECH")[0].raw == partial_frame.raw  # partials are doubled too
    assert (partial.get("Speech-Type"), partial.body) == ("detected-partial-speech", "hel")
    assert partial.sequence > sequence

    sim.speak(call, 'héllo wörld ✓ "q" 100%AB')
    frame, utf8 = peer.event("DETECTED_SPEECH")
    assert utf8.body == 'héllo wörld ✓ "q" 100%AB'
    assert frame.body.endswith('Content-Length: 28\n\nhéllo wörld ✓ "q" 100%AB'.encode())


def test_duplicates_can_be_turned_off(sim, peer):
    sim.duplicate_speech_while_parked = False
    peer.login("event plain DETECTED_SPEECH CHANNEL_HANGUP_COMPLETE")
    call = sim.new_call()
    sim.speak(call, "once")
    sim.hangup(call)
    _, speech = peer.event()
    _, closed = peer.event()
    assert (speech.body, closed.get("Speech-Type")) == ("once", "closed")


def test_json_subscription_gets_only_its_events_with_the_body_in__body(sim, peer):
    peer.login("event json DETECTED_SPEECH")
    call = sim.new_call()
    sim.duplicate_speech_while_parked = False
    sim.speak(call, "hello world")
    frame = peer.next_frame()  # nothing of CHANNEL_ANSWER/PARK came first
    assert frame.content_type == "text/event-json"
    obj = json.loads(frame.body)
    assert (obj["Event-Name"], obj["_body"], obj["Content-Length"], obj["Unique-ID"]) == ("DETECTED_SPEECH", "hello world", "11", call)
    assert list(obj) == header_names(frames_of(capture("43_event_json_DETECTED_SPEECH_detected-speech.txt"))[0])


def test_xml_subscription_is_laid_out_like_capture_46(sim, peer):
    peer.login("event xml DETECTED_SPEECH")
    call = sim.new_call()
    sim.speak(call, "hello world")
    frame, event = peer.event("DETECTED_SPEECH")
    assert frame.content_type == "text/event-xml" and event.body == "hello world" and event.unique_id == call
    assert frame.body.endswith(b"  </headers>\n  <Content-Length>11</Content-Length>\n  <body>hello world</body>\n</event>\n")


def test_hangup_emits_park_complete_closed_and_hangup_complete(sim, peer):
    peer.login("event plain CHANNEL_EXECUTE_COMPLETE DETECTED_SPEECH CHANNEL_HANGUP_COMPLETE")
    call = sim.new_call()
    sim.hangup(call, "USER_BUSY")
    _, park = peer.event("CHANNEL_EXECUTE_COMPLETE")
    assert (park.get("Application"), park.get("Application-Response"), park.get("Hangup-Cause")) == ("park", "_none_", "USER_BUSY")
    closed_frame, closed = peer.event("DETECTED_SPEECH")
    assert closed.get("Speech-Type") == "closed" and closed.body is None
    assert header_names(closed_frame) == header_names(frames_of(capture("47_event_plain_DETECTED_SPEECH_closed.txt"))[0])
    frame, complete = peer.event("CHANNEL_HANGUP_COMPLETE")
    real = frames_of(capture("61_event_plain_CHANNEL_HANGUP_COMPLETE_ivr_leg.txt"))[0]
    assert [n for n in header_names(frame) if not n.startswith("variable_")] == [n for n in header_names(real) if not n.startswith("variable_")]
    real_vars = variable_names(real)
    hangup_block = real_vars[real_vars.index("variable_hangup_cause"):]
    hangup_block.remove("variable_last_arg")  # no application data was ever set on this leg
    assert variable_names(frame)[-len(hangup_block):] == hangup_block
    assert complete.get("Hangup-Cause") == complete.get("variable_hangup_cause") == "USER_BUSY"
    assert complete.get("variable_hangup_cause_q850") == "17" and complete.get("variable_last_app") == "park"
    assert int(complete.get("Caller-Channel-Hangup-Time")) >= int(complete.get("Caller-Channel-Created-Time"))
    assert not sim.call_exists(call)
    with pytest.raises(NoSuchCall):
        sim.speak(call, "too late")


def test_dtmf_event(sim, peer):
    peer.login("event plain DTMF")
    call = sim.new_call()
    sim.dtmf(call, "5")
    frame, event = peer.event("DTMF")
    # A loopback leg says UNKNOWN (tests/captures/dtmf/); a trunk's source can be given.
    assert (event.get("DTMF-Digit"), event.get("DTMF-Duration"), event.get("DTMF-Source"), event.unique_id) == ("5", "2000", "UNKNOWN", call)
    assert "Speech-Type" not in header_names(frame)
    sim.dtmf(call, "a", duration_samples=640, source="RTP")
    _, event = peer.event("DTMF")
    assert (event.get("DTMF-Digit"), event.get("DTMF-Duration"), event.get("DTMF-Source")) == ("A", "640", "RTP")


def test_api_events_reach_all_subscribers(sim, peer):
    peer.login("event plain API")
    peer.send("api show channels as json")
    frame, event = peer.event("API")
    assert header_names(frame) == header_names(captured_event("80_all_events_full_stream.txt", "API", API_Command="show"))
    assert (event.get("API-Command"), event.get("API-Command-Argument")) == ("show", "channels as json")


# -- playback ----------------------------------------------------------------------------------


def test_broadcasts_queue_and_play_in_order(sim, peer, tmp_path):
    a = write_wav(tmp_path / "a.wav", 0.5)
    b = write_wav(tmp_path / "b.wav", 0.25)
    peer.login("event plain PLAYBACK_START PLAYBACK_STOP CHANNEL_EXECUTE CHANNEL_EXECUTE_COMPLETE DETECTED_SPEECH")
    call = sim.new_call()
    peer.event("CHANNEL_EXECUTE")  # park
    peer.send(f"api uuid_broadcast {call} {a} aleg", f"api uuid_broadcast {call} playback::{b} aleg")
    assert peer.reply().raw == peer.reply().raw == capture("50_api_uuid_broadcast_aleg.txt")
    names = []
    for path, samples in ((a, 4000), (b, 2000)):
        execute_frame, execute = peer.event("CHANNEL_EXECUTE")
        start_frame, start = peer.event("PLAYBACK_START")
        stop_frame, stop = peer.event("PLAYBACK_STOP")
        _, complete = peer.event("CHANNEL_EXECUTE_COMPLETE")
        assert (execute.get("Application"), execute.get("Application-Data")) == ("playback", path)
        assert start.get("Playback-File-Path") == stop.get("Playback-File-Path") == path
        assert start.unique_id == stop.unique_id == call
        assert stop.get("Playback-Status") == "done"
        assert stop.get("variable_playback_samples") == stop.get("variable_playback_last_offset_pos") == str(samples)
        assert stop.get("variable_playback_ms") == str(samples // 8)
        assert (complete.get("Application-Response"), complete.get("Application-UUID")) == ("FILE PLAYED", execute.get("Application-UUID"))
        names.append([header_names(f) for f in (execute_frame, start_frame, stop_frame)])
    # The header lists are the captured ones (X01, X02, X03), variables in FreeSWITCH's order.
    assert [n for n in names[0][1] if not n.startswith("variable_")] == [n for n in header_names(frames_of(capture("X02_S1_event_plain_PLAYBACK_START_a_wav.txt"))[0]) if not n.startswith("variable_")]
    assert variable_names(start_frame) == [k for k in json.loads(frames_of(capture("X05_S1_event_json_PLAYBACK_START_b_wav.txt"))[0].body) if k.startswith("variable_")]
    assert variable_names(stop_frame) == [k for k in json.loads(frames_of(capture("X06_S1_event_json_PLAYBACK_STOP_b_wav_done.txt"))[0].body) if k.startswith("variable_")]
    assert sim.played_files(call) == [a, b] and sim.playing(call) is None
    assert [r.status for r in sim.playback_log(call)] == ["done", "done"]


def test_speech_is_single_while_playing_and_doubled_when_parked_again(sim, peer, tmp_path):
    sim.playback_speed = 1.0
    long_file = write_wav(tmp_path / "long.wav", 30.0)
    peer.login("event plain PLAYBACK_START PLAYBACK_STOP DETECTED_SPEECH")
    call = sim.new_call()
    peer.send(f"api uuid_broadcast {call} {long_file} aleg")
    peer.event("PLAYBACK_START")
    sim.speak(call, "during")
    sim.speak(call, "marker")
    assert [peer.event("DETECTED_SPEECH")[1].body for _ in range(2)] == ["during", "marker"]
    peer.send(f"api uuid_break {call}")
    peer.event("PLAYBACK_STOP", Playback_Status="break")
    sim.speak(call, "parked")
    assert [peer.event("DETECTED_SPEECH")[1].body for _ in range(2)] == ["parked", "parked"]


def test_break_all_stops_the_current_file_and_flushes_the_queue(sim, peer, tmp_path):
    sim.playback_speed = 1.0
    long_file = write_wav(tmp_path / "long.wav", 30.0)
    b = write_wav(tmp_path / "b.wav", 0.1)
    probe = write_wav(tmp_path / "probe.wav", 0.1)
    peer.login("event plain PLAYBACK_START PLAYBACK_STOP CHANNEL_EXECUTE")
    call = sim.new_call()
    peer.event("CHANNEL_EXECUTE")
    peer.send(f"api uuid_broadcast {call} {long_file} aleg", f"api uuid_broadcast {call} {b} aleg", f"api uuid_broadcast {call} {b} aleg")
    peer.event("PLAYBACK_START", Playback_File_Path=long_file)
    assert sim.playing(call) == long_file
    peer.send(f"api uuid_break {call} all")
    assert peer.reply().raw == capture("52_api_uuid_break_all.txt")
    frame, stop = peer.event("PLAYBACK_STOP")
    assert (stop.get("Playback-File-Path"), stop.get("Playback-Status")) == (long_file, "break")
    offset = int(stop.get("variable_playback_last_offset_pos"))
    assert offset % 160 == 0 and offset < 240000 and stop.get("variable_playback_samples") == "240000"
    assert stop.get("variable_playback_ms") == "30000"  # the whole file's length, as on the wire (X09)
    assert [n for n in header_names(frame) if not n.startswith("variable_")] == [n for n in header_names(frames_of(capture("X09_S2a_event_plain_PLAYBACK_STOP_break.txt"))[0]) if not n.startswith("variable_")]
    # The flushed b.wav never executes: the next EXECUTE is the probe's.
    peer.send(f"api uuid_broadcast {call} {probe} aleg")
    _, execute = peer.event("CHANNEL_EXECUTE")
    assert execute.get("Application-Data") == probe
    peer.event("PLAYBACK_STOP", Playback_File_Path=probe, Playback_Status="done")
    assert sim.playback_log(call) == [PlaybackRecord(b, "flushed", 0), PlaybackRecord(b, "flushed", 0),
                                      PlaybackRecord(long_file, "break", offset), PlaybackRecord(probe, "done", 800)]


def test_break_without_all_stops_only_the_current_file(sim, peer, tmp_path):
    sim.playback_speed = 1.0
    long_file = write_wav(tmp_path / "long.wav", 30.0)
    b = write_wav(tmp_path / "b.wav", 0.1)
    peer.login("event plain PLAYBACK_START PLAYBACK_STOP")
    call = sim.new_call()
    peer.send(f"api uuid_broadcast {call} {long_file} aleg", f"api uuid_broadcast {call} {b} aleg")
    peer.event("PLAYBACK_START", Playback_File_Path=long_file)
    peer.send(f"api uuid_break {call}")
    peer.event("PLAYBACK_STOP", Playback_File_Path=long_file, Playback_Status="break")
    peer.event("PLAYBACK_START", Playback_File_Path=b)
    peer.event("PLAYBACK_STOP", Playback_File_Path=b, Playback_Status="done")
    assert sim.played_files(call) == [long_file, b]


def test_break_while_idle_does_not_affect_later_broadcasts(sim, peer, tmp_path):
    a = write_wav(tmp_path / "a.wav", 0.1)
    peer.login("event plain PLAYBACK_STOP")
    call = sim.new_call()
    peer.send(f"api uuid_break {call} all", f"api uuid_break {call}", f"api uuid_broadcast {call} {a} aleg")
    assert [peer.reply().body for _ in range(3)] == [b"+OK\n", b"+OK\n", b"+OK Message sent\n"]
    peer.event("PLAYBACK_STOP", Playback_File_Path=a, Playback_Status="done")


def test_missing_file_answers_message_sent_then_only_file_not_found(sim, peer, tmp_path):
    a = write_wav(tmp_path / "a.wav", 0.1)
    missing = str(tmp_path / "does-not-exist.wav")
    peer.login("event plain PLAYBACK_START PLAYBACK_STOP CHANNEL_EXECUTE CHANNEL_EXECUTE_COMPLETE")
    call = sim.new_call()
    peer.event("CHANNEL_EXECUTE")
    peer.send(f"api uuid_broadcast {call} {missing} aleg", f"api uuid_broadcast {call} {a} aleg")
    assert peer.reply().body == peer.reply().body == b"+OK Message sent\n"
    _, execute = peer.event()
    frame, complete = peer.event()
    assert (execute.name, execute.get("Application-Data")) == ("CHANNEL_EXECUTE", missing)
    assert (complete.name, complete.get("Application-Response"), complete.get("Application-Data")) == ("CHANNEL_EXECUTE_COMPLETE", "FILE NOT FOUND", missing)
    real = frames_of(capture("X11_S4_event_plain_CHANNEL_EXECUTE_COMPLETE_FILE_NOT_FOUND.txt"))[0]
    assert header_names(frame) == header_names(real)
    _, next_event = peer.event()
    assert (next_event.name, next_event.get("Application-Data")) == ("CHANNEL_EXECUTE", a)  # no PLAYBACK_* for the missing one
    assert sim.playback_log(call)[0] == PlaybackRecord(missing, "not-found", 0)


def test_hangup_mid_file_stops_it_with_done(sim, peer, tmp_path):
    sim.playback_speed = 1.0
    long_file = write_wav(tmp_path / "long.wav", 30.0)
    peer.login("event plain PLAYBACK_START PLAYBACK_STOP CHANNEL_EXECUTE_COMPLETE CHANNEL_HANGUP_COMPLETE")
    call = sim.new_call()
    peer.send(f"api uuid_broadcast {call} {long_file} aleg", f"api uuid_broadcast {call} {long_file} aleg")
    peer.event("PLAYBACK_START")
    peer.send(f"api uuid_kill {call}")
    assert peer.reply().raw == capture("60_api_uuid_kill.txt")
    _, stop = peer.event()
    _, playback_complete = peer.event()
    _, park_complete = peer.event()
    _, hangup = peer.event()
    assert (stop.name, stop.get("Playback-Status")) == ("PLAYBACK_STOP", "done")
    assert (playback_complete.get("Application"), playback_complete.get("Application-Response")) == ("playback", "PLAYBACK ERROR")
    assert (park_complete.get("Application"), park_complete.get("Application-Response")) == ("park", "PLAYBACK ERROR")
    assert hangup.name == "CHANNEL_HANGUP_COMPLETE" and hangup.get("variable_last_arg") == long_file
    assert [r.status for r in sim.playback_log(call)] == ["flushed", "hangup"]


# -- fault injection ---------------------------------------------------------------------------


def test_drop_connections_closes_sockets_without_a_notice(sim, peer):
    peer.login("event plain ALL")
    other = RawPeer(sim.port)
    assert other.next_frame().raw == capture("01_auth_request.txt")
    assert sim.drop_connections() == 2
    assert peer.read_to_eof() == b"" and other.read_to_eof() == b""  # no disconnect-notice
    other.close()
    third = RawPeer(sim.port)
    assert third.next_frame().raw == capture("01_auth_request.txt")  # still listening
    third.close()


def test_inject_raw_arrives_verbatim_in_order_with_events(sim, peer):
    peer.login("event plain DETECTED_SPEECH")
    junk = b"Content-Length: 9\nContent-Type: text/event-plain\n\nnot valid"
    assert sim.inject_raw(junk) == 1
    call = sim.new_call()
    sim.speak(call, "after")
    peer.event("DETECTED_SPEECH")
    assert junk in bytes(peer.received)
    assert bytes(peer.received).index(junk) < bytes(peer.received).index(b"after")


def test_send_event_frame_replays_captures_to_matching_subscribers_only(sim, peer):
    peer.login("event plain CHANNEL_ANSWER")
    speech = capture("40_event_plain_DETECTED_SPEECH_detected-speech.txt")
    answer = capture("31_event_plain_CHANNEL_ANSWER_ivr_leg.txt")
    assert sim.send_event_frame(speech + answer) == 2
    assert peer.next_frame().raw == answer  # the DETECTED_SPEECH went to nobody
    with pytest.raises(NotAnEventFrame):
        sim.send_event_frame(capture("02_auth_reply_ok.txt"))
    with pytest.raises(NotAnEventFrame):
        sim.send_event_frame(answer[:-5])


# -- recording and waiting ---------------------------------------------------------------------


def test_commands_are_recorded_per_connection_and_waited_for(sim, peer):
    peer.login()
    other = RawPeer(sim.port)
    other.send("auth ClueCon", "api uuid_exists x")
    command = sim.wait_for_command("api uuid_exists", timeout_s=READ_TIMEOUT_S)
    assert command.line == "api uuid_exists x" and command.connection_id != sim.commands[0].connection_id
    assert [c.line for c in sim.commands_for(command.connection_id)] == ["auth ClueCon", "api uuid_exists x"]
    assert sim.wait_for_command(lambda c: c.line == "auth ClueCon").connection_id == sim.commands[0].connection_id
    # Each wait returns a command once: the next auth is the other connection's.
    assert sim.wait_for_command("auth ").connection_id == command.connection_id
    with pytest.raises(CommandNotReceived):
        sim.wait_for_command("auth ", timeout_s=0.05)
    assert sim.wait_for_command("auth ", consume=False).connection_id == sim.commands[0].connection_id
    with pytest.raises(CommandNotReceived):
        sim.wait_for_command("api never", timeout_s=0.05)
    other.close()


def test_wait_for_subscription_and_event(sim, peer):
    gevent.spawn(peer.login, "event plain DETECTED_SPEECH")
    info = sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=READ_TIMEOUT_S)
    assert info.subscription.wire_format == "plain" and info.subscription.event_names == {"DETECTED_SPEECH"}
    call = sim.new_call()
    sim.speak(call, "x")
    assert sim.wait_for_event("DETECTED_SPEECH").body == "x"
    with pytest.raises(EventNotEmitted):  # each emitted event is returned once
        sim.wait_for_event("DETECTED_SPEECH", timeout_s=0.05)
    assert sim.wait_for_event("DETECTED_SPEECH", consume=False).body == "x"


def test_esl_client_against_the_simulator(sim, tmp_path):
    wav = write_wav(tmp_path / "reply.wav", 0.1)
    events = []
    answered = gevent.event.Event()

    def on_event(event):
        events.append(event)
        if event.name == "CHANNEL_ANSWER":
            answered.set()

    client = EslClient("127.0.0.1", sim.port, "ClueCon", ("CHANNEL_ANSWER", "DETECTED_SPEECH", "PLAYBACK_STOP"), on_event)
    runner = gevent.spawn(client.run)
    try:
        assert client.wait_connected(READ_TIMEOUT_S)
        call = sim.new_call()
        assert answered.wait(READ_TIMEOUT_S)
        reply = client.send(commands.uuid_broadcast(call, wav))
        assert reply.text == "+OK Message sent\n" and reply.ok
        assert client.send(commands.uuid_exists(call)).text == "true"
        stop = sim.wait_for_event("PLAYBACK_STOP")
        assert stop.get("Playback-File-Path") == wav
        assert sim.wait_for_command(f"api uuid_broadcast {call} {wav} aleg").connection_id == sim.commands[0].connection_id
    finally:
        client.stop()
        runner.join(READ_TIMEOUT_S)


def test_sendmsg_execute_plays_like_a_broadcast_and_hangup_hangs_up(sim, peer, tmp_path):
    a = write_wav(tmp_path / "a.wav", 0.1)
    peer.login("event plain PLAYBACK_STOP CHANNEL_HANGUP_COMPLETE")
    call = sim.new_call()
    peer.sock.sendall(f"sendmsg {call}\ncall-command: execute\nexecute-app-name: playback\nexecute-app-arg: {a}\n\n".encode())
    assert peer.reply().headers["Reply-Text"] == "+OK"
    _, stop = peer.event("PLAYBACK_STOP")
    assert (stop.get("Playback-File-Path"), stop.get("Playback-Status")) == (a, "done")
    peer.sock.sendall(f"sendmsg {DEAD_UUID}\ncall-command: hangup\n\n".encode())
    assert peer.reply().headers["Reply-Text"] == f"-ERR invalid session id [{DEAD_UUID}]"
    peer.sock.sendall(f"sendmsg {call}\ncall-command: hangup\nhangup-cause: NO_ANSWER\n\n".encode())
    assert peer.reply().headers["Reply-Text"] == "+OK"
    _, hangup = peer.event("CHANNEL_HANGUP_COMPLETE")
    assert hangup.get("Hangup-Cause") == "NO_ANSWER" and not sim.call_exists(call)


def test_run_standalone_takes_control_lines_and_prints_the_daemons_commands(tmp_path):
    import subprocess
    import sys

    script = ("from ivr_daemon.logs import configure_logging; configure_logging('WARNING', 'console'); "
              "from ivr_daemon.replay.simulator import run_standalone; raise SystemExit(run_standalone(0, 'ClueCon'))")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
    try:
        with gevent.Timeout(30):
            banner = proc.stdout.readline()
            port = int(re.search(r"127\.0\.0\.1:(\d+)", banner).group(1))
            peer = RawPeer(port)
            peer.login("event plain CHANNEL_ANSWER DETECTED_SPEECH CHANNEL_HANGUP_COMPLETE")
            printed = [proc.stdout.readline().strip() for _ in range(2)]
            assert printed == ["<- [conn 1] auth ***", "<- [conn 1] event plain CHANNEL_ANSWER DETECTED_SPEECH CHANNEL_HANGUP_COMPLETE"]
            proc.stdin.write("call 5550000\n")
            call = proc.stdout.readline().strip()
            _, answer = peer.event("CHANNEL_ANSWER")
            assert (answer.unique_id, answer.get("Caller-Caller-ID-Number")) == (call, "5550000")
            proc.stdin.write("say last hello there\n")
            assert proc.stdout.readline().startswith("DETECTED_SPEECH Event-Sequence ")
            assert peer.event("DETECTED_SPEECH")[1].body == "hello there"
            proc.stdin.write(f"hangup {call}\n")
            assert peer.event("CHANNEL_HANGUP_COMPLETE")[1].unique_id == call
            proc.stdin.write("quit\n")
            assert proc.wait() == 0
            peer.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_api_originate_replies_with_the_a_leg_and_carries_the_variables_like_s8(sim, peer):
    peer.login("event plain CHANNEL_ANSWER")
    sent = capture("S8_originate_origination_uuid_cmd_sent.txt").decode().split("\n\n")[1]
    a_leg = "4be6992c-e225-40a1-8e6f-7578aaf0d2a1"
    peer.send(sent)
    frame, answer = peer.event("CHANNEL_ANSWER")
    assert peer.reply().raw == api_response(f"+OK {a_leg}\n".encode())  # the shape of capture 22
    real = frames_of(capture("X14_S8_event_plain_CHANNEL_ANSWER_ai-b_ivr_leg.txt"))[0]
    assert header_names(frame) == header_names(real)
    real_answer = parse_event(real)
    for name in ("variable_origination_uuid", "variable_ivr_agent", "variable_other_loopback_leg_uuid", "Caller-Caller-ID-Number"):
        assert answer.get(name) == real_answer.get(name), name
    assert answer.unique_id != a_leg and sim.calls() == [answer.unique_id]


def test_module_exists_answers_as_mod_commands_does(sim, peer):
    # mod_commands.c module_exists_function writes "true"/"false" with no newline, the shape of
    # uuid_exists's captured replies (53, 64); no argument writes nothing, which mod_event_socket
    # answers with "-ERR no reply\n".
    peer.login()

    def api(line: str) -> bytes:
        peer.send(line)
        return peer.reply().raw

    assert api("api module_exists mod_vosk") == capture("53_api_uuid_exists_true.txt")
    assert api("api module_exists mod_nonesuch") == capture("64_api_uuid_exists_false.txt")
    assert api("api module_exists") == api_response(b"-ERR no reply\n")
    sim.loaded_modules.discard("mod_vosk")
    assert api("api module_exists mod_vosk") == capture("64_api_uuid_exists_false.txt")
