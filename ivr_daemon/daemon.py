"""Wires the parts together: ESL client -> call router -> one handler per call.

Arrows point down: this module knows the ESL layer and the call handlers; the ESL layer knows
nothing of either.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Callable

import gevent
import gevent.threadpool

from ivr_daemon.agents import Agent, AgentBook, load_agents
from ivr_daemon.call_flow import CallFlowServices, call_flow_factory
from ivr_daemon.calls import Call, CallHandler, CallRouter, HandlerFactory
from ivr_daemon.config import Settings, SwitchAddress
from ivr_daemon.esl.connection import AuthenticationFailed, EslClient
from ivr_daemon.conversation import TurnResult, TurnServices, prepare_fallback_wav
from ivr_daemon.llm import make_llm_client
from ivr_daemon.llm.base import LlmClient
from ivr_daemon.llm.replicas import ReplicaSet
from ivr_daemon.logs import get_logger
from ivr_daemon.metrics import DaemonMetrics
from ivr_daemon.outbound import BadCallRequest, JobWaiters, placeholders
from ivr_daemon.switches import Switch
from ivr_daemon.records.writer import RecordWriter
from ivr_daemon.storage import prepare_output_dir
from ivr_daemon.tts import start_voice
from ivr_daemon.tts.base import TtsEngine, TtsError, TtsModelUnavailable
from ivr_daemon.tts.cache import PhraseCache
from ivr_daemon.tts.pinned import PinnedPhrases
from ivr_daemon.tts.workers import CLOSE_REAP_S
from ivr_daemon.turn_services import SynthesisQueue
from ivr_daemon.webhooks import DEFAULT_BACKOFF_BASE_S, WebhookSender

log = get_logger(__name__)

# SIGTERM to exit within 10 s, end to end: turns in flight get what is left after the fixed
# steps (exit to FreeSWITCH, call clean-up, syntheses landing, process exit).
SHUTDOWN_BUDGET_S = 9.0
SHUTDOWN_EXIT_S = 1.0  # the "exit" command's reply
SHUTDOWN_CLEANUP_S = 1.0  # calls' clean-up and syntheses still running
SHUTDOWN_VOICES_S = CLOSE_REAP_S  # the TTS worker processes killed and reaped, last
SHUTDOWN_GRACE_S = SHUTDOWN_BUDGET_S - SHUTDOWN_EXIT_S - SHUTDOWN_CLEANUP_S - SHUTDOWN_VOICES_S
# At most this long (within the budget) for webhook events still queued: a dead receiver must
# not make every shutdown take the whole budget.
SHUTDOWN_WEBHOOK_FLUSH_S = 2.0
# Call records still queued (the calls' last rows are queued by their clean-up): at most this
# long, and at least SHUTDOWN_RECORDS_MIN_S even when the turns took the whole grace.
SHUTDOWN_RECORDS_FLUSH_S = 2.0
SHUTDOWN_RECORDS_MIN_S = 0.5
RESYNC_INTERVAL_S = 60.0

# What the daemon subscribes to (https://developer.signalwire.com/freeswitch/FreeSWITCH-Explained/Introduction/Event-System/Event-List_7143557/).
# No ESL `filter` on top: a filter only lets in what matches one of the filters (it cannot say
# "not this Speech-Type"), and dropping the partials at the switch would lose what they carry:
# the silence clock learns from them that the caller is talking (a caller speaking longer than
# SILENCE_TIMEOUT_S without a final transcript would be re-prompted mid-sentence), and barge-in
# needs them the moment a broadcast starts, before a per-call `filter Unique-ID` sent through
# the one writer could take effect. They are dropped in the reader instead (CallHandler.absorb).
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
    """One ESL connection per switch kept alive, each switch's events routed to its calls' handlers.

    ``handlers_for`` gets a switch's ESL client (that socket's one writer) and returns the
    factory that makes a handler per call UUID on that switch; it is called once per switch.
    ``esl``, ``router`` and ``jobs`` are the first switch's (the only one without
    FREESWITCH_HOSTS); ``switches`` has them all.
    """

    def __init__(
        self,
        settings: Settings,
        handlers_for: Callable[[EslClient], HandlerFactory],
        *,
        metrics: DaemonMetrics | None = None,
        **esl_options,
    ):
        self.settings = settings
        # Given when the handlers count into it too (build_conversation_daemon); each daemon its own.
        self.metrics = metrics if metrics is not None else DaemonMetrics()
        self.started_s = time.monotonic()
        shard, shards = settings.daemon_shard
        owns = None if shards == 1 else (lambda uuid: shard_of(uuid, shards) == shard)
        addresses = settings.switches
        self.switches: list[Switch] = [
            Switch(address, handlers_for, SUBSCRIBED_EVENTS, self.metrics, owns=owns,
                   log_speech_text=settings.log_transcripts or settings.log_level == "DEBUG",
                   # With one switch its lines stay as they always were; with several each says whose.
                   log_context={"switch": address.name} if len(addresses) > 1 else None,
                   **esl_options)
            for address in addresses
        ]
        self.services: TurnServices | None = None  # the default agent's, set by build_conversation_daemon
        self.flow: CallFlowServices | None = None  # every agent's (the first switch's, for test turns)
        self.flows: list[CallFlowServices] = []  # every switch's
        self.voices: list[TtsEngine] = []  # the voices build_conversation_daemon started: closed at stop
        self.webhooks: WebhookSender | None = None  # set by build_conversation_daemon
        self.records: RecordWriter | None = None  # set by build_conversation_daemon
        self._greenlet: gevent.Greenlet | None = None
        self._stopping = False
        self.agents: AgentBook | None = None  # set by build_conversation_daemon (POST /calls)

    @property
    def esl(self) -> EslClient:
        return self.switches[0].esl

    @property
    def router(self) -> CallRouter:
        return self.switches[0].router

    @property
    def jobs(self) -> JobWaiters:
        return self.switches[0].jobs

    def switch(self, name: str | None = None) -> Switch:
        """The switch of that name (``host:port``); None: the first. KeyError if there is none."""
        if name is None:
            return self.switches[0]
        for switch in self.switches:
            if switch.name == name:
                return switch
        raise KeyError(name)

    @property
    def calls(self) -> list[tuple[Switch, Call]]:
        """Every live call of every switch, with its switch."""
        return [(switch, call) for switch in self.switches for call in list(switch.router.calls.values())]

    def busy_calls(self) -> list[Call]:
        return [call for switch in self.switches for call in switch.router.busy_calls()]

    def resync(self, after_reconnect: bool = True) -> None:
        """Every switch's resync (:meth:`Switch.resync`), one after another."""
        for switch in self.switches:
            switch.resync(after_reconnect)

    def run(self) -> None:
        """Block until stopped. Raises AuthenticationFailed when a switch refuses the password
        before it was ever connected (a setting to fix: start-up fails at once), or when every
        switch has refused it. A switch that refuses it later stops alone; the others go on."""
        if self.webhooks is not None:
            self.webhooks.start()  # idempotent
        if self.records is not None:
            self.records.start()  # idempotent
        periodic = gevent.spawn(self._resync_every, RESYNC_INTERVAL_S)
        runners = {gevent.spawn(_run_client, switch.esl): switch for switch in self.switches}
        try:
            pending = set(runners)
            refused: list[AuthenticationFailed] = []
            while pending:
                done = gevent.wait(list(pending), count=1)
                for runner in done:
                    pending.discard(runner)
                    switch = runners[runner]
                    exc = runner.value
                    if exc is None:
                        continue
                    if not isinstance(exc, AuthenticationFailed):
                        raise exc
                    if len(self.switches) == 1 or switch.connects == 0:
                        raise AuthenticationFailed(f"{switch.name}: {exc}") if len(self.switches) > 1 else exc
                    switch.log.error("esl_switch_given_up", error=str(exc),
                                     hint="the switch's event socket password changed: fix it and restart")
                    refused.append(exc)
            if refused and len(refused) == len(self.switches):
                raise refused[-1]
        finally:
            periodic.kill(block=False)
            for runner, switch in runners.items():
                if not runner.dead:
                    switch.esl.stop(send_exit=False)
                    runner.kill(block=False)

    def _resync_every(self, interval_s: float) -> None:
        # A hangup event lost any other way (a filter, a bug) must not keep a call forever.
        while True:
            gevent.sleep(interval_s)
            for switch in self.switches:
                if switch.connected:
                    switch.resync(after_reconnect=False)

    def start(self) -> gevent.Greenlet:
        self._greenlet = gevent.spawn(self.run)
        return self._greenlet

    def wait_connected(self, timeout_s: float | None = None) -> bool:
        """Until every switch is connected and subscribed; False if one is not within the time."""
        deadline_s = None if timeout_s is None else time.monotonic() + timeout_s
        for switch in self.switches:
            left_s = None if deadline_s is None else max(0.0, deadline_s - time.monotonic())
            if not switch.esl.wait_connected(left_s):
                return False
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop at once: exit to every switch, sockets closed; turns in flight are abandoned."""
        for switch in self.switches:
            switch.esl.stop(send_exit=True)
        if self._greenlet is not None:
            self._greenlet.join(timeout=timeout_s)
        if self.webhooks is not None:
            self.webhooks.stop(timeout_s=0.0)
        if self.records is not None:
            self.records.stop(timeout_s=timeout_s)  # tests stop this way: what was queued is written
        self.close_voices()

    def close_voices(self) -> None:
        """Stop the voices' worker processes (syntheses still running fail). Idempotent."""
        for voice in self.voices:
            voice.close()

    def shutdown(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """SIGTERM: take no new turns, let turns in flight send their audio, then leave cleanly.

        ``exit`` to FreeSWITCH (the calls themselves go on: FreeSWITCH owns them), every call's
        own WAVs deleted, also those of syntheses that land during the clean-up. Pinned phrases
        (the fallback) stay: other daemons on the same directory use them. Within
        ``SHUTDOWN_BUDGET_S`` whatever hangs.
        """
        if self._stopping:
            return
        self._stopping = True
        started_s = time.monotonic()
        deadline_s = started_s + grace_s + SHUTDOWN_EXIT_S + SHUTDOWN_CLEANUP_S
        for services in self._all_services():
            services.accepting_turns = False
        log.info("daemon_shutting_down", calls=len(self.calls), turns_in_flight=len(self.busy_calls()))
        while self.busy_calls():
            if time.monotonic() - started_s > grace_s:
                log.warning("shutdown_grace_over", turns_cut=len(self.busy_calls()))
                break
            gevent.sleep(0.05)
        # Every switch's exit at once: their replies are waited for side by side, not in turn.
        exits = [gevent.spawn(switch.esl.stop, send_exit=True, exit_timeout_s=SHUTDOWN_EXIT_S)
                 for switch in self.switches]
        gevent.joinall(exits, timeout=SHUTDOWN_EXIT_S + 0.5)
        for switch in self.switches:
            for uuid in list(switch.router.calls):
                switch.router.end_call(uuid, "DAEMON_SHUTDOWN")
        for switch in self.switches:
            switch.router.join(timeout_s=max(0.0, deadline_s - time.monotonic()))
        if self.services is not None and self.services.in_flight:
            # Per-call WAVs of syntheses that land now are deleted by their calls' clean-up.
            running = list(self.services.in_flight)
            done = gevent.wait(running, timeout=max(0.0, deadline_s - time.monotonic()))
            if len(done) < len(running):
                log.warning("shutdown_syntheses_abandoned", count=len(running) - len(done))
        if self._greenlet is not None:
            self._greenlet.join(timeout=max(0.0, deadline_s - time.monotonic()))
        if self.records is not None:
            # The calls' last rows (their ends) were queued by their clean-up just now.
            self.records.stop(timeout_s=min(SHUTDOWN_RECORDS_FLUSH_S,
                                            max(SHUTDOWN_RECORDS_MIN_S, deadline_s - time.monotonic())))
        if self.webhooks is not None:
            # The calls' last events (call.ended) were queued by their clean-up just now.
            self.webhooks.stop(timeout_s=max(0.0, min(SHUTDOWN_WEBHOOK_FLUSH_S, deadline_s - time.monotonic())))
        self.close_voices()
        log.info("daemon_shut_down", seconds=round(time.monotonic() - started_s, 2))

    def _all_services(self) -> list[TurnServices]:
        if self.flows:
            return [services for flow in self.flows for services in flow.by_agent.values()]
        return [self.services] if self.services is not None else []


def build_conversation_daemon(
    settings: Settings,
    *,
    llm: LlmClient | None = None,
    tts: TtsEngine | None = None,
    on_turn: Callable[[TurnResult], None] | None = None,
    synth_threads: int | None = None,
    agents: AgentBook | None = None,
    webhook_backoff_base_s: float = DEFAULT_BACKOFF_BASE_S,
    records: RecordWriter | None = None,
    **esl_options,
) -> Daemon:
    """The daemon ``ivr-daemon run`` runs: every agent's LLM and voice loaded once, and its
    phrases (fallback, greeting, re-prompt, goodbye, transfer) synthesized and pinned, so they
    play at once and even with the LLM down; a :class:`PhoneCall` per call.

    ``llm``/``tts`` given: every agent uses them. Raises ConfigError for a bad agents file and
    TtsModelUnavailable (naming the agent) when a voice cannot be loaded or speak, and
    UnsafeOutputDir when TTS_OUTPUT_DIR is not private to the daemon's user. ``records``: where
    calls and turns are recorded (``ivr-daemon run`` gives :func:`open_records`'s); None: nowhere.
    """
    prepare_output_dir(settings.tts_output_dir)  # before anything is written or adopted there
    agents = agents or load_agents(settings)
    cache = (PhraseCache.for_output_dir(settings.tts_output_dir, settings.tts_cache_max_mb * 1024 * 1024)
             if settings.tts_cache_max_mb > 0 else None)
    metrics = DaemonMetrics()  # one for the daemon and every agent's turns
    if cache is not None:
        metrics.watch_cache(cache.stats)
    # Synthesis is CPU-bound: native threads, as many as cores, never the gevent loop.
    pool = gevent.threadpool.ThreadPool(synth_threads or max(1, os.cpu_count() or 1))
    synth_queue = SynthesisQueue(pool)  # one for all: a first sentence goes before any call's later ones
    in_flight: set = set()  # one set for all agents: shutdown waits for every synthesis
    engines: dict[tuple, TtsEngine] = {}
    clients: dict[tuple, LlmClient] = {}
    prepared: dict[str, tuple[Agent, LlmClient, TtsEngine, PinnedPhrases, object]] = {}
    try:
        for name, agent in agents.agents.items():
            agent_settings = agent.settings
            engine = tts or engines.get(_voice_key(agent_settings))
            if engine is None:
                engine = engines[_voice_key(agent_settings)] = _load_voice(agent_settings, name, agents)
            client = llm or clients.get(_llm_key(agent_settings))
            if client is None:
                client = clients[_llm_key(agent_settings)] = make_llm_client(agent_settings)
            pinned = PinnedPhrases.for_output_dir(settings.tts_output_dir, engine)
            try:
                fallback_wav = prepare_fallback_wav(pinned, agent_settings)
                for phrase in agent_phrases(agent_settings, has_tools=bool(agent.tools)):
                    pinned.prepare(phrase)
            except TtsError as exc:
                raise TtsModelUnavailable(f"agent {name}{_where(agents)}: {exc}") from exc
            prepared[name] = (agent, client, engine, pinned, fallback_wav)
    except BaseException:
        for engine in engines.values():  # no worker process outlives a start-up that failed
            engine.close()
        raise

    def handlers_for(esl: EslClient) -> HandlerFactory:
        switch = SwitchAddress(esl.host, esl.port, "").name  # the label its calls' metrics carry
        by_agent = {
            name: TurnServices(agent.settings, client, engine, esl.send, pool, fallback_wav, on_turn, cache,
                               wait_connected=esl.wait_connected, pinned=pinned, agent=agent, in_flight=in_flight,
                               metrics=metrics, switch=switch, synth_queue=synth_queue)
            for name, (agent, client, engine, pinned, fallback_wav) in prepared.items()
        }
        flow = CallFlowServices(by_agent, agents.default_name, webhooks=webhooks, records=records)
        made.append(flow)
        return call_flow_factory(flow)

    made: list[CallFlowServices] = []
    # One sender for every agent (each names its own URL); the secret and the queue are global.
    webhooks = WebhookSender(settings.webhook_secret, metrics, queue_max=settings.webhook_queue_max,
                             timeout_s=settings.webhook_timeout_s, backoff_base_s=webhook_backoff_base_s) \
        if any(agent.settings.webhook_url for agent in agents.agents.values()) else None
    for _, client, *_ in prepared.values():
        if isinstance(client, ReplicaSet):
            metrics.watch_llm_replicas(client)
    default = agents.default
    default_llm = prepared[agents.default_name][1]
    log.info("daemon_ready", agents=list(agents.agents), default_agent=agents.default_name,
             llm_provider=default.settings.llm_provider,
             # A replica set says host:port only: its URLs may carry credentials.
             llm_api_url=default_llm.api_url if isinstance(default_llm, ReplicaSet) else default.settings.llm_api_url,
             tts_engine=prepared[agents.default_name][2].name, tts_voice=prepared[agents.default_name][2].voice_id,
             shard="/".join(map(str, settings.daemon_shard)))
    daemon = Daemon(settings, handlers_for, metrics=metrics, **esl_options)
    daemon.voices = list(engines.values())
    daemon.flow = made[0]
    daemon.flows = made
    daemon.agents = agents
    daemon.webhooks = webhooks
    if records is not None:
        records.use_metrics(metrics)
        daemon.records = records
    daemon.services = made[0].by_agent[agents.default_name]
    return daemon


def _run_client(esl: EslClient) -> Exception | None:
    """An ESL client's run, its failure handed back rather than raised: a greenlet that dies of
    an exception has gevent print its traceback, and ``run`` says it once, the daemon's way."""
    try:
        esl.run()
    except Exception as exc:
        return exc
    return None


def open_records(settings: Settings) -> RecordWriter | None:
    """The call records of ``ivr-daemon run``: DATABASE_URL's tables created or upgraded now.

    A database that cannot be reached now does not stop the daemon: records wait for it (and
    the tables are made when it answers). Raises BadDatabaseUrl for a URL or SQLite file that
    cannot be used at all. None when the settings name no database (a hand-built Settings).
    """
    from ivr_daemon.records.remote import RemoteStore
    from ivr_daemon.records.store import DatabaseUnavailable, RecordStore

    if not settings.database_url:
        return None
    # Built here so that a bad URL or SQLite file stops the start; the records process builds its own.
    store = RemoteStore(RecordStore(settings.database_url), log_level=settings.log_level,
                        log_format=settings.log_format)
    writer = RecordWriter(store, queue_max=settings.records_queue_max,
                          retention_days=settings.records_retention_days)
    try:
        revision = writer.using_store(store.migrate)
    except DatabaseUnavailable as exc:
        log.error("records_database_down", database=store.description, error=str(exc)[:300],
                  hint="records wait in memory (RECORDS_QUEUE_MAX) and are written when it is back")
    else:
        writer.db_up = True
        log.info("records_database_ready", database=store.description, revision=revision)
    return writer


def agent_phrases(settings: Settings, has_tools: bool = False) -> list[str]:
    """The phrases of an agent that must play at once: pinned at start-up (the tool filler
    only for an agent with HTTP tools)."""
    filler = settings.tool_filler_phrase if has_tools else ""
    # A greeting with {placeholders} differs per call: synthesized per call (call_flow point 8).
    greeting = settings.greeting if settings.greeting and not _has_placeholders(settings.greeting) else ""
    return [p for p in (greeting, settings.reprompt_phrase, settings.goodbye_phrase,
                        settings.transfer_phrase, filler) if p]


def _has_placeholders(text: str) -> bool:
    try:
        return bool(placeholders(text))
    except BadCallRequest:
        return True  # not a plain text either: never pinned as if it were


def _voice_key(settings: Settings) -> tuple:
    return (settings.tts_engine, settings.coqui_model, settings.coqui_model_path, settings.coqui_config_path,
            settings.piper_voice)


def _llm_key(settings: Settings) -> tuple:
    return (settings.llm_provider, settings.llm_api_url, settings.llm_model, settings.llm_api_key,
            settings.llm_timeout_s, settings.llm_max_tokens)


def _where(agents: AgentBook) -> str:
    agents_file = next(iter(agents.agents.values())).settings.agents_file
    return f" ({agents_file})" if agents_file else ""


def _load_voice(settings: Settings, agent_name: str, agents: AgentBook) -> TtsEngine:
    try:
        return start_voice(settings)
    except TtsModelUnavailable as exc:
        raise TtsModelUnavailable(f"agent {agent_name}{_where(agents)}, tts_engine={settings.tts_engine}: {exc}") \
            from exc


def shard_of(call_uuid: str, shards: int) -> int:
    """Which of ``shards`` daemons answers this call: stable across processes and hosts."""
    return zlib.crc32(call_uuid.lower().encode()) % shards


__all__ = ["Daemon", "SUBSCRIBED_EVENTS", "CallHandler", "build_conversation_daemon"]
