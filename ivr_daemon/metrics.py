"""Prometheus metrics of one daemon: what ``GET /metrics`` exposes.

One :class:`DaemonMetrics` per daemon, each with its own ``CollectorRegistry`` (not the
process-wide default), so two daemons in one test process never add to each other's counts.
prometheus_client writes the exposition format; nothing here formats text by hand.

Names follow Prometheus conventions: ``_total`` counters, ``_seconds`` histograms, base units.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ivr_daemon.llm.base import LlmError, LlmTimeout, LlmUnavailable

# Telephone latencies: a caller notices 300 ms; anything past 5 s is a failure anyway.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)

TURN_OUTCOMES = ("answered", "fallback", "interrupted")
LLM_ERROR_KINDS = ("timeout", "connection", "http", "bad_reply")


class DaemonMetrics:
    """Every metric the daemon keeps, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls_active = Gauge("ivr_calls_active", "Calls the daemon is tracking now.", registry=r)
        self.calls_total = Counter("ivr_calls_total", "Calls the daemon has started tracking.", registry=r)
        self.turns_total = Counter("ivr_turns_total", "Finished turns, by how they ended.", ["outcome"], registry=r)
        self.turn_first_audio_seconds = Histogram(
            "ivr_turn_first_audio_seconds", "Final transcript to the first uuid_broadcast of the answer.",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.llm_first_sentence_seconds = Histogram(
            "ivr_llm_first_sentence_seconds",
            "LLM request to its first complete sentence (streaming) or whole reply (batch).",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.tts_synthesis_seconds = Histogram(
            "ivr_tts_synthesis_seconds", "One synthesis (cache misses only), on a worker thread.",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.barge_ins_total = Counter("ivr_barge_ins_total", "Answers the caller interrupted.", registry=r)
        self.esl_reconnects_total = Counter(
            "ivr_esl_reconnects_total", "Event socket connections made after the first one.", registry=r)
        self.tts_cache_hits_total = Counter(
            "ivr_tts_cache_hits_total", "Sentences served from the phrase cache.", registry=r)
        self.tts_cache_misses_total = Counter(
            "ivr_tts_cache_misses_total", "Sentences the phrase cache had to synthesize.", registry=r)
        self.llm_errors_total = Counter(
            "ivr_llm_errors_total", "LLM requests that failed, by kind.", ["kind"], registry=r)
        # Known label values show as 0 from the start: a dashboard's rate() needs the series.
        for outcome in TURN_OUTCOMES:
            self.turns_total.labels(outcome=outcome)
        for kind in LLM_ERROR_KINDS:
            self.llm_errors_total.labels(kind=kind)
        # For GET /health: what went wrong last, so an administrator sees it without the logs.
        self.last_llm_error: dict[str, object] | None = None

    def note_llm_error(self, exc: LlmError) -> None:
        """Count an LLM failure by kind and keep it as the last one."""
        kind = llm_error_kind(exc)
        self.llm_errors_total.labels(kind=kind).inc()
        self.last_llm_error = {"kind": kind, "error": str(exc), "at_unix_s": round(time.time(), 3)}

    def exposition(self) -> tuple[bytes, str]:
        """The text ``GET /metrics`` answers with, and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def llm_error_kind(exc: LlmError) -> str:
    """timeout | connection (no answer at all) | http (an error status) | bad_reply."""
    if isinstance(exc, LlmTimeout):
        return "timeout"
    if isinstance(exc, LlmUnavailable):
        return "http" if exc.status is not None else "connection"
    return "bad_reply"


__all__ = ["DaemonMetrics", "LATENCY_BUCKETS_S", "LLM_ERROR_KINDS", "TURN_OUTCOMES", "llm_error_kind"]
