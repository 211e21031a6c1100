"""The TTS engine interface and its errors: text in, telephony WAV out."""

from __future__ import annotations

import abc
import hashlib
import os
import threading
import time
from pathlib import Path

import numpy

from ivr_daemon.audio import write_telephony_wav
from ivr_daemon.logs import get_logger

log = get_logger(__name__)


class TtsError(Exception):
    """Base of every TTS failure."""


class TtsModelUnavailable(TtsError):
    """The model could not be found, downloaded or loaded at start-up; the message says how to fix it."""


class TtsSynthesisFailed(TtsError):
    """Synthesis of one text failed; no WAV was written."""


def one_line(exc: BaseException) -> str:
    """An exception as a single line, for messages that end up in one log line."""
    detail = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def native_lock() -> threading.Lock:
    """An OS lock even under gevent monkey-patching: synthesis runs in native worker threads."""
    try:
        from gevent.monkey import get_original
    except ImportError:
        return threading.Lock()
    return get_original("_thread", "allocate_lock")()


def file_fingerprint(path: str | os.PathLike) -> str:
    """First 12 hex digits of the file's SHA-256, so a cache key changes when the model does."""
    digest = hashlib.sha256()
    with open(path, "rb") as model_file:
        for block in iter(lambda: model_file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


class TtsEngine(abc.ABC):
    """One loaded model/voice; ``synthesize`` is blocking and called from worker threads."""

    name: str
    voice_id: str

    @abc.abstractmethod
    def synthesize(self, text: str) -> tuple[numpy.ndarray, int]:
        """Blocking, CPU-bound: returns (mono samples, native sample rate in Hz). Called from a worker thread."""

    def close(self) -> None:
        """Free what the engine holds beyond memory (worker processes); the daemon calls it at exit."""

    def warm_up(self) -> None:
        """Blocking: run the model once before the first real sentence, so that sentence does not pay
        for the model's first runs. A worker process calls it after loading its voice; no-op here."""

    def write_wav(self, samples: numpy.ndarray, sample_rate_hz: int, path: str | os.PathLike, *,
                  durable: bool = True) -> Path:
        """``synthesize``'s output as the telephony WAV at ``path`` (atomically); on the same thread.
        ``durable``: fsynced before it appears (see ``audio.write_telephony_wav``)."""
        return write_telephony_wav(samples, sample_rate_hz, path, durable=durable)

    def synthesize_to_wav(self, text: str, path: str | os.PathLike, *, durable: bool = True) -> Path:
        """Synthesize ``text`` into an 8 kHz mono PCM_16 WAV at ``path``; raises TtsSynthesisFailed.
        ``durable=False`` for a call's own WAV, which nobody reads after a restart: no fsync."""
        if not text or not text.strip():
            raise TtsSynthesisFailed(f"{self.name}: nothing to say (empty text)")
        started_s = time.monotonic()
        try:
            samples, sample_rate_hz = self.synthesize(text)
        except TtsSynthesisFailed:
            raise
        except Exception as exc:
            raise TtsSynthesisFailed(f"{self.name} failed on {text[:60]!r}: {one_line(exc)}") from exc
        samples = numpy.asarray(samples)
        if samples.size == 0:
            raise TtsSynthesisFailed(f"{self.name} produced no audio for {text[:60]!r}")
        try:
            written = self.write_wav(samples, sample_rate_hz, path, durable=durable)
        except Exception as exc:
            raise TtsSynthesisFailed(f"{self.name} could not write {path}: {one_line(exc)}") from exc
        log.debug(
            "tts_synthesized",
            engine=self.name,
            voice_id=self.voice_id,
            text_chars=len(text),
            audio_s=round(samples.shape[0] / sample_rate_hz, 3),
            elapsed_s=round(time.monotonic() - started_s, 3),
        )
        return written
