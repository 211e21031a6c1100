"""pytest plugin: the ``replay`` fixture, so a test engineer writes ``replay("tests/fixtures/refund.esl")``.

Installed with ivr-daemon (entry point ``pytest11``), so pytest loads it in every run in an
environment that has the package: it must change nothing there. Loading it imports nothing of
the daemon, and nothing ever gevent-monkey-patches the test process. The daemon needs a patched process,
and patching one late (after pytest and its plugins imported threading, ssl and socket) is
fragile; so each ``replay(...)`` runs ``python -m ivr_daemon replay`` in a child process, which
patches first thing as the daemon does, and reads its result back as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def replay():
    """``replay(path, speed=0.0, env_file=None)`` replays a fixture; a mismatch fails the test with the diff.

    The child gets this process's environment (TTS_ENGINE, LLM_STREAM, SYSTEM_PROMPT, ...);
    ``env_file`` adds a .env file under it, as ``--env-file`` does (none by default, so a
    developer's ./.env does not change what a test sees). Returns the
    :class:`~ivr_daemon.replay.replayer.ReplayResult` (``ok``, ``report``, ``sent``).
    """

    def run(path, speed: float = 0.0, env_file=None):
        with tempfile.TemporaryDirectory(prefix="ivr-replay-") as tmp:
            json_out = Path(tmp) / "result.json"
            command = [sys.executable, "-m", "ivr_daemon", "--env-file", str(env_file) if env_file else os.devnull,
                       "replay", str(path), "--speed", str(speed), "--json", str(json_out)]
            child = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            print(child.stdout, end="")  # captured by pytest, shown with a failure
            if not json_out.exists():
                pytest.fail(f"ivr-daemon replay exited {child.returncode} without a result:\n{child.stdout[-3000:]}",
                            pytrace=False)
            data = json.loads(json_out.read_text())
        for message in data["errors"].values():
            pytest.fail(f"unreadable fixture: {message}", pytrace=False)
        from ivr_daemon.replay.replayer import ReplayResult

        result = ReplayResult.from_json(data["results"][0])
        if not result.ok:
            pytest.fail(result.report, pytrace=False)
        return result

    return run
