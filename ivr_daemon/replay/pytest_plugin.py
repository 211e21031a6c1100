"""pytest plugin: the ``replay`` fixture, so a test engineer writes ``replay("tests/fixtures/refund.esl")``.

Installed with ivr-daemon (entry point ``pytest11``). The daemon is a gevent program, so the
plugin monkey-patches first thing, as the daemon's own entry point does.
"""

from gevent import monkey

monkey.patch_all()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def replay_tts_engine():
    """The TTS engine replays use: TTS_ENGINE from the environment, ``null`` by default."""
    from ivr_daemon.config import load_settings
    from ivr_daemon.replay.replayer import replay_environment
    from ivr_daemon.tts import make_tts_engine

    return make_tts_engine(load_settings(environ={"TTS_ENGINE": "null", **replay_environment()}))


@pytest.fixture
def replay(replay_tts_engine):
    """``replay(path, speed=0.0)`` replays a fixture; a mismatch fails the test with the diff."""
    from ivr_daemon.replay.fixture import FixtureError, load_fixture
    from ivr_daemon.replay.replayer import replay_environment, replay_fixture

    def run(path, speed: float = 0.0):
        try:
            fixture = load_fixture(path)
        except FixtureError as exc:
            pytest.fail(f"unreadable fixture: {exc}", pytrace=False)
        result = replay_fixture(fixture, speed=speed, tts=replay_tts_engine, base_env=replay_environment())
        if not result.ok:
            pytest.fail(result.report, pytrace=False)
        return result

    return run
