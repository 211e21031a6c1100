"""A slow or hostile HTTP client never delays a call; the HTTP settings; the server inside
``ivr-daemon run`` (real process, real sockets)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

import ivr_daemon.http.transcription as transcription
from harness import TurnLog, broadcasts, http_server, running_daemon, settings_for, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.config import ConfigError, load_settings
from ivr_daemon.daemon import SHUTDOWN_BUDGET_S
from ivr_daemon.replay.simulator import FreeswitchSimulator

TOKEN = "test-token-0123456789abcdef"


def raw_connection(http) -> socket.socket:
    host, port = http.address
    return socket.create_connection((host, port), timeout=30)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (waits on the socket)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_stalled_client_delays_neither_other_requests_nor_a_phone_turn_and_is_cut_off(tmp_path, monkeypatch):
    monkeypatch.setattr(transcription, "BODY_READ_TIMEOUT_S", 1.0)
    turns = TurnLog()
    with FakeLlmServer("ollama", replies="Right away.") as llm, FreeswitchSimulator() as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings, on_turn=turns) as daemon, \
                http_server(daemon, io_timeout_s=1.0, headers_timeout_s=1.0) as http:
            half_headers, half_body = raw_connection(http), raw_connection(http)
            half_headers.sendall(b"POST /test/transcription HTTP/1.1\r\nHost: x\r\nContent-Type: applica")
            half_body.sendall(b"POST /test/transcription HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 60\r\n\r\n{\"call_uuid\": \"slow\", ")
            # While both stall: another client's requests and a phone call's turn go through.
            assert requests.get(http.url + "/health", timeout=5).status_code == 200
            turn = requests.post(http.url + "/test/transcription", timeout=5,
                                 json={"call_uuid": "quick", "transcription": "hello"})
            assert turn.status_code == 200
            call = sim.new_call()
            sim.speak(call, "hello")
            turns.wait(1, call)
            assert len(broadcasts(sim, call)) == 1
            # Then the server gives up on them: headers too slow -> 400, body too slow -> 408.
            assert read_until_closed(half_headers).startswith(b"HTTP/1.1 400 ")
            cut = read_until_closed(half_body)
            assert cut.startswith(b"HTTP/1.1 408 ") and b'"408 Request Timeout"' in cut
            half_headers.close()
            half_body.close()
    assert len(llm.requests) == 2  # the test turn and the phone turn; nothing of the stalled ones


def test_an_idle_keep_alive_connection_is_closed_after_the_io_timeout(tmp_path):
    with FakeLlmServer("ollama") as llm, FreeswitchSimulator() as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon, http_server(daemon, io_timeout_s=0.5) as http:
            sock = raw_connection(http)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_until_closed(sock)  # the answer, then nothing more: the server closed
            sock.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1


def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(tmp_path):
    with FakeLlmServer("ollama") as llm, FreeswitchSimulator() as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            sock = raw_connection(http)
            # Ten gigabytes announced, none sent: the 413 comes at once and the connection closes.
            sock.sendall(b"POST /test/transcription HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 10000000000\r\n\r\n")
            answer = read_until_closed(sock)
            sock.close()
            chunked = raw_connection(http)
            chunk = b"x" * 40000
            chunked.sendall(b"POST /test/transcription HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n" + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2)
            chunked_answer = read_until_closed(chunked)  # not waiting for the last chunk either
            chunked.close()
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower()
    assert chunked_answer.startswith(b"HTTP/1.1 413 ")
    assert llm.requests == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_http_host_needs_no_token(host):
    assert load_settings(environ={"HTTP_HOST": host}).http_host == host


def test_http_settings_are_checked_and_name_their_variable():
    for env, variable in [({"HTTP_HOST": "0.0.0.0"}, "HTTP_HOST"), ({"HTTP_HOST": "192.0.2.7"}, "HTTP_HOST"),
                          ({"HTTP_HOST": "ivr.example.com"}, "HTTP_HOST"), ({"HTTP_HOST": "a b"}, "HTTP_HOST"),
                          ({"HTTP_PORT": "65536"}, "HTTP_PORT"), ({"HTTP_PORT": "x"}, "HTTP_PORT"),
                          ({"HTTP_API_TOKEN": "short"}, "HTTP_API_TOKEN"),
                          ({"HTTP_API_TOKEN": "has a space inside it"}, "HTTP_API_TOKEN")]:
        with pytest.raises(ConfigError) as caught:
            load_settings(environ=env)
        assert caught.value.variable == variable, env
    # A token, or no server at all, makes any address fine.
    assert load_settings(environ={"HTTP_HOST": "0.0.0.0", "HTTP_API_TOKEN": TOKEN}).http_api_token == TOKEN
    assert load_settings(environ={"HTTP_HOST": "0.0.0.0", "HTTP_PORT": "0"}).http_port == 0


def _run_env(sim, tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "LOG_", "HTTP_"))}
    env.update({"FREESWITCH_PORT": str(sim.port), "TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(tmp_path / "tts"),
                "LOG_FORMAT": "json", "GREETING": "", "SILENCE_TIMEOUT_S": "0", **extra})
    return env


def _ivr_daemon_run() -> list[str]:
    return [str(Path(sys.executable).parent / "ivr-daemon"), "--env-file", os.devnull, "run"]


def test_run_on_a_non_loopback_host_without_a_token_exits_2_with_one_line(tmp_path):
    with FreeswitchSimulator() as sim:
        result = subprocess.run(_ivr_daemon_run(), env=_run_env(sim, tmp_path, HTTP_HOST="0.0.0.0"),
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "HTTP_HOST" in lines[0] and "HTTP_API_TOKEN" in lines[0] and "0.0.0.0" in lines[0]
    assert not sim.connections and not sim.commands  # it never got as far as the switch


def test_run_exits_2_naming_http_port_when_the_port_is_taken(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with FreeswitchSimulator() as sim:
            result = subprocess.run(_ivr_daemon_run(), capture_output=True, text=True, timeout=60,
                                    env=_run_env(sim, tmp_path, HTTP_PORT=str(taken.getsockname()[1])))
    finally:
        taken.close()
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("ivr-daemon:")]
    assert len(errors) == 1 and "HTTP_PORT" in errors[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_run_serves_http_with_its_token_and_stops_with_sigterm_within_the_budget(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "daemon.log"
    with FakeLlmServer("ollama", replies="Hello from the daemon.") as llm, FreeswitchSimulator() as sim:
        env = _run_env(sim, tmp_path, HTTP_PORT=str(port), HTTP_API_TOKEN=TOKEN, LLM_PROVIDER="ollama",
                       LLM_API_URL=llm.url)
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(_ivr_daemon_run(), env=env, stdout=log_file, stderr=log_file)
        try:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=60)
            wait_until(lambda: b'"http_listening"' in log_path.read_bytes(), 30)
            assert requests.get(url + "/health", timeout=10).status_code == 200
            assert requests.get(url + "/calls", timeout=10).status_code == 401
            turn = requests.post(url + "/test/transcription", headers={"Authorization": f"Bearer {TOKEN}"},
                                 json={"call_uuid": "cli", "transcription": "hi"}, timeout=10)
            assert turn.status_code == 200 and turn.headers["X-LLM-Response"] == "Hello from the daemon."
            idle = requests.Session()  # a keep-alive connection left open must not hold the shutdown
            assert idle.get(url + "/health", timeout=10).status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            idle.close()
        finally:
            proc.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    events = {line["event"]: line for line in lines}
    assert "http_stopped" in events
    assert events["daemon_shut_down"]["seconds"] <= SHUTDOWN_BUDGET_S
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=5)
