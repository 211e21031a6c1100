"""GET /ws/transcribe on the real daemon's HTTP server: Piper-spoken audio in, recognised by
pocketsphinx, the phone call's own turn (the fast local LLM, or the fake one), the reply's text
and WAV out; hostile clients; the token; the page's files."""

from __future__ import annotations

import io
import json
import re
import socket

import gevent
import numpy as np
import pytest
import requests
import soundfile
from wsproto.events import CloseConnection
from wsproto.frame_protocol import CloseReason

from asr_clients import HandshakeRefused, WsClient, load_voice, spoken, words_of
from harness import http_server, running_daemon, settings_for, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.asr.pocketsphinx import PocketsphinxEngine
from ivr_daemon.http.talk import TalkSessions
from ivr_daemon.http.transcription import TurnSlots
from ivr_daemon.replay.simulator import FreeswitchSimulator

QUESTION = "can you tell me the opening hours"
QUESTION_WORDS = {"tell", "opening", "hours"}  # what pocketsphinx gets of it at 16 kHz (test_asr_engines)
SECOND = "I need help with my bill"
SECOND_WORDS = {"help", "bill"}
CHUNK_BYTES = 3200  # 100 ms of 16 kHz PCM16, what the page sends


@pytest.fixture(scope="module")
def piper():
    return load_voice()


@pytest.fixture(scope="module")
def sphinx():
    return PocketsphinxEngine()


@pytest.fixture
def sim():
    with FreeswitchSimulator() as simulator:
        yield simulator


def talk_sessions(settings, engine, **limits) -> TalkSessions:
    return TalkSessions(settings, TurnSlots(), asr_engine=engine, **limits)


def open_socket(http, query: str = "", **kwargs) -> WsClient:
    host, port = http.address
    return WsClient(host, port, f"/ws/transcribe{query}", **kwargs)


def send_audio(client: WsClient, pcm: bytes) -> None:
    for start in range(0, len(pcm), CHUNK_BYTES):
        client.send_bytes(pcm[start:start + CHUNK_BYTES])


def messages_until_reply(client: WsClient) -> list:
    """Every message up to and including the binary WAV after an llm_response (JSON decoded)."""
    got = []
    while True:
        message = client.recv_message()
        assert message is not None and not isinstance(message, CloseConnection), f"closed: {message!r}, after {got}"
        got.append(json.loads(message) if isinstance(message, str) else message)
        if isinstance(message, bytes):
            return got


def closing(client: WsClient) -> tuple[list[dict], CloseConnection]:
    """The messages until the server's close frame, and that close."""
    got = []
    while True:
        message = client.recv_message()
        if message is None or isinstance(message, CloseConnection):
            return got, message
        got.append(json.loads(message) if isinstance(message, str) else message)


def assert_spoken_wav(data: bytes) -> float:
    info = soundfile.info(io.BytesIO(data))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 8000, 1)
    samples, _ = soundfile.read(io.BytesIO(data), dtype="int16")
    assert np.abs(samples).max() > 1000, "the reply's WAV is silence"
    return info.duration


