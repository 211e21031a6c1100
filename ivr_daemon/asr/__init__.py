"""Speech recognition engines behind one streaming interface (base.AsrEngine/AsrStream)."""

from __future__ import annotations

from ivr_daemon.asr.base import AsrEngine, AsrError, AsrModelUnavailable, AsrResult, AsrStream, WordTiming

__all__ = ["AsrEngine", "AsrError", "AsrModelUnavailable", "AsrResult", "AsrStream", "WordTiming", "make_asr_engine"]


def make_asr_engine(settings) -> AsrEngine:
    """The engine ASR_ENGINE names (load_settings resolved an empty one from VOSK_MODEL_PATH).

    Loads the model now: AsrModelUnavailable names the setting and the path when it cannot.
    Blocking (vosk's models take seconds): call it at start-up or off the gevent loop.
    """
    if settings.asr_engine == "vosk":
        from ivr_daemon.asr.vosk import VoskEngine

        return VoskEngine(settings.vosk_model_path)
    from ivr_daemon.asr.pocketsphinx import PocketsphinxEngine

    return PocketsphinxEngine()
