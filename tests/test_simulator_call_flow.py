"""The simulator through a whole call, against tests/captures/dtmf/ and playback/S6: DTMF, both loopback legs parked, transfer, kill."""

from __future__ import annotations

import re
import subprocess
import sys

import gevent

from ivr_daemon.esl.protocol import Frame, parse_event
from test_simulator import (  # noqa: F401  (sim and peer are fixtures)
    CAPTURES,
    DEAD_UUID,
    RawPeer,
    api_response,
    capture,
    captured_event,
    frames_of,
    header_names,
    peer,
    sim,
    variable_names,
)

DTMF_DIR = CAPTURES / "dtmf"
# What FreeSWITCH typed on the captured switch (dtmf/README.md): both legs park, A runs &park().
CAPTURED_ORIGINATE = "api originate {origination_caller_id_number=5551234,ivr_agent=sales}loopback/ai/ivr &park()"
# Headers whose values differ from run to run (uuids, clocks, counters), everything else must match.
VOLATILE = re.compile(
    r"Core-UUID|Event-Date-.*|Event-Sequence|Unique-ID|Channel-Call-UUID|Caller-Unique-ID|Caller-.*-Time"
    r"|variable_(uuid|call_uuid|session_id|other_loopback_leg_uuid)"
)


def dtmf_frame(name: str) -> Frame:
    (frame,) = frames_of((DTMF_DIR / name).read_bytes())
    return frame


def stream_events(name: str, event_name: str) -> list[Frame]:
    frames = frames_of((DTMF_DIR / name).read_bytes())
    return [f for f in frames if f.content_type.startswith("text/event-") and parse_event(f).name == event_name]


def stable_values(frame: Frame) -> dict[str, str]:
    event = parse_event(frame)
    return {name: event.get(name) for name in header_names(frame) if not VOLATILE.fullmatch(name)}


# -- 1. DTMF -------------------------------------------------------------------------------------


def test_dtmf_is_the_captured_frame_on_the_ivr_leg_without_channel_variables(sim, peer):
    peer.login("event plain DTMF")
    json_peer = RawPeer(sim.port)
    try:
        json_peer.login("event json DTMF")
        call = sim.new_call(variables={"ivr_agent": "sales"})
        sim.dtmf(call, "0")
        frame, event = peer.event("DTMF")
        real = dtmf_frame("event_plain_DTMF.txt")
        assert header_names(frame) == header_names(real)
        assert not [name for name in header_names(frame) if name.startswith("variable_")]
        assert stable_values(frame) == stable_values(real)  # DTMF-Source UNKNOWN, DTMF-Duration 2000, line 678...
        assert (event.unique_id, event.get("Channel-Name"), event.get("DTMF-Digit")) == (call, "loopback/ai-b", "0")
        json_frame, _ = json_peer.event("DTMF")
        assert header_names(json_frame) == header_names(stream_events("dtmf_json_stream.txt", "DTMF")[0])
    finally:
        json_peer.close()


def test_each_digit_is_one_dtmf_event_once_in_order_like_the_captured_stream(sim, peer):
    peer.login("event plain DTMF")
    call = sim.new_call()
    sequences = [sim.dtmf(call, digit) for digit in "05#"]
    got = [peer.event("DTMF") for _ in range(3)]
    real = stream_events("dtmf_plain_stream.txt", "DTMF")
    assert [event.get("DTMF-Digit") for _, event in got] == ["0", "5", "#"]
    assert [int(event.get("Event-Sequence")) for _, event in got] == sequences and len(set(sequences)) == 3
    # '#' is URL-encoded on the wire like every value: the frame's bytes say DTMF-Digit: %23.
    assert b"\nDTMF-Digit: %23\n" in got[2][0].body and b"\nDTMF-Digit: %23\n" in real[2].body
    assert [header_names(frame) for frame, _ in got] == [header_names(frame) for frame in real]
    sim.hangup(call)
    assert len([e for e in sim.emitted_events if e.name == "DTMF"]) == 3  # no duplicate delivery


# -- 2. both loopback legs park ----------------------------------------------------------------


