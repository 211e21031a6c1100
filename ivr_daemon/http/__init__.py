"""The daemon's HTTP face: test turns, /health, /metrics, /calls (see app.py).

Arrows point down: this package uses the daemon, the call flow and the metrics; nothing below
it imports it.
"""

from ivr_daemon.http.server import HttpServer

__all__ = ["HttpServer"]
