"""A running daemon on the simulator, for tests that play whole calls."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from ivr_daemon.config import Settings, load_settings
from ivr_daemon.daemon import Daemon, build_conversation_daemon
from ivr_daemon.replay.simulator import FreeswitchSimulator


def give_to(path, uid: int = -1, gid: int = -1) -> None:
    """chown ``path`` to another user or group (-1: unchanged), as an attacker's planted file would be.

    Only root may give a file away: as root directly, otherwise through password-less sudo, the
    way ``make test`` installs its Debian packages. Neither: the test fails saying so (no skip).
    """
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
        return
    owner = ("" if uid == -1 else str(uid)) + ("" if gid == -1 else f":{gid}")
    try:
        done = subprocess.run(["sudo", "-n", "chown", owner, str(path)], capture_output=True, text=True, timeout=30)
        problem = done.stderr.strip() if done.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    if problem:
        pytest.fail(f"giving {path} to {owner} needs root or password-less sudo (make test's apt-get needs "
                    f"them too): {problem}")


def settings_for(sim: FreeswitchSimulator, tts_dir: Path, **env: str) -> Settings:
    values = {
        "FREESWITCH_PORT": str(sim.port),
        "TTS_ENGINE": "null",
        "TTS_OUTPUT_DIR": str(tts_dir),
        "LLM_TIMEOUT": "5",
        "LOG_FORMAT": "console",
        # The call flow's own speech is off unless a test turns it on: most tests are about turns.
        "GREETING": "",
        "SILENCE_TIMEOUT_S": "0",
    }
    values.update(env)
    return load_settings(environ=values)


@contextlib.contextmanager
def running_daemon(sim: FreeswitchSimulator, settings: Settings, **kwargs) -> Iterator[Daemon]:
    daemon = build_conversation_daemon(settings, **kwargs)
    daemon.start()
    try:
        assert daemon.esl.wait_connected(10), "daemon did not connect to the simulator"
        yield daemon
    finally:
        daemon.stop(timeout_s=10)


def broadcasts(sim: FreeswitchSimulator, call_uuid: str | None = None) -> list[str]:
    lines = [c.line for c in sim.commands if c.line.startswith("api uuid_broadcast ")]
    return [line for line in lines if call_uuid is None or f" {call_uuid} " in line]


def wait_until(condition, timeout_s: float = 10.0, step_s: float = 0.01) -> None:
    """Poll a condition cooperatively (lets the daemon's greenlets run); fail on timeout."""
    import time

    import gevent

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        gevent.sleep(step_s)


class TurnLog:
    """The daemon's ``on_turn``: every finished turn, to wait on.

    A turn reports only after it has written its history, so waiting here (not on the
    broadcast, which goes out before) is what makes reading the history afterwards safe.
    """

    def __init__(self):
        self.results: list = []

    def __call__(self, result) -> None:
        self.results.append(result)

    def of(self, call_uuid: str) -> list:
        return [r for r in self.results if r.call_uuid == call_uuid]

    def wait(self, count: int, call_uuid: str | None = None, timeout_s: float = 10.0) -> list:
        """Until ``count`` turns (of this call, or in all) have finished; returns those turns."""
        def done() -> list:
            return self.of(call_uuid) if call_uuid is not None else list(self.results)

        wait_until(lambda: len(done()) >= count, timeout_s)
        return done()


def routed_events(daemon: Daemon) -> list:
    """Every event the daemon's reader hands to its router from now on, duplicates included."""
    seen: list = []
    route = daemon.router.route

    def recording_route(event) -> None:
        seen.append(event)
        route(event)

    daemon.router.route = recording_route  # Daemon._route looks it up per event
    return seen


def wait_idle(daemon: Daemon, timeout_s: float = 10.0) -> None:
    """Until no call of the daemon (on any of its switches) has an event queued or a turn in flight."""
    wait_until(lambda: not daemon.busy_calls(), timeout_s)


def wait_heard(sim, call_uuid: str, count: int = 1, timeout_s: float = 10.0) -> None:
    """Wait until ``count`` more broadcasts to this call have finished playing (PLAYBACK_STOP)."""
    for _ in range(count):
        sim.wait_for_event(lambda e: e.name == "PLAYBACK_STOP" and e.unique_id == call_uuid, timeout_s)


def captured_event(capture_name: str, body: str | None = None, transform=None, **replace: str) -> bytes:
    """A real captured plain event, rebuilt with some headers replaced (``Unique_ID`` -> ``Unique-ID``).

    ``transform(key, value)`` may rewrite every other value (e.g. to make them all hostile);
    a header it maps to None is left out.
    """
    from ivr_daemon.esl.protocol import FrameParser, build_plain_event, split_plain_event

    frame = FrameParser().feed((Path(__file__).parent / "captures" / capture_name).read_bytes())[0]
    pairs, _ = split_plain_event(frame.body)
    replace = {key.replace("_", "-"): value for key, value in replace.items()}
    headers = [(k, replace[k] if k in replace else transform(k, v) if transform else v) for k, v in pairs]
    return build_plain_event([(k, v) for k, v in headers if v is not None], body)


@contextlib.contextmanager
def http_server(daemon: Daemon, **kwargs):
    """The daemon's HTTP server on a free port of 127.0.0.1 (``.url``), as ``ivr-daemon run`` starts it."""
    from ivr_daemon.http import HttpServer

    server = HttpServer(daemon, daemon.settings, port=0, **kwargs)
    server.bind()
    server.start()
    try:
        yield server
    finally:
        server.stop()
