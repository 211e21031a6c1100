"""The ASR engine interface: PCM16 in, partial and final transcripts out.

An :class:`AsrEngine` is one loaded model, shared by every stream of the process. An
:class:`AsrStream` is one caller's audio: feed it 16-bit little-endian mono PCM at the rate it
was opened with, and each chunk gives back one result, as vosk's recognizer does: the final
result of an utterance that ended within the chunk (the engine's own end-of-utterance
detection; the stream then starts the next utterance by itself), else the partial result of
the utterance in progress (empty text when nobody speaks).

Every method of a stream blocks and burns CPU: call them from a worker thread, never on the
gevent loop, and one at a time per stream (streams are not thread-safe; different streams
are independent).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import soxr

PCM16_SAMPLE_BYTES = 2


class AsrError(Exception):
    """Base of every ASR failure."""


class AsrModelUnavailable(AsrError):
    """The model could not be found or loaded; the message names the setting and the path."""


@dataclass(frozen=True)
class WordTiming:
    """One recognised word, in seconds from the start of the stream."""

    word: str
    start_s: float
    end_s: float
    confidence: float | None = None


@dataclass(frozen=True)
class AsrResult:
    """A partial (utterance in progress) or final (utterance ended) transcript."""

    text: str
    final: bool
    words: tuple[WordTiming, ...] = ()

    def as_vosk(self) -> dict[str, object]:
        """vosk-server's reply for this result: ``{"partial": ...}`` or ``{"text": ..., "result": [...]}``.

        ``result`` (the word timings) is there only when words are, as vosk writes it.
        """
        if not self.final:
            return {"partial": self.text}
        reply: dict[str, object] = {}
        if self.words:
            reply["result"] = [
                {"conf": round(w.confidence, 6) if w.confidence is not None else 1.0,
                 "end": round(w.end_s, 3), "start": round(w.start_s, 3), "word": w.word}
                for w in self.words
            ]
        reply["text"] = self.text
        return reply


def join_finals(results: list[AsrResult]) -> AsrResult:
    """Several utterances that ended within one chunk, as one final result (one reply per chunk)."""
    texts = [r.text for r in results if r.text]
    return AsrResult(" ".join(texts), True, tuple(w for r in results for w in r.words))


class AsrStream(abc.ABC):
    """One caller's audio through one recognizer. Blocking: use from one worker thread at a time.

    This base turns bytes into int16 samples at the engine's rate (an odd trailing byte waits for
    the next chunk; another rate is resampled with soxr, statefully across chunks), and leaves
    the recognizing to :meth:`_accept` and :meth:`_finish`.
    """

    def __init__(self, sample_rate_hz: int, engine_rate_hz: int):
        if sample_rate_hz <= 0:
            raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
        self.sample_rate_hz = sample_rate_hz
        self.engine_rate_hz = engine_rate_hz
        self._odd_byte = b""
        self._resampler = self._new_resampler()
        self.audio_received_s = 0.0

    def _new_resampler(self) -> soxr.ResampleStream | None:
        if self.sample_rate_hz == self.engine_rate_hz:
            return None
        return soxr.ResampleStream(self.sample_rate_hz, self.engine_rate_hz, 1, dtype="int16", quality="HQ")

    def _samples(self, pcm: bytes, *, last: bool = False) -> np.ndarray:
        data = self._odd_byte + bytes(pcm)
        whole = len(data) - len(data) % PCM16_SAMPLE_BYTES
        self._odd_byte = b"" if last else data[whole:]
        samples = np.frombuffer(data[:whole], dtype="<i2")
        self.audio_received_s += samples.size / self.sample_rate_hz
        if self._resampler is None:
            return samples
        resampled = self._resampler.resample_chunk(samples, last=last)
        if last:
            self._resampler = self._new_resampler()
        return resampled

    def accept(self, pcm: bytes) -> AsrResult:
        """Feed PCM16 (little-endian, mono, at ``sample_rate_hz``): the final result of an utterance
        that ended within it, else the partial result of the one in progress."""
        return self._accept(self._samples(pcm))

    def finish(self) -> AsrResult:
        """End of the audio: the final result of what is pending (empty text when nothing is).

        The stream may be fed again afterwards, as a new utterance.
        """
        return self._finish(self._samples(b"", last=True))

    @abc.abstractmethod
    def _accept(self, samples: np.ndarray) -> AsrResult:
        """int16 samples at ``engine_rate_hz``."""

    @abc.abstractmethod
    def _finish(self, samples: np.ndarray) -> AsrResult:
        """The last int16 samples at ``engine_rate_hz`` (maybe none), then the final result."""

    def reset(self) -> None:
        """Drop the utterance in progress: what was heard of it is never reported."""
        self._odd_byte = b""
        self._resampler = self._new_resampler()  # it holds the last few ms of what came in
        self._reset()

    @abc.abstractmethod
    def _reset(self) -> None:
        """Drop the recognizer's utterance in progress."""

    def close(self) -> None:
        """Release what the stream holds (the engine may hand it to the next stream)."""


class AsrEngine(abc.ABC):
    """One loaded model, shared by every stream of the process."""

    name: str
    model_id: str

    @abc.abstractmethod
    def open_stream(self, sample_rate_hz: int) -> AsrStream:
        """A new stream of PCM16 at ``sample_rate_hz``. May block (a decoder is made): call off the loop."""
