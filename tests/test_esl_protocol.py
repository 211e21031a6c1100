"""The ESL parser against every raw capture from a real FreeSWITCH, and against bad input."""

import json
import random
from pathlib import Path

import pytest

from ivr_daemon.esl.dedup import EventDeduplicator
from ivr_daemon.esl.protocol import (
    EslEvent,
    Frame,
    FrameParser,
    MalformedEvent,
    MalformedFrame,
    build_json_event,
    build_plain_event,
    encode_header_value,
    parse_event,
    parse_header_lines,
    parse_header_pairs,
)

CAPTURES = Path(__file__).parent / "captures"
IVR_UUID = "03362ffb-115a-4a3d-9eb6-770e2089d43f"
A_LEG_UUID = "7238f352-c251-4b17-9ee4-9b0b82980f46"
JOB_UUID = "88d4bade-239c-48e9-b63f-0fd2dc072561"
UTF8_TEXT = 'héllo wörld ✓ "q" 100%AB'


def frames_of(name: str) -> list[Frame]:
    items = FrameParser().feed((CAPTURES / name).read_bytes())
    assert all(isinstance(i, Frame) for i in items), [i for i in items if isinstance(i, MalformedFrame)]
    return items


def only_frame(name: str) -> Frame:
    frames = frames_of(name)
    assert len(frames) == 1
    return frames[0]


def only_event(name: str) -> EslEvent:
    return parse_event(only_frame(name))


def api_text(name: str) -> str:
    frame = only_frame(name)
    assert frame.content_type == "api/response"
    assert int(frame.headers["Content-Length"]) == len(frame.body)
    return frame.body.decode("utf-8")


def reply_text(name: str) -> str:
    frame = only_frame(name)
    assert frame.content_type == "command/reply"
    assert frame.body == b""
    return frame.headers["Reply-Text"]


# --- one test per capture file -----------------------------------------------------------------


def test_00_fs_cli_stdout_is_not_wire_bytes_and_matches_api_status_shape():
    text = (CAPTURES / "00_fs_cli_x_status_stdout.txt").read_text()
    assert text.startswith("UP 0 years") and "FreeSWITCH (Version 1.11.3-dev  64bit) is ready" in text
    # fs_cli's stdout has no ESL framing: the parser finds no frame in it and keeps it buffered.
    parser = FrameParser()
    items = parser.feed(text.encode())
    assert all(isinstance(i, MalformedFrame) for i in items)


def test_01_auth_request():
    frame = only_frame("01_auth_request.txt")
    assert dict(frame.headers) == {"Content-Type": "auth/request"}
    assert frame.body == b""


def test_02_auth_reply_ok():
    assert reply_text("02_auth_reply_ok.txt") == "+OK accepted"


@pytest.mark.parametrize(
    "name, text",
    [
        ("03_event_plain_subscribe_reply.txt", "+OK event listener enabled plain"),
        ("04_event_json_subscribe_reply.txt", "+OK event listener enabled json"),
        ("05_event_xml_subscribe_reply.txt", "+OK event listener enabled xml"),
        ("06_event_plain_ALL_subscribe_reply.txt", "+OK event listener enabled plain"),
    ],
)
def test_03_to_06_subscribe_replies(name, text):
    assert reply_text(name) == text


def test_07_bad_password_stream():
    frames = frames_of("07_auth_reply_bad_password_full_stream.txt")
    assert [f.content_type for f in frames] == ["auth/request", "command/reply", "text/disconnect-notice"]
    assert frames[1].headers["Reply-Text"] == "-ERR invalid"
    assert frames[2].body == b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"


def test_10_api_status():
    text = api_text("10_api_status.txt")
    assert text.startswith("UP 0 years, 0 days, 0 hours, 1 minute, 35 seconds")
    assert text.endswith("Current Stack Size/Max 240K/8192K\n")


def test_11_show_channels_empty_has_space_and_lf():
    assert api_text("11_api_show_channels_as_json_empty.txt") == '{"row_count": 0}\n'


