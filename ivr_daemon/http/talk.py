"""``GET /`` (a page to talk to the agent) and ``GET /ws/transcribe`` (live transcription, then the turn).

The WebSocket route is a Falcon resource like any other, so it gets the token check, the access
log and JSON errors for free: everything that can be refused is refused here, as plain HTTP,
before the upgrade (401 without the token, 400 for a request that is no WebSocket handshake,
404 for an unknown agent, 501 without the ``[asr]`` extra, 503 while the daemon stops). The
resource answers ``101 Switching Protocols`` and leaves the session in the WSGI environ under
:data:`WEBSOCKET_SESSION`; once pywsgi has written the 101, its handler (server.py) hands the
socket to the session, which runs on that connection's greenlet until the socket closes
(ws_transcribe.py speaks the protocol, through wsproto). pywsgi never reads or writes that
connection again.

Browsers cannot set an Authorization header on a WebSocket, so this route alone also takes the
token as ``?token=`` (the access log never logs query strings). The page and its files are
open: they are static and hold nothing; the page passes its own ``?token=`` on to the socket.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import falcon
import gevent
import gevent.event
import gevent.lock
import gevent.threadpool

from ivr_daemon.config import Settings
from ivr_daemon.http.transcription import TurnSlots
from ivr_daemon.logs import get_logger

log = get_logger(__name__)

WEBSOCKET_SESSION = "ivr_daemon.websocket_session"  # environ key: what runs once the 101 is out
STATIC_DIR = Path(str(files("ivr_daemon.http") / "static"))
# Sockets at once. Each holds a recognizer (pocketsphinx: ~90 MB) and a decoding thread while
# it decodes; past this, a new socket is accepted, told why in an error message, and closed.
MAX_SOCKETS = 8
IDLE_TIMEOUT_S = 60.0  # nothing from the client this long (a turn in flight aside): closed
MAX_MESSAGE_BYTES = 1 << 20  # one binary message; the page sends 3,200 bytes (100 ms) at a time
SAMPLE_RATE_HZ = 16000  # what the client streams: mono PCM16 little-endian
# The page's own Content-Security-Policy: it may load nothing but its own files, talk to nothing
# but its own origin (the socket), and play only the reply it was sent.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "media-src blob:; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class SessionSummary:
    """How one socket went: logged when it closes, kept for tests."""

    session_id: str
    peer: str
    agent: str
    messages: int = 0
    audio_s: float = 0.0
    dropped_audio_s: float = 0.0  # received while a turn was in flight: not listened to
    decode_s: float = 0.0
    partials: int = 0
    finals: int = 0
    turns: int = 0
    errors: int = 0
    # client_closed | disconnected | idle | too_big | bad_message | protocol_error | too_many_sockets
    # | asr_unavailable | server_stopped | failed
    reason: str = ""
    detail: str = ""


class TalkSessions:
    """What every /ws/transcribe socket shares: the recognizer's model (loaded on first use, off
    the loop), the decoding threads, the limits, and the test turns' slots."""

    def __init__(self, settings: Settings, turn_slots: TurnSlots, *, asr_engine=None, max_sockets: int = MAX_SOCKETS,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.settings = settings
        self.turn_slots = turn_slots
        self.max_sockets = max_sockets
        self.idle_timeout_s = idle_timeout_s
        self.max_message_bytes = max_message_bytes
        # One decoding thread per socket that may be open: a slow socket never waits for another's.
        self.pool = gevent.threadpool.ThreadPool(max_sockets)
        self._engine = asr_engine
        self._engine_lock = gevent.lock.Semaphore()
        self.open_sockets = 0
        self.closed: list[SessionSummary] = []
        self._closed_event = gevent.event.Event()

    def engine(self):
        """The ASR engine ASR_ENGINE names, loaded once, on a worker thread (the model takes a while)."""
        with self._engine_lock:
            if self._engine is None:
                from ivr_daemon.asr import make_asr_engine

                started_s = time.monotonic()
                self._engine = self.pool.spawn(make_asr_engine, self.settings).get()
                log.info("talk_asr_engine_loaded", engine=self._engine.name, model_id=self._engine.model_id,
                         load_s=round(time.monotonic() - started_s, 2))
            return self._engine

    def session_ended(self, summary: SessionSummary) -> None:
        self.closed.append(summary)
        del self.closed[:-1000]  # bounded: the most recent only
        self._closed_event.set()

    def wait_closed(self, count: int, timeout_s: float = 30.0) -> list[SessionSummary]:
        """Block this greenlet until ``count`` sockets have closed in all; their summaries."""
        deadline_s = time.monotonic() + timeout_s
        while len(self.closed) < count:
            self._closed_event.clear()
            if not self._closed_event.wait(max(0.0, deadline_s - time.monotonic())):
                raise TimeoutError(f"{len(self.closed)} of {count} sockets closed within {timeout_s} s")
        return list(self.closed)

    def close(self) -> None:
        self.pool.kill()


def _bad(description: str) -> falcon.HTTPBadRequest:
    return falcon.HTTPBadRequest(title="400 Bad Request", description=description)


def _header_tokens(req: falcon.Request, name: str) -> set[str]:
    return {part.strip().lower() for part in (req.get_header(name) or "").split(",")}


class TranscribeResource:
    """``GET /ws/transcribe``: checks the handshake, answers 101 and leaves the session to the handler."""

    def __init__(self, test_calls, sessions: TalkSessions):
        self.test_calls = test_calls  # for the call flow: the socket's conversation is a TestCall of its own
        self.sessions = sessions

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if "websocket" not in _header_tokens(req, "Upgrade") or "upgrade" not in _header_tokens(req, "Connection"):
            raise falcon.HTTPError(falcon.HTTP_426, title="426 Upgrade Required",
                                   description="this route is a WebSocket: send 'Upgrade: websocket'",
                                   headers={"Upgrade": "websocket"})
        key = req.get_header("Sec-WebSocket-Key") or ""
        if req.get_header("Sec-WebSocket-Version") != "13":
            raise falcon.HTTPError(falcon.HTTP_426, title="426 Upgrade Required",
                                   description="only WebSocket version 13 is spoken",
                                   headers={"Sec-WebSocket-Version": "13"})
        if not 16 <= len(key) <= 64:
            raise _bad("Sec-WebSocket-Key is missing or malformed")
        flow = self.test_calls.flow
        agent = req.get_param("agent") or flow.default_agent
        if agent not in flow.by_agent:
            raise falcon.HTTPNotFound(title="404 Not Found",
                                      description=f"no agent {agent[:64]!r}; the agents are {', '.join(flow.by_agent)}")
        if not flow.by_agent[agent].accepting_turns:
            raise falcon.HTTPServiceUnavailable(title="503 Service Unavailable", description="the daemon is stopping")
        try:
            from ivr_daemon.http.ws_transcribe import TranscribeSession, accept_token
        except ImportError as exc:  # wsproto and the recognisers are the [asr] extra
            log.warning("talk_needs_asr_extra", error=str(exc)[:200])
            raise falcon.HTTPError(falcon.HTTP_501, title="501 Not Implemented",
                                   description="live transcription needs the asr extra: pip install 'ivr-daemon[asr]'")
        req.env[WEBSOCKET_SESSION] = TranscribeSession(self.sessions, flow, agent, session_id=f"ws-{secrets.token_hex(8)}",
                                                       peer=str(req.remote_addr)[:80])
        resp.status = falcon.HTTP_101
        resp.content_type = None
        resp.set_header("Upgrade", "websocket")
        resp.set_header("Connection", "Upgrade")
        resp.set_header("Sec-WebSocket-Accept", accept_token(key))


class TalkPageResource:
    """``GET /``: the page (static/talk.html); its script and worklet are under /static/."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/html; charset=utf-8"
        resp.data = (STATIC_DIR / "talk.html").read_bytes()
        resp.set_header("Content-Security-Policy", PAGE_CSP)
        resp.set_header("Cache-Control", "no-cache")
