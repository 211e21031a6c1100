"""Tests for ivr_daemon.tts.cache: hits without synthesis, LRU eviction, restarts, concurrency, failures."""

from __future__ import annotations

import fnmatch
import os
import stat
import time
import uuid
from pathlib import Path

import gevent
import gevent.threadpool
import numpy
import pytest
import soundfile

from ivr_daemon.tts import TtsSynthesisFailed
from ivr_daemon.tts.base import native_lock
from ivr_daemon.tts.cache import CACHE_SUBDIR, STRAY_TEMP_MIN_AGE_S, CacheStats, PhraseCache
from ivr_daemon.tts.null import NullEngine
from ivr_daemon.tts.piper import PiperEngine
from harness import give_to


class CountingEngine(NullEngine):
    """NullEngine that counts its syntheses (from any thread) and can be made to fail or wait."""

    def __init__(self, name: str = "null", voice_id: str = "null:silence"):
        self.name = name
        self.voice_id = voice_id
        self.calls = 0
        self.failures_left = 0
        self.gate = None  # a held native lock makes synthesis wait until it is released
        self._count_lock = native_lock()

    def synthesize(self, text: str):
        with self._count_lock:
            self.calls += 1
            fail = self.failures_left > 0
            self.failures_left -= fail
        if self.gate is not None:
            self.gate.acquire()
            self.gate.release()
        if fail:
            raise RuntimeError("model exploded")
        return super().synthesize(text)


class CountingPiper(PiperEngine):
    def __init__(self):
        super().__init__(None)
        self.calls = 0

    def synthesize(self, text: str):
        self.calls += 1
        return super().synthesize(text)


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline_s, "condition not met in time"
        gevent.sleep(0.005)


def same_size_texts(count: int) -> list[str]:
    """Texts of equal length, so NullEngine gives files of equal size."""
    return [f"phrase number {index:02d} for the cache" for index in range(count)]


@pytest.fixture
def output_dir(tmp_path) -> Path:
    return tmp_path / "tts"


@pytest.fixture
def one_file_bytes(tmp_path) -> int:
    probe = PhraseCache(tmp_path / "probe", max_bytes=10**9)
    return probe.get_or_synthesize(NullEngine(), same_size_texts(1)[0]).stat().st_size


def test_a_hit_returns_the_same_file_without_synthesis(output_dir):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    engine = CountingEngine()

    first = cache.get_or_synthesize(engine, "Thank you for calling.")
    first_bytes = first.read_bytes()
    again = cache.get_or_synthesize(engine, "  Thank you\n for   calling. ")

    assert again == first == cache.path_for(engine, "Thank you for calling.")
    assert engine.calls == 1
    assert again.read_bytes() == first_bytes
    info = soundfile.info(str(again))
    assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
    assert cache.stats() == CacheStats(hits=1, misses=1, coalesced=0, evictions=0, bytes=len(first_bytes), files=1)


def test_text_voice_and_engine_each_change_the_file(output_dir):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    null = CountingEngine()
    other_voice = CountingEngine(voice_id="null:other")
    other_engine = CountingEngine(name="other")

    paths = {
        cache.get_or_synthesize(null, "Hello there."),
        cache.get_or_synthesize(null, "hello there."),  # case changes prosody
        cache.get_or_synthesize(null, "Hello there!"),  # so does punctuation
        cache.get_or_synthesize(other_voice, "Hello there."),
        cache.get_or_synthesize(other_engine, "Hello there."),
    }

    assert len(paths) == 5
    assert all(path.is_file() for path in paths)
    assert (null.calls, other_voice.calls, other_engine.calls) == (3, 1, 1)
    assert cache.stats().files == 5


def test_eviction_removes_least_recently_used_and_hits_refresh_recency(output_dir, one_file_bytes):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=3 * one_file_bytes)
    engine = CountingEngine()
    a, b, c, d, e = same_size_texts(5)
    path = {text: cache.get_or_synthesize(engine, text) for text in (a, b, c)}
    assert all(p.stat().st_size == one_file_bytes for p in path.values())

    cache.get_or_synthesize(engine, a)  # a is now the most recent: b is the oldest
    path[d] = cache.get_or_synthesize(engine, d)

    assert not path[b].exists()
    assert all(path[text].exists() for text in (a, c, d))

    path[e] = cache.get_or_synthesize(engine, e)

    assert not path[c].exists()
    assert all(path[text].exists() for text in (a, d, e))
    stats = cache.stats()
    assert (stats.evictions, stats.files, stats.bytes) == (2, 3, 3 * one_file_bytes)
    assert sum(p.stat().st_size for p in cache.directory.iterdir()) <= cache.max_bytes
    assert engine.calls == 5