def test_a_spoken_question_is_transcribed_and_answered_by_smollm2_with_its_audio(sim, tmp_path, llama_server, piper, sphinx):
    settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="openai", LLM_API_URL=llama_server.chat_completions_url,
                            LLM_MODEL="smollm2", LLM_TIMEOUT="120", LLM_TOOLS="false", TTS_ENGINE="piper",
                            LLM_MAX_TOKENS="40", SYSTEM_PROMPT="You are a shop's phone assistant. Answer in one short sentence.")
    with running_daemon(sim, settings) as daemon, \
            http_server(daemon, talk_sessions=talk_sessions(settings, sphinx)) as http:
        # SmolLM2 and Piper on a busy 2-core box: a turn can take tens of seconds.
        client = open_socket(http, timeout_s=240)
        hello = json.loads(client.recv_message())
        send_audio(client, spoken(piper, QUESTION, 16000, lead_s=0.5, tail_s=1.5))
        first = messages_until_reply(client)
        send_audio(client, spoken(piper, SECOND, 16000, lead_s=0.5, tail_s=1.5))
        second = messages_until_reply(client)
        client.close()
        (summary,) = http.talk_sessions.wait_closed(1)

    assert hello["type"] == "connection" and hello["status"] == "connected" and hello["message"]
    for turn, words in ((first, QUESTION_WORDS), (second, SECOND_WORDS)):
        kinds = [m["type"] if isinstance(m, dict) else "wav" for m in turn]
        # Partials while the question is spoken, then one final, the reply, its audio.
        assert kinds[-3:] == ["final_transcript", "llm_response", "wav"], kinds
        assert set(kinds[:-3]) == {"partial_transcript"}, kinds
        partials = [m["text"] for m in turn[:-3]]
        assert all(partials) and len(set(partials)) == len(partials)  # only changes are sent
        final, reply, wav = turn[-3:]
        assert words <= words_of(final["text"]), final
        assert reply["user_message"] == final["text"]
        assert set(reply) == {"type", "text", "user_message"} and reply["text"].strip()
        assert assert_spoken_wav(wav) > 0.5
    assert (summary.reason, summary.finals, summary.turns, summary.errors) == ("client_closed", 2, 2, 0)


def numbered(request: dict) -> str:
    numbered.count += 1
    return f"Reply {numbered.count}."


def test_each_socket_is_one_conversation_with_its_own_history(sim, tmp_path, piper, sphinx):
    numbered.count = 0
    with FakeLlmServer("ollama", replies=numbered) as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                SYSTEM_PROMPT="You are the test prompt.", TTS_ENGINE="piper")
        with running_daemon(sim, settings) as daemon, \
                http_server(daemon, talk_sessions=talk_sessions(settings, sphinx)) as http:
            alice, bob = open_socket(http), open_socket(http)
            for client in (alice, bob):
                assert json.loads(client.recv_message())["type"] == "connection"
            heard = []
            for client, sentence in ((alice, QUESTION), (bob, SECOND), (alice, SECOND)):
                send_audio(client, spoken(piper, sentence, 16000, lead_s=0.5, tail_s=1.5))
                *_, final, reply, wav = messages_until_reply(client)
                heard.append(final["text"])
                assert reply["text"] == f"Reply {len(heard)}." and assert_spoken_wav(wav) > 0.3
            alice.close(), bob.close()
            http.talk_sessions.wait_closed(2)

    roles = [[(m["role"], m["content"]) for m in request["messages"]] for request in llm.requests]
    system = ("system", "You are the test prompt.")
    assert roles == [
        [system, ("user", heard[0])],
        [system, ("user", heard[1])],  # bob never hears of alice
        [system, ("user", heard[0]), ("assistant", "Reply 1."), ("user", heard[2])],
    ]


# --- hostile clients -------------------------------------------------------------------------------


@pytest.fixture
def quiet_daemon(sim, tmp_path):
    """The daemon with a fake LLM and no TTS: for clients that never get as far as a turn."""
    with FakeLlmServer("ollama", replies="Fine.") as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            yield daemon


def still_serving(http) -> None:
    assert requests.get(f"{http.url}/health", timeout=10).status_code == 200


def test_a_text_message_is_refused_with_an_error_and_close_1003(quiet_daemon, sphinx):
    with http_server(quiet_daemon, talk_sessions=talk_sessions(quiet_daemon.settings, sphinx)) as http:
        client = open_socket(http)
        client.recv_message()
        client.send_text('{"config": {"sample_rate": 8000}}')
        messages, close = closing(client)
        (summary,) = http.talk_sessions.wait_closed(1)
        still_serving(http)
    assert [m["type"] for m in messages] == ["error"] and "binary" in messages[0]["message"]
    assert close.code == CloseReason.UNSUPPORTED_DATA
    assert summary.reason == "bad_message"


