"""NullEngine: silence as long as the text would take to say, for tests, replay and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy

from ivr_daemon.audio import TELEPHONY_RATE_HZ, silence, write_silent_wav, write_telephony_wav
from ivr_daemon.tts.base import TtsEngine

# Roughly 13 characters a second, an unhurried phone voice.
SECONDS_PER_CHARACTER = 0.075
MINIMUM_DURATION_S = 0.3


class NullEngine(TtsEngine):
    """No model: every text becomes silence of a plausible speaking length at 8000 Hz."""

    name = "null"
    voice_id = "null:silence"

    def synthesize(self, text: str) -> tuple[numpy.ndarray, int]:
        duration_s = max(MINIMUM_DURATION_S, SECONDS_PER_CHARACTER * len(text.strip()))
        return silence(duration_s, TELEPHONY_RATE_HZ), TELEPHONY_RATE_HZ

    def write_wav(self, samples: numpy.ndarray, sample_rate_hz: int, path, *, durable: bool = True) -> Path:
        # Silence needs no conversion (and no disk flush: see write_silent_wav); a subclass (a
        # test's engine) that returns anything else is written the usual way.
        if sample_rate_hz == TELEPHONY_RATE_HZ and samples.ndim == 1 and not samples.any():
            return write_silent_wav(samples.size, path)
        return write_telephony_wav(samples, sample_rate_hz, path, durable=durable)
