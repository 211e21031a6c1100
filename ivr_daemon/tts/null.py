"""NullEngine: silence as long as the text would take to say, for tests, replay and benchmarks."""

from __future__ import annotations

import numpy

from ivr_daemon.audio import TELEPHONY_RATE_HZ, silence
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