def test_a_huge_message_is_cut_off_with_close_1009_before_it_is_all_read(quiet_daemon, sphinx):
    sessions = talk_sessions(quiet_daemon.settings, sphinx, max_message_bytes=64 * 1024)
    with http_server(quiet_daemon, talk_sessions=sessions) as http:
        client = open_socket(http)
        client.recv_message()
        try:
            client.send_bytes(bytes(16 * 1024 * 1024))  # the server stops reading long before the end
        except OSError:
            pass
        messages, close = closing(client)
        (summary,) = sessions.wait_closed(1)
        still_serving(http)
    assert summary.reason == "too_big"
    # The client may see the close frame, or only the reset of a socket it was still writing to.
    assert close is None or close.code in (CloseReason.MESSAGE_TOO_BIG, CloseReason.ABNORMAL_CLOSURE)


def test_bytes_that_are_no_websocket_frames_close_with_a_protocol_error(quiet_daemon, sphinx, caplog):
    with http_server(quiet_daemon, talk_sessions=talk_sessions(quiet_daemon.settings, sphinx)) as http:
        client = open_socket(http)
        client.recv_message()
        client.sock.sendall(b"\x8f\x05hello" * 10)  # an unmasked frame with a reserved opcode
        messages, close = closing(client)
        (summary,) = http.talk_sessions.wait_closed(1)
        still_serving(http)
    assert summary.reason == "protocol_error" and close.code == CloseReason.PROTOCOL_ERROR
    assert any("talk_protocol_error" in r.getMessage() for r in caplog.records)


def test_an_idle_socket_is_closed_with_1008_and_a_log_line(quiet_daemon, sphinx, caplog):
    sessions = talk_sessions(quiet_daemon.settings, sphinx, idle_timeout_s=0.5)
    with http_server(quiet_daemon, talk_sessions=sessions) as http:
        client = open_socket(http)
        client.recv_message()
        messages, close = closing(client)  # sends nothing: the server ends it
        (summary,) = sessions.wait_closed(1)
    assert [m["type"] for m in messages] == ["error"] and "nothing received" in messages[0]["message"]
    assert close.code == CloseReason.POLICY_VIOLATION and summary.reason == "idle"
    assert any("talk_socket_idle" in r.getMessage() for r in caplog.records)


def test_past_max_sockets_a_new_socket_is_told_why_and_closed_with_1013(quiet_daemon, sphinx):
    sessions = talk_sessions(quiet_daemon.settings, sphinx, max_sockets=2)
    with http_server(quiet_daemon, talk_sessions=sessions) as http:
        kept = [open_socket(http) for _ in range(2)]
        for client in kept:
            assert json.loads(client.recv_message())["type"] == "connection"
        extra = open_socket(http)
        messages, close = closing(extra)
        (summary,) = sessions.wait_closed(1)
        # The two first still work.
        for client in kept:
            client.send_bytes(bytes(3200))
        kept[0].close()
        sessions.wait_closed(2)
        assert sessions.open_sockets == 1
    assert [m["type"] for m in messages] == ["error"] and "too many" in messages[0]["message"]
    assert close.code == CloseReason.TRY_AGAIN_LATER and summary.reason == "too_many_sockets"


