"""Text-to-speech engines behind one interface; ``make_tts_engine`` picks one from the settings."""

from __future__ import annotations

from ivr_daemon.tts.base import TtsEngine, TtsError, TtsModelUnavailable, TtsSynthesisFailed

__all__ = ["TtsEngine", "TtsError", "TtsModelUnavailable", "TtsSynthesisFailed", "make_tts_engine", "start_voice"]


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


def start_voice(settings) -> TtsEngine:
    """The voice the daemon speaks with, in ``settings.tts_workers`` worker processes (TTS_WORKERS).

    Auto (0): Piper one worker per core, each synthesis on one core; Coqui one, since one forward
    pass already uses every core; null none, its silence written in the daemon's own threads
    (tests, replay). A number runs every engine in that many workers, null too, so a benchmark's
    stand-in voice runs where real ones do. Raises TtsModelUnavailable as the engine does.
    """
    import os

    workers = getattr(settings, "tts_workers", 0)
    if settings.tts_engine == "null" and not workers:
        return make_tts_engine(settings)
    from ivr_daemon.tts.workers import WorkerEngine

    if not workers:
        workers = 1 if settings.tts_engine == "coqui" else max(1, os.cpu_count() or 1)
    return WorkerEngine(settings, workers)
