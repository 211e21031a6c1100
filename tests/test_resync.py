"""Resync after a reconnect: each tracked call is asked about with uuid_exists; a live call is never ended."""

from __future__ import annotations

from structlog.testing import capture_logs

from harness import broadcasts, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.replay.simulator import FreeswitchSimulator

# What `show channels as json` says while FreeSWITCH's core database has not caught up with a
# channel created a moment ago (it is filled asynchronously): no rows (capture 11's literal).
CORE_DB_NOT_YET_FILLED = '{"row_count": 0}\n'


def _commands(sim, prefix: str) -> list[str]:
    return [c.line for c in sim.commands if c.line.startswith(prefix)]


def test_a_live_call_missing_from_the_core_database_is_not_ended(tmp_path, monkeypatch):
    with FakeLlmServer("ollama", replies="We open at nine.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        monkeypatch.setattr(sim, "_api_show", lambda arg: CORE_DB_NOT_YET_FILLED)
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "when do you open")
            wait_until(lambda: len(broadcasts(sim, call)) == 1)
            wait_heard(sim, call)
            daemon.resync(after_reconnect=True)
            assert call in daemon.router.calls and not daemon.router.calls[call].ended, "resync ended a live call"
            assert _commands(sim, f"api uuid_exists {call}")
            sim.speak(call, "and on sundays")
            wait_until(lambda: len(broadcasts(sim, call)) == 2)  # the call goes on
            assert not _commands(sim, "api show")


def test_resync_asks_only_about_tracked_calls_and_ends_those_gone(tmp_path):
    with FakeLlmServer("ollama", replies="Hello.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, DAEMON_SHARD="0/2")
        with running_daemon(sim, settings) as daemon:
            from ivr_daemon.daemon import shard_of

            ours, theirs = [], []
            while len(ours) < 3 or not theirs:
                call = sim.new_call()
                (ours if shard_of(call, 2) == 0 else theirs).append(call)
            wait_until(lambda: set(ours) <= set(daemon.router.calls))
            gone = ours[0]
            sim.drop_connections()
            sim.hangup(gone)  # while the daemon is away: its hangup event is lost
            wait_until(lambda: gone not in daemon.router.calls, 10)
            asked = {line.split()[2] for line in _commands(sim, "api uuid_exists ")}
            assert asked == set(ours)  # only the calls this daemon tracks, every one of them
            assert set(ours[1:]) <= set(daemon.router.calls)
            assert not set(theirs) & set(daemon.router.calls)
            assert not _commands(sim, "api show")


def test_a_call_is_kept_when_freeswitch_cannot_say_whether_it_exists(tmp_path, monkeypatch):
    with FakeLlmServer("ollama", replies="Hello.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        run_api = sim._run_api
        monkeypatch.setattr(sim, "_run_api", lambda name, arg: ("-ERR busy\n", []) if name == "uuid_exists"
                            else run_api(name, arg))
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            wait_until(lambda: call in daemon.router.calls)
            with capture_logs() as logs:
                daemon.resync(after_reconnect=False)
            assert call in daemon.router.calls
            assert any(line["event"] == "esl_resync_unexpected_reply" and line["call_uuid"] == call for line in logs)
            assert any(line["event"] == "esl_resynced" and line["calls_unknown"] == 1 for line in logs)
