"""``GET /health`` (for load balancers) and ``GET /metrics`` (for Prometheus)."""

from __future__ import annotations

import time

import falcon

from ivr_daemon.daemon import Daemon


class HealthResource:
    """200 while some switch's ESL connection is up, 503 while none is; the same JSON either way.

    With several switches one down is ``degraded``, still 200: the daemon answers the other
    switches' calls, and a load balancer that took it out would cut those too. ``switches``
    says which is which.
    """

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        daemon = self.daemon
        switches = [{"switch": switch.name, "esl_connected": switch.connected,
                     "calls_active": len(switch.router.calls)} for switch in daemon.switches]
        connected = sum(1 for switch in switches if switch["esl_connected"])
        services = daemon.services
        resp.media = {
            "status": "ok" if connected == len(switches) else "degraded" if connected else "esl_disconnected",
            "esl_connected": connected == len(switches),
            "tts_engine": services.tts.name if services is not None else None,
            "llm_provider": services.settings.llm_provider if services is not None else daemon.settings.llm_provider,
            "calls_active": sum(switch["calls_active"] for switch in switches),
            "uptime_s": round(time.monotonic() - daemon.started_s, 1),
            "last_llm_error": daemon.metrics.last_llm_error,
            "switches": switches,
        }
        replicas = _llm_replicas(daemon)
        if replicas:
            resp.media["llm_replicas"] = replicas
        resp.status = falcon.HTTP_200 if connected else falcon.HTTP_503

    on_head = on_get  # some load balancers ask with HEAD: the same status, no body


def _llm_replicas(daemon: Daemon) -> list[dict]:
    """Every LLM replica the agents use (LLM_API_URL with several URLs), each once: which are down."""
    seen: dict[str, dict] = {}
    for replica_set in daemon.metrics.llm_replica_sets:
        for state in replica_set.status():
            seen.setdefault(state["replica"], state)
    return list(seen.values())


class MetricsResource:
    """The daemon's registry in Prometheus' text format, written by prometheus_client."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Gauges such as ivr_calls_active read the router and the connection as this collects them.
        resp.data, resp.content_type = self.daemon.metrics.exposition()