def test_12_uuid_break_no_such_channel():
    assert api_text("12_api_uuid_break_no_such_channel.txt") == "-ERR No such channel!\n"


def test_13_unknown_api_command():
    assert api_text("13_api_unknown_command.txt") == "-ERR nosuchcommand Command not found!\n"


def test_14_unknown_esl_verb():
    assert reply_text("14_unknown_esl_verb_reply.txt") == "-ERR command not found"


def test_20_bgapi_reply_carries_job_uuid():
    frame = only_frame("20_bgapi_originate_reply.txt")
    assert frame.headers["Reply-Text"] == f"+OK Job-UUID: {JOB_UUID}"
    assert frame.headers["Job-UUID"] == JOB_UUID


def test_21_background_job_body_and_decoded_arg():
    event = only_event("21_event_plain_BACKGROUND_JOB_originate.txt")
    assert event.name == "BACKGROUND_JOB"
    assert event.get("Job-UUID") == JOB_UUID
    assert event.get("Job-Command-Arg", "").startswith("{origination_caller_id_number=5551234}loopback/ai/ivr &playback(")
    assert event.body == f"+OK {A_LEG_UUID}\n"
    assert event.unique_id is None


def test_22_blocking_originate():
    assert api_text("22_api_originate_blocking_reply.txt").startswith("+OK ")


@pytest.mark.parametrize(
    "name, uuid, channel",
    [
        ("30_event_plain_CHANNEL_ANSWER_originating_a_leg.txt", A_LEG_UUID, "loopback/ai-a"),
        ("31_event_plain_CHANNEL_ANSWER_ivr_leg.txt", IVR_UUID, "loopback/ai-b"),
        ("45_event_json_CHANNEL_ANSWER.txt", None, None),
    ],
)
def test_30_31_45_channel_answer(name, uuid, channel):
    event = only_event(name)
    assert event.name == "CHANNEL_ANSWER"
    assert event.body is None
    assert event.get("Answer-State") == "answered"
    assert event.get("FreeSWITCH-IPv6") == "fd00::2"  # URL-decoded once
    if uuid:
        assert event.unique_id == uuid
        assert event.get("Channel-Name") == channel
    else:
        assert event.wire_format == "json" and event.unique_id in (IVR_UUID, A_LEG_UUID)


@pytest.mark.parametrize(
    "name, speech_type, body",
    [
        ("40_event_plain_DETECTED_SPEECH_detected-speech.txt", "detected-speech", "hello world"),
        ("41_event_plain_DETECTED_SPEECH_detected-partial-speech.txt", "detected-partial-speech", "hello"),
        ("43_event_json_DETECTED_SPEECH_detected-speech.txt", "detected-speech", "hello world"),
        ("44_event_json_DETECTED_SPEECH_detected-partial-speech.txt", "detected-partial-speech", "hello"),
        ("46_event_xml_DETECTED_SPEECH_detected-speech.txt", "detected-speech", "hello world"),
        ("47_event_plain_DETECTED_SPEECH_closed.txt", "closed", None),
        ("48_event_json_DETECTED_SPEECH_closed.txt", "closed", None),
        ("90_event_plain_DETECTED_SPEECH_utf8_quotes_percent_body.txt", "detected-speech", UTF8_TEXT),
        ("91_event_json_DETECTED_SPEECH_utf8_quotes_percent_body.txt", "detected-speech", UTF8_TEXT),
    ],
)
def test_40_to_48_90_91_detected_speech_body_is_exact(name, speech_type, body):
    event = only_event(name)
    assert event.name == "DETECTED_SPEECH"
    assert event.get("Speech-Type") == speech_type
    # 90/91 come from a later call of the same session.
    assert event.unique_id == (IVR_UUID if not name.startswith("9") else "546cddc8-d71e-49c2-9223-749ab44d427b")
    assert event.body == body
    # The body is not glued onto the last header (greenswitch's bug, its PR #86).
    assert event.get("Caller-Privacy-Hide-Number") == "false"
    assert event.get("Event-Date-Local", "").count(" ") == 1