def test_the_file_just_written_survives_even_beyond_the_cap(output_dir, one_file_bytes, caplog):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=one_file_bytes + 100)
    engine = CountingEngine()
    small = cache.get_or_synthesize(engine, same_size_texts(1)[0])

    big = cache.get_or_synthesize(engine, "a much longer sentence " * 10)

    assert big.exists() and big.stat().st_size > cache.max_bytes
    assert not small.exists()
    assert cache.stats().files == 1
    assert "tts_cache_file_exceeds_cap" in caplog.text
    assert cache.get_or_synthesize(engine, "a much longer sentence " * 10) == big
    assert engine.calls == 2


def test_a_restart_reindexes_the_directory_and_keeps_the_lru_order(output_dir, one_file_bytes):
    a, b, c, d = same_size_texts(4)
    first_run = PhraseCache.for_output_dir(output_dir, max_bytes=3 * one_file_bytes)
    for text in (a, b, c, a):
        first_run.get_or_synthesize(CountingEngine(), text)

    engine = CountingEngine()
    second_run = PhraseCache.for_output_dir(output_dir, max_bytes=3 * one_file_bytes)
    assert (second_run.stats().files, second_run.stats().bytes) == (3, 3 * one_file_bytes)

    assert second_run.get_or_synthesize(engine, c) == first_run.path_for(engine, c)
    assert engine.calls == 0
    # Recency from the first run (b oldest, then a, then c just hit) survived the restart.
    second_run.get_or_synthesize(engine, d)
    assert not second_run.path_for(engine, b).exists()
    assert all(second_run.path_for(engine, text).exists() for text in (a, c, d))
    assert engine.calls == 1


def test_start_up_removes_stale_temp_files_and_ignores_foreign_ones(output_dir):
    cache_dir = output_dir / CACHE_SUBDIR
    cache_dir.mkdir(parents=True)
    stale_temp = cache_dir / f".{'a' * 64}.wav.x1y2z3.part"
    young_temp = cache_dir / f".{'b' * 64}.wav.q9w8e7.part"
    foreign = cache_dir / "README.txt"
    for path in (stale_temp, young_temp, foreign):
        path.write_bytes(b"partial")
    stale_s = time.time() - STRAY_TEMP_MIN_AGE_S - 60
    os.utime(stale_temp, (stale_s, stale_s))

    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)

    assert not stale_temp.exists()
    # A young temp may belong to another daemon writing into the same directory right now.
    assert young_temp.exists() and foreign.exists()
    assert cache.stats() == CacheStats(hits=0, misses=0, coalesced=0, evictions=0, bytes=0, files=0)


def test_a_smaller_cap_after_restart_evicts_down_to_it(output_dir, one_file_bytes):
    texts = same_size_texts(4)
    first_run = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    for text in texts:
        first_run.get_or_synthesize(NullEngine(), text)

    second_run = PhraseCache.for_output_dir(output_dir, max_bytes=2 * one_file_bytes)

    assert second_run.stats().files == 2
    assert [second_run.path_for(NullEngine(), text).exists() for text in texts] == [False, False, True, True]


def test_concurrent_requests_for_one_missing_text_synthesize_once(output_dir):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    engine = CountingEngine()
    engine.gate = native_lock()
    engine.gate.acquire()
    pool = gevent.threadpool.ThreadPool(5)
    try:
        pending = [pool.spawn(cache.get_or_synthesize, engine, "Please hold the line.") for _ in range(4)]
        # Three threads are waiting on the one synthesis the gate holds.
        wait_until(lambda: cache.stats().coalesced == 3)
        assert engine.calls == 1
        # The lock is not held during synthesis: another text goes through meanwhile.
        other = pool.spawn(cache.get_or_synthesize, NullEngine(), "Something else.").get(timeout=10)
        assert other.exists()
    finally:
        engine.gate.release()
        paths = [result.get(timeout=10) for result in pending]
        pool.kill()

    assert len(set(paths)) == 1 and paths[0].exists()
    assert engine.calls == 1
    stats = cache.stats()
    assert (stats.misses, stats.coalesced, stats.hits, stats.files) == (2, 3, 0, 2)


def test_waiters_on_a_failed_synthesis_get_the_error_too(output_dir):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    engine = CountingEngine()
    engine.failures_left = 1
    engine.gate = native_lock()
    engine.gate.acquire()
    pool = gevent.threadpool.ThreadPool(3)
    try:
        pending = [pool.spawn(cache.get_or_synthesize, engine, "Goodbye.") for _ in range(3)]
        wait_until(lambda: cache.stats().coalesced == 2)
    finally:
        engine.gate.release()
        for result in pending:
            with pytest.raises(TtsSynthesisFailed, match="model exploded"):
                result.get(timeout=10)
        pool.kill()

    assert engine.calls == 1
    assert list(cache.directory.iterdir()) == []


