"""``POST /test/transcription`` and ``DELETE /test/calls/{call_uuid}``: a phone turn without a phone.

The request is checked whole before anything happens: a bad one gets its JSON error and never
reaches the LLM. In order: 415 when the Content-Type is not JSON; 413 when the body is over
64 KiB (refused on its Content-Length before a byte of it is read); 408 when the body does not
arrive within BODY_READ_TIMEOUT_S; 400 when it is not a JSON object, a field is missing, empty,
of the wrong type or unknown, or ``call_uuid`` is not 1-128 of ``[A-Za-z0-9._-]``; 413 when the
transcription is over 4,000 characters; 404 for an unknown agent. Then 409 when the test call
already has a turn in flight (one turn at a time per ``call_uuid``: a second request is refused
at once, not queued) or talks to another agent; 503 while shutting down or when every turn slot
stays taken for TURN_SLOT_WAIT_S.

The answer is the whole reply as one 8 kHz mono PCM16 WAV, with ``X-LLM-Response`` (its text,
percent-encoded: everything but printable ASCII, and ``%`` itself, as UTF-8 %XX, so
``urllib.parse.unquote`` gives it back exactly), ``X-File-Metadata`` (JSON) and
``X-Used-Fallback``; ``X-Call-Action`` when the turn would have hung up or transferred a call.
"""

from __future__ import annotations

import json
import re
import urllib.parse

import falcon
import gevent
import gevent.lock

from ivr_daemon.audio import TELEPHONY_RATE_HZ
from ivr_daemon.daemon import Daemon
from ivr_daemon.http.test_calls import AgentMismatch, TestAnswer, TestCallBusy, TestCalls, TestCallsFull

MAX_BODY_BYTES = 64 * 1024
# A body over the limit but at most this long is read and dropped after the 413, so a client
# that sends it whole before reading (most do) still gets the 413; a longer one, or a chunked
# one, closes the connection instead of being read.
DISCARD_MAX_BYTES = 1024 * 1024
MAX_TRANSCRIPTION_CHARS = 4000
CALL_UUID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
BODY_READ_TIMEOUT_S = 10.0  # the whole body, however slowly it trickles in
# Test turns share the LLM and the synthesis threads with live calls: only so many at once.
TEST_TURNS_AT_ONCE = 4
TURN_SLOT_WAIT_S = 30.0
FIELDS = ("call_uuid", "transcription", "agent")
# What X-LLM-Response keeps as it is: printable ASCII but "%", the escape character itself.
HEADER_SAFE = "".join(chr(code) for code in range(0x20, 0x7F) if chr(code) != "%")


def header_text(text: str) -> str:
    """``text`` as a header value: non-ASCII, control characters and "%" percent-encoded (UTF-8)."""
    return urllib.parse.quote(text, safe=HEADER_SAFE)


class TurnSlots:
    """At most ``at_once`` test turns in flight; a request waits ``wait_s`` for a slot, then 503."""

    def __init__(self, at_once: int = TEST_TURNS_AT_ONCE, wait_s: float = TURN_SLOT_WAIT_S):
        self._slots = gevent.lock.BoundedSemaphore(at_once)
        self.wait_s = wait_s

    def acquire(self) -> None:
        if not self._slots.acquire(timeout=self.wait_s):
            raise falcon.HTTPServiceUnavailable(
                title="503 Service Unavailable", description="every test turn slot is busy: try again",
                retry_after=1)

    def release(self) -> None:
        self._slots.release()


def _bad(description: str) -> falcon.HTTPBadRequest:
    return falcon.HTTPBadRequest(title="400 Bad Request", description=description)


def read_json_object(req: falcon.Request, max_bytes: int = MAX_BODY_BYTES) -> dict:
    """The request body as a JSON object, read at most ``max_bytes`` + 1 bytes far."""
    if (req.content_type or "").split(";")[0].strip().lower() != falcon.MEDIA_JSON:
        raise falcon.HTTPUnsupportedMediaType(title="415 Unsupported Media Type",
                                              description="send the request as Content-Type: application/json")
    length = req.content_length
    if length is not None and length > max_bytes:
        raise _too_large(f"the body is {length} bytes; at most {max_bytes}", close=length > DISCARD_MAX_BYTES)
    timer = gevent.Timeout(BODY_READ_TIMEOUT_S)
    timer.start()
    try:
        # wsgi.input itself (gevent's), not Falcon's bounded_stream: it also reads chunked bodies.
        data = req.stream.read(max_bytes + 1)
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise falcon.HTTPError(falcon.HTTP_408, title="408 Request Timeout",
                               description=f"the body did not arrive within {BODY_READ_TIMEOUT_S:g} s",
                               headers={"Connection": "close"})
    except (OSError, ValueError) as exc:
        raise _bad(f"the body could not be read: {exc}")
    finally:
        timer.close()
    if len(data) > max_bytes:
        raise _too_large(f"the body is over {max_bytes} bytes", close=True)
    try:
        payload = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError is one
        raise _bad(f"the body is not JSON: {exc}")
    if not isinstance(payload, dict):
        raise _bad("the body must be a JSON object")
    return payload