def test_90_plain_body_length_counts_bytes():
    event = only_event("90_event_plain_DETECTED_SPEECH_utf8_quotes_percent_body.txt")
    assert int(event.get("Content-Length")) == len(UTF8_TEXT.encode()) == 28


def test_50_to_54_60_64_api_replies():
    assert api_text("50_api_uuid_broadcast_aleg.txt") == "+OK Message sent\n"
    assert api_text("52_api_uuid_break_all.txt") == "+OK\n"
    assert api_text("53_api_uuid_exists_true.txt") == "true"
    assert api_text("54_api_uuid_getvar.txt") == "true"
    assert api_text("60_api_uuid_kill.txt") == "+OK\n"
    assert api_text("64_api_uuid_exists_false.txt") == "false"


def test_51_show_channels_live_json():
    text = api_text("51_api_show_channels_as_json_live.txt")
    assert not text.endswith("\n")
    rows = json.loads(text)
    assert rows["row_count"] == 2
    assert {row["uuid"] for row in rows["rows"]} == {IVR_UUID, A_LEG_UUID}


def test_55_show_channels_plain_csv():
    text = api_text("55_api_show_channels_plain.txt")
    assert text.splitlines()[0].startswith("uuid,direction,created")
    assert "2 total." in text


def test_56_uuid_dump_json():
    data = json.loads(api_text("56_api_uuid_dump_json.txt"))
    assert data["Unique-ID"] == IVR_UUID
    assert data["variable_fire_asr_events"] == "true"


@pytest.mark.parametrize(
    "name, uuid",
    [
        ("61_event_plain_CHANNEL_HANGUP_COMPLETE_ivr_leg.txt", IVR_UUID),
        ("62_event_plain_CHANNEL_HANGUP_COMPLETE_other_leg.txt", A_LEG_UUID),
        ("63_event_json_CHANNEL_HANGUP_COMPLETE_ivr_leg.txt", IVR_UUID),
    ],
)
def test_61_to_63_hangup_complete(name, uuid):
    event = only_event(name)
    assert event.name == "CHANNEL_HANGUP_COMPLETE"
    assert event.unique_id == uuid
    assert event.get("Hangup-Cause") == "NORMAL_CLEARING"
    assert event.body is None


def test_70_command_connection_stream_and_what_was_sent():
    frames = frames_of("70_cmd_connection_full_stream.txt")
    types = [f.content_type for f in frames]
    assert types[0] == "auth/request" and types[-1] == "text/disconnect-notice"
    assert types.count("api/response") == 13 and types.count("command/reply") == 4
    sent = (CAPTURES / "70_cmd_connection_sent.txt").read_bytes().split(b"\n\n")
    assert sent[0] == b"auth ClueCon" and sent[-2] == b"exit" and sent[-1] == b""


@pytest.mark.parametrize(
    "name, wire_format, events, duplicates",
    [
        ("80_plain_events_full_stream.txt", "plain", 103, 48),
        ("80_json_events_full_stream.txt", "json", 103, 48),
        ("80_xml_events_full_stream.txt", "xml", 103, 48),
        ("80_all_events_full_stream.txt", "plain", 171, 48),
    ],
)
def test_80_full_streams_split_and_deduplicated(name, wire_format, events, duplicates):
    frames = frames_of(name)
    parsed = [parse_event(f) for f in frames if f.content_type.startswith("text/event-")]
    assert len(parsed) == events
    assert {e.wire_format for e in parsed} == {wire_format}
    dedup = EventDeduplicator()
    kept = [e for e in parsed if not dedup.is_duplicate(e)]
    assert len(parsed) - len(kept) == duplicates
    finals = [e.body for e in kept if e.get("Speech-Type") == "detected-speech"]
    assert finals == ["hello world"]  # answered once, not twice


