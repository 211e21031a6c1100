"""Outbound calls: check the request, build the ``bgapi originate``, wait for its BACKGROUND_JOB.

Shared by ``ivr-daemon call`` and ``POST /calls``. The call is originated into the shipped IVR
extension (dialplan/ai_ivr.xml: extension ``ai`` in context ``ivr``) with ``ivr_agent`` and the
caller's dynamic variables as channel variables, and ``origination_uuid`` so the call's UUID is
known before it exists. Nothing here talks to a socket: ``send`` is the one ESL writer's.

Dynamic variables fill ``{name}`` placeholders in the agent's system prompt and greeting. Their
values go into FreeSWITCH's ``{k=v,...}`` originate block, where ``,`` separates pairs, ``}``
ends the block, ``'`` ``^`` quote or change the separator, ``=`` is the pair's own separator and
a line break would end the command: all are refused, not escaped, so nothing can be injected.
"""

from __future__ import annotations

import collections
import re
import string
import uuid as uuid_lib
from dataclasses import dataclass, field
from typing import Callable, Mapping

import gevent
import gevent.event

from ivr_daemon.esl import commands
from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.logs import get_logger

log = get_logger(__name__)

IVR_EXTENSION = "ai"  # dialplan/ai_ivr.xml
IVR_DIALPLAN = "XML"
IVR_CONTEXT = "ivr"
JOB_TIMEOUT_S = 60.0  # originate waits for an answer (FreeSWITCH's default originate_timeout is 60 s)
MAX_VARIABLES = 32
MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 256
MAX_PENDING_JOBS = 256

_KEY_RE = re.compile(r"^[a-z0-9_]+$")
# Characters FreeSWITCH's originate variable syntax gives a meaning to, and = (the pair separator).
_VALUE_FORBIDDEN = set(",{}[]<>'\"^=|\\")
# Set by the originate itself: a caller's variable may not override them.
RESERVED_KEYS = frozenset({"ivr_agent", "origination_uuid", "origination_caller_id_number",
                           "origination_caller_id_name", "fire_asr_events"})
_CALLER_ID_RE = re.compile(r"^\+?[0-9]{1,20}$")


class OutboundError(Exception):
    """A call that was not placed: ``http_status`` and ``exit_code`` say why."""

    http_status = 400
    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadCallRequest(OutboundError):
    pass


class UnknownAgent(OutboundError):
    http_status = 404


class OriginateFailed(OutboundError):
    """FreeSWITCH refused or failed the originate: its own text (``-ERR USER_NOT_REGISTERED``)."""

    http_status = 502
    exit_code = 1


class JobTimeout(OutboundError):
    http_status = 504
    exit_code = 1


def check_variables(variables: Mapping[str, object]) -> dict[str, str]:
    """The variables as given, or BadCallRequest naming the first bad key."""
    if not isinstance(variables, Mapping):
        raise BadCallRequest("variables must be an object of names to strings")
    if len(variables) > MAX_VARIABLES:
        raise BadCallRequest(f"at most {MAX_VARIABLES} variables")
    checked: dict[str, str] = {}
    for key, value in variables.items():
        shown = repr(str(key)[:MAX_KEY_CHARS])
        if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > MAX_KEY_CHARS:
            raise BadCallRequest(f"variable {shown}: names are 1-{MAX_KEY_CHARS} of a-z 0-9 _")
        if key in RESERVED_KEYS:
            raise BadCallRequest(f"variable {shown}: reserved, set by the call itself")
        if not isinstance(value, str):
            raise BadCallRequest(f"variable {shown}: the value must be a string")
        if len(value) > MAX_VALUE_CHARS:
            raise BadCallRequest(f"variable {shown}: longer than {MAX_VALUE_CHARS} characters")
        if not value or value != value.strip():
            raise BadCallRequest(f"variable {shown}: empty, or whitespace at either end")
        if any(c in _VALUE_FORBIDDEN for c in value) or any(not c.isprintable() for c in value):
            raise BadCallRequest(f"variable {shown}: may not contain control characters or any of , {{ }} [ ] < > ' \" ^ = | \\")
        if not value.isascii():
            # FreeSWITCH would take it, but channel variables travel url-encoded in events and
            # through other systems' logs; ASCII keeps them the same everywhere.
            raise BadCallRequest(f"variable {shown}: only ASCII characters")
        checked[key] = value
    return checked


def placeholders(text: str) -> set[str]:
    """The ``{name}`` fields of a prompt; BadCallRequest for any other kind of field."""
    names: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise BadCallRequest(f"bad placeholder in {text[:60]!r}: {exc}") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not _KEY_RE.match(name) or name.isdigit() or spec or conversion:
            raise BadCallRequest(f"placeholder {{{name}}} in {text[:60]!r}: only plain {{name}} fields")
        names.add(name)
    return names


class _Missing(dict):
    def __missing__(self, key):
        raise KeyError(key)


def fill(text: str, variables: Mapping[str, str]) -> tuple[str, list[str]]:
    """The text with its placeholders filled, and the names that had no value.

    With any name missing the text is returned as written (a half-filled sentence is worse
    than a template) and the caller logs it. Only plain ``{name}`` fields are filled:
    attribute and index access are refused, so a value can never reach into an object.
    """
    try:
        names = placeholders(text)
    except BadCallRequest:
        return text, ["<invalid placeholder>"]
    if not names:
        return text, []
    missing = sorted(n for n in names if n not in variables)
    if missing:
        return text, missing
    try:
        return text.format_map(_Missing({n: variables[n] for n in names})), []
    except (KeyError, IndexError, ValueError):
        return text, ["<invalid placeholder>"]