def test_captured_originate_parks_both_legs_like_the_capture(sim, peer):
    peer.login("event plain CHANNEL_PARK")
    cmd = RawPeer(sim.port)
    try:
        cmd.login()
        cmd.send(CAPTURED_ORIGINATE)
        a_leg = re.fullmatch(rb"\+OK (\S+)\n", cmd.reply().body).group(1).decode()
    finally:
        cmd.close()
    ivr_frame, ivr = peer.event("CHANNEL_PARK")
    a_frame, a = peer.event("CHANNEL_PARK")
    real_ivr = dtmf_frame("event_plain_CHANNEL_PARK_ivr_leg_with_ivr_agent.txt")
    real_a = dtmf_frame("event_plain_CHANNEL_PARK_loopback_a_leg.txt")
    assert header_names(ivr_frame) == header_names(real_ivr)
    assert header_names(a_frame) == header_names(real_a)
    assert stable_values(ivr_frame) == stable_values(real_ivr)
    assert stable_values(a_frame) == stable_values(real_a)
    assert ivr.get("variable_fire_asr_events") == "true" and a.get("variable_fire_asr_events") is None
    assert ivr.get("variable_ivr_agent") == a.get("variable_ivr_agent") == "sales"
    assert a.unique_id == a_leg and sim.calls() == [ivr.unique_id]
    assert ivr.get("variable_other_loopback_leg_uuid") == a_leg and a.get("variable_other_loopback_leg_uuid") == ivr.unique_id
    assert int(a.get("Event-Sequence")) > int(ivr.get("Event-Sequence"))


def test_bgapi_originate_park_parks_both_legs_but_another_app_only_the_ivr_leg(sim, peer):
    peer.login("event plain CHANNEL_PARK BACKGROUND_JOB")
    peer.send("bgapi originate {origination_caller_id_number=5551234}loopback/ai/ivr &park()")
    parks = [peer.event("CHANNEL_PARK")[1] for _ in range(2)]
    assert [p.get("Channel-Name") for p in parks] == ["loopback/ai-b", "loopback/ai-a"]
    assert peer.event("BACKGROUND_JOB")[1].body == f"+OK {parks[1].unique_id}\n"
    peer.send("bgapi originate {origination_caller_id_number=5551234}loopback/ai/ivr &playback(/tmp/a.wav)")
    _, ivr_only = peer.event("CHANNEL_PARK")
    job = peer.event("BACKGROUND_JOB")[1]
    assert ivr_only.get("Channel-Name") == "loopback/ai-b"
    assert not [e for e in sim.emitted_events if e.name == "CHANNEL_PARK" and e.unique_id == job.body.split()[1]]


def test_new_call_with_a_loopback_a_leg_parks_it_too(sim, peer):
    peer.login("event plain CHANNEL_PARK")
    call = sim.new_call(variables={"ivr_agent": "sales"}, loopback_a_leg=True)
    ivr_frame, ivr = peer.event("CHANNEL_PARK")
    a_frame, a = peer.event("CHANNEL_PARK")
    assert ivr.unique_id == call and a.unique_id == ivr.get("variable_other_loopback_leg_uuid") != call
    assert sorted(header_names(a_frame)) == sorted(header_names(dtmf_frame("event_plain_CHANNEL_PARK_loopback_a_leg.txt")))
    assert (a.get("Channel-Name"), a.get("variable_loopback_leg"), a.get("variable_ivr_agent")) == ("loopback/ai-a", "A", "sales")
    assert a.get("variable_fire_asr_events") is None and ivr.get("variable_fire_asr_events") == "true"
    assert sim.calls() == [call]


def test_a_plain_new_call_parks_only_the_ivr_leg_and_carries_its_variables(sim, peer):
    peer.login("event plain CHANNEL_ANSWER CHANNEL_PARK DTMF")
    call = sim.new_call(variables={"ivr_agent": "sales"})
    _, answer = peer.event("CHANNEL_ANSWER")
    _, park = peer.event("CHANNEL_PARK")
    sim.dtmf(call, "1")
    _, next_event = peer.event()
    assert next_event.name == "DTMF"  # no second CHANNEL_PARK in between
    assert answer.get("variable_ivr_agent") == park.get("variable_ivr_agent") == "sales"
    assert park.unique_id == call and park.get("variable_fire_asr_events") == "true"


def test_dtmf_sent_to_the_a_leg_arrives_on_the_ivr_leg(sim, peer):
    peer.login("event plain CHANNEL_PARK DTMF")
    call = sim.new_call(loopback_a_leg=True)
    peer.event("CHANNEL_PARK")
    _, a = peer.event("CHANNEL_PARK")
    sim.dtmf(a.unique_id, "7")
    _, event = peer.event("DTMF")
    assert (event.unique_id, event.get("Channel-Name"), event.get("DTMF-Digit")) == (call, "loopback/ai-b", "7")