def test_80_stream_is_not_in_sequence_order_and_dedup_does_not_care():
    frames = frames_of("80_all_events_full_stream.txt")
    sequences = [parse_event(f).sequence for f in frames if f.content_type == "text/event-plain"]
    assert sequences != sorted(sequences)


def test_92_uuid_dump_shows_lossy_url_encoding():
    body = only_frame("92_api_uuid_dump_plain_with_special_var.txt").body.decode()
    raw = parse_header_lines(body.split("\n\n")[0], url_decoded=False)
    assert raw["variable_ivr_test_var"] == "h%C3%A9llo%20100%AB%2050%25zz%20a%3Ab/c%26d%3De%5Cf"
    decoded = parse_header_lines(body.split("\n\n")[0], url_decoded=True)
    # "%AB" was never encoded by FreeSWITCH, so decoding it cannot give "%AB" back.
    assert decoded["variable_ivr_test_var"] == "héllo 100\ufffd 50%zz a:b/c&d=e\\f"
    assert encode_header_value("héllo 100%AB 50%zz a:b/c&d=e\\f") == raw["variable_ivr_test_var"]


def test_95_originate_app_args_cut_at_first_paren():
    event = only_event("95_event_plain_CHANNEL_EXECUTE_originate_ampersand_app_paren_truncation.txt")
    assert event.name == "CHANNEL_EXECUTE"
    assert event.get("Application") == "playback"
    assert event.get("Application-Data") == "tone_stream://%(1000,0,440"


# --- playback/ captures ------------------------------------------------------------------------

PLAYBACK_STREAMS = sorted(p.name for p in (CAPTURES / "playback").glob("S*_*.txt") if not p.name.endswith(".times.txt"))


@pytest.mark.parametrize("name", PLAYBACK_STREAMS)
def test_playback_streams_frame_cleanly(name):
    data = (CAPTURES / "playback" / name).read_bytes()
    items = FrameParser().feed(data)
    if name.endswith("_cmd_sent.txt"):
        # What the client sent is commands, not frames: every one is a single line.
        commands = [c for c in data.split(b"\n\n") if c]
        assert commands[0] == b"auth ClueCon" and all(b"\n" not in c for c in commands)
        return
    assert items and all(isinstance(i, Frame) for i in items)
    for frame in items:
        if frame.content_type.startswith("text/event-"):
            event = parse_event(frame)
            assert event.name
            if event.name.startswith("PLAYBACK_"):
                assert event.get("Playback-File-Path") and event.unique_id


@pytest.mark.parametrize(
    "name, event_name, status, path",
    [
        ("X02_S1_event_plain_PLAYBACK_START_a_wav.txt", "PLAYBACK_START", None, "/tmp/a.wav"),
        ("X03_S1_event_plain_PLAYBACK_STOP_a_wav_done.txt", "PLAYBACK_STOP", "done", "/tmp/a.wav"),
        ("X05_S1_event_json_PLAYBACK_START_b_wav.txt", "PLAYBACK_START", None, "/tmp/b.wav"),
        ("X06_S1_event_json_PLAYBACK_STOP_b_wav_done.txt", "PLAYBACK_STOP", "done", "/tmp/b.wav"),
        ("X09_S2a_event_plain_PLAYBACK_STOP_break.txt", "PLAYBACK_STOP", "break", "/tmp/a.wav"),
        ("X10_S2a_event_json_PLAYBACK_STOP_break.txt", "PLAYBACK_STOP", "break", "/tmp/a.wav"),
    ],
)
def test_playback_events(name, event_name, status, path):
    event = parse_event(FrameParser().feed((CAPTURES / "playback" / name).read_bytes())[0])
    assert event.name == event_name
    assert event.get("Playback-File-Path") == path
    assert event.get("Playback-Status") == status


