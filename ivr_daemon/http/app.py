"""The daemon's HTTP face as one Falcon WSGI app: routes, the Bearer token, JSON errors, access log.

Falcon because it is small, WSGI-first (gevent's pywsgi serves it on the daemon's own loop, no
second event loop or thread), has no dependencies, and answers every error as JSON
(``falcon.HTTPError``) without a line of ours.

Routes (each in its own module):

=======================================  ==============================================
``POST /test/transcription``             a test turn: JSON in, the spoken answer as WAV
``DELETE /test/calls/{call_uuid}``       forget a test conversation
``GET /health``                          JSON; 200 while a switch's ESL connection is up, else 503
``GET /metrics``                         Prometheus exposition (prometheus_client)
``GET /calls``, ``GET /calls/{uuid}``    the live phone calls; one call's history
``GET /calls/{uuid}/transcript``         an ended call's record (the records database)
``POST /calls``                          place an outbound call into the IVR extension
``GET /ws/transcribe``                   WebSocket: live transcription, each final a turn
``GET /``, ``GET /static/...``           the page to talk to the agent (talk.py)
=======================================  ==============================================
"""

from __future__ import annotations

import hmac
import time
import urllib.parse

import falcon

from ivr_daemon.daemon import Daemon
from ivr_daemon.http.live_calls import CallResource, CallsResource, TranscriptResource
from ivr_daemon.http.status import HealthResource, MetricsResource
from ivr_daemon.http.talk import STATIC_DIR, TalkPageResource, TalkSessions, TranscribeResource
from ivr_daemon.http.test_calls import TestCalls
from ivr_daemon.http.transcription import TestCallResource, TranscriptionResource, TurnSlots
from ivr_daemon.logs import get_logger

log = get_logger(__name__)

OPEN_ROUTES = frozenset({("GET", "/health"), ("HEAD", "/health"),  # what a load balancer asks without a token
                         ("GET", "/")})  # the talk page: static, it holds nothing (its socket needs the token)
OPEN_PREFIXES = ("/static/",)  # the page's script and worklet, static too
# Browsers cannot set headers on a WebSocket: these routes also take the token as ?token=.
QUERY_TOKEN_ROUTES = frozenset({("GET", "/ws/transcribe")})
QUIET_ROUTES = frozenset({("GET", "/health"), ("GET", "/metrics")})  # scraped every few seconds: DEBUG


class BearerToken:
    """With HTTP_API_TOKEN set, every route but GET /health and the talk page's files needs
    ``Authorization: Bearer <token>``; the WebSocket also takes ``?token=<token>``."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if (req.method, req.path) in OPEN_ROUTES or (req.method == "GET" and req.path.startswith(OPEN_PREFIXES)):
            return
        # WSGI hands headers over as latin-1 text; bytes compare in constant time whatever they hold.
        given = (req.get_header("Authorization") or "").encode("latin-1", "replace")
        if hmac.compare_digest(given, self._expected):
            return
        if (req.method, req.path) in QUERY_TOKEN_ROUTES:
            tokens = urllib.parse.parse_qs(req.query_string).get("token", [])
            if len(tokens) == 1 and hmac.compare_digest(f"Bearer {tokens[0]}".encode("utf-8", "replace"), self._expected):
                return
            raise falcon.HTTPUnauthorized(
                title="401 Unauthorized",
                description="this route needs 'Authorization: Bearer <HTTP_API_TOKEN>' or '?token=<HTTP_API_TOKEN>'",
                challenges=['Bearer realm="ivr-daemon"'])
        raise falcon.HTTPUnauthorized(
            title="401 Unauthorized", description="this route needs 'Authorization: Bearer <HTTP_API_TOKEN>'",
            challenges=['Bearer realm="ivr-daemon"'])


class AccessLog:
    """One structlog line per request: method, path, status, time taken."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started_s = time.monotonic()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        status = resp.status_code
        quiet = (req.method, req.path) in QUIET_ROUTES and status < 400
        getattr(log, "debug" if quiet else "info")(
            "http_request", method=req.method, path=req.path[:200], status=status,
            duration_ms=round((time.monotonic() - getattr(req.context, "started_s", time.monotonic())) * 1000, 1),
            client=req.remote_addr)


def _json_errors(req: falcon.Request, resp: falcon.Response, exception: falcon.HTTPError) -> None:
    """Every error as JSON, whatever the client's Accept says (audio/wav included)."""
    resp.data = exception.to_json()
    resp.content_type = falcon.MEDIA_JSON


def _unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params) -> None:
    log.exception("http_request_failed", method=req.method, path=req.path[:200])
    raise falcon.HTTPInternalServerError(title="500 Internal Server Error", description="see the daemon's log")


def make_app(daemon: Daemon, test_calls: TestCalls, *, token: str = "", turn_slots: TurnSlots | None = None,
             talk_sessions: TalkSessions | None = None) -> falcon.App:
    """The WSGI app for ``daemon``; ``token`` empty: no authentication (loopback only, see config)."""
    turn_slots = turn_slots or TurnSlots()
    talk_sessions = talk_sessions or TalkSessions(daemon.settings, turn_slots)
    middleware = [AccessLog()]
    if token:
        middleware.append(BearerToken(token))
    app = falcon.App(middleware=middleware)
    app.set_error_serializer(_json_errors)
    app.add_error_handler(Exception, _unexpected)
    app.add_route("/test/transcription", TranscriptionResource(daemon, test_calls, turn_slots))
    app.add_route("/test/calls/{call_uuid}", TestCallResource(test_calls))
    app.add_route("/health", HealthResource(daemon))
    app.add_route("/metrics", MetricsResource(daemon))
    app.add_route("/calls", CallsResource(daemon))
    app.add_route("/calls/{call_uuid}", CallResource(daemon))
    app.add_route("/ws/transcribe", TranscribeResource(test_calls, talk_sessions))
    app.add_route("/", TalkPageResource())
    app.add_static_route("/static", str(STATIC_DIR), fallback_filename=None)
    app.add_route("/calls/{call_uuid}/transcript", TranscriptResource(daemon))
    return app
