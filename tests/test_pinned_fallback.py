"""The fallback phrase is pinned: never evicted from a full cache, re-created if deleted, kept at shutdown."""

from __future__ import annotations

from harness import broadcasts, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.replay.simulator import FreeswitchSimulator


def _unique_reply(request) -> str:
    # ~110 characters: ~130 KB of null-engine audio, so eight of them overflow a 1 MB cache.
    question = request["messages"][-1]["content"]
    return f"Here is a long and entirely unique answer to {question}, padded so that it takes a while to say."


def _broadcast_path(line: str) -> str:
    return line.split()[3]


def test_a_full_cache_never_evicts_the_fallback_phrase(tmp_path):
    with FakeLlmServer("ollama", replies=_unique_reply) as llm, FreeswitchSimulator(playback_speed=0.01) as sim:
        # One broadcast per answer (FIRST_CHUNK=sentence: no first clause), counted below.
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_CACHE_MAX_MB="1",
                                LLM_TIMEOUT="2", FIRST_CHUNK="sentence")
        with running_daemon(sim, settings) as daemon:
            fallback = daemon.services.fallback_wav
            call = sim.new_call()
            for n in range(12):
                sim.speak(call, f"question number {n}")
                wait_until(lambda n=n: len(broadcasts(sim, call)) == n + 1)
                wait_heard(sim, call)
            assert daemon.services.cache.stats().evictions > 0  # the cache really was full
            llm.status = 500  # the LLM fails from now on
            sim.speak(call, "are you there")
            wait_until(lambda: len(broadcasts(sim, call)) == 13)
            sent = _broadcast_path(broadcasts(sim, call)[-1])
            assert sent == str(fallback) and fallback.exists()
            wait_heard(sim, call)
            assert sim.played_files(call)[-1] == sent  # FreeSWITCH could open it and played it


def test_a_deleted_fallback_phrase_is_re_created_before_it_is_broadcast(tmp_path):
    with FakeLlmServer("ollama", status=500) as llm, FreeswitchSimulator(playback_speed=0.01) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            fallback = daemon.services.fallback_wav
            fallback.unlink()  # an operator's clean-up, another daemon's bug
            call = sim.new_call()
            sim.speak(call, "hello")
            wait_until(lambda: broadcasts(sim, call))
            assert _broadcast_path(broadcasts(sim, call)[0]) == str(fallback) and fallback.exists()
            wait_heard(sim, call)
            assert sim.played_files(call) == [str(fallback)]


def test_shutdown_without_a_cache_leaves_the_pinned_fallback_for_the_other_shards(tmp_path):
    with FakeLlmServer("ollama", replies="Hello.") as llm, FreeswitchSimulator(playback_speed=0.01) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_CACHE_MAX_MB="0")
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "hi")
            wait_until(lambda: broadcasts(sim, call))
            wait_heard(sim, call)
            daemon.shutdown()
            assert daemon.services.fallback_wav.exists()
            assert list(tmp_path.glob(f"{call}-*.wav")) == []  # the call's own WAVs are gone
