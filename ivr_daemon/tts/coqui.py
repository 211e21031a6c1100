"""CoquiEngine: a Coqui TTS model (by name, downloaded on first use, or from local files), on CPU."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy

from ivr_daemon.config import DEFAULT_COQUI_MODEL
from ivr_daemon.logs import get_logger
from ivr_daemon.tts.base import TtsEngine, TtsModelUnavailable, file_fingerprint, native_lock, one_line

log = get_logger(__name__)

_INSTALL_HINT = "pip install coqui-tts (with torch)"
# Spoken once at load: the first call otherwise pays seconds of lazy imports (inflect, for
# numbers) and torch start-up, and a model that cannot speak (e.g. no phonemizer) fails here.
_WARM_UP_TEXT = "Hello, 1."
# Coqui logs its own download failures with a full traceback; ours carries the cause instead.
_DOWNLOAD_LOGGER = "TTS.utils.manage"


class _DropTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


@contextlib.contextmanager
def _quiet_download_tracebacks():
    download_logger = logging.getLogger(_DOWNLOAD_LOGGER)
    drop = _DropTraceback()
    download_logger.addFilter(drop)
    try:
        yield
    finally:
        download_logger.removeFilter(drop)


class CoquiEngine(TtsEngine):
    """One Coqui model loaded once (the daemon runs it in one worker process) and shared;
    synthesis is serialized by a lock.

    Coqui does not say its models are thread-safe (some keep per-model state), and on CPU one
    forward pass already spreads over torch.get_num_threads() threads, all the cores: running
    two at once would gain no throughput. Cache hits do not wait for it (PhraseCache.lookup).
    """

    name = "coqui"

    def __init__(self, tts, voice_id: str):
        """Wrap an already loaded ``TTS.api.TTS``; use the ``from_*`` constructors."""
        self._tts = tts.to("cpu")
        self.sample_rate_hz = int(tts.synthesizer.output_sample_rate)
        # Multi-speaker or multi-lingual models refuse to speak without a choice: take the first.
        self._speaker = tts.speakers[0] if tts.is_multi_speaker and tts.speakers else None
        languages = tts.languages if tts.is_multi_lingual else None
        self._language = ("en" if "en" in languages else languages[0]) if languages else None
        self.voice_id = voice_id + (f":{self._speaker}" if self._speaker else "")
        self._lock = native_lock()
        self.synthesize(_WARM_UP_TEXT)
        log.info("tts_model_loaded", engine=self.name, voice_id=self.voice_id, sample_rate_hz=self.sample_rate_hz)

    @classmethod
    def from_model_name(cls, model_name: str = DEFAULT_COQUI_MODEL) -> "CoquiEngine":
        """Load a released model by name, downloading it (with a progress bar) on first use."""
        fix = (
            "set COQUI_MODEL_PATH and COQUI_CONFIG_PATH to a local model, "
            f"or check the model name and network access to download {model_name}"
        )
        tts_class = _tts_class()
        try:
            with _quiet_download_tracebacks():
                tts = tts_class(model_name=model_name, progress_bar=True)
            if tts.synthesizer is None:
                raise ValueError("not a text-to-speech model")
            return cls(tts, f"coqui:{model_name}")
        except (Exception, SystemExit) as exc:
            raise TtsModelUnavailable(f"Coqui model {model_name} unavailable ({one_line(exc)}): {fix}") from exc

    @classmethod
    def from_files(cls, model_path: str | Path, config_path: str | Path) -> "CoquiEngine":
        """Load a local checkpoint and its config.json, as ``TTS(model_path=..., config_path=...)`` does."""
        fix = "set COQUI_MODEL_PATH and COQUI_CONFIG_PATH to a Coqui checkpoint and its config.json"
        tts_class = _tts_class()
        try:
            tts = tts_class(model_path=str(model_path), config_path=str(config_path), progress_bar=False)
            return cls(tts, f"coqui:{Path(model_path).name}:{file_fingerprint(model_path)}")
        except (Exception, SystemExit) as exc:
            raise TtsModelUnavailable(
                f"Coqui model {model_path} (config {config_path}) could not be loaded ({one_line(exc)}): {fix}"
            ) from exc

    def synthesize(self, text: str) -> tuple[numpy.ndarray, int]:
        with self._lock:
            samples = self._tts.tts(text=text, speaker=self._speaker, language=self._language)
        return numpy.asarray(samples, dtype=numpy.float32), self.sample_rate_hz


def _tts_class():
    try:
        from TTS.api import TTS
    except ImportError as exc:
        raise TtsModelUnavailable(f"Coqui TTS is not installed ({one_line(exc)}): {_INSTALL_HINT}") from exc
    return TTS
