"""The HTTP server inside ``ivr-daemon run``: gevent's pywsgi on the daemon's own loop, with limits.

A slow or hostile client must never delay a call. Each connection is one greenlet doing socket
I/O, which never holds the loop; the limits make sure it also never holds much else:

- at most MAX_CONNECTIONS connections at once (a gevent Pool: past it, new ones wait in the
  listen backlog, not in memory);
- every socket read and write gives up after IO_TIMEOUT_S, so an idle keep-alive connection or
  a client that stops reading is closed;
- the request line and headers must arrive within HEADERS_TIMEOUT_S in all (a client sending a
  byte every few seconds is cut off too), the body within its own deadline (transcription.py);
- bodies over 64 KiB are refused before they are read; a response that closes the connection
  does not read what the client still sends.
"""

from __future__ import annotations

import gevent
import gevent.pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from ivr_daemon.config import Settings
from ivr_daemon.daemon import Daemon
from ivr_daemon.http.app import make_app
from ivr_daemon.http.test_calls import TestCalls
from ivr_daemon.http.transcription import TurnSlots
from ivr_daemon.logs import get_logger

log = get_logger(__name__)

MAX_CONNECTIONS = 100
IO_TIMEOUT_S = 10.0
HEADERS_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 0.5  # requests in flight at shutdown, after the daemon's own shutdown


class _BoundedDiscard:
    """What pywsgi reads out of a request body the app left unread, to reach the next request
    on the connection: nothing when the connection closes anyway, else at most for
    HEADERS_TIMEOUT_S (then the connection closes)."""

    def __init__(self, handler: "BoundedHandler", body):
        self._handler = handler
        self._body = body

    def _discard(self) -> None:
        if self._handler.close_connection:
            return
        timer = gevent.Timeout(self._handler.server.headers_timeout_s)
        timer.start()
        try:
            self._body._discard()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self._handler.close_connection = True
        finally:
            timer.close()


class BoundedHandler(WSGIHandler):
    """pywsgi's handler with socket timeouts, a deadline for the headers and no reading of
    bodies nobody wants."""

    def handle(self):
        self.socket.settimeout(self.server.io_timeout_s)
        return super().handle()

    def read_requestline(self):
        # Between two requests the connection is idle: at shutdown it is closed at once.
        idle, me = self.server.idle_greenlets, gevent.getcurrent()
        idle.add(me)
        try:
            return super().read_requestline()
        finally:
            idle.discard(me)

    def read_request(self, raw_requestline):
        timer = gevent.Timeout(self.server.headers_timeout_s)
        timer.start()
        try:
            return super().read_request(raw_requestline)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            # A ValueError is how pywsgi knows a client error: 400, logged, connection closed.
            raise ValueError(f"request headers not complete within {self.server.headers_timeout_s:g} s") from None
        except OSError as exc:
            raise ValueError(f"request headers not received: {exc}") from None
        finally:
            timer.close()

    def run_application(self):
        try:
            super().run_application()
        finally:
            # Left alone, pywsgi reads the rest of the body, of any length and at any pace.
            self.wsgi_input = _BoundedDiscard(self, self.wsgi_input)

    def _log_error(self, t, v, tb):
        # A client that vanished or stopped reading mid-response: its problem, one line.
        if issubclass(t, OSError):
            log.info("http_client_gone", client=str(self.client_address)[:80], error=str(v)[:200])
            return
        log.error("http_server_error", client=str(self.client_address)[:80], exc_info=(t, v, tb))


class _ErrorLog:
    """pywsgi's error stream (malformed requests and the like) into structlog."""

    def write(self, message: str) -> None:
        message = message.strip()
        if message:
            log.info("http_bad_request", detail=message[:300])

    def flush(self) -> None:
        pass


class HttpServer:
    """The daemon's HTTP face on ``settings.http_host``:``settings.http_port``."""

    def __init__(self, daemon: Daemon, settings: Settings, *, port: int | None = None,
                 test_calls: TestCalls | None = None, max_connections: int = MAX_CONNECTIONS,
                 io_timeout_s: float = IO_TIMEOUT_S, headers_timeout_s: float = HEADERS_TIMEOUT_S,
                 turn_slots: TurnSlots | None = None):
        """``port`` None: HTTP_PORT; 0: any free port (tests, benchmarks)."""
        if daemon.flow is None:
            raise ValueError("the HTTP server needs a daemon made by build_conversation_daemon")
        self.daemon = daemon
        self.test_calls = test_calls if test_calls is not None else TestCalls(daemon.flow)
        app = make_app(daemon, self.test_calls, token=settings.http_api_token, turn_slots=turn_slots)
        self._server = WSGIServer((settings.http_host, settings.http_port if port is None else port), app,
                                  spawn=gevent.pool.Pool(max_connections), handler_class=BoundedHandler,
                                  log=None, error_log=_ErrorLog())
        self._server.io_timeout_s = io_timeout_s
        self._server.headers_timeout_s = headers_timeout_s
        self._server.idle_greenlets = set()  # connections waiting for their next request
        self.authenticated = bool(settings.http_api_token)

    def bind(self) -> None:
        """Open the listening socket now (raises OSError: address in use, not allowed)."""
        self._server.init_socket()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.address[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> None:
        self._server.start()
        self.test_calls.start_sweeping()
        log.info("http_listening", url=self.url, token_required=self.authenticated)

    def close(self) -> None:
        """Take no new connections (requests in flight go on)."""
        self._server.close()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Close; idle keep-alive connections at once, requests in flight after ``timeout_s``;
        forget every test call."""
        self._server.close()
        for greenlet in list(self._server.idle_greenlets):
            greenlet.kill(block=False)
        self._server.stop(timeout=timeout_s)
        self.test_calls.close()
        log.info("http_stopped")

    def __enter__(self) -> "HttpServer":
        self.bind()
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