def _too_large(description: str, close: bool) -> falcon.HTTPContentTooLarge:
    return falcon.HTTPContentTooLarge(title="413 Content Too Large", description=description,
                                      headers={"Connection": "close"} if close else None)


def _field(payload: dict, name: str, required: bool = True) -> str | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if value is None:
        raise _bad(f"{name} is required")
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string")
    if not value.strip():
        raise _bad(f"{name} must not be empty")
    return value


class TranscriptionResource:
    """``POST /test/transcription``."""

    def __init__(self, daemon: Daemon, test_calls: TestCalls, turn_slots: TurnSlots):
        self.daemon = daemon
        self.test_calls = test_calls
        self.turn_slots = turn_slots

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        payload = read_json_object(req)
        unknown = sorted(set(payload) - set(FIELDS))
        if unknown:
            raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))[:200]}; the fields are {', '.join(FIELDS)}")
        call_uuid = _field(payload, "call_uuid")
        if not CALL_UUID_RE.match(call_uuid):
            raise _bad("call_uuid must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'")
        transcription = _field(payload, "transcription").strip()
        if len(transcription) > MAX_TRANSCRIPTION_CHARS:
            raise falcon.HTTPContentTooLarge(
                title="413 Content Too Large",
                description=f"the transcription is {len(transcription)} characters; at most {MAX_TRANSCRIPTION_CHARS}")
        agent = _field(payload, "agent", required=False)
        flow = self.test_calls.flow
        if agent is not None and agent not in flow.by_agent:
            raise falcon.HTTPNotFound(title="404 Not Found",
                                      description=f"no agent {agent[:64]!r}; the agents are {', '.join(flow.by_agent)}")
        if not flow.by_agent[agent or flow.default_agent].accepting_turns:
            raise falcon.HTTPServiceUnavailable(title="503 Service Unavailable", description="the daemon is stopping")
        answer = self._turn(call_uuid, agent, transcription)
        resp.content_type = "audio/wav"
        resp.data = answer.wav
        resp.set_header("X-LLM-Response", header_text(answer.text))
        resp.set_header("X-File-Metadata", json.dumps({
            "sample_rate_hz": TELEPHONY_RATE_HZ, "channels": 1, "sample_width_bytes": 2,
            "duration_s": round(answer.duration_s, 4), "size_bytes": len(answer.wav)}))
        resp.set_header("X-Used-Fallback", "true" if answer.used_fallback else "false")
        resp.set_header("X-Turn", str(answer.turn))
        if answer.actions:
            resp.set_header("X-Call-Action", ", ".join(answer.actions))

    def _turn(self, call_uuid: str, agent: str | None, transcription: str) -> TestAnswer:
        try:
            call = self.test_calls.open(call_uuid, agent)
        except AgentMismatch as exc:
            raise falcon.HTTPConflict(
                title="409 Conflict",
                description=f"test call {call_uuid} talks to agent {exc.args[0]!r}: DELETE /test/calls/{call_uuid} "
                            "to start it again with another")
        except TestCallsFull:
            raise falcon.HTTPServiceUnavailable(title="503 Service Unavailable",
                                                description="too many test calls have a turn in flight",
                                                retry_after=1)
        if call.in_turn:
            raise _busy(call_uuid)
        self.turn_slots.acquire()
        try:
            if call.forgotten:  # deleted (or made room for another) while it waited for a slot
                raise _forgotten(call_uuid)
            answer = call.answer(transcription)
        except TestCallBusy:
            raise _busy(call_uuid)
        finally:
            self.turn_slots.release()
            self.test_calls.touch(call)
        if call.forgotten:
            raise _forgotten(call_uuid)
        return answer


def _forgotten(call_uuid: str) -> falcon.HTTPConflict:
    return falcon.HTTPConflict(title="409 Conflict", description=f"test call {call_uuid} was deleted during this request")


def _busy(call_uuid: str) -> falcon.HTTPConflict:
    return falcon.HTTPConflict(title="409 Conflict",
                               description=f"test call {call_uuid} already has a turn in flight: one at a time")


class TestCallResource:
    """``DELETE /test/calls/{call_uuid}``: forget a test conversation (a turn in flight is cut)."""

    __test__ = False

    def __init__(self, test_calls: TestCalls):
        self.test_calls = test_calls

    def on_delete(self, req: falcon.Request, resp: falcon.Response, call_uuid: str) -> None:
        if not self.test_calls.forget(call_uuid):
            raise falcon.HTTPNotFound(title="404 Not Found", description=f"no test call {call_uuid[:128]}")
        resp.status = falcon.HTTP_204