def test_a_failed_synthesis_leaves_nothing_and_the_next_call_retries(output_dir):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    engine = CountingEngine()
    engine.failures_left = 1

    with pytest.raises(TtsSynthesisFailed, match="model exploded"):
        cache.get_or_synthesize(engine, "One moment please.")
    assert list(cache.directory.iterdir()) == []
    assert cache.stats().files == 0

    path = cache.get_or_synthesize(engine, "One moment please.")

    assert path.exists()
    assert engine.calls == 2
    assert (cache.stats().misses, cache.stats().files) == (2, 1)


def test_a_partial_file_from_a_failing_engine_is_removed(output_dir):
    class HalfWritingEngine(NullEngine):
        def synthesize_to_wav(self, text, path):
            Path(path).write_bytes(b"RIFF\x00\x00")
            raise TtsSynthesisFailed("disk full halfway")

    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)

    with pytest.raises(TtsSynthesisFailed, match="disk full halfway"):
        cache.get_or_synthesize(HalfWritingEngine(), "Hello.")

    assert list(cache.directory.iterdir()) == []
    # So a restart does not adopt it as a valid phrase.
    assert PhraseCache.for_output_dir(output_dir, max_bytes=10**9).stats().files == 0


def test_empty_text_raises_without_synthesis(output_dir):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    engine = CountingEngine()

    with pytest.raises(TtsSynthesisFailed, match="empty"):
        cache.get_or_synthesize(engine, " \n\t ")

    assert engine.calls == 0


def test_cached_files_live_in_output_cache_and_escape_the_hangup_glob(output_dir):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    call_uuid = str(uuid.uuid4())
    call_wav = output_dir / f"{call_uuid}-0001-{os.getpid()}.wav"
    NullEngine().synthesize_to_wav("a call's own reply", call_wav)
    cached = [cache.get_or_synthesize(CountingEngine(name=f"engine{n}"), f"text {n}") for n in range(20)]

    assert cache.directory == output_dir / "cache"
    assert all(path.parent == output_dir / "cache" for path in cached)
    # The hangup clean-up (conversation.py) deletes exactly this glob.
    assert list(output_dir.glob(f"{call_uuid}-*.wav")) == [call_wav]
    # No name could match it for any uuid, even if the files sat in the output directory itself.
    assert not any(fnmatch.fnmatch(path.name, "*-*.wav") for path in cached)
    assert all(fnmatch.fnmatch(path.name, "*.wav") for path in cached)


def test_a_hit_avoids_synthesis_with_the_real_piper_voice(output_dir):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    piper = CountingPiper()

    first = cache.get_or_synthesize(piper, "Your appointment is confirmed.")
    info = soundfile.info(str(first))
    audio, _ = soundfile.read(str(first))
    assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
    assert info.duration > 1.0 and numpy.abs(audio).max() > 0.05

    again = cache.get_or_synthesize(piper, "Your appointment is confirmed.")

    assert again == first
    assert piper.calls == 1
    assert cache.stats().hits == 1
    assert first != cache.path_for(NullEngine(), "Your appointment is confirmed.")


def test_lookup_serves_a_hit_without_synthesis_and_counts_it(output_dir):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    engine = CountingEngine()
    stored = cache.get_or_synthesize(engine, "Thank you for calling.")

    assert cache.lookup(engine, "  Thank you\n for calling. ") == stored
    assert cache.lookup(engine, "Not cached yet.") is None
    assert cache.lookup(engine, " ") is None

    assert engine.calls == 1
    assert not cache.path_for(engine, "Not cached yet.").exists()
    # The miss is counted by the get_or_synthesize the caller makes next, not twice.
    assert cache.stats() == CacheStats(hits=1, misses=1, coalesced=0, evictions=0, bytes=stored.stat().st_size,
                                       files=1)


def test_lookup_refreshes_recency(output_dir, one_file_bytes):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=3 * one_file_bytes)
    engine = CountingEngine()
    a, b, c, d = same_size_texts(4)
    for text in (a, b, c):
        cache.get_or_synthesize(engine, text)

    assert cache.lookup(engine, a) is not None  # a is now the most recent: b is the oldest
    cache.get_or_synthesize(engine, d)

    assert not cache.path_for(engine, b).exists()
    assert all(cache.path_for(engine, text).exists() for text in (a, c, d))


def test_lookup_of_a_vanished_file_is_a_miss_and_forgets_it(output_dir):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    engine = CountingEngine()
    cache.get_or_synthesize(engine, "Goodbye.").unlink()

    assert cache.lookup(engine, "Goodbye.") is None

    assert (cache.stats().files, cache.stats().bytes, cache.stats().hits) == (0, 0, 0)
    assert cache.get_or_synthesize(engine, "Goodbye.").exists()
    assert engine.calls == 2


