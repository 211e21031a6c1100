"""One client connection: its ``event`` subscription and the writer greenlet that alone writes its socket."""

from __future__ import annotations

import socket as socket_constants
import struct
from dataclasses import dataclass
from typing import Callable

import gevent
import gevent.queue

WRITER_DRAIN_TIMEOUT_S = 5.0
_CLOSE = object()


@dataclass(frozen=True)
class Subscription:
    """A connection's ``event`` state: format and names, as mod_event_socket keeps them."""

    wire_format: str
    event_names: frozenset[str]
    all_events: bool
    custom_subclasses: frozenset[str] = frozenset()

    def matches(self, event_name: str, subclass: str | None = None) -> bool:
        # mod_event_socket event_handler(): ALL takes everything; CUSTOM needs the subclass too.
        if self.all_events:
            return True
        if event_name not in self.event_names:
            return False
        return event_name != "CUSTOM" or not subclass or subclass in self.custom_subclasses


@dataclass(frozen=True)
class ConnectionInfo:
    """A snapshot of one client connection; ``subscription`` is None until events are enabled."""

    connection_id: int
    peer: str
    authenticated: bool
    subscription: Subscription | None


class ClientConnection:
    """One client socket: its ``event`` state and a writer greenlet draining an ordered outbox."""

    def __init__(self, connection_id: int, sock, peer: str, on_written: Callable[[int], None] | None = None):
        self.id = connection_id
        self._on_written = on_written
        self.sock = sock
        self.peer = peer
        self.authenticated = False
        self.events_enabled = False
        self.wire_format = "plain"
        self.event_names: set[str] = set()
        self.all_events = False
        self.custom_subclasses: set[str] = set()
        self.logging = False
        self.closing = False
        self.closed = False
        self._outbox: gevent.queue.Queue = gevent.queue.Queue()
        self._writer = gevent.spawn(self._write_loop)

    def subscription(self) -> Subscription | None:
        if not self.events_enabled:
            return None
        return Subscription(self.wire_format, frozenset(self.event_names), self.all_events, frozenset(self.custom_subclasses))

    def wants(self, event_name: str, subclass: str | None) -> bool:
        subscription = self.subscription()
        return not self.closed and subscription is not None and subscription.matches(event_name, subclass)

    def info(self) -> ConnectionInfo:
        return ConnectionInfo(self.id, self.peer, self.authenticated, self.subscription())

    def send(self, data: bytes, sequence: int | None = None) -> None:
        """Queue bytes for the writer; an event's ``sequence`` gets its write time noted."""
        if not self.closed:
            self._outbox.put(data if sequence is None else (data, sequence))

    def close_after_flush(self) -> None:
        self._outbox.put(_CLOSE)

    def abort(self, reset: bool = False) -> None:
        """Close at once, dropping whatever is still queued: no disconnect-notice."""
        if self.closed:
            return
        self.closed = True
        self._writer.kill(block=False)
        try:
            if reset:
                # Linger 0 makes close() send RST, like a crashed switch or a cut cable.
                self.sock.setsockopt(socket_constants.SOL_SOCKET, socket_constants.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.sock.shutdown(socket_constants.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def wait_written(self, timeout_s: float) -> None:
        """Wait for the writer to flush and close; abort if the peer does not read in time."""
        self._writer.join(timeout_s)
        if not self._writer.dead:
            self.abort()

    def _write_loop(self) -> None:
        try:
            while True:
                item = self._outbox.get()
                if item is _CLOSE:
                    break
                if isinstance(item, tuple):
                    data, sequence = item
                    self.sock.sendall(data)
                    if self._on_written is not None:
                        self._on_written(sequence)
                else:
                    self.sock.sendall(item)
        except OSError:
            pass
        finally:
            self.closed = True
            try:
                self.sock.shutdown(socket_constants.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