def test_a_client_that_vanishes_mid_turn_leaves_nothing_behind(sim, tmp_path, piper, sphinx):
    with FakeLlmServer("ollama", replies="A long answer.", hold_reply=True) as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_ENGINE="piper")
        with running_daemon(sim, settings) as daemon, \
                http_server(daemon, talk_sessions=talk_sessions(settings, sphinx)) as http:
            client = open_socket(http)
            client.recv_message()
            send_audio(client, spoken(piper, QUESTION, 16000, lead_s=0.5, tail_s=1.5))
            while json.loads(client.recv_message())["type"] != "final_transcript":
                pass
            wait_until(lambda: len(llm.requests) == 1, 10)
            client.shut()  # gone without a close frame, the LLM still thinking
            (summary,) = http.talk_sessions.wait_closed(1)
            llm.release_reply.set()
            still_serving(http)
            assert http.talk_sessions.open_sockets == 0
    assert summary.reason == "disconnected" and summary.finals == 1 and summary.turns == 0
    assert not list((tmp_path / "tts").glob("ws-*.wav")) and not list((tmp_path / "tts").glob("test-*.wav"))


def test_not_an_upgrade_is_426_and_an_unknown_agent_404(quiet_daemon, sphinx):
    with http_server(quiet_daemon, talk_sessions=talk_sessions(quiet_daemon.settings, sphinx)) as http:
        plain = requests.get(f"{http.url}/ws/transcribe", timeout=10)
        with pytest.raises(HandshakeRefused) as refused:
            open_socket(http, "?agent=nobody")
    assert plain.status_code == 426 and plain.headers["Upgrade"] == "websocket"
    assert refused.value.status_code == 404


# --- the token --------------------------------------------------------------------------------------


def test_with_a_token_the_socket_needs_it_in_the_header_or_the_query(sim, tmp_path, sphinx):
    with FakeLlmServer("ollama", replies="Fine.") as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                HTTP_API_TOKEN="s3cret-token-0123456789")
        with running_daemon(sim, settings) as daemon, \
                http_server(daemon, talk_sessions=talk_sessions(settings, sphinx)) as http:
            refused = []
            for query, headers in (("", None), ("?token=wrong", None), ("?token=s3cret-token-0123456789&token=x", None),
                                   ("", [(b"Authorization", b"Bearer wrong")])):
                with pytest.raises(HandshakeRefused) as exc:
                    open_socket(http, query, extra_headers=headers)
                refused.append(exc.value.status_code)
            by_query = open_socket(http, "?token=s3cret-token-0123456789")
            by_header = open_socket(http, extra_headers=[(b"Authorization", b"Bearer s3cret-token-0123456789")])
            opened = [json.loads(c.recv_message())["type"] for c in (by_query, by_header)]
            # The query token is for the socket alone.
            post = requests.post(f"{http.url}/test/transcription?token=s3cret-token-0123456789",
                                 json={"call_uuid": "a", "transcription": "hi"}, timeout=10)
            page = requests.get(f"{http.url}/", timeout=10)
            script = requests.get(f"{http.url}/static/talk.js", timeout=10)
    assert refused == [401, 401, 401, 401]
    assert opened == ["connection", "connection"]
    assert post.status_code == 401
    assert page.status_code == 200 and script.status_code == 200  # static, holding nothing


# --- the page's files -------------------------------------------------------------------------------


