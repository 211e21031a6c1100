"""Text-to-speech engines behind one interface; ``make_tts_engine`` picks one from the settings."""

from __future__ import annotations

from ivr_daemon.tts.base import TtsEngine, TtsError, TtsModelUnavailable, TtsSynthesisFailed

__all__ = ["TtsEngine", "TtsError", "TtsModelUnavailable", "TtsSynthesisFailed", "make_tts_engine"]


def make_tts_engine(settings) -> TtsEngine:
    """Load the engine ``settings.tts_engine`` names, once; raises TtsModelUnavailable."""
    # Providers are imported here, not at the top: importing torch takes seconds and
    # piper/null need none of it.
    if settings.tts_engine == "coqui":
        from ivr_daemon.tts.coqui import CoquiEngine

        if settings.coqui_model_path:
            return CoquiEngine.from_files(settings.coqui_model_path, settings.coqui_config_path)
        return CoquiEngine.from_model_name(settings.coqui_model)
    if settings.tts_engine == "piper":
        from ivr_daemon.tts.piper import PiperEngine

        return PiperEngine(settings.piper_voice or None)
    if settings.tts_engine == "null":
        from ivr_daemon.tts.null import NullEngine

        return NullEngine()
    raise ValueError(f"unknown TTS engine {settings.tts_engine!r}: expected coqui | piper | null")
