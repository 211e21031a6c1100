"""PinnedPhrases: the WAVs the daemon relies on (the fallback phrase, ...), never evicted or deleted.

They live in ``<tts_output_dir>/phrases``, apart from the LRU phrase cache (``cache/``) and
from the per-call WAVs (``<call-uuid>-*.wav``, deleted at hangup), under the phrase cache's
names: the SHA-256 of (engine name, voice id, normalized text). Shards sharing the directory
share the files; nothing in the daemon deletes them, and a file that vanishes anyway (an
operator, a tmp cleaner) is reported by ``existing`` and re-created by ``prepare``.

Writes are atomic (``write_telephony_wav``: temp file, fsync, rename), so two daemons preparing
the same phrase at once each write a complete file and the last rename wins; threads of one
daemon share a single synthesis.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from ivr_daemon.logs import get_logger
from ivr_daemon.storage import PINNED_SUBDIR, make_private_dir, owned_by_us
from ivr_daemon.tts.base import TtsEngine, TtsSynthesisFailed, native_lock, one_line
from ivr_daemon.tts.cache import STRAY_TEMP_MIN_AGE_S, TEMP_NAME, InFlight, cache_key, normalize_text

log = get_logger(__name__)

__all__ = ["PINNED_SUBDIR", "PinnedPhrases"]


class PinnedPhrases:
    """Phrases the daemon relies on, content-addressed under <tts_output_dir>/phrases,
    never evicted or deleted by the daemon; every method is safe from any thread."""

    def __init__(self, directory: str | os.PathLike, engine: TtsEngine):
        self.directory = Path(directory)
        self.engine = engine
        self._lock = native_lock()
        self._in_flight: dict[str, InFlight] = {}
        # Prepares that waited for another thread's synthesis of the same text.
        self.coalesced = 0
        make_private_dir(self.directory)  # raises UnsafeOutputDir
        self._remove_stray_temps()

    @classmethod
    def for_output_dir(cls, tts_output_dir: str | os.PathLike, engine: TtsEngine) -> "PinnedPhrases":
        """The pinned phrases of ``engine`` in ``<tts_output_dir>/phrases``."""
        return cls(Path(tts_output_dir) / PINNED_SUBDIR, engine)

    def path_for(self, text: str) -> Path:
        """Where ``text`` is (or would be) pinned; no I/O."""
        return self.directory / f"{cache_key(self.engine, text)}.wav"

    def existing(self, text: str) -> Path | None:
        """The path if the file is there (one lstat, safe on the gevent loop), else None.

        None means it vanished (or is not ours): re-create it with ``prepare`` on a worker thread.
        """
        path = self.path_for(text)
        try:
            info = os.lstat(path)
        except OSError:
            return None
        return path if owned_by_us(info) else None

    def prepare(self, text: str, on_synthesized: Callable[[float], None] | None = None) -> Path:
        """Synthesize ``text`` unless its file is there; returns the path. Blocking; raises TtsError.

        ``on_synthesized(seconds)`` is called, on this thread, when this call synthesized it.
        """
        spoken = normalize_text(text)
        if not spoken:
            raise TtsSynthesisFailed(f"{self.engine.name}: nothing to say (empty text)")
        key = cache_key(self.engine, spoken)
        while True:
            path = self.existing(spoken)
            if path is not None:
                return path
            with self._lock:
                flight = self._in_flight.get(key)
                if flight is None:
                    flight = self._in_flight[key] = InFlight()
                    break
                self.coalesced += 1
            flight.wait()
            if flight.error is not None:
                raise TtsSynthesisFailed(
                    f"{self.engine.name}: the same text failed in another thread: {one_line(flight.error)}"
                ) from flight.error
        return self._synthesize(spoken, key, flight, on_synthesized)

    def _synthesize(self, spoken: str, key: str, flight: InFlight,
                    on_synthesized: Callable[[float], None] | None) -> Path:
        path = self.path_for(spoken)
        error: BaseException | None = None
        started_s = time.monotonic()
        try:
            self.engine.synthesize_to_wav(spoken, path)
            synthesis_s = time.monotonic() - started_s
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._lock:
                del self._in_flight[key]
            flight.finish(error)
        log.info("tts_phrase_pinned", engine=self.engine.name, voice_id=self.engine.voice_id, path=str(path),
                 text_chars=len(spoken))
        if on_synthesized is not None:
            on_synthesized(synthesis_s)
        return path

    def _remove_stray_temps(self) -> None:
        """Temp files a crash left; a young one may be another daemon's write under way."""
        now_s = time.time()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not TEMP_NAME.match(entry.name):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                    if owned_by_us(info) and now_s - info.st_mtime > STRAY_TEMP_MIN_AGE_S:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.warning("tts_pinned_cleanup_failed", path=entry.path, error=one_line(exc))