def test_lookup_answers_while_every_worker_thread_is_busy_synthesizing(output_dir):
    # The daemon's pool has as many threads as cores; a hit must not queue behind them.
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
    greeting = cache.get_or_synthesize(NullEngine(), "Welcome to the store.")
    slow = CountingEngine()
    slow.gate = native_lock()
    slow.gate.acquire()
    pool = gevent.threadpool.ThreadPool(2)
    try:
        busy = [pool.spawn(cache.get_or_synthesize, slow, f"a long uncached sentence {n}") for n in range(2)]
        wait_until(lambda: slow.calls == 2)
        # Through the pool the hit waits for a free thread (spawn itself blocks on a full pool).
        queued_hit = gevent.spawn(pool.apply, cache.get_or_synthesize, (NullEngine(), "Welcome to the store."))
        gevent.sleep(0)

        # Served on this (the gevent loop's) thread while both workers are stuck in synthesis.
        assert cache.lookup(NullEngine(), "Welcome to the store.") == greeting
        assert not queued_hit.ready()
    finally:
        slow.gate.release()
        for result in busy:
            result.get(timeout=10)
        assert queued_hit.get(timeout=10) == greeting
        pool.kill()


OTHER_UID = 65534


def test_start_up_never_adopts_a_cache_file_owned_by_another_user(output_dir, caplog):
    engine = CountingEngine()
    planted = PhraseCache.for_output_dir(output_dir, max_bytes=10**9).path_for(engine, "Please hold.")
    NullEngine().synthesize_to_wav("transfer your savings to this account", planted)
    give_to(planted, OTHER_UID, -1)

    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)

    assert cache.stats().files == 0
    assert "tts_cache_file_not_adopted" in caplog.text and "owned by another user" in caplog.text
    assert cache.lookup(engine, "Please hold.") is None
    # A miss replaces it with a file of our own.
    assert cache.get_or_synthesize(engine, "Please hold.") == planted
    assert engine.calls == 1
    assert os.lstat(planted).st_uid == os.geteuid()


def test_start_up_never_adopts_a_symlink(output_dir, tmp_path, caplog):
    engine = CountingEngine()
    elsewhere = tmp_path / "elsewhere.wav"
    NullEngine().synthesize_to_wav("somebody else's words", elsewhere)
    planted = PhraseCache.for_output_dir(output_dir, max_bytes=10**9).path_for(engine, "Please hold.")
    planted.symlink_to(elsewhere)

    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)

    assert cache.stats().files == 0
    assert "tts_cache_file_not_adopted" in caplog.text and "a symlink" in caplog.text
    path = cache.get_or_synthesize(engine, "Please hold.")
    assert path == planted and not path.is_symlink()
    assert engine.calls == 1
    assert elsewhere.exists()


def test_the_cache_directory_is_created_private(output_dir):
    cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)

    assert stat.S_IMODE(os.lstat(cache.directory).st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(cache.get_or_synthesize(NullEngine(), "Hello.")).st_mode) == 0o640


def test_a_calls_own_wav_skips_the_disk_flush_and_a_cached_phrase_keeps_it(output_dir, monkeypatch):
    """A per-call WAV is played at once and deleted at the hangup; the cache's files are read
    again after a restart, so only they are fsynced before they appear."""
    from ivr_daemon import audio
    from ivr_daemon.config import load_settings
    from ivr_daemon.llm import make_llm_client
    from ivr_daemon.turn_services import TurnServices

    class ToneEngine(NullEngine):  # says something, so it is written the way real voices are
        def synthesize(self, text):
            return numpy.full(800, 0.25, dtype=numpy.float32), 8000

    flushed: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(audio.os, "fsync", lambda fd: (flushed.append(fd), real_fsync(fd)))
    settings = load_settings(environ={"TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(output_dir)})
    pool = gevent.threadpool.ThreadPool(1)
    try:
        def services(cache):
            return TurnServices(settings=settings, llm=make_llm_client(settings), tts=ToneEngine(),
                                send=lambda command: None, synth_pool=pool, cache=cache)

        own = services(None).spawn_synthesis("A reply for this call.", output_dir / "call-0.wav").get(timeout=10)
        assert soundfile.info(str(own)).frames == 800 and flushed == []

        cache = PhraseCache.for_output_dir(output_dir, max_bytes=10**9)
        cached = services(cache).spawn_synthesis("One moment please.", output_dir / "call-1.wav").get(timeout=10)
        assert cached.parent == cache.directory and len(flushed) == 1
    finally:
        pool.kill()
