"""The server side of one wsproto connection, shared by the two WebSocket servers: ``asr-server``
(:mod:`ivr_daemon.asr.server`) and the HTTP server's ``/ws/transcribe``
(:mod:`ivr_daemon.http.ws_transcribe`, which imports from here: http sits above asr).

:class:`WebSocketSession` turns bytes read from the socket into whole messages, answers pings,
tells a clean close from a dropped connection and a protocol error, enforces the message size
limit and sends close frames (then lingers for the client's own). What a message means, the
read loop with its idle rule and the log line at the end stay with each server.
"""

from __future__ import annotations

import socket
import time

import gevent.lock
from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import CloseConnection, Message, Ping, RejectConnection, Request, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ivr_daemon.tts.base import one_line

RECV_BYTES = 65536


def linger_for_close(sock: socket.socket, ws: WSConnection | Connection, linger_s: float) -> None:
    """After our close frame: read until the client's close frame (a clean close for it), the
    connection's end, or ``linger_s`` in all. One deadline for the whole wait, not one per read:
    a client trickling bytes must not keep a closed session (and its slot) alive."""
    deadline_s = time.monotonic() + linger_s
    try:
        while ws.state is not ConnectionState.CLOSED:
            left_s = deadline_s - time.monotonic()
            if left_s <= 0:
                return
            sock.settimeout(left_s)
            data = sock.recv(RECV_BYTES)
            ws.receive_data(data or None)
            list(ws.events())
            if not data:
                return
    except (OSError, LocalProtocolError):
        pass


class SessionClosed(Exception):
    """The session is over; ``reason`` (and ``detail``) go into its summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class WebSocketSession:
    """One server-side WebSocket connection: bytes in, whole messages to :meth:`_on_message`.

    A subclass sets ``log_prefix`` (its log events are ``<prefix>_protocol_error``,
    ``<prefix>_message_too_big``, ``<prefix>_handshake_failed``), implements ``_on_message`` and
    may override ``_on_request`` (a handshake wsproto read: only a ``WSConnection`` sees one) and
    ``_tell_client`` (a last word in the server's own format before an error close).
    Every ending raises :class:`SessionClosed`; the subclass's read loop catches it.
    """

    log_prefix = "ws"
    # After our close frame, how long the client gets to answer with its own (0: the socket goes at once).
    close_linger_s = 1.0
    # libks's close frame with status code 1 (how every mod_vosk stream ends at hangup) is a
    # normal end for asr-server; for a browser's socket it is a protocol error like any other.
    malformed_close_is_normal = False

    def __init__(self, ws: WSConnection | Connection, log, max_message_bytes: int, sock: socket.socket | None = None):
        self.ws = ws
        self.log = log
        self.max_message_bytes = max_message_bytes
        self.sock = sock
        self._send_lock = gevent.lock.Semaphore()  # the reader and another greenlet may both send: whole frames only
        self._message = bytearray()
        self._message_is_text = False

    # --- what subclasses fill in --------------------------------------------------------------

    def _on_message(self, message: bytes, is_text: bool) -> None:
        raise NotImplementedError

    def _on_request(self, event: Request) -> None:
        """The client's handshake (only when wsproto reads it)."""

    def _tell_client(self, text: str) -> None:
        """A word to the client before an error close, in the server's own message format."""

    # --- bytes in -----------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        """Feed what ``recv`` returned (``b""``: the peer closed TCP) and act on every event."""
        try:
            self.ws.receive_data(data or None)  # None: the peer closed TCP
            events = list(self.ws.events())
        except RemoteProtocolError as exc:  # raised only while the HTTP upgrade is read
            self.log.warning(f"{self.log_prefix}_handshake_failed", error=one_line(exc))
            if isinstance(exc.event_hint, RejectConnection):
                self._send(exc.event_hint)
            raise SessionClosed("handshake_failed", one_line(exc)) from None
        for event in events:
            if isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, Message):
                self._on_message_part(event)
            elif isinstance(event, Ping):
                self._send(event.response())
            elif isinstance(event, CloseConnection):
                self._on_close(event)

    def _on_close(self, event: CloseConnection) -> None:
        if self.ws.state is ConnectionState.REMOTE_CLOSING:  # a well-formed close frame
            self._send(event.response())
            raise SessionClosed("client_closed", f"code {int(event.code)}")
        if event.code == CloseReason.ABNORMAL_CLOSURE:  # TCP closed under us (wsproto's 1006)
            raise SessionClosed("disconnected", "connection closed without a close frame")
        # wsproto could not parse what came (an unmasked frame, a bad opcode, bad UTF-8...).
        # Every close frame wsproto refuses it reports as "CLOSE with ...".
        if self.malformed_close_is_normal and event.reason.startswith("CLOSE"):
            raise SessionClosed("client_closed_malformed", event.reason)
        self.log.warning(f"{self.log_prefix}_protocol_error", error=event.reason[:200])
        self._close(event.code, "protocol error")
        raise SessionClosed("protocol_error", event.reason[:200])

    def _on_message_part(self, event: Message) -> None:
        if not self._message:
            self._message_is_text = isinstance(event, TextMessage)
        part = event.data.encode("utf-8") if isinstance(event, TextMessage) else event.data
        if len(self._message) + len(part) > self.max_message_bytes:
            self.log.warning(f"{self.log_prefix}_message_too_big", max_bytes=self.max_message_bytes)
            self._tell_client(f"a message over {self.max_message_bytes} bytes: send audio in small pieces")
            self._close(CloseReason.MESSAGE_TOO_BIG, "message too big")
            raise SessionClosed("too_big", f"a message over {self.max_message_bytes} bytes")
        self._message += part
        if not event.message_finished:
            return
        message, self._message = bytes(self._message), bytearray()
        self._on_message(message, self._message_is_text)

    # --- bytes out ----------------------------------------------------------------------------

    def _send(self, event) -> None:
        with self._send_lock:
            try:
                data = self.ws.send(event)
            except LocalProtocolError:
                return  # the connection is past the state where this could go out (closing)
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise SessionClosed("disconnected", one_line(exc)) from None

    def _close(self, code: int, reason: str, linger_s: float | None = None) -> None:
        """Send our close frame (once), then give the client ``linger_s`` (by default
        ``close_linger_s``) to answer with its own."""
        if self.ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return
        try:
            self._send(CloseConnection(code=code, reason=reason or None))
        except SessionClosed:
            return
        linger_s = self.close_linger_s if linger_s is None else linger_s
        if linger_s > 0:
            linger_for_close(self.sock, self.ws, linger_s)
