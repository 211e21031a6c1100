"""systemd's notify protocol, against a real unix datagram socket standing in for systemd's
NOTIFY_SOCKET: READY after the daemon has connected and listens, WATCHDOG pings from the loop
(none while the loop hangs), STOPPING at SIGTERM; the real ``ivr-daemon run`` and
``ivr-daemon asr-server`` in their own processes, the daemon against the simulator."""

from __future__ import annotations

import configparser
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import gevent
import pytest
import requests
from gevent import monkey

from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.service_manager import ServiceNotifier, _watchdog_interval_s

REPO = Path(__file__).resolve().parent.parent
NATIVE_SLEEP = monkey.get_original("time", "sleep")


class FakeSystemd:
    """A bound AF_UNIX datagram socket: what systemd listens on for sd_notify."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next_message(self, timeout_s: float = 30.0) -> dict[str, str]:
        """The next datagram as its KEY=VALUE lines (a cooperative wait: the simulator keeps serving)."""
        self.sock.settimeout(timeout_s)
        data = self.sock.recv(4096)
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def wait_for(self, key: str, timeout_s: float = 30.0) -> tuple[dict[str, str], list[dict[str, str]]]:
        """The first message holding ``key``, and every message before it."""
        before: list[dict[str, str]] = []
        deadline = time.monotonic() + timeout_s
        while True:
            message = self.next_message(max(0.1, deadline - time.monotonic()))
            if key in message:
                return message, before
            before.append(message)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    fake = FakeSystemd(tmp_path / "notify")
    yield fake
    fake.close()


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_process():
    assert _watchdog_interval_s({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert _watchdog_interval_s({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}) == 10.0
    assert _watchdog_interval_s({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert _watchdog_interval_s({}) is None
    assert _watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert _watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None


def test_without_notify_socket_nothing_is_sent():
    notifier = ServiceNotifier(environ={})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.start_watchdog() is None


def test_ready_status_and_stopping_datagrams(systemd, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path))  # sdnotify reads it from the environment
    notifier = ServiceNotifier(environ={"NOTIFY_SOCKET": str(systemd.path)})
    notifier.ready("connected")
    assert systemd.next_message() == {"READY": "1", "STATUS": "connected"}
    notifier.status("reconnecting")
    assert systemd.next_message() == {"STATUS": "reconnecting"}
    notifier.stopping()
    assert systemd.next_message() == {"STOPPING": "1", "STATUS": "stopping"}


def test_abstract_namespace_socket(monkeypatch):
    # systemd may hand an abstract socket, "@name": sdnotify maps "@" to the leading NUL.
    name = f"ivr-daemon-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        ServiceNotifier(environ={"NOTIFY_SOCKET": "@" + name}).ready("up")
        receiver.settimeout(10)
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up"
    finally:
        receiver.close()


def test_a_hung_loop_stops_feeding_the_watchdog(systemd, monkeypatch):
    """The pings come from the gevent loop: while it is blocked, none goes out."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path))
    # Received on a native thread with a native socket: it keeps receiving while the loop hangs.
    native = monkey.get_original("socket", "socket")(fileno=os.dup(systemd.sock.fileno()))
    native.settimeout(0.1)
    arrivals: list[float] = []
    enough = threading.Event()

    def receive() -> None:
        while not enough.is_set():
            try:
                if native.recv(4096) == b"WATCHDOG=1":
                    arrivals.append(time.monotonic())
            except TimeoutError:
                continue

    receiving = gevent.get_hub().threadpool.spawn(receive)
    notifier = ServiceNotifier(environ={"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_interval_s == 0.05
    notifier.start_watchdog()
    try:
        gevent.sleep(0.3)  # the loop turns: a ping every 50 ms
        blocked_from_s = time.monotonic()
        NATIVE_SLEEP(0.5)  # the loop hangs, as a CPU-bound call on it would make it: ten intervals
        blocked_until_s = time.monotonic()
        gevent.sleep(0.3)
    finally:
        notifier.stop_watchdog()
        enough.set()
        receiving.get(timeout=10)
        native.close()
    before = [t for t in arrivals if t < blocked_from_s]
    during = [t for t in arrivals if blocked_from_s <= t < blocked_until_s]
    after = [t for t in arrivals if t >= blocked_until_s]
    assert len(before) >= 2 and len(after) >= 2, (len(before), len(after))
    # At most the one ping that was on its way as the loop blocked; systemd would restart us.
    assert len(during) <= 1, [round(t - blocked_from_s, 3) for t in during]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def daemon_environment(systemd: FakeSystemd, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("FREESWITCH_", "LLM_", "TTS_", "HTTP_", "NOTIFY_", "WATCHDOG_", "ASR_"))}
    env.update({"PYTHONPATH": str(REPO), "LOG_FORMAT": "json", "LOG_LEVEL": "INFO",
                "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "400000"}, **settings)
    return env


def test_the_daemon_tells_systemd_ready_after_connecting_feeds_the_watchdog_and_says_stopping(systemd, tmp_path):
    esl_port, http_port = free_port(), free_port()
    env = daemon_environment(systemd, FREESWITCH_PORT=str(esl_port), HTTP_PORT=str(http_port),
                             TTS_ENGINE="null", TTS_OUTPUT_DIR=str(tmp_path / "tts"))
    process = subprocess.Popen([sys.executable, "-m", "ivr_daemon", "--env-file", str(tmp_path / "none.env"), "run"],
                               env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sim = FreeswitchSimulator(port=esl_port)
    try:
        # No switch yet: the watchdog is fed, systemd is told the daemon is connecting, and no READY.
        early: list[dict[str, str]] = []
        while sum(m == {"WATCHDOG": "1"} for m in early) < 3:
            early.append(systemd.next_message(timeout_s=60))
        assert {"STATUS": f"connecting to FreeSWITCH 127.0.0.1:{esl_port}"} in early
        assert not any("READY" in m for m in early)
        sim.start()
        ready, before = systemd.wait_for("READY")
        assert not any("READY" in m for m in before)
        # READY comes after the daemon subscribed on the switch, with the HTTP API already up.
        assert any(c.line.startswith("event plain DETECTED_SPEECH") for c in sim.commands)
        assert ready["STATUS"] == f"connected to FreeSWITCH 127.0.0.1:{esl_port}, HTTP on http://127.0.0.1:{http_port}"
        assert requests.get(f"http://127.0.0.1:{http_port}/health", timeout=10).status_code == 200
        assert [systemd.next_message(), systemd.next_message()] == [{"WATCHDOG": "1"}] * 2
        process.send_signal(signal.SIGTERM)
        stopping, _ = systemd.wait_for("STOPPING")
        assert stopping["STOPPING"] == "1"
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
        sim.stop()


def test_the_asr_server_is_ready_once_it_listens(systemd, tmp_path):
    port = free_port()
    env = daemon_environment(systemd, ASR_PORT=str(port))
    process = subprocess.Popen([sys.executable, "-m", "ivr_daemon", "--env-file", str(tmp_path / "none.env"),
                                "asr-server"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        ready, _ = systemd.wait_for("READY", timeout_s=120)
        assert ready["STATUS"] == f"listening on ws://127.0.0.1:{port} (pocketsphinx)"
        socket.create_connection(("127.0.0.1", port), timeout=10).close()  # it does listen
        assert systemd.next_message() == {"WATCHDOG": "1"}
        process.send_signal(signal.SIGTERM)
        assert systemd.wait_for("STOPPING")[0]["STOPPING"] == "1"
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(REPO / "freeswitch_conf" / "systemd" / name)
    return parser


@pytest.mark.parametrize("name", ["ivr-daemon.service", "ivr-daemon-asr.service"])
def test_units_are_notify_watchdog_restart_and_hardened(name):
    service = unit(name)["Service"]
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "true"
    assert service["ProtectSystem"] == "strict"
    assert "2" in service["RestartPreventExitStatus"].split()


def test_the_daemon_unit_writes_where_freeswitch_reads():
    service = unit("ivr-daemon.service")["Service"]
    # TTS_OUTPUT_DIR and the records database live under /var/lib/ivr-daemon: writable despite
    # ProtectSystem=strict, and /tmp not private (a WAV path there would be invisible to FreeSWITCH).
    assert "/var/lib/ivr-daemon" in service["ReadWritePaths"].split()
    assert service["PrivateTmp"] == "false"
    assert "3" in service["RestartPreventExitStatus"].split()  # a refused ESL password stays refused
