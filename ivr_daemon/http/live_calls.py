"""``GET /calls`` (the live phone calls), ``GET /calls/{uuid}`` (one call and its history),
``POST /calls`` (place an outbound call, :mod:`ivr_daemon.outbound`) and
``GET /calls/{uuid}/transcript`` (an ended call, from the records database).

Read-only: what the router and each call's handler already know, read on the loop between
two of their steps. Caller numbers and what callers said are personal data: with
HTTP_API_TOKEN set these routes need it (config refuses a non-loopback HTTP_HOST without it).
"""

from __future__ import annotations

import datetime

import falcon

from ivr_daemon.calls import Call
from ivr_daemon.daemon import Daemon
from ivr_daemon.outbound import BadCallRequest, CallRequest, OutboundError, UnknownSwitch, place_call
from ivr_daemon.switches import Switch

_HTTP_ERRORS = {400: falcon.HTTPBadRequest, 404: falcon.HTTPNotFound, 502: falcon.HTTPBadGateway,
                504: falcon.HTTPGatewayTimeout}
_CALL_FIELDS = frozenset({"destination", "agent", "variables", "caller_id", "switch"})


def call_summary(call: Call, switch: str) -> dict[str, object]:
    handler = call.handler
    agent = getattr(handler, "agent", None)
    return {
        "uuid": call.uuid,
        "switch": switch,
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
        resp.media = {"calls": [call_summary(call, switch.name) for switch, call in self.daemon.calls
                                if not call.ended]}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """``{"destination": "user/1001", "agent": "sales", "variables": {...}, "caller_id": "...",
        "switch": "host:port"}`` -> 201 ``{"uuid": ...}``; 400 bad request, 404 unknown agent or
        switch, 502 FreeSWITCH's error, 504 no BACKGROUND_JOB in time. The originate goes through
        the one ESL writer of the switch named (default: the first of FREESWITCH_HOSTS)."""
        from ivr_daemon.http.transcription import read_json_object

        body = read_json_object(req)
        try:
            request = _call_request(body)
            switch = _switch(self.daemon, body.get("switch"))
            if self.daemon.agents is None:
                raise BadCallRequest("this daemon has no agents to call with")
            call_uuid = place_call(request, self.daemon.agents, switch.esl.send, switch.jobs)
        except OutboundError as exc:
            status = exc.http_status
            raise _HTTP_ERRORS[status](title=f"{status} {_TITLES[status]}", description=exc.message) from None
        resp.status = falcon.HTTP_201
        resp.media = {"uuid": call_uuid, "destination": request.destination,
                      "agent": request.agent or self.daemon.agents.default_name, "switch": switch.name}


_TITLES = {400: "Bad Request", 404: "Not Found", 502: "Bad Gateway", 504: "Gateway Timeout"}


def _switch(daemon: Daemon, name: object) -> Switch:
    if name is None:
        return daemon.switch()
    if not isinstance(name, str):
        raise BadCallRequest("'switch' must be a string: host:port as in FREESWITCH_HOSTS")
    try:
        return daemon.switch(name)
    except KeyError:
        raise UnknownSwitch(f"no switch {name[:100]!r}; this daemon's: "
                            f"{', '.join(switch.name for switch in daemon.switches)}") from None


def _call_request(body: dict) -> CallRequest:
    unknown = sorted(set(body) - _CALL_FIELDS)
    if unknown:
        raise BadCallRequest(f"unknown field(s): {', '.join(k[:40] for k in unknown[:5])}")
    destination = body.get("destination")
    if not isinstance(destination, str) or not destination:
        raise BadCallRequest("'destination' (a dial string such as user/1001) is required")
    agent = body.get("agent")
    if agent is not None and not isinstance(agent, str):
        raise BadCallRequest("'agent' must be a string")
    caller_id = body.get("caller_id")
    if caller_id is not None and not isinstance(caller_id, str):
        raise BadCallRequest("'caller_id' must be a string")
    variables = body.get("variables", {})
    if not isinstance(variables, dict):
        raise BadCallRequest("'variables' must be an object of names to strings")
    return CallRequest(destination, agent, variables, caller_id)


class CallResource:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def on_get(self, req: falcon.Request, resp: falcon.Response, call_uuid: str) -> None:
        """A call is its switch and its UUID: ``?switch=host:port`` picks one when the same UUID
        is live on several switches (409 without it)."""
        wanted = req.get_param("switch")
        found = [(switch, call) for switch in self.daemon.switches
                 if (wanted is None or switch.name == wanted)
                 and (call := switch.router.calls.get(call_uuid)) is not None and not call.ended]
        if not found:
            where = f" on switch {wanted[:100]}" if wanted is not None else ""
            raise falcon.HTTPNotFound(title="404 Not Found", description=f"no live call {call_uuid[:128]}{where}")
        if len(found) > 1:
            raise falcon.HTTPConflict(
                title="409 Conflict", description=f"call {call_uuid[:128]} is live on several switches "
                f"({', '.join(switch.name for switch, _ in found)}): add ?switch=host:port")
        switch, call = found[0]
        history = getattr(call.handler, "history", None)
        # The conversation itself; the system prompt is the agent's, not the call's.
        messages = history.messages()[1:] if history is not None else []
        resp.media = {**call_summary(call, switch.name), "history": messages}


class TranscriptResource:
    """``GET /calls/{uuid}/transcript``: an ended call's record and its turns (what the caller
    said, what was sent and what was heard) from the records database. 404 unknown; 409 still
    live (``GET /calls/{uuid}``); 503 its record not written yet (``Retry-After``), the database
    down, or no records kept. The read runs on the records' own thread, never on the loop."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def on_get(self, req: falcon.Request, resp: falcon.Response, call_uuid: str) -> None:
        from ivr_daemon.records import DatabaseUnavailable, RecordsError
        from ivr_daemon.records.views import call_json

        if any((call := switch.router.calls.get(call_uuid)) is not None and not call.ended
               for switch in self.daemon.switches):
            raise falcon.HTTPConflict(title="409 Conflict",
                                      description=f"call {call_uuid[:128]} is still going on: GET /calls/{{uuid}}")
        records = self.daemon.records
        if records is None:
            raise falcon.HTTPServiceUnavailable(title="503 Service Unavailable",
                                                description="this daemon keeps no call records")
        if records.pending_for(call_uuid):
            raise falcon.HTTPServiceUnavailable(title="503 Service Unavailable", retry_after=1,
                                                description=f"the record of {call_uuid[:128]} is being written")
        try:
            found = records.using_store(records.store.call, call_uuid)
        except DatabaseUnavailable as exc:
            raise falcon.HTTPServiceUnavailable(title="503 Service Unavailable", retry_after=5,
                                                description=f"records database unavailable: {exc}") from None
        except RecordsError as exc:
            raise falcon.HTTPInternalServerError(title="500 Internal Server Error",
                                                 description=f"records database error: {exc}") from None
        if found is None:
            raise falcon.HTTPNotFound(title="404 Not Found", description=f"no recorded call {call_uuid[:128]}")
        resp.media = call_json(found)