@dataclass
class CallRequest:
    destination: str
    agent: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    caller_id: str | None = None


@dataclass
class PreparedCall:
    command: commands.EslCommand
    call_uuid: str
    agent: str


def prepare(request: CallRequest, agents) -> PreparedCall:
    """Check everything and build the originate; nothing is dialled here."""
    agent_name = request.agent or agents.default_name
    agent = agents.agents.get(agent_name)
    if agent is None:
        raise UnknownAgent(f"unknown agent {agent_name[:64]!r}; agents: {', '.join(sorted(agents.agents))}")
    variables = check_variables(request.variables)
    needed: set[str] = set()
    for what, text in (("system prompt", agent.settings.system_prompt), ("greeting", agent.settings.greeting)):
        try:
            needed |= placeholders(text or "")
        except BadCallRequest as exc:
            raise BadCallRequest(f"agent {agent_name} {what}: {exc.message}") from None
    missing = sorted(needed - set(variables))
    if missing:
        raise BadCallRequest(f"agent {agent_name} needs a value for {', '.join(missing)} (--var NAME=VALUE)")
    if request.caller_id is not None and not _CALLER_ID_RE.match(str(request.caller_id)):
        raise BadCallRequest("caller id: digits only, optionally a leading +")
    call_uuid = str(uuid_lib.uuid4())
    channel_vars = {"origination_uuid": call_uuid, "ivr_agent": agent_name, **variables}
    if request.caller_id:
        channel_vars["origination_caller_id_number"] = request.caller_id
    try:
        command = commands.originate_extension(request.destination, IVR_EXTENSION, IVR_DIALPLAN, IVR_CONTEXT,
                                               channel_vars)
    except commands.UnsafeCommandArgument as exc:
        raise BadCallRequest(str(exc)) from None
    return PreparedCall(command, call_uuid, agent_name)


def job_result(body: str) -> str:
    """A BACKGROUND_JOB body (capture 21: ``+OK <uuid>``) to the uuid, or OriginateFailed."""
    text = (body or "").strip()
    if text.startswith("+OK"):
        return text[3:].strip()
    raise OriginateFailed(f"FreeSWITCH: {text[:200] or 'empty reply'}")


class JobWaiters:
    """BACKGROUND_JOB bodies by Job-UUID, for whoever waits on them; bounded both ways.

    A job's event can be routed before its sender, woken by the bgapi reply, asks for it: such a
    result is kept (the latest ``MAX_PENDING_JOBS``) until asked for.
    """

    def __init__(self, max_jobs: int = MAX_PENDING_JOBS):
        self.max_jobs = max_jobs
        self._waiting: dict[str, gevent.event.AsyncResult] = {}
        self._unclaimed: collections.OrderedDict[str, str] = collections.OrderedDict()

    def on_event(self, event: EslEvent) -> bool:
        if event.name != "BACKGROUND_JOB":
            return False
        job_uuid = event.get("Job-UUID")
        if not job_uuid:
            return False
        waiter = self._waiting.pop(job_uuid, None)
        if waiter is not None:
            waiter.set(event.body or "")
        else:
            self._unclaimed[job_uuid] = event.body or ""
            while len(self._unclaimed) > self.max_jobs:
                self._unclaimed.popitem(last=False)
        return True

    def wait(self, job_uuid: str, timeout_s: float) -> str:
        if job_uuid in self._unclaimed:
            return self._unclaimed.pop(job_uuid)
        if len(self._waiting) >= self.max_jobs:
            raise OriginateFailed("too many calls being placed at once")
        result = self._waiting[job_uuid] = gevent.event.AsyncResult()
        try:
            return result.get(timeout=timeout_s)
        except gevent.Timeout:
            raise JobTimeout(f"no BACKGROUND_JOB for job {job_uuid} within {timeout_s:g} s") from None
        finally:
            self._waiting.pop(job_uuid, None)


def place_call(request: CallRequest, agents, send: Callable, waiters: JobWaiters,
               timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Check, send the bgapi originate, wait for its job; the call's UUID or an OutboundError."""
    prepared = prepare(request, agents)
    call_log = log.bind(call_uuid=prepared.call_uuid, agent=prepared.agent)
    try:
        reply = send(prepared.command)
    except Exception as exc:  # NotConnectedError, EslError: the switch never got it
        call_log.warning("originate_not_sent", error=str(exc))
        raise OriginateFailed(f"not sent to FreeSWITCH: {exc}") from None
    job_uuid = reply.job_uuid if reply.ok else None
    if not job_uuid:
        call_log.warning("originate_refused", reply=reply.text[:200])
        raise OriginateFailed(f"FreeSWITCH: {reply.text[:200]}")
    try:
        call_uuid = job_result(waiters.wait(job_uuid, timeout_s))
    except OutboundError as exc:
        call_log.warning("originate_failed", job_uuid=job_uuid, error=exc.message)
        raise
    call_log.info("originate_ok", job_uuid=job_uuid, answered_uuid=call_uuid)
    return call_uuid
