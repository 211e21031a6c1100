"""Prometheus metrics of one daemon: what ``GET /metrics`` exposes.

One :class:`DaemonMetrics` per daemon, each with its own ``CollectorRegistry`` (not the
process-wide default), so two daemons in one test process never add to each other's counts.
prometheus_client writes the exposition format; nothing here formats text by hand.

Names follow Prometheus conventions: ``_total`` counters, ``_seconds`` histograms, base units.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import gevent.monkey
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from ivr_daemon.llm.base import LlmError, LlmTimeout, LlmUnavailable
from ivr_daemon.tts.cache import CacheStats

# Telephone latencies: a caller notices 300 ms; anything past 5 s is a failure anyway.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)

TURN_OUTCOMES = ("answered", "fallback", "interrupted")
LLM_ERROR_KINDS = ("timeout", "connection", "http", "bad_reply")
# Why the daemon ended a call with its goodbye (call_flow's reasons).
HANGUP_REASONS = ("llm_end_call", "goodbye_words", "dtmf", "silence")
# Why a call record was not written (ivr_daemon.records.writer).
RECORD_DROP_REASONS = ("queue_full", "refused", "shutdown", "stopped")


class DaemonMetrics:
    """Every metric the daemon keeps, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # Calls are channels: every Unique-ID of the daemon's shard it gets events of. These four
        # are per switch (label ``switch``, host:port): one switch down shows as that switch's.
        self.calls_active = Gauge("ivr_calls_active", "Calls the daemon is tracking now.", ["switch"], registry=r)
        self.calls_total = Counter("ivr_calls_total", "Calls the daemon has started tracking.", ["switch"],
                                   registry=r)
        # What happens in calls is per switch too (label ``switch``: the call's switch; "test" for
        # the HTTP test calls): a switch whose callers wait longer shows as that switch's.
        self.turns_total = Counter(
            "ivr_turns_total", "Turns whose answer is over (played, cut by the caller, or the call ended), "
            "by how they ended.", ["switch", "outcome"], registry=r)
        self.turn_first_audio_seconds = Histogram(
            "ivr_turn_first_audio_seconds", "Turn start (final transcript) to the first uuid_broadcast of the answer.",
            ["switch"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.llm_first_sentence_seconds = Histogram(
            "ivr_llm_first_sentence_seconds",
            "LLM request to its first complete sentence (streaming) or whole reply (batch).",
            ["switch"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.tts_synthesis_seconds = Histogram(
            "ivr_tts_synthesis_seconds", "One synthesis (a cache miss or a per-call WAV), on a worker thread.",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.barge_ins_total = Counter("ivr_barge_ins_total", "Answers the caller interrupted.", ["switch"],
                                       registry=r)
        self.esl_reconnects_total = Counter(
            "ivr_esl_reconnects_total", "Event socket connections made after the first one.", ["switch"], registry=r)
        self.esl_connected = Gauge("ivr_esl_connected", "1 while the event socket is up and subscribed.",
                                   ["switch"], registry=r)
        # The phrase cache keeps its own counts (from any thread, under its native lock): they
        # are read at scrape time, never kept twice.
        self._cache_stats: Callable[[], CacheStats] | None = None
        r.register(_CacheCollector(self))
        self.llm_errors_total = Counter(
            "ivr_llm_errors_total", "LLM requests that failed, by kind.", ["kind"], registry=r)
        self.transfers_total = Counter(
            "ivr_transfers_total", "Calls transferred (uuid_transfer answered).", ["switch"], registry=r)
        self.transfers_refused_total = Counter(
            "ivr_transfers_refused_total", "Transfers refused: a target not in the agent's allowlist.", ["switch"],
            registry=r)
        self.hangups_by_ivr_total = Counter(
            "ivr_hangups_by_ivr_total", "Calls the daemon hung up after its goodbye, by reason.", ["switch", "reason"],
            registry=r)
        self.webhooks_delivered_total = Counter(
            "ivr_webhooks_delivered_total", "Call-event webhooks the receiver accepted (2xx).", registry=r)
        self.webhooks_failed_total = Counter(
            "ivr_webhooks_failed_total", "Call-event webhooks given up: a 4xx, or every attempt failed.", registry=r)
        self.webhooks_dropped_total = Counter(
            "ivr_webhooks_dropped_total", "Call-event webhooks dropped unsent: the queue was full (oldest first).",
            registry=r)
        self.records_written_total = Counter(
            "ivr_records_written_total", "Call and turn records written to the database (DATABASE_URL).", registry=r)
        self.records_dropped_total = Counter(
            "ivr_records_dropped_total", "Call and turn records not written, by reason.", ["reason"], registry=r)
        # The records' queue and the database's state are read from the writer when scraped.
        self._records = None
        r.register(_RecordsCollector(self))
        # Known label values show as 0 from the start: a dashboard's rate() needs the series.
        # (The per-call ones per switch, as each switch is watched: watch_call_series.)
        for kind in LLM_ERROR_KINDS:
            self.llm_errors_total.labels(kind=kind)
        for reason in RECORD_DROP_REASONS:
            self.records_dropped_total.labels(reason=reason)
        # LLM replicas (LLM_API_URL with several URLs): read from the replica sets when scraped.
        self.llm_replica_sets: list = []
        r.register(_ReplicaCollector(self))
        # The loop's share of a core: when one daemon is no longer enough (docs/operations.md).
        r.register(_LoopCpuCollector())
        # For GET /health: what went wrong last, so an administrator sees it without the logs.
        self.last_llm_error: dict[str, object] | None = None

    def watch_switch(self, name: str, *, calls_active: Callable[[], int], connected: Callable[[], bool]) -> None:
        """A switch's series: its gauges read its call table and connection when scraped (the
        truth, never a copy); its counters shown at 0 from the start."""
        self.calls_active.labels(switch=name).set_function(calls_active)
        self.esl_connected.labels(switch=name).set_function(lambda: 1 if connected() else 0)
        self.calls_total.labels(switch=name)
        self.esl_reconnects_total.labels(switch=name)
        self.watch_call_series(name)

    def watch_call_series(self, switch: str) -> None:
        """The per-call series of ``switch`` (a switch's name, or "test"), shown at 0 from the start."""
        for outcome in TURN_OUTCOMES:
            self.turns_total.labels(switch=switch, outcome=outcome)
        for reason in HANGUP_REASONS:
            self.hangups_by_ivr_total.labels(switch=switch, reason=reason)
        for metric in (self.turn_first_audio_seconds, self.llm_first_sentence_seconds, self.barge_ins_total,
                       self.transfers_total, self.transfers_refused_total):
            metric.labels(switch=switch)

    def watch_llm_replicas(self, replica_set) -> None:
        """Expose a :class:`~ivr_daemon.llm.replicas.ReplicaSet`'s per-replica counts and state."""
        if all(known is not replica_set for known in self.llm_replica_sets):
            self.llm_replica_sets.append(replica_set)

    def watch_cache(self, stats: Callable[[], CacheStats]) -> None:
        """Expose the phrase cache's hit and miss counts (``PhraseCache.stats``)."""
        self._cache_stats = stats

    def watch_records(self, writer) -> None:
        """Expose the records writer's queue length and database state (``RecordWriter``)."""
        self._records = writer

    def note_llm_error(self, exc: LlmError) -> None:
        """Count an LLM failure by kind and keep it as the last one."""
        kind = llm_error_kind(exc)
        self.llm_errors_total.labels(kind=kind).inc()
        self.last_llm_error = {"kind": kind, "error": str(exc), "at_unix_s": round(time.time(), 3)}

    def exposition(self) -> tuple[bytes, str]:
        """The text ``GET /metrics`` answers with, and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _CacheCollector(Collector):
    """ivr_tts_cache_hits_total and ivr_tts_cache_misses_total, read from the cache when scraped
    (0 without a cache: TTS_CACHE_MAX_MB=0)."""

    def __init__(self, metrics: DaemonMetrics):
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        source = self._metrics._cache_stats
        stats = source() if source is not None else None
        yield CounterMetricFamily("ivr_tts_cache_hits_total", "Sentences served from the phrase cache.",
                                  value=stats.hits if stats else 0)
        yield CounterMetricFamily("ivr_tts_cache_misses_total", "Sentences the phrase cache had to synthesize.",
                                  value=stats.misses if stats else 0)


class _RecordsCollector(Collector):
    """ivr_records_queued and ivr_records_db_up, read from the records writer when scraped
    (0 and 0 without one)."""

    def __init__(self, metrics: DaemonMetrics):
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        writer = self._metrics._records
        yield GaugeMetricFamily("ivr_records_queued", "Call and turn records waiting to be written.",
                                value=writer.queued if writer is not None else 0)
        yield GaugeMetricFamily("ivr_records_db_up", "1 while the records database answers, else 0.",
                                value=1 if writer is not None and writer.db_up else 0)


class _LoopCpuCollector(Collector):
    """ivr_event_loop_cpu_seconds_total: the CPU time of the thread that made the metrics (the
    daemon's, whose gevent loop runs every call), read from its clock when scraped.

    ``rate()`` of it is the share of one core the loop uses. Every call, turn and event goes
    through that one loop, so past about half a core callers start to wait for each other
    (bench/multiswitch.py: the overhead p99 doubles from ~17 % to ~50 % busy). The process's own
    CPU would not tell: it adds the synthesis, records and resolver threads, which run beside
    the loop, not in its way. Not time.thread_time(): a scrape may come on another thread.
    """

    def __init__(self):
        # The OS thread's id: under monkey-patching threading's is a greenlet's.
        thread_id = gevent.monkey.get_original("_thread", "get_ident")()
        try:
            self._clock_id: int | None = time.pthread_getcpuclockid(thread_id)
        except (AttributeError, OSError):  # not every Unix has per-thread CPU clocks (macOS)
            self._clock_id = None

    def collect(self) -> Iterator[Metric]:
        if self._clock_id is None:
            return
        try:
            seconds = time.clock_gettime(self._clock_id)
        except OSError:  # that thread has ended (a test's): nothing more to count
            return
        yield CounterMetricFamily("ivr_event_loop_cpu_seconds_total",
                                  "CPU time of the daemon's event loop thread; rate() is its share of one core.",
                                  value=seconds)


class _ReplicaCollector(Collector):
    """The ivr_llm_replica_* series, one per replica (label ``replica``: host:port, bounded by
    LLM_API_URL), read from the replica sets when scraped. Two agents' sets naming the same
    host:port (two models on one server) add up into one series."""

    def __init__(self, metrics: DaemonMetrics):
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("ivr_llm_replica_requests_total",
                                       "LLM requests sent to a replica (a retry counts on the replica it went to).",
                                       labels=["replica"])
        failures = CounterMetricFamily("ivr_llm_replica_failures_total", "LLM requests a replica failed.",
                                       labels=["replica"])
        retries = CounterMetricFamily("ivr_llm_replica_retries_total",
                                      "LLM requests that failed on a replica before any answer and were sent to "
                                      "another.", labels=["replica"])
        up = GaugeMetricFamily("ivr_llm_replica_up", "1 unless the replica is backing off after a failure.",
                               labels=["replica"])
        in_flight = GaugeMetricFamily("ivr_llm_replica_in_flight", "LLM requests a replica is answering now.",
                                      labels=["replica"])
        totals: dict[str, list[int]] = {}
        for replica_set in self._metrics.llm_replica_sets:
            states = {state["replica"]: state for state in replica_set.status()}
            for replica in replica_set.replicas:
                row = totals.setdefault(replica.label, [0, 0, 0, 1, 0])
                row[0] += replica.requests
                row[1] += replica.failures
                row[2] += replica.retries
                row[3] = min(row[3], 1 if states[replica.label]["up"] else 0)
                row[4] += replica.in_flight
        for label, (sent, failed, retried, is_up, busy) in totals.items():
            requests.add_metric([label], sent)
            failures.add_metric([label], failed)
            retries.add_metric([label], retried)
            up.add_metric([label], is_up)
            in_flight.add_metric([label], busy)
        yield from (requests, failures, retries, up, in_flight)


def llm_error_kind(exc: LlmError) -> str:
    """timeout | connection (no answer at all) | http (an error status) | bad_reply."""
    if isinstance(exc, LlmTimeout):
        return "timeout"
    if isinstance(exc, LlmUnavailable):
        return "http" if exc.status is not None else "connection"
    return "bad_reply"


__all__ = ["DaemonMetrics", "HANGUP_REASONS", "LATENCY_BUCKETS_S", "LLM_ERROR_KINDS", "RECORD_DROP_REASONS", "TURN_OUTCOMES",
           "llm_error_kind"]