@pytest.mark.parametrize(
    "name, event_name, check",
    [
        ("X01_S1_event_plain_CHANNEL_EXECUTE_playback_via_broadcast.txt", "CHANNEL_EXECUTE", ("Application", "playback")),
        ("X04_S1_event_plain_CHANNEL_EXECUTE_COMPLETE_playback_FILE_PLAYED.txt", "CHANNEL_EXECUTE_COMPLETE", ("Application-Response", "FILE PLAYED")),
        ("X07_S1_event_plain_ALL_COMMAND_then_PRIVATE_COMMAND_two_Event-Name.txt", "COMMAND", ("Event-Sequence", "805")),
        ("X08_S1_event_plain_CHANNEL_EXECUTE_COMPLETE_park_at_hangup_stale_response.txt", "CHANNEL_EXECUTE_COMPLETE", ("Application", "park")),
        ("X11_S4_event_plain_CHANNEL_EXECUTE_COMPLETE_FILE_NOT_FOUND.txt", "CHANNEL_EXECUTE_COMPLETE", ("Application-Response", "FILE NOT FOUND")),
        ("X12_S4_event_json_CHANNEL_EXECUTE_COMPLETE_FILE_NOT_FOUND.txt", "CHANNEL_EXECUTE_COMPLETE", ("Application-Response", "FILE NOT FOUND")),
        ("X13_S8_event_plain_CHANNEL_ANSWER_ai-a_origination_uuid_leg.txt", "CHANNEL_ANSWER", ("variable_ivr_agent", "sales")),
        ("X14_S8_event_plain_CHANNEL_ANSWER_ai-b_ivr_leg.txt", "CHANNEL_ANSWER", ("Channel-Name", "loopback/ai-b")),
        ("X15_S8_event_json_CHANNEL_ANSWER_ai-b_ivr_leg.txt", "CHANNEL_ANSWER", ("Channel-Name", "loopback/ai-b")),
    ],
)
def test_playback_single_events(name, event_name, check):
    frame = FrameParser().feed((CAPTURES / "playback" / name).read_bytes())[0]
    event = parse_event(frame)
    assert event.name == event_name
    assert event.get(check[0]) == check[1]


def test_repeated_headers_are_kept_in_order_by_pair_parser():
    frame = FrameParser().feed((CAPTURES / "playback" / "X07_S1_event_plain_ALL_COMMAND_then_PRIVATE_COMMAND_two_Event-Name.txt").read_bytes())[0]
    pairs = parse_header_pairs(frame.body.decode().split("\n\n")[0], url_decoded=True)
    assert [v for k, v in pairs if k == "Event-Name"] == ["COMMAND", "PRIVATE_COMMAND"]
    assert build_plain_event(pairs) == frame.raw


# --- streams cut anywhere ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["80_plain_events_full_stream.txt", "80_json_events_full_stream.txt", "70_cmd_connection_full_stream.txt"])
def test_stream_cut_at_arbitrary_offsets_gives_same_frames(name):
    data = (CAPTURES / name).read_bytes()
    whole = [f.raw for f in FrameParser().feed(data)]
    rng = random.Random(1234)
    for _ in range(5):
        parser, got, pos = FrameParser(), [], 0
        while pos < len(data):
            step = rng.choice([1, 2, 3, 7, 64, 1000, 4096])
            got.extend(f.raw for f in parser.feed(data[pos : pos + step]))
            pos += step
        assert got == whole
        assert parser.buffered_bytes == 0


def test_every_plain_and_json_event_without_repeats_serialises_back_byte_for_byte():
    checked = 0
    for path in sorted(CAPTURES.glob("8*_events_full_stream.txt")):
        for frame in FrameParser().feed(path.read_bytes()):
            if frame.content_type not in ("text/event-plain", "text/event-json"):
                continue
            body = frame.body.decode()
            if frame.content_type == "text/event-plain":
                pairs = parse_header_pairs(body.split("\n\n")[0], url_decoded=True)
                if len({k for k, _ in pairs}) != len(pairs):
                    continue  # repeated headers: see the pair test above
                event = parse_event(frame)
                assert build_plain_event(pairs, event.body) == frame.raw
            else:
                event = parse_event(frame)
                if body.count('"Hangup-Cause"') > 1:
                    continue
                assert build_json_event(list(event.headers.items()), event.body) == frame.raw
            checked += 1
    assert checked > 200