def test_hanging_up_a_loopback_call_hangs_up_both_legs_a_first_like_capture_80(sim, peer):
    peer.login("event plain CHANNEL_PARK CHANNEL_HANGUP_COMPLETE")
    call = sim.new_call(loopback_a_leg=True)
    peer.event("CHANNEL_PARK")
    _, a_park = peer.event("CHANNEL_PARK")
    peer.send(f"api uuid_kill {call} NORMAL_CLEARING")
    a_frame, a = peer.event("CHANNEL_HANGUP_COMPLETE")
    _, ivr = peer.event("CHANNEL_HANGUP_COMPLETE")
    assert (a.unique_id, ivr.unique_id) == (a_park.unique_id, call)
    assert a.get("Hangup-Cause") == ivr.get("Hangup-Cause") == "NORMAL_CLEARING"
    real = frames_of(capture("62_event_plain_CHANNEL_HANGUP_COMPLETE_other_leg.txt"))[0]
    names, real_names = header_names(a_frame), header_names(real)
    assert [n for n in names if not n.startswith("variable_")] == [n for n in real_names if not n.startswith("variable_")]
    hangup_block = real_names[real_names.index("variable_hangup_cause"):]
    hangup_block.remove("variable_last_arg")  # park has no argument
    assert names[-len(hangup_block):] == hangup_block
    assert a.get("variable_last_app") == "park" and a.get("variable_ivr_agent") is None


# -- 3. the interactive CLI ----------------------------------------------------------------------


def test_standalone_cli_sends_dtmf_digit_by_digit_and_lists_it_in_help():
    script = ("from ivr_daemon.logs import configure_logging; configure_logging('WARNING', 'console'); "
              "from ivr_daemon.replay.simulator import run_standalone; raise SystemExit(run_standalone(0, 'ClueCon'))")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
    try:
        with gevent.Timeout(30):
            port = int(re.search(r"127\.0\.0\.1:(\d+)", proc.stdout.readline()).group(1))
            peer_ = RawPeer(port)
            peer_.login("event plain DTMF")
            [proc.stdout.readline() for _ in range(2)]  # the echo of auth and event
            proc.stdin.write("help\n")
            help_lines = []
            while not help_lines or not help_lines[-1].startswith("  quit"):
                help_lines.append(proc.stdout.readline().rstrip("\n"))
            assert any(line.lstrip().startswith("dtmf <uuid|last> <digits>") for line in help_lines), help_lines
            proc.stdin.write("call\n")
            call = proc.stdout.readline().strip()
            proc.stdin.write("dtmf last 0\n")
            proc.stdin.write(f"dtmf {call} 5#\n")
            digits = [peer_.event("DTMF")[1] for _ in range(3)]
            assert [(e.unique_id, e.get("DTMF-Digit")) for e in digits] == [(call, "0"), (call, "5"), (call, "#")]
            printed = [proc.stdout.readline().strip() for _ in range(3)]
            assert all(line.startswith("DTMF Event-Sequence ") for line in printed), printed
            proc.stdin.write("dtmf last 5x\n")
            assert proc.stdout.readline().startswith("error: not a DTMF digit")
            proc.stdin.write("quit\n")
            assert proc.wait() == 0
            peer_.close()
    finally:
        if proc.poll() is None:
            proc.kill()


# -- 4. transfer and kill ------------------------------------------------------------------------


def test_uuid_transfer_answers_like_s6_and_s6b_and_the_call_leaves_the_ivr_context(sim, peer):
    peer.login("event plain CHANNEL_EXECUTE_COMPLETE DETECTED_SPEECH CHANNEL_HANGUP_COMPLETE")
    call = sim.new_call()
    cmd = RawPeer(sim.port)
    try:
        cmd.login()
        cmd.send(f"api uuid_transfer {DEAD_UUID} 1000 XML default")
        assert cmd.reply().body == b"-ERR No such channel!\n"  # S6, dead uuid
        cmd.send(f"api uuid_transfer {call} 1000 XML default")
        assert cmd.reply().raw == api_response(b"+OK\n")  # S6, live uuid
        frame, park_done = peer.event("CHANNEL_EXECUTE_COMPLETE")
        real = captured_event("S6_uuid_transfer_plain.txt", "CHANNEL_EXECUTE_COMPLETE", Application="park")
        assert [n for n in header_names(frame) if not n.startswith("variable_")] == \
            [n for n in header_names(real) if not n.startswith("variable_")]
        assert (park_done.get("Application"), park_done.get("Application-Response")) == ("park", "_none_")
        assert (park_done.get("Caller-Context"), park_done.get("Caller-Destination-Number")) == ("default", "1000")
        assert (park_done.get("Caller-RDNIS"), park_done.get("Caller-Dialplan"), park_done.get("Caller-Profile-Index")) == ("ai", "XML", "2")
        assert park_done.get("Caller-Transfer-Source").endswith(":bl_xfer:1000/default/XML")
        assert park_done.get("variable_transfer_source") == park_done.get("Caller-Transfer-Source")
        assert variable_names(frame)[-4:] == variable_names(real)[-4:]  # ...park, max_forwards, transfer_*
        assert sim.transfers(call) == ["1000 XML default"]
        sim.speak(call, "hello")
        _, speech = peer.event("DETECTED_SPEECH")
        assert speech.get("Caller-Context") == "default"
        cmd.send(f"api uuid_transfer {call} nosuchext XML default")
        assert cmd.reply().raw == api_response(b"+OK\n")  # S6b: the extension is never checked
        assert sim.transfers(call) == ["1000 XML default", "nosuchext XML default"]
        cmd.send(f"api uuid_kill {call} NORMAL_CLEARING")
        assert cmd.reply().raw == capture("60_api_uuid_kill.txt")
    finally:
        cmd.close()
    # Park already ended at the transfer: at hangup only ASR closes and the leg completes (S6).
    _, closed = peer.event()
    assert (closed.name, closed.get("Speech-Type")) == ("DETECTED_SPEECH", "closed")
    hangup_frame, hangup = peer.event("CHANNEL_HANGUP_COMPLETE")
    real_hangup = captured_event("S6_uuid_transfer_plain.txt", "CHANNEL_HANGUP_COMPLETE")
    assert [n for n in header_names(hangup_frame) if not n.startswith("variable_")] == \
        [n for n in header_names(real_hangup) if not n.startswith("variable_")]
    assert (hangup.get("Hangup-Cause"), hangup.get("Caller-Context"), hangup.get("Caller-Destination-Number")) == \
        ("NORMAL_CLEARING", "default", "nosuchext")


