"""PhraseCache: synthesized WAVs kept on disk by (engine, voice, text), bounded in bytes, LRU-evicted."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ivr_daemon.logs import get_logger
from ivr_daemon.storage import CACHE_SUBDIR, make_private_dir, owned_by_us
from ivr_daemon.tts.base import TtsEngine, TtsSynthesisFailed, native_lock, one_line

log = get_logger(__name__)

__all__ = ["CACHE_SUBDIR", "CacheStats", "InFlight", "PhraseCache", "cache_key", "normalize_text"]

# Part of every key: bump it when the WAV format changes so old files stop matching (and age out).
_KEY_VERSION = "phrase-cache-v1"
# Names are a bare SHA-256 in hex: no "-", so no "<call-uuid>-*.wav" hangup glob can ever match one.
_CACHED_NAME = re.compile(r"^[0-9a-f]{64}\.wav$")
# write_telephony_wav's temp files: mkstemp(prefix=".<final name>.", suffix=".part").
TEMP_NAME = re.compile(r"^\.[0-9a-f]{64}\.wav\..+\.part$")
# Another daemon sharing the directory may be writing a young temp file right now; only
# one this old is certainly left over from a crash.
STRAY_TEMP_MIN_AGE_S = 300.0


@dataclass(frozen=True)
class CacheStats:
    """Counters since start-up, and the size of the index now."""

    hits: int
    misses: int
    coalesced: int
    evictions: int
    bytes: int
    files: int


def normalize_text(text: str) -> str:
    """Whitespace collapsed and trimmed; case and punctuation kept, since they change the prosody."""
    return " ".join(text.split())


def cache_key(engine: TtsEngine, text: str) -> str:
    """SHA-256 hex of (engine name, voice id, normalized text), unambiguous whatever the strings hold."""
    material = json.dumps([_KEY_VERSION, engine.name, engine.voice_id, normalize_text(text)], ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


class InFlight:
    """One synthesis under way; other threads wanting the same key wait for it to finish."""

    def __init__(self) -> None:
        # A native lock held until the synthesis ends: gevent's Event cannot wake native threads.
        self._done = native_lock()
        self._done.acquire()
        self.error: BaseException | None = None

    def finish(self, error: BaseException | None) -> None:
        self.error = error
        self._done.release()

    def wait(self) -> None:
        self._done.acquire()
        self._done.release()


class PhraseCache:
    """Synthesized phrases on disk, bounded by ``max_bytes``; every method is safe from any thread."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = native_lock()
        # key -> file size in bytes, least recently used first.
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._in_flight: dict[str, InFlight] = {}
        self._total_bytes = 0
        self._hits = self._misses = self._coalesced = self._evictions = 0
        # Recency is persisted as each file's mtime; strictly increasing stamps keep the order
        # exact across a restart even when the filesystem clock is coarser than our calls.
        self._last_stamp_ns = 0
        make_private_dir(self.directory)  # raises UnsafeOutputDir
        self._index_existing_files()

    @classmethod
    def for_output_dir(cls, tts_output_dir: str | os.PathLike, max_bytes: int) -> "PhraseCache":
        """The cache in ``<tts_output_dir>/cache``, beside (not among) the per-call WAVs."""
        return cls(Path(tts_output_dir) / CACHE_SUBDIR, max_bytes)

    def path_for(self, engine: TtsEngine, text: str) -> Path:
        """Where ``text`` spoken by ``engine`` is (or would be) cached."""
        return self._path(cache_key(engine, text))

    def lookup(self, engine: TtsEngine, text: str) -> Path | None:
        """The cached WAV for ``text`` if there is one, else None; never synthesizes.

        Non-blocking, safe on the gevent loop: a dict lookup under the lock (which no thread
        holds for longer than a few file-system calls) and one utime. A hit is counted and
        refreshes the recency; a miss counts nothing (get_or_synthesize counts it next).
        """
        spoken = normalize_text(text)
        if not spoken:
            return None
        key = cache_key(engine, spoken)
        path = self._path(key)
        with self._lock:
            if key in self._sizes and self._refresh(key, path):
                self._hits += 1
                return path
        return None

    def get_or_synthesize(self, engine: TtsEngine, text: str,
                          on_synthesized: Callable[[float], None] | None = None) -> Path:
        """The cached WAV for ``text``, synthesizing it on a miss; blocking, raises TtsError as the engine does.

        ``on_synthesized(seconds)`` is called, on this thread, when this call synthesized it.
        """
        spoken = normalize_text(text)
        if not spoken:
            raise TtsSynthesisFailed(f"{engine.name}: nothing to say (empty text)")
        key = cache_key(engine, spoken)
        path = self._path(key)
        joined = False
        while True:
            with self._lock:
                if key in self._sizes and self._refresh(key, path):
                    if not joined:
                        self._hits += 1
                    return path
                flight = self._in_flight.get(key)
                if flight is None:
                    flight = self._in_flight[key] = InFlight()
                    self._misses += 1
                    break
                self._coalesced += 1
            flight.wait()
            if flight.error is not None:
                raise TtsSynthesisFailed(
                    f"{engine.name}: the same text failed in another thread: {one_line(flight.error)}"
                ) from flight.error
            # Loop to pick the file up from the index: it may have been evicted already.
            joined = True
        return self._synthesize(engine, spoken, key, path, flight, on_synthesized)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                coalesced=self._coalesced,
                evictions=self._evictions,
                bytes=self._total_bytes,
                files=len(self._sizes),
            )

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.wav"

    def _synthesize(self, engine: TtsEngine, spoken: str, key: str, path: Path, flight: InFlight,
                    on_synthesized: Callable[[float], None] | None) -> Path:
        # No lock held here: synthesis takes seconds and other keys must not wait for it.
        started_s = time.monotonic()
        try:
            engine.synthesize_to_wav(spoken, path)
            synthesis_s = time.monotonic() - started_s
            size_bytes = path.stat().st_size
        except BaseException as exc:
            # The built-in engines write atomically, but an engine that left a partial file
            # would otherwise have it indexed as a valid phrase at the next start-up.
            _unlink_quietly(path)
            with self._lock:
                del self._in_flight[key]
            flight.finish(exc)
            raise
        with self._lock:
            del self._in_flight[key]
            self._stamp(path)
            self._sizes[key] = size_bytes
            self._total_bytes += size_bytes
            self._evict_beyond_cap(keep=key)
        flight.finish(None)
        log.debug("tts_cache_stored", engine=engine.name, voice_id=engine.voice_id, key=key, size_bytes=size_bytes)
        if on_synthesized is not None:
            on_synthesized(synthesis_s)
        return path

    def _refresh(self, key: str, path: Path) -> bool:
        """Mark ``key`` most recently used; False (and forgotten) if its file vanished. Lock held."""
        try:
            self._stamp(path)
        except FileNotFoundError:
            # Deleted behind our back (another daemon sharing the directory, an operator).
            self._total_bytes -= self._sizes.pop(key)
            log.warning("tts_cache_file_missing", path=str(path))
            return False
        except OSError as exc:
            # Owned by another user, say: the in-memory order still counts, only the restart order suffers.
            log.debug("tts_cache_touch_failed", path=str(path), error=one_line(exc))
        self._sizes.move_to_end(key)
        return True

    def _stamp(self, path: Path) -> None:
        """Set atime and mtime to a strictly increasing now, the recency a restart reads back. Lock held."""
        stamp_ns = max(time.time_ns(), self._last_stamp_ns + 1)
        os.utime(path, ns=(stamp_ns, stamp_ns))
        self._last_stamp_ns = stamp_ns

    def _evict_beyond_cap(self, keep: str) -> None:
        """Delete least recently used files until the total fits, never ``keep``. Lock held.

        Unlinking under the lock matters: a concurrent miss on an evicted key writes the same
        path, and an unlink done later would delete that fresh file.
        """
        for key in list(self._sizes):
            if self._total_bytes <= self.max_bytes:
                break
            if key == keep:
                continue
            size_bytes = self._sizes.pop(key)
            self._total_bytes -= size_bytes
            self._evictions += 1
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("tts_cache_evict_failed", path=str(self._path(key)), error=one_line(exc))
            log.debug("tts_cache_evicted", key=key, size_bytes=size_bytes)
        if self._total_bytes > self.max_bytes:
            log.warning(
                "tts_cache_file_exceeds_cap",
                path=str(self._path(keep)),
                size_bytes=self._sizes[keep],
                max_bytes=self.max_bytes,
            )

    def _index_existing_files(self) -> None:
        """Adopt the phrases a previous run left, oldest use first; delete old stray temp files.

        Only regular files we own are adopted: a symlink or a file of another user's may be a
        planted WAV under a name anyone can compute. They are skipped (and logged), never
        served: a miss on that key later replaces the file with our own.
        """
        found: list[tuple[int, str, int]] = []
        stray_temps_removed = 0
        now_s = time.time()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not owned_by_us(info):
                    if _CACHED_NAME.match(entry.name):
                        log.warning("tts_cache_file_not_adopted", path=entry.path, owner_uid=info.st_uid,
                                    reason=_why_not_ours(info))
                    continue
                if _CACHED_NAME.match(entry.name):
                    found.append((info.st_mtime_ns, entry.name[: -len(".wav")], info.st_size))
                elif TEMP_NAME.match(entry.name) and now_s - info.st_mtime > STRAY_TEMP_MIN_AGE_S:
                    _unlink_quietly(Path(entry.path))
                    stray_temps_removed += 1
        found.sort()
        with self._lock:
            for mtime_ns, key, size_bytes in found:
                self._sizes[key] = size_bytes
                self._total_bytes += size_bytes
                self._last_stamp_ns = max(self._last_stamp_ns, mtime_ns)
            if found:
                # The cap may have shrunk since the last run; the newest file stays whatever its size.
                self._evict_beyond_cap(keep=found[-1][1])
            log.info(
                "tts_cache_indexed",
                directory=str(self.directory),
                files=len(self._sizes),
                bytes=self._total_bytes,
                max_bytes=self.max_bytes,
                evictions=self._evictions,
                stray_temps_removed=stray_temps_removed,
            )


def _why_not_ours(info: os.stat_result) -> str:
    if stat.S_ISLNK(info.st_mode):
        return "a symlink"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return "owned by another user"


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("tts_cache_cleanup_failed", path=str(path), error=one_line(exc))
