"""ivr-daemon asr-server: driven by a client that does what mod_vosk does on the wire, by one that
does what vosk-server's examples do, and by hostile ones; the pocketsphinx engine decodes
Piper-spoken English throughout."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import gevent
import pytest
from wsproto.events import CloseConnection, Ping, Pong

from asr_clients import (CAPTURED_LIBKS_CLOSE_FRAME, FRAME_BYTES, FRAME_INTERVAL_S, WsClient, ModVoskClient, load_voice,
                         spoken, transcribe_like_vosk_examples, words_of)
from ivr_daemon.asr import modvosk_client
from ivr_daemon.asr.base import AsrEngine, AsrStream
from ivr_daemon.asr.pocketsphinx import PocketsphinxEngine
from ivr_daemon.asr.server import AsrServer

REPO = Path(__file__).resolve().parent.parent
HELP = "I need help with my bill"
HELP_WORDS = {"help", "bill"}
OPERATOR = "I want to speak to an operator"
OPERATOR_WORDS = {"want", "operator"}


@pytest.fixture(scope="module")
def voice():
    return load_voice()


@pytest.fixture(scope="module")
def sphinx():
    return PocketsphinxEngine()


@pytest.fixture(scope="module")
def help_pcm(voice) -> bytes:
    return spoken(voice, HELP, 8000, lead_s=0.3, tail_s=0.6)


@pytest.fixture
def server(sphinx):
    with AsrServer(sphinx, port=0) as running:
        yield running


def asr_lines(caplog, level=logging.INFO) -> list[tuple[str, dict]]:
    """(level, event dict) of every line the asr-server logged at ``level`` or above."""
    return [(r.levelname, r.msg) for r in caplog.records
            if r.name.startswith("ivr_daemon.asr") and r.levelno >= level and isinstance(r.msg, dict)]


def talk_like_mod_vosk(server: AsrServer, pcm: bytes, speed: float = 5.0):
    client = ModVoskClient(*server.address, speed=speed)
    run = client.talk(pcm)
    client.hang_up()
    return run


def assert_heard(run, key_words: set[str]) -> None:
    # Every 3,200-byte frame had its one reply, each a vosk-server JSON object.
    assert run.frames_sent and len(run.replies) == run.frames_sent
    for reply in run.replies:
        assert set(json.loads(reply)) in ({"partial"}, {"text"}, {"result", "text"}), reply
    (final,) = run.finals
    assert key_words <= words_of(final.text), final.text
    # Partials came while the caller spoke, before the final.
    assert run.partials and run.partials[0].at_s < final.at_s
    assert all(h.text for h in run.heard)  # mod_vosk drops the empty ones


# --- mod_vosk ----------------------------------------------------------------------------------


def test_the_mod_vosk_client_sends_what_the_capture_shows():
    # The package's client (the simulator's mod_vosk) against tests/captures/mod_vosk-websocket/.
    assert (modvosk_client.FRAME_BYTES, modvosk_client.FRAME_INTERVAL_S) == (FRAME_BYTES, FRAME_INTERVAL_S)
    assert modvosk_client.LIBKS_CLOSE_FRAME == CAPTURED_LIBKS_CLOSE_FRAME


def test_a_mod_vosk_stream_gets_partials_then_the_final_and_ends_quietly(server, help_pcm, caplog):
    run = talk_like_mod_vosk(server, help_pcm)

    assert_heard(run, HELP_WORDS)
    (summary,) = server.wait_for_closed_streams(1)
    assert (summary.reason, summary.path, summary.messages, summary.finals) == \
           ("client_closed_malformed", "/", run.frames_sent, 1)
    assert summary.audio_s == pytest.approx(run.frames_sent * FRAME_BYTES / 2 / 8000)
    # libks's malformed close frame is how every call ends: no warning, no error.
    assert not asr_lines(caplog, logging.WARNING)
    closed = [line for level, line in asr_lines(caplog) if line["event"] == "asr_stream_closed"]
    assert closed[0]["reason"] == "client_closed_malformed" and "asr_stream" in closed[0]
    # Callers' words stay out of INFO logs unless LOG_TRANSCRIPTS (a length and a hash instead).
    (final_line,) = [line for level, line in asr_lines(caplog) if line["event"] == "asr_final"]
    assert "text" not in final_line and final_line["text_chars"] == len(run.finals[0].text)


def test_concurrent_streams_each_hear_their_own_caller(server, voice, help_pcm):
    operator_pcm = spoken(voice, OPERATOR, 8000, lead_s=0.3, tail_s=0.6)
    callers = [gevent.spawn(talk_like_mod_vosk, server, pcm, 3.0) for pcm in (help_pcm, operator_pcm, help_pcm)]
    gevent.joinall(callers, raise_error=True)

    help_run, operator_run, help_again = (caller.value for caller in callers)
    assert_heard(help_run, HELP_WORDS)
    assert_heard(operator_run, OPERATOR_WORDS)
    assert_heard(help_again, HELP_WORDS)
    assert not HELP_WORDS & words_of(operator_run.finals[0].text)
    assert [s.reason for s in server.wait_for_closed_streams(3)] == ["client_closed_malformed"] * 3


# --- vosk-server's own clients -----------------------------------------------------------------


def test_a_vosk_server_style_client_sets_the_rate_and_ends_with_eof(server, voice):
    pcm = spoken(voice, "can you tell me the opening hours", 16000, lead_s=0.3, tail_s=0.0)
    run = transcribe_like_vosk_examples(*server.address, pcm, 16000, chunk_bytes=8000)

    assert len(run.replies) == -(-len(pcm) // 8000) + 1  # one per chunk, and the final for eof
    assert all(set(reply) == {"partial"} for reply in run.replies[:-1])
    assert {"tell", "opening", "hours"} <= words_of(run.final["text"]), run.final
    assert [entry["word"] for entry in run.final["result"]] == run.final["text"].split()
    assert run.close is not None and run.close.code == 1000
    (summary,) = server.wait_for_closed_streams(1)
    assert (summary.reason, summary.sample_rate_hz) == ("eof", 16000)


def test_eof_before_any_audio_is_an_empty_final(server):
    client = WsClient(*server.address)
    client.send_text('{"eof" : 1}')
    assert json.loads(client.recv_message()) == {"text": ""}
    close = client.recv_message()
    assert isinstance(close, CloseConnection) and close.code == 1000
    client.shut()


def test_a_client_that_trickles_bytes_instead_of_answering_our_close_is_let_go(server):
    """After eof the server closes and waits a moment for the client's close frame: a client that
    sends a byte every 50 ms instead must not keep the stream open past that moment."""
    from wsproto.frame_protocol import FrameProtocol

    client = WsClient(*server.address)
    client.send_text('{"eof" : 1}')
    assert json.loads(client.recv_message()) == {"text": ""}
    assert isinstance(client.recv_message(), CloseConnection)
    frame = FrameProtocol(client=True, extensions=[]).send_data(bytes(3200), fin=True)
    for at in range(len(frame)):
        try:
            client.sock.sendall(frame[at:at + 1])
        except OSError:
            break
        if server.closed_streams:
            break
        gevent.sleep(0.05)
    else:
        pytest.fail("the whole frame went out a byte at a time and the stream was never let go")
    client.shut()
    assert server.wait_for_closed_streams(1)[0].reason == "eof"


def test_config_is_taken_before_audio_only_and_unknown_keys_are_ignored(server, help_pcm, caplog):
    client = WsClient(*server.address)
    client.send_text(json.dumps({"config": {"sample_rate": 8000, "words": 1, "phrase_list": ["bill"]}}))
    client.send_bytes(help_pcm[:3200])
    assert "partial" in json.loads(client.recv_message())
    client.send_text(json.dumps({"config": {"sample_rate": 16000}}))  # too late: ignored
    client.send_bytes(help_pcm[3200:])
    client.send_text('{"eof" : 1}')
    reply = json.loads(client.recv_message())
    while "partial" in reply:
        reply = json.loads(client.recv_message())
    assert HELP_WORDS <= words_of(reply["text"])  # still decoded at 8 kHz
    client.shut()
    (summary,) = server.wait_for_closed_streams(1)
    assert summary.sample_rate_hz == 8000
    assert [line["event"] for _, line in asr_lines(caplog, logging.WARNING)] == ["asr_config_after_audio"]


def test_a_well_formed_close_and_a_ping_are_answered(server):
    client = WsClient(*server.address)
    client.sock.sendall(client.ws.send(Ping(payload=b"are you there")))
    pong = client.next_event()
    assert isinstance(pong, Pong) and pong.payload == b"are you there"
    client.close(1000)
    reply = client.recv_message()
    assert isinstance(reply, CloseConnection) and reply.code == 1000
    client.shut()
    (summary,) = server.wait_for_closed_streams(1)
    assert summary.reason == "client_closed"


def test_stopping_the_server_closes_open_streams_as_going_away(sphinx):
    server = AsrServer(sphinx, port=0)
    server.start()
    client = WsClient(*server.address)
    server.stop(timeout_s=0.1)
    close = client.recv_message()
    assert isinstance(close, CloseConnection) and close.code == 1001
    assert server.closed_streams[0].reason == "server_stopped"
    client.shut()


# --- hostile clients ----------------------------------------------------------------------------


def with_a_caller_alongside(server: AsrServer, pcm: bytes, hostile) -> None:
    """Run ``hostile()`` while a mod_vosk caller talks on the same server: the caller is unaffected."""
    caller = gevent.spawn(talk_like_mod_vosk, server, pcm, 3.0)
    hostile()
    assert_heard(caller.get(timeout=120), HELP_WORDS)


def raw_connection(server: AsrServer) -> socket.socket:
    return socket.create_connection(server.address, timeout=30)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_garbage_instead_of_a_handshake_is_refused(server, help_pcm, caplog):
    def hostile():
        sock = raw_connection(server)
        sock.sendall(random.Random(12).randbytes(4096) + b"\r\n\r\n")
        answer = read_until_closed(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 400")

    with_a_caller_alongside(server, help_pcm, hostile)
    reasons = sorted(s.reason for s in server.wait_for_closed_streams(2))
    assert reasons == ["client_closed_malformed", "handshake_failed"]
    assert ("WARNING", "asr_handshake_failed") in [(level, line["event"]) for level, line in asr_lines(caplog)]


def test_garbage_after_the_handshake_is_a_protocol_error(server, help_pcm, caplog):
    def hostile():
        client = WsClient(*server.address)
        client.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not a WebSocket frame
        close = client.recv_message()
        assert isinstance(close, CloseConnection) and close.code == 1002
        client.shut()

    with_a_caller_alongside(server, help_pcm, hostile)
    assert "protocol_error" in [s.reason for s in server.wait_for_closed_streams(2)]
    assert "asr_protocol_error" in [line["event"] for _, line in asr_lines(caplog, logging.WARNING)]


def test_a_frame_over_1_mib_closes_the_stream(server, help_pcm, caplog):
    def hostile():
        client = WsClient(*server.address)
        try:
            client.send_bytes(bytes(2 << 20))
        except OSError:
            pass  # the server may close before the last of it is written
        close = client.recv_message()  # 1009, or 1006 when the unread rest made the close a reset
        assert isinstance(close, CloseConnection) and close.code in (1006, 1009)
        client.shut()

    with_a_caller_alongside(server, help_pcm, hostile)
    too_big = [s for s in server.wait_for_closed_streams(2) if s.reason == "too_big"]
    assert too_big and too_big[0].messages == 0  # nothing of it was decoded
    assert "asr_message_too_big" in [line["event"] for _, line in asr_lines(caplog, logging.WARNING)]


def test_a_text_frame_that_is_not_json_closes_the_stream(server, help_pcm, caplog):
    def hostile():
        client = WsClient(*server.address)
        client.send_text("hello, is this thing on?")
        close = client.recv_message()
        assert isinstance(close, CloseConnection) and close.code == 1007
        client.shut()

    with_a_caller_alongside(server, help_pcm, hostile)
    assert "bad_message" in [s.reason for s in server.wait_for_closed_streams(2)]
    assert "asr_bad_message" in [line["event"] for _, line in asr_lines(caplog, logging.WARNING)]


@pytest.mark.parametrize("rate", [4000, "fast", True, 1e9])
def test_a_config_with_an_impossible_rate_closes_the_stream(server, rate):
    client = WsClient(*server.address)
    client.send_text(json.dumps({"config": {"sample_rate": rate}}))
    close = client.recv_message()
    assert isinstance(close, CloseConnection) and close.code == 1007
    client.shut()
    assert server.wait_for_closed_streams(1)[0].reason == "bad_message"


def test_idle_clients_are_closed_after_the_idle_timeout(sphinx, help_pcm, caplog):
    with AsrServer(sphinx, port=0, idle_timeout_s=0.5) as server:
        def hostile():
            client = WsClient(*server.address)  # says nothing after the handshake
            close = client.recv_message()
            assert isinstance(close, CloseConnection) and close.code == 1008
            client.shut()
            silent = raw_connection(server)  # says nothing at all
            assert read_until_closed(silent) == b""
            silent.close()

        with_a_caller_alongside(server, help_pcm, hostile)
        reasons = sorted(s.reason for s in server.wait_for_closed_streams(3))
    assert reasons == ["client_closed_malformed", "idle", "idle"]
    assert [line["event"] for _, line in asr_lines(caplog, logging.WARNING)] == ["asr_stream_idle"] * 2


def test_a_client_that_drops_the_connection_mid_stream_is_a_normal_end(server, help_pcm, caplog):
    client = WsClient(*server.address)
    client.send_bytes(help_pcm[:FRAME_BYTES])
    client.recv_message()
    client.shut()
    (summary,) = server.wait_for_closed_streams(1)
    assert summary.reason == "disconnected"
    assert not asr_lines(caplog, logging.WARNING)


class ExplodingEngine(AsrEngine):
    """pocketsphinx, but a stream raises on audio that starts with b"BOOM" (a bug in an engine)."""

    name = "exploding"
    model_id = "exploding:1"

    def __init__(self, inner: AsrEngine):
        self.inner = inner

    def open_stream(self, sample_rate_hz: int) -> AsrStream:
        stream = self.inner.open_stream(sample_rate_hz)
        accept = stream.accept

        def exploding_accept(pcm: bytes):
            if pcm.startswith(b"BOOM"):
                raise RuntimeError("engine bug")
            return accept(pcm)

        stream.accept = exploding_accept
        return stream


def test_an_engine_failure_ends_only_its_own_stream(sphinx, help_pcm, caplog):
    with AsrServer(ExplodingEngine(sphinx), port=0) as server:
        def hostile():
            client = WsClient(*server.address)
            client.send_bytes(b"BOOM" + bytes(FRAME_BYTES - 4))
            close = client.recv_message()
            assert isinstance(close, CloseConnection) and close.code == 1011
            client.shut()

        with_a_caller_alongside(server, help_pcm, hostile)
        assert "decode_failed" in [s.reason for s in server.wait_for_closed_streams(2)]
    assert ("ERROR", "asr_decode_failed") in [(level, line["event"]) for level, line in asr_lines(caplog)]


class StuckEngine(ExplodingEngine):
    """pocketsphinx, but a stream's decoding of audio that starts with b"STUCK" blocks its worker
    thread until the test lets it go: a stream far slower than real time."""

    def __init__(self, inner: AsrEngine):
        super().__init__(inner)
        from gevent.monkey import get_original

        native_event = get_original("threading", "Event")
        self.stuck, self.release = native_event(), native_event()

    def open_stream(self, sample_rate_hz: int) -> AsrStream:
        stream = self.inner.open_stream(sample_rate_hz)
        accept = stream.accept

        def stuck_accept(pcm: bytes):
            if pcm.startswith(b"STUCK"):
                self.stuck.set()
                self.release.wait(60)
            return accept(pcm)

        stream.accept = stuck_accept
        return stream


def test_a_stream_stuck_in_decoding_delays_no_other(sphinx, help_pcm):
    engine = StuckEngine(sphinx)
    with AsrServer(engine, port=0) as server:
        stuck = WsClient(*server.address)
        stuck.send_bytes(b"STUCK" + bytes(FRAME_BYTES - 5))
        assert engine.stuck.wait(30)  # its worker thread is busy with it now
        # A whole call goes through meanwhile, on other threads; the loop is not blocked either.
        assert_heard(talk_like_mod_vosk(server, help_pcm), HELP_WORDS)
        engine.release.set()
        assert "partial" in json.loads(stuck.recv_message())
        stuck.shut()
        assert len(server.wait_for_closed_streams(2)) == 2


# --- the command ---------------------------------------------------------------------------------


def asr_server_environment(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ASR_", "VOSK_"))}
    env.update({"PYTHONPATH": str(REPO), "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}, **settings)
    return env


def start_asr_server(tmp_path, **settings: str):
    """``ivr-daemon asr-server`` in its own process; (process, port, stderr lines so far)."""
    process = subprocess.Popen([sys.executable, "-m", "ivr_daemon", "--env-file", str(tmp_path / "none.env"), "asr-server"],
                               env=asr_server_environment(**settings), stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if '"asr_server_listening"' in line:
            return process, json.loads(line)["port"], lines
    raise AssertionError(f"asr-server did not start: {''.join(lines)}")


def test_the_command_serves_mod_vosk_at_true_pacing_and_stops_on_sigterm(tmp_path, help_pcm):
    process, port, lines = start_asr_server(tmp_path, ASR_PORT="0")
    try:
        # The one exchange at mod_vosk's own pace: a 3,200-byte frame every 200 ms, a read per 20 ms.
        client = ModVoskClient("127.0.0.1", port, speed=1.0)
        run = client.talk(help_pcm)
        client.hang_up()
        assert_heard(run, HELP_WORDS)
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    assert process.returncode == 0
    logged = [json.loads(line) for line in lines + rest.splitlines(keepends=True) if line.startswith("{")]
    assert [(e["event"], e["reason"]) for e in logged if e["event"] == "asr_stream_closed"] == \
           [("asr_stream_closed", "client_closed_malformed")]
    assert {e["level"] for e in logged} == {"info"}
    assert logged[-1]["event"] == "asr_server_stopped"


def test_the_command_exits_2_naming_a_vosk_model_it_cannot_load(tmp_path):
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    for path, words in ((tmp_path / "nowhere", "not a directory"), (not_a_model, "not a loadable vosk model")):
        done = subprocess.run([sys.executable, "-m", "ivr_daemon", "asr-server"], cwd=tmp_path, timeout=60,
                              env=asr_server_environment(VOSK_MODEL_PATH=str(path)), capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert "VOSK_MODEL_PATH" in last and str(path) in last and words in last


def test_the_command_exits_2_when_its_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run([sys.executable, "-m", "ivr_daemon", "asr-server"], cwd=tmp_path, timeout=60,
                              env=asr_server_environment(ASR_PORT=str(taken.getsockname()[1])),
                              capture_output=True, text=True)
    assert done.returncode == 2
    assert "ASR_HOST/ASR_PORT" in done.stderr.strip().splitlines()[-1]