def test_uuid_kill_with_a_cause_hangs_up_with_that_cause_like_capture_61(sim, peer):
    peer.login("event plain CHANNEL_HANGUP_COMPLETE")
    first, second = sim.new_call(), sim.new_call()
    for call, cause in ((first, "NORMAL_CLEARING"), (second, "USER_BUSY")):
        peer.send(f"api uuid_kill {call} {cause}")
        assert peer.reply().raw == capture("60_api_uuid_kill.txt")
        frame, hangup = peer.event("CHANNEL_HANGUP_COMPLETE")
        real = frames_of(capture("61_event_plain_CHANNEL_HANGUP_COMPLETE_ivr_leg.txt"))[0]
        assert [n for n in header_names(frame) if not n.startswith("variable_")] == \
            [n for n in header_names(real) if not n.startswith("variable_")]
        assert (hangup.unique_id, hangup.get("Hangup-Cause"), hangup.get("variable_hangup_cause")) == (call, cause, cause)
        assert not sim.call_exists(call)
    peer.send("api show channels as json")
    assert peer.reply().raw == capture("11_api_show_channels_as_json_empty.txt")


def test_bgapi_originate_to_a_user_runs_the_ivr_extension_on_the_answered_leg_or_fails_like_capture_21(sim, peer):
    from test_simulator import frames_of, header_names

    peer.login("event plain BACKGROUND_JOB CHANNEL_ANSWER CHANNEL_PARK")
    peer.send("bgapi originate {origination_uuid=4be6992c-e225-40a1-8e6f-7578aaf0d2a1,ivr_agent=sales,"
              "customer_name='Ann Lee'}user/1001 ai XML ivr")
    job = peer.next_frame().headers["Job-UUID"]
    frame, failed = peer.event("BACKGROUND_JOB")
    assert header_names(frame) == header_names(frames_of(capture("21_event_plain_BACKGROUND_JOB_originate.txt"))[0])
    assert (failed.get("Job-UUID"), failed.body) == (job, "-ERR USER_NOT_REGISTERED\n")
    assert sim.calls() == []
    sim.registered_users.add("1001")
    peer.send("bgapi originate {origination_uuid=4be6992c-e225-40a1-8e6f-7578aaf0d2a1,ivr_agent=sales,"
              "customer_name='Ann Lee'}user/1001 ai XML ivr")
    job = peer.next_frame().headers["Job-UUID"]
    _, answer = peer.event("CHANNEL_ANSWER")
    _, park = peer.event("CHANNEL_PARK")
    _, done = peer.event("BACKGROUND_JOB")
    assert (done.get("Job-UUID"), done.body) == (job, "+OK 4be6992c-e225-40a1-8e6f-7578aaf0d2a1\n")
    assert answer.unique_id == park.unique_id == "4be6992c-e225-40a1-8e6f-7578aaf0d2a1"
    # The quotes group the value and are dropped (switch_separate_string), as FreeSWITCH does.
    assert park.get("variable_customer_name") == "Ann Lee" and park.get("variable_ivr_agent") == "sales"
    assert park.get("variable_fire_asr_events") == "true" and park.get("Caller-Context") == "ivr"
