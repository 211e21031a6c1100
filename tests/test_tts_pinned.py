"""Tests for ivr_daemon.tts.pinned: phrases the daemon relies on are never evicted, and come back if they vanish."""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import time
import uuid
from pathlib import Path

import gevent
import gevent.threadpool
import pytest
import soundfile

from ivr_daemon.tts import TtsSynthesisFailed
from ivr_daemon.tts.base import native_lock
from ivr_daemon.tts.cache import STRAY_TEMP_MIN_AGE_S, PhraseCache, cache_key
from ivr_daemon.tts.null import NullEngine
from ivr_daemon.tts.pinned import PINNED_SUBDIR, PinnedPhrases
from harness import give_to

FALLBACK = "Sorry, I'm having trouble right now. Please try again in a moment."
OTHER_UID = 65534


class GatedEngine(NullEngine):
    """NullEngine counting its syntheses (from any thread); a held ``gate`` makes them wait, ``fail`` raises."""

    def __init__(self, gate=None):
        self.calls = 0
        self.fail = False
        self.gate = gate
        self._count_lock = native_lock()

    def synthesize(self, text: str):
        with self._count_lock:
            self.calls += 1
        if self.gate is not None:
            self.gate.acquire()
            self.gate.release()
        if self.fail:
            raise RuntimeError("model exploded")
        return super().synthesize(text)


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline_s, "condition not met in time"
        gevent.sleep(0.005)


def held_lock():
    lock = native_lock()
    lock.acquire()
    return lock


def assert_telephony_wav(path: Path) -> None:
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (8000, 1, "PCM_16", "WAV")
    assert info.duration > 1.0


