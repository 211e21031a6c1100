"""The connection against the simulator: auth, subscribe, reconnect, fail fast, bad frames."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest
from structlog.testing import capture_logs

from harness import wait_until
from ivr_daemon.daemon import SUBSCRIBED_EVENTS
from ivr_daemon.esl import commands
from ivr_daemon.esl.connection import AuthenticationFailed, EslClient, NotConnectedError
from ivr_daemon.replay.simulator import FreeswitchSimulator

CAPTURES = Path(__file__).parent / "captures"


@contextlib.contextmanager
def running_client(sim, events, **kwargs):
    """A client connected to the simulator in its own greenlet; stopped (with exit) after."""
    client = client_for(sim, events, **kwargs)
    runner = gevent.spawn(client.run)
    try:
        assert client.wait_connected(5)
        yield client
    finally:
        client.stop()
        runner.join(5)
    assert runner.dead


def client_for(sim, events, password="ClueCon", **kwargs):
    return EslClient("127.0.0.1", sim.port, password, SUBSCRIBED_EVENTS, events.append, **kwargs)


def subscriptions(sim):
    return [c for c in sim.commands if c.line.startswith("event plain ")]


def test_connects_authenticates_subscribes_and_receives_bodies():
    events = []
    with FreeswitchSimulator() as sim:
        with running_client(sim, events) as client:
            assert [c.line for c in sim.commands[:2]] == ["auth ClueCon", "event plain " + " ".join(SUBSCRIBED_EVENTS)]
            call = sim.new_call()
            sim.speak(call, "hello world")
            wait_until(lambda: any(e.body == "hello world" for e in events))
            speech = [e for e in events if e.name == "DETECTED_SPEECH"]
            assert speech[0].unique_id == call and speech[0].get("Speech-Type") == "detected-speech"
            reply = client.send(commands.uuid_broadcast(call, "/tmp/x.wav"))
            assert reply.text == "+OK Message sent\n" and reply.ok
            reply = client.send(commands.uuid_break("00000000-0000-0000-0000-000000000000"))
            assert reply.text == "-ERR No such channel!\n" and not reply.ok
        assert sim.commands[-1].line == "exit"


def test_reconnects_and_resubscribes_within_two_seconds_after_the_socket_dies():
    events = []
    with FreeswitchSimulator() as sim, running_client(sim, events) as client, capture_logs() as logs:
        for drop in range(3):
            sim.drop_connections()
            wait_until(lambda: len(subscriptions(sim)) == drop + 2, timeout_s=5)
            wait_until(lambda: client.connected)
        # Each loss waits the first step of the backoff (0.5 s), not a grown one: the schedule
        # starts again after every successful connection.
        lost = [line for line in logs if line["event"] == "esl_connection_lost"]
        assert [line["retry_in_s"] for line in lost] == [0.5, 0.5, 0.5]
        call = sim.new_call()
        sim.speak(call, "still here")
        wait_until(lambda: any(e.body == "still here" for e in events))


def test_backoff_doubles_to_the_cap_while_the_switch_is_down():
    with FreeswitchSimulator() as sim:
        port = sim.port
    # Nothing listens on the port now: every attempt is refused and retried later.
    sleeps = []

    def recording_sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 7:
            client.stop()

    client = EslClient("127.0.0.1", port, "ClueCon", SUBSCRIBED_EVENTS, lambda e: None, sleep=recording_sleep)
    client.run()
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_wrong_password_raises_authentication_failed_without_retrying():
    with FreeswitchSimulator(password="secret") as sim:
        client = client_for(sim, [], password="wrong")
        with pytest.raises(AuthenticationFailed) as caught:
            client.run()
        assert "-ERR invalid" in str(caught.value)
        assert [c.line for c in sim.commands] == ["auth wrong"]


def test_command_while_disconnected_fails_fast():
    with FreeswitchSimulator() as sim:
        client = client_for(sim, [])
        started = time.monotonic()
        with pytest.raises(NotConnectedError):
            client.send(commands.status())
        runner = gevent.spawn(client.run)
        assert client.wait_connected(5)
        sim.drop_connections()
        wait_until(lambda: not client.connected)
        with pytest.raises(NotConnectedError):
            client.send(commands.status())
        assert time.monotonic() - started < 3
        client.stop()
        runner.join(5)


def test_malformed_frames_are_logged_and_skipped_and_the_connection_lives_on(caplog):
    events, malformed = [], []
    with FreeswitchSimulator() as sim, running_client(sim, events, on_malformed=malformed.append) as client:
        good = (CAPTURES / "40_event_plain_DETECTED_SPEECH_detected-speech.txt").read_bytes()
        bad_length = b"Content-Length: 12x\nContent-Type: text/event-plain\n\n"
        not_utf8 = b"Content-Length: 40\nContent-Type: text/event-plain\n\nEvent-Name: DETECTED_SPEECH\nX: \xff\xfe\xfd\n\n"
        no_headers = b"Content-Length: 5\n\nhello"
        bad_inner = b"Content-Length: 30\nContent-Type: text/event-plain\n\nEvent-Name: X\nno colon line\n\n"
        sim.inject_raw(bad_length + not_utf8 + no_headers + bad_inner + good)
        wait_until(lambda: any(e.body == "hello world" for e in events))
        assert len(malformed) == 4
        assert any("esl_malformed" in str(r.msg) for r in caplog.records)
        assert client.send(commands.status()).text.startswith("UP ")


def test_each_connection_reads_its_own_twice_sent_events():
    """Two connections to one switch get the same bytes: a DETECTED_SPEECH sent twice, as while
    parked. Each reads both copies right, the second off its own first one (the very body object:
    the reader's repeat shortcut), never off the other connection's (which a parse per copy, or a
    shortcut shared by the connections, would show)."""
    speech = (CAPTURES / "40_event_plain_DETECTED_SPEECH_detected-speech.txt").read_bytes()
    events_a, events_b = [], []
    with FreeswitchSimulator() as sim, running_client(sim, events_a), running_client(sim, events_b):
        wait_until(lambda: len(subscriptions(sim)) == 2)
        sim.inject_raw(speech + speech)  # to every subscribed connection
        wait_until(lambda: len(events_a) == 2 and len(events_b) == 2)
    for events in (events_a, events_b):
        assert [(e.name, e.body) for e in events] == [("DETECTED_SPEECH", "hello world")] * 2
        assert dict(events[1].headers) == dict(events[0].headers)
        assert events[1].body is events[0].body
    assert events_b[0].body is not events_a[0].body


def _daemon_env(sim, tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "LOG_", "HTTP_"))}
    env.update({"FREESWITCH_PORT": str(sim.port), "TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(tmp_path / "tts"),
                "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "GREETING": "", "SILENCE_TIMEOUT_S": "0",
                "HTTP_PORT": "0"})
    env.update(extra)
    return env


def _ivr_daemon():
    return [str(Path(sys.executable).parent / "ivr-daemon"), "--env-file", "/nonexistent/.env"]


def test_cli_run_logs_events_with_call_uuid_reconnects_and_stops_on_sigterm(tmp_path):
    log_path = tmp_path / "daemon.log"
    with FreeswitchSimulator() as sim, open(log_path, "wb") as log_file:
        proc = subprocess.Popen(_ivr_daemon() + ["run"], env=_daemon_env(sim, tmp_path), stderr=log_file, stdout=log_file)
        try:
            wait_until(lambda: len(subscriptions(sim)) == 1, timeout_s=60)
            call = sim.new_call()
            sim.hangup(call)
            wait_until(lambda: b"call_hangup" in log_path.read_bytes(), timeout_s=10)
            sim.drop_connections()
            wait_until(lambda: len(subscriptions(sim)) == 2, timeout_s=5)
            lost = [json.loads(line) for line in log_path.read_bytes().splitlines() if b"esl_connection_lost" in line]
            assert [line["retry_in_s"] for line in lost] == [0.5]
            proc.terminate()
            assert proc.wait(10) == 0
        finally:
            proc.kill()
    text = log_path.read_text()
    assert "esl_default_password" in text
    call_lines = [line for line in text.splitlines() if call in line]
    assert any('"call_uuid": "%s"' % call in line for line in call_lines)
    assert "esl_connection_lost" in text


def test_cli_run_with_wrong_password_exits_3_with_one_clear_line(tmp_path):
    with FreeswitchSimulator(password="secret") as sim:
        result = subprocess.run(_ivr_daemon() + ["run"], env=_daemon_env(sim, tmp_path, FREESWITCH_PASSWORD="wrong"),
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    errors = [line for line in result.stderr.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1 and "esl_authentication_failed" in errors[0] and "FREESWITCH_PASSWORD" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_switch_that_stops_reading_does_not_hold_the_writer_for_good():
    import gevent.server

    from ivr_daemon.esl.connection import CommandOutcomeUnknown, CommandTimedOut, EslConnection

    accepted = []

    def handle(sock, address):
        # Greets, accepts the password, then never reads again.
        sock.sendall(b"Content-Type: auth/request\n\n")
        sock.recv(4096)
        sock.sendall(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n")
        accepted.append(sock)
        gevent.sleep(30)

    server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        conn = EslConnection("127.0.0.1", server.server_port, "ClueCon", lambda e: None, command_timeout_s=0.5)
        conn.connect()
        started = time.monotonic()
        big = commands.uuid_setvar("03362ffb-115a-4a3d-9eb6-770e2089d43f", "note", "x" * 60_000)
        outcome = None
        # 60 kB lines fill both kernel buffers long before anyone reads them; each unanswered
        # one times out on its reply first, until a write itself cannot go through.
        for _ in range(1000):
            try:
                conn.send(big, timeout_s=0.01)
            except CommandTimedOut:
                continue
            except CommandOutcomeUnknown as exc:
                outcome = exc
                break
        assert outcome is not None and "socket not writable" in str(outcome) and len(str(outcome)) < 300
        assert time.monotonic() - started < 5 and conn.closed
        with pytest.raises(NotConnectedError):
            conn.send(commands.status())
    finally:
        server.stop()
