"""What the two WebSocket servers (``asr-server`` and the HTTP server's ``/ws/transcribe``) share
on their side of a wsproto connection."""

from __future__ import annotations

import socket
import time

from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.utilities import LocalProtocolError

RECV_BYTES = 65536


def linger_for_close(sock: socket.socket, ws: WSConnection, linger_s: float) -> None:
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
