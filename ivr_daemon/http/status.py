"""``GET /health`` (for load balancers) and ``GET /metrics`` (for Prometheus)."""

from __future__ import annotations

import time

import falcon

from ivr_daemon.daemon import Daemon


class HealthResource:
    """200 while the ESL connection is up, 503 while it is not; the same JSON either way."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        daemon = self.daemon
        connected = daemon.esl.connected
        services = daemon.services
        resp.media = {
            "status": "ok" if connected else "esl_disconnected",
            "esl_connected": connected,
            "tts_engine": services.tts.name if services is not None else None,
            "llm_provider": services.settings.llm_provider if services is not None else daemon.settings.llm_provider,
            "calls_active": len(daemon.router.calls),
            "uptime_s": round(time.monotonic() - daemon.started_s, 1),
            "last_llm_error": daemon.metrics.last_llm_error,
        }
        resp.status = falcon.HTTP_200 if connected else falcon.HTTP_503

    on_head = on_get  # some load balancers ask with HEAD: the same status, no body


class MetricsResource:
    """The daemon's registry in Prometheus' text format, written by prometheus_client."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Gauges such as ivr_calls_active read the router and the connection as this collects them.
        resp.data, resp.content_type = self.daemon.metrics.exposition()
