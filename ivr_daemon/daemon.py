"""Wires the parts together: ESL client -> call router -> one handler per call.

Arrows point down: this module knows the ESL layer and the call handlers; the ESL layer knows
nothing of either.
"""

from __future__ import annotations

import os
from typing import Callable

import gevent
import gevent.threadpool

from ivr_daemon.calls import CallHandler, CallRouter, HandlerFactory
from ivr_daemon.config import Settings
from ivr_daemon.esl.connection import EslClient
from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.conversation import TurnResult, TurnServices, conversation_factory, prepare_fallback_wav
from ivr_daemon.llm import make_llm_client
from ivr_daemon.llm.base import LlmClient
from ivr_daemon.logs import get_logger
from ivr_daemon.tts import make_tts_engine
from ivr_daemon.tts.base import TtsEngine
from ivr_daemon.tts.cache import PhraseCache

log = get_logger(__name__)

# What the daemon subscribes to (https://developer.signalwire.com/freeswitch/FreeSWITCH-Explained/Introduction/Event-System/Event-List_7143557/).
SUBSCRIBED_EVENTS: tuple[str, ...] = (
    "DETECTED_SPEECH",
    "CHANNEL_ANSWER",
    "CHANNEL_PARK",
    "CHANNEL_HANGUP_COMPLETE",
    "DTMF",
    "PLAYBACK_START",
    "PLAYBACK_STOP",
    "CHANNEL_EXECUTE_COMPLETE",
    "BACKGROUND_JOB",
)


class Daemon:
    """One ESL connection kept alive, its events routed to per-call handlers.

    ``handlers_for`` gets the ESL client (the one writer) and returns the factory that makes
    a handler per call UUID.
    """

    def __init__(
        self,
        settings: Settings,
        handlers_for: Callable[[EslClient], HandlerFactory],
        **esl_options,
    ):
        self.settings = settings
        self.esl = EslClient(
            settings.freeswitch_host,
            settings.freeswitch_port,
            settings.freeswitch_password,
            SUBSCRIBED_EVENTS,
            self._route,
            **esl_options,
        )
        self.router = CallRouter(handlers_for(self.esl), on_callless_event=self._on_callless_event)
        self._greenlet: gevent.Greenlet | None = None

    def _route(self, event: EslEvent) -> None:
        self.router.route(event)

    def run(self) -> None:
        """Block until stopped; raises AuthenticationFailed on a wrong password."""
        self.esl.run()

    def start(self) -> gevent.Greenlet:
        self._greenlet = gevent.spawn(self.run)
        return self._greenlet

    def stop(self, timeout_s: float = 10.0) -> None:
        self.esl.stop(send_exit=True)
        if self._greenlet is not None:
            self._greenlet.join(timeout=timeout_s)

    def _on_callless_event(self, event: EslEvent) -> None:
        log.debug("esl_event", event_name=event.name, event_sequence=event.sequence)


def build_conversation_daemon(
    settings: Settings,
    *,
    llm: LlmClient | None = None,
    tts: TtsEngine | None = None,
    on_turn: Callable[[TurnResult], None] | None = None,
    synth_threads: int | None = None,
    **esl_options,
) -> Daemon:
    """The daemon ``ivr-daemon run`` runs: LLM and TTS loaded once, a conversation per call.

    Raises TtsModelUnavailable when the TTS model cannot be loaded.
    """
    llm = llm or make_llm_client(settings)
    tts = tts or make_tts_engine(settings)
    cache = (PhraseCache.for_output_dir(settings.tts_output_dir, settings.tts_cache_max_mb * 1024 * 1024)
             if settings.tts_cache_max_mb > 0 else None)
    fallback_wav = prepare_fallback_wav(tts, settings, log, cache)
    # Synthesis is CPU-bound: native threads, as many as cores, never the gevent loop.
    pool = gevent.threadpool.ThreadPool(synth_threads or max(1, os.cpu_count() or 1))

    def handlers_for(esl: EslClient) -> HandlerFactory:
        services = TurnServices(settings, llm, tts, esl.send, pool, fallback_wav, on_turn, cache)
        return conversation_factory(services)

    log.info("daemon_ready", llm_provider=settings.llm_provider, llm_api_url=settings.llm_api_url,
             tts_engine=tts.name, tts_voice=tts.voice_id, fallback_wav=str(fallback_wav))
    return Daemon(settings, handlers_for, **esl_options)


__all__ = ["Daemon", "SUBSCRIBED_EVENTS", "CallHandler", "build_conversation_daemon"]
