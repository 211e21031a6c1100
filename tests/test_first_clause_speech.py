"""A reply spoken as first clause + rest (two Piper syntheses, played back to back) stays
intelligible: pocketsphinx still recognises its key words, as many as in the sentence said whole."""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from ivr_daemon.sentences import FIRST_CLAUSE_MIN_WORDS, SentenceSplitter
from ivr_daemon.tts import piper as piper_module

# FreeSWITCH starts a queued broadcast right after the previous one; leave it a short gap anyway.
GAP_S = 0.05
# Replies whose words pocketsphinx's generic model gets from the joe voice, with their key words.
REPLIES = [
    ("Please call me back tomorrow morning, and we will fix your phone today.",
     ["call", "back", "tomorrow", "morning", "fix", "phone", "today"]),
    ("Thank you for calling today, please call me back tomorrow morning.",
     ["thank", "calling", "today", "call", "back", "tomorrow", "morning"]),
]


@pytest.fixture(scope="module")
def piper_voice():
    return piper_module.load_voice()


@pytest.fixture(scope="module")
def recognizer():
    from pocketsphinx import Decoder

    return Decoder(loglevel="FATAL")  # the wheel's US-English acoustic model, dictionary and LM


def transcribe(recognizer, samples: np.ndarray, rate_hz: int) -> list[str]:
    wideband = soxr.resample(samples, rate_hz, 16000, quality="HQ")  # the model is for 16 kHz
    recognizer.start_utt()
    recognizer.process_raw(wideband.astype(np.int16).tobytes(), full_utt=True)
    recognizer.end_utt()
    hypothesis = recognizer.hyp()
    return hypothesis.hypstr.split() if hypothesis is not None else []


def spoken(voice, text: str) -> tuple[np.ndarray, int]:
    """What the caller hears of ``text`` at the telephony rate, with Piper's noise terms off: the
    same audio on every run, so what pocketsphinx hears does not change from run to run (with
    them on, one run in a few heard "take your own" for "fix your phone")."""
    rate_hz = 8000
    return np.frombuffer(piper_module.spoken_pcm16(voice, text, rate_hz, lead_s=0.0, tail_s=0.0), dtype="<i2"), rate_hz


@pytest.mark.parametrize("reply, key_words", REPLIES)
def test_key_words_survive_the_first_clause_cut(piper_voice, recognizer, reply, key_words):
    splitter = SentenceSplitter(first_clause_min_words=FIRST_CLAUSE_MIN_WORDS)
    chunks = splitter.feed(reply) + splitter.flush()
    assert splitter.first_chunk_is_clause and len(chunks) == 2

    whole, rate_hz = spoken(piper_voice, reply)
    pieces = []
    for index, chunk in enumerate(chunks):
        samples, chunk_rate_hz = spoken(piper_voice, chunk)
        assert chunk_rate_hz == rate_hz
        pieces += [samples, np.zeros(int(GAP_S * rate_hz), dtype=np.int16)]
    played = np.concatenate(pieces)

    heard_whole = transcribe(recognizer, whole, rate_hz)
    heard_cut = transcribe(recognizer, played, rate_hz)
    got_whole = [word for word in key_words if word in heard_whole]
    got_cut = [word for word in key_words if word in heard_cut]
    # The cut costs at most one key word against the sentence said whole, and most are heard.
    assert len(got_cut) >= len(got_whole) - 1, f"cut: {heard_cut!r}, whole: {heard_whole!r}"
    assert len(got_cut) >= 0.75 * len(key_words), f"cut: {heard_cut!r}"
    # No long pause between the clause and its rest: about the length of the sentence said whole.
    assert len(played) / rate_hz < len(whole) / rate_hz + 0.5