def test_prepare_synthesizes_once_into_output_phrases_under_a_content_name(tmp_path):
    engine = GatedEngine()
    pinned = PinnedPhrases.for_output_dir(tmp_path, engine)

    path = pinned.prepare(FALLBACK)
    again = pinned.prepare("  " + FALLBACK.replace(" ", "\n ", 1))

    assert again == path == pinned.path_for(FALLBACK) == tmp_path / PINNED_SUBDIR / f"{cache_key(engine, FALLBACK)}.wav"
    assert engine.calls == 1
    assert_telephony_wav(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert pinned.existing(FALLBACK) == path
    # No "<call-uuid>-*.wav" hangup glob can match it, wherever it lived.
    assert re.fullmatch(r"[0-9a-f]{64}\.wav", path.name)
    assert not fnmatch.fnmatch(path.name, f"{uuid.uuid4()}-*.wav")


def test_path_for_and_existing_do_not_synthesize(tmp_path):
    engine = GatedEngine()
    pinned = PinnedPhrases.for_output_dir(tmp_path, engine)

    path = pinned.path_for(FALLBACK)

    assert pinned.existing(FALLBACK) is None
    assert not path.exists()
    assert engine.calls == 0


def test_a_vanished_phrase_is_reported_missing_and_prepare_recreates_it(tmp_path):
    engine = GatedEngine()
    pinned = PinnedPhrases.for_output_dir(tmp_path, engine)
    path = pinned.prepare(FALLBACK)
    first_bytes = path.read_bytes()

    path.unlink()  # an operator, a tmp cleaner

    assert pinned.existing(FALLBACK) is None
    assert pinned.prepare(FALLBACK) == path
    assert pinned.existing(FALLBACK) == path
    assert path.read_bytes() == first_bytes
    assert engine.calls == 2


def test_two_threads_preparing_the_same_text_share_one_synthesis(tmp_path):
    engine = GatedEngine(gate=held_lock())
    pinned = PinnedPhrases.for_output_dir(tmp_path, engine)
    pool = gevent.threadpool.ThreadPool(2)
    try:
        first = pool.spawn(pinned.prepare, FALLBACK)
        wait_until(lambda: engine.calls == 1)
        second = pool.spawn(pinned.prepare, FALLBACK)
        # The second thread waits on the first one's synthesis rather than starting its own.
        wait_until(lambda: pinned.coalesced == 1)
        assert pinned.existing(FALLBACK) is None
    finally:
        engine.gate.release()
        paths = [first.get(timeout=10), second.get(timeout=10)]
        pool.kill()

    assert paths[0] == paths[1] == pinned.path_for(FALLBACK)
    assert engine.calls == 1
    assert_telephony_wav(paths[0])
    assert os.listdir(pinned.directory) == [paths[0].name]


def test_two_daemons_preparing_the_same_phrase_at_once_leave_one_complete_file(tmp_path):
    # Two shards: separate instances (no shared state, as two processes) on one output directory.
    gate = held_lock()
    engines = [GatedEngine(gate=gate), GatedEngine(gate=gate)]
    shards = [PinnedPhrases.for_output_dir(tmp_path, engine) for engine in engines]
    pool = gevent.threadpool.ThreadPool(2)
    try:
        pending = [pool.spawn(shard.prepare, FALLBACK) for shard in shards]
        # Both are synthesizing at the same time.
        wait_until(lambda: [engine.calls for engine in engines] == [1, 1])
    finally:
        gate.release()
        paths = [result.get(timeout=10) for result in pending]
        pool.kill()

    assert paths[0] == paths[1]
    assert_telephony_wav(paths[0])
    # Both writes were atomic: one final file, no temp file left behind.
    assert os.listdir(tmp_path / PINNED_SUBDIR) == [paths[0].name]
    assert [shard.existing(FALLBACK) for shard in shards] == paths


def test_the_phrase_survives_a_full_cache_evicting_everything_under_one_output_dir(tmp_path):
    engine = GatedEngine()
    pinned = PinnedPhrases.for_output_dir(tmp_path, engine)
    fallback = pinned.prepare(FALLBACK)
    fallback_bytes = fallback.read_bytes()
    one_file_bytes = len(fallback_bytes)
    cache = PhraseCache.for_output_dir(tmp_path, max_bytes=3 * one_file_bytes)

    # The same text through the cache too (a model may say it): the cached copy is the cache's own.
    assert cache.get_or_synthesize(engine, FALLBACK) != fallback
    for index in range(20):
        cache.get_or_synthesize(engine, f"A unique reply number {index:03d} that fills the cache up.")
    # A restart with the cache cut to nothing evicts all it can.
    restarted = PhraseCache.for_output_dir(tmp_path, max_bytes=0)

    assert cache.stats().evictions >= 18
    assert restarted.stats().files == 1
    assert not cache.path_for(engine, FALLBACK).exists()
    assert pinned.existing(FALLBACK) == fallback
    assert fallback.read_bytes() == fallback_bytes


def test_a_failed_synthesis_raises_leaves_no_file_and_the_next_prepare_retries(tmp_path):
    engine = GatedEngine()
    engine.fail = True
    pinned = PinnedPhrases.for_output_dir(tmp_path, engine)

    with pytest.raises(TtsSynthesisFailed, match="model exploded"):
        pinned.prepare(FALLBACK)
    assert pinned.existing(FALLBACK) is None
    assert os.listdir(pinned.directory) == []

    engine.fail = False
    assert pinned.prepare(FALLBACK).exists()
    assert engine.calls == 2


def test_a_thread_waiting_on_a_failed_synthesis_gets_the_error_too(tmp_path):
    engine = GatedEngine(gate=held_lock())
    engine.fail = True
    pinned = PinnedPhrases.for_output_dir(tmp_path, engine)
    pool = gevent.threadpool.ThreadPool(2)
    try:
        first = pool.spawn(pinned.prepare, FALLBACK)
        wait_until(lambda: engine.calls == 1)
        second = pool.spawn(pinned.prepare, FALLBACK)
        wait_until(lambda: pinned.coalesced == 1)
    finally:
        engine.gate.release()
        for result in (first, second):
            with pytest.raises(TtsSynthesisFailed, match="model exploded"):
                result.get(timeout=10)
        pool.kill()

    assert engine.calls == 1


def test_empty_text_raises_without_synthesis(tmp_path):
    engine = GatedEngine()
    pinned = PinnedPhrases.for_output_dir(tmp_path, engine)

    with pytest.raises(TtsSynthesisFailed, match="empty"):
        pinned.prepare(" \n ")

    assert engine.calls == 0


def test_a_file_not_ours_is_not_used_and_prepare_replaces_it(tmp_path):
    engine = GatedEngine()
    pinned = PinnedPhrases.for_output_dir(tmp_path, engine)
    planted = pinned.path_for(FALLBACK)
    planted.write_bytes(b"RIFF planted by someone else")
    give_to(planted, OTHER_UID, -1)

    assert pinned.existing(FALLBACK) is None

    path = pinned.prepare(FALLBACK)

    assert path == planted
    assert os.lstat(path).st_uid == os.geteuid()
    assert_telephony_wav(path)
    assert engine.calls == 1


def test_a_symlink_is_not_used_and_prepare_replaces_it(tmp_path):
    engine = GatedEngine()
    pinned = PinnedPhrases.for_output_dir(tmp_path, engine)
    elsewhere = tmp_path / "elsewhere.wav"
    NullEngine().synthesize_to_wav("somebody else's words", elsewhere)
    pinned.path_for(FALLBACK).symlink_to(elsewhere)

    assert pinned.existing(FALLBACK) is None

    path = pinned.prepare(FALLBACK)

    assert not path.is_symlink()
    assert_telephony_wav(path)
    assert engine.calls == 1


def test_start_up_removes_old_stray_temp_files_only(tmp_path):
    phrases = tmp_path / PINNED_SUBDIR
    phrases.mkdir(mode=0o750)
    stale = phrases / f".{'a' * 64}.wav.x1y2z3.part"
    young = phrases / f".{'b' * 64}.wav.q9w8e7.part"
    for path in (stale, young):
        path.write_bytes(b"partial")
    stale_s = time.time() - STRAY_TEMP_MIN_AGE_S - 60
    os.utime(stale, (stale_s, stale_s))

    PinnedPhrases.for_output_dir(tmp_path, NullEngine())

    assert not stale.exists()
    # A young one may be another daemon's write under way.
    assert young.exists()
