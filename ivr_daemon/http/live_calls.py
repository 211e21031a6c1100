"""``GET /calls`` (the live phone calls) and ``GET /calls/{uuid}`` (one call and its history).

Read-only: what the router and each call's handler already know, read on the loop between
two of their steps. Caller numbers and what callers said are personal data: with
HTTP_API_TOKEN set these routes need it (config refuses a non-loopback HTTP_HOST without it).
"""

from __future__ import annotations

import datetime

import falcon

from ivr_daemon.calls import Call
from ivr_daemon.daemon import Daemon


def call_summary(call: Call) -> dict[str, object]:
    handler = call.handler
    agent = getattr(handler, "agent", None)
    return {
        "uuid": call.uuid,
        "agent": agent.name if agent is not None else None,
        "caller_number": getattr(handler, "caller_number", None),
        "started": datetime.datetime.fromtimestamp(call.started_unix_s, datetime.timezone.utc)
                           .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "turns": getattr(handler, "turns", 0),
        "state": getattr(handler, "state", "listening"),
    }


class CallsResource:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        calls = [call for call in list(self.daemon.router.calls.values()) if not call.ended]
        resp.media = {"calls": [call_summary(call) for call in calls]}


class CallResource:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def on_get(self, req: falcon.Request, resp: falcon.Response, call_uuid: str) -> None:
        call = self.daemon.router.calls.get(call_uuid)
        if call is None or call.ended:
            raise falcon.HTTPNotFound(title="404 Not Found", description=f"no live call {call_uuid[:128]}")
        history = getattr(call.handler, "history", None)
        # The conversation itself; the system prompt is the agent's, not the call's.
        messages = history.messages()[1:] if history is not None else []
        resp.media = {**call_summary(call), "history": messages}
