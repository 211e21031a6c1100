"""The LLM session's connections: each sends its request at once and reads the answer once the
loop has nothing more urgent to do (the idle lane, ``ivr_daemon/idle_lane.py``).

Plugged into requests through its adapter (``LanePacedAdapter``, mounted on the session of
``ivr_daemon/llm/transport.py``, which takes the pool from it and posts into it directly):
urllib3 pools whose connection class waits in the lane in ``getresponse``, between the request
written and its status line read.
"""

from __future__ import annotations

import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.response

from ivr_daemon.idle_lane import idle_lane


class _LanePacedConnection(urllib3.connection.HTTPConnection):
    """Sends its request at once; reads the answer once the loop has nothing more urgent to do.

    In a burst of turns the answers come back while other turns' requests are still to be sent:
    parsing an answer's headers and reading its first sentence (~0.5 ms of the loop each) would
    run before them, first come first served, and the last requests would go out late by all of
    it. Waiting in the idle lane (idle_lane.py) as a first waiter, between the request written and
    its status line read, puts every request first, then the first sentences, then the rest of the
    replies. At most a quarter of the read timeout: well within the client's own deadline.
    """

    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        timeout_s = self.timeout if isinstance(self.timeout, (int, float)) else None
        idle_lane().wait(first=True, max_wait_s=timeout_s / 4 if timeout_s else None)
        return super().getresponse()


class _LanePacedHttpsConnection(_LanePacedConnection, urllib3.connection.HTTPSConnection):
    pass


class _LanePacedPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _LanePacedConnection


class _LanePacedHttpsPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _LanePacedHttpsConnection


class LanePacedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections read their answers from the idle lane."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _LanePacedPool, "https": _LanePacedHttpsPool}