# --- bad input ---------------------------------------------------------------------------------

GOOD = (CAPTURES / "40_event_plain_DETECTED_SPEECH_detected-speech.txt").read_bytes()


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b"Content-Length: abc\nContent-Type: text/event-plain\n\n", "bad Content-Length"),
        (b"Content-Length: -5\nContent-Type: text/event-plain\n\n", "bad Content-Length"),
        (b"Content-Type: text/event-plain\nthis line has no colon\n\n", "header line without"),
        (b"Content-Length: 2\n\nhi", "no Content-Type"),
        (b"Content-Type: \xff\xfe\n\n", "not UTF-8"),
        # More digits than int() takes (4,300): refused, not a ValueError out of the reader.
        (b"Content-Length: " + b"1" * 5000 + b"\nContent-Type: text/event-plain\n\n", "bad Content-Length"),
    ],
)
def test_malformed_frames_are_reported_and_the_next_frame_still_parses(bad, reason):
    items = FrameParser().feed(bad + GOOD)
    assert isinstance(items[0], MalformedFrame) and reason in items[0].reason
    assert isinstance(items[-1], Frame)
    assert parse_event(items[-1]).body == "hello world"


def test_huge_content_length_is_skipped_without_buffering():
    parser = FrameParser(max_body_bytes=4096)
    items = parser.feed(b"Content-Length: 9000\nContent-Type: text/event-plain\n\n")
    assert isinstance(items[0], MalformedFrame) and "cap" in items[0].reason
    for _ in range(9):
        assert parser.feed(b"x" * 1000) == []
        assert parser.buffered_bytes == 0
    assert isinstance(parser.feed(GOOD)[0], Frame)


def test_endless_header_block_is_bounded():
    parser = FrameParser(max_header_bytes=4096)
    items = []
    for _ in range(10):
        items += parser.feed(b"X-Garbage: " + b"a" * 1000)
    assert any(isinstance(i, MalformedFrame) for i in items)
    assert parser.buffered_bytes <= 4096


@pytest.mark.parametrize(
    "body",
    [
        b"Event-Name: DETECTED_SPEECH\nContent-Length: 50\n\nshort",  # inner length too long
        b"Event-Name: DETECTED_SPEECH\nContent-Length: 4\n\n\xff\xfe\xfd\xfc",  # body not UTF-8
        b"Event-Name: X\nno colon here\n\n",
        b"Event-Name: \xc3\x28\n\n",  # header not UTF-8
    ],
)
def test_malformed_plain_events_raise(body):
    frame = FrameParser().feed(f"Content-Length: {len(body)}\nContent-Type: text/event-plain\n\n".encode() + body)[0]
    with pytest.raises(MalformedEvent):
        parse_event(frame)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"\xff"])
def test_malformed_json_events_raise(body):
    frame = FrameParser().feed(f"Content-Length: {len(body)}\nContent-Type: text/event-json\n\n".encode() + body)[0]
    with pytest.raises(MalformedEvent):
        parse_event(frame)


def test_percent_escapes_decoding_to_crlf_stay_inside_the_value():
    frame = build_plain_event([("Event-Name", "CUSTOM"), ("Caller-Caller-ID-Name", "evil\r\napi uuid_kill x")])
    assert b"\r" not in frame and b"evil%0D%0Aapi%20uuid_kill%20x" in frame
    event = parse_event(FrameParser().feed(frame)[0])
    assert event.get("Caller-Caller-ID-Name") == "evil\r\napi uuid_kill x"


def test_numbers_longer_than_int_takes_are_refused_not_raised():
    assert EslEvent(headers={"Event-Sequence": "7" * 5000}).sequence is None
    inner = b"Event-Name: X\nContent-Length: " + b"1" * 5000 + b"\n\nab"
    frame = FrameParser().feed(b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(inner) + inner)[0]
    with pytest.raises(MalformedEvent):
        parse_event(frame)
