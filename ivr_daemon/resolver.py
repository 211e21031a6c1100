"""Name resolution for the daemon's outgoing connections (the LLM, webhooks, HTTP tools).

gevent's default resolver runs every ``getaddrinfo`` on its thread pool, so that a slow DNS
server never blocks the loop; that includes the IP literals the daemon is usually given
(``http://127.0.0.1:8080``, a LAN address). Each such lookup is a round trip through a worker
thread and back to the hub, and a burst of turns opening connections to the LLM at once queues
them all behind the pool's few threads: seconds under load, for answers that need no lookup.

:class:`NumericFirstResolver` answers a host that is already a numeric address on the loop
(``AI_NUMERICHOST``: no DNS, no file read, microseconds) and hands every name to gevent's
thread pool as before. Its answers are the same as ``socket.getaddrinfo``'s.
"""

from __future__ import annotations

import _socket

import gevent
from gevent.resolver.thread import Resolver as ThreadResolver


class NumericFirstResolver(ThreadResolver):
    """gevent's thread resolver, except that numeric hosts are answered at once, on the loop."""

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002 (socket's names)
        if isinstance(host, (str, bytes)) and host:
            try:
                return _socket.getaddrinfo(host, port, family, type, proto, flags | _socket.AI_NUMERICHOST)
            except _socket.gaierror:
                pass  # a name (or not an address at all): the thread pool decides, as before
        return super().getaddrinfo(host, port, family, type, proto, flags)


def install() -> None:
    """Use :class:`NumericFirstResolver` on this thread's hub (the daemon's loop)."""
    hub = gevent.get_hub()
    if not isinstance(hub.resolver, NumericFirstResolver):
        hub.resolver = NumericFirstResolver(hub=hub)