def test_the_page_and_its_files_are_served_from_the_package_and_fetch_nothing_outside(quiet_daemon):
    with http_server(quiet_daemon) as http:
        page = requests.get(f"{http.url}/", timeout=10)
        files = {name: requests.get(f"{http.url}/static/{name}", timeout=10)
                 for name in ("talk.js", "pcm-worklet.js", "talk.css")}
        missing = requests.get(f"{http.url}/static/../app.py", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    for name, answer in files.items():
        assert answer.status_code == 200, name
    assert files["talk.js"].headers["Content-Type"].split(";")[0] in ("text/javascript", "application/javascript")
    for text in [page.text] + [answer.text for answer in files.values()]:
        assert not re.search(r"\b(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), "a URL outside the server"
    for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert src.startswith("/static/") or src.startswith("data:"), src
    assert missing.status_code == 404


def test_a_frame_sent_with_the_handshake_is_not_lost(quiet_daemon, sphinx):
    """A client that does not wait for the 101: what pywsgi's reader took past the headers is the
    socket's first audio, not dropped."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import Request
    from wsproto.frame_protocol import FrameProtocol

    with http_server(quiet_daemon, talk_sessions=talk_sessions(quiet_daemon.settings, sphinx)) as http:
        host, port = http.address
        handshake = WSConnection(ConnectionType.CLIENT).send(Request(host=host, target="/ws/transcribe"))
        early = FrameProtocol(client=True, extensions=[]).send_data(bytes(3200), fin=True)
        with socket.create_connection((host, port), timeout=10) as raw:
            raw.sendall(handshake + early)
            reply = b""
            while b'"connected"' not in reply:
                reply += raw.recv(65536)
            raw.sendall(FrameProtocol(client=True, extensions=[]).close(1000))
            (summary,) = http.talk_sessions.wait_closed(1)
    assert reply.startswith(b"HTTP/1.1 101 ")
    assert summary.messages == 1 and summary.audio_s == pytest.approx(0.1)
    assert summary.reason == "client_closed"


def test_when_the_server_stops_an_open_socket_is_closed_with_1001(quiet_daemon, sphinx):
    sessions = talk_sessions(quiet_daemon.settings, sphinx)
    with http_server(quiet_daemon, talk_sessions=sessions) as http:
        client = open_socket(http)
        client.recv_message()
        http.stop()
        messages, close = closing(client)
        (summary,) = sessions.wait_closed(1)
    assert close.code == CloseReason.GOING_AWAY and summary.reason == "server_stopped"


def test_a_client_trickling_a_frame_byte_by_byte_is_idle_all_the_same(quiet_daemon, sphinx):
    from wsproto.frame_protocol import FrameProtocol

    sessions = talk_sessions(quiet_daemon.settings, sphinx, idle_timeout_s=1.0)
    with http_server(quiet_daemon, talk_sessions=sessions) as http:
        client = open_socket(http)
        client.recv_message()
        frame = FrameProtocol(client=True, extensions=[]).send_data(bytes(3200), fin=True)
        for at in range(len(frame)):  # a byte every 50 ms: the socket is never silent for long
            try:
                client.sock.sendall(frame[at:at + 1])
            except OSError:
                break
            if sessions.closed:
                break
            gevent.sleep(0.05)
        else:
            pytest.fail("the whole frame went out a byte at a time and the socket was never closed")
        (summary,) = sessions.wait_closed(1)
    assert summary.reason == "idle" and summary.messages == 0


def test_the_idle_time_starts_when_the_answer_is_sent_not_when_the_turn_began(sim, tmp_path, piper, sphinx):
    """A turn longer than the idle time, then a client that takes a moment (less than the idle
    time) to speak again: the socket stays open."""
    idle_s = 1.0
    with FakeLlmServer("ollama", replies="Fine.", hold_reply=True) as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url, LLM_TIMEOUT="30")
        sessions = talk_sessions(settings, sphinx, idle_timeout_s=idle_s)
        question = spoken(piper, QUESTION, 16000, lead_s=0.5, tail_s=1.5)
        with running_daemon(sim, settings) as daemon, http_server(daemon, talk_sessions=sessions) as http:
            client = open_socket(http)
            client.recv_message()
            send_audio(client, question)
            while json.loads(client.recv_message())["type"] != "final_transcript":
                pass
            wait_until(lambda: len(llm.requests) == 1, 10)
            gevent.sleep(idle_s * 1.5)  # the LLM thinks past the idle time (the client waits, not idle)
            llm.release_reply.set()
            reply = json.loads(client.recv_message())
            assert isinstance(client.recv_message(), bytes)
            gevent.sleep(idle_s * 0.6)  # the caller draws breath, within the idle time
            send_audio(client, question)
            second = messages_until_reply(client)
            client.close()
            (summary,) = sessions.wait_closed(1)
    assert reply["type"] == "llm_response" and second[-2]["type"] == "llm_response"
    assert summary.reason == "client_closed" and summary.turns == 2
