"""What one phone call records, and when: snapshots of its row and of its turns' rows.

A call is recorded from the moment the IVR leg parks (or its first turn, for a call up before
the daemon started): other channels of the same call (a loopback A leg, the B leg of a
transfer) are not. Each change that matters writes the newest snapshot: the writer keeps only
the newest one of a record still waiting, so this costs a dict per change, not a row.

A turn's row is built from its replies (the answer, and the answers to its tool calls): what
was sent to be played, and what **the caller heard**, the sentences that played to the end
(PLAYBACK_STOP ``done``): after a barge-in, the reply up to where the caller cut it. It is
written when the turn's answer is sent, again whenever it may have changed (played out, cut,
its tool calls answered), and a last time when the call ends.

Only duck-typed reads of the call flow's objects: this module imports nothing of it.
"""

from __future__ import annotations

import datetime
import time

from ivr_daemon.records.schema import MAX_NAME_CHARS
from ivr_daemon.records.store import utc_now
from ivr_daemon.records.writer import RecordWriter

MAX_TOOL_ARGUMENTS_CHARS = 2000


class CallRecorder:
    """One call's records; every method returns at once (the writer only queues)."""

    def __init__(self, writer: RecordWriter, call_uuid: str):
        self.writer = writer
        self.call_uuid = call_uuid
        self.active = False
        self.started_at = utc_now()
        self.answered_at: datetime.datetime | None = None
        self.ended_at: datetime.datetime | None = None
        self.hangup_cause: str | None = None
        self._replies: dict[int, list] = {}  # turn -> its replies, the answer first
        self._turn_started_at: dict[int, datetime.datetime] = {}

    def learn_times(self, headers: dict) -> None:
        """FreeSWITCH's own times (µs since the epoch) when an event carries them.

        Called with every event of the call: once it is recorded and answered there is nothing
        left to learn, and each header read (a search of the event's header block) is skipped.
        """
        if not self.active:
            created = _freeswitch_time(headers.get("Caller-Channel-Created-Time"))
            if created is not None:
                self.started_at = created
        if self.answered_at is None:
            self.answered_at = _freeswitch_time(headers.get("Caller-Channel-Answered-Time"))

    def answered(self) -> None:
        if self.answered_at is None:
            self.answered_at = utc_now()

    def begin(self, call: dict) -> None:
        """The call is one to record (the IVR leg parked): its row."""
        self.active = True
        self.update(call)

    def update(self, call: dict) -> None:
        """The call's row again (agent learnt, transferred, ended); only once it is recorded."""
        if self.active:
            self.writer.put_call(self._call_row(call))

    def reply_changed(self, reply, call: dict, fallback_phrase: str) -> None:
        """A reply of a turn was sent, played out, cut or its call ended: the turn's row again."""
        turn = getattr(reply, "turn", None)
        if turn is None:
            return
        replies = self._replies.setdefault(turn, [])
        if not any(known is reply for known in replies):
            if not replies and reply.transcript is None:
                return  # a follow-up whose turn was never seen (cannot happen): nothing to anchor it
            replies.append(reply)
            if len(replies) == 1:
                started_s = reply.turn_started_s or reply.started_s
                self._turn_started_at[turn] = utc_now() - datetime.timedelta(seconds=time.monotonic() - started_s)
        if not self.active:
            self.begin(call)  # a call up before the daemon started: recorded from its first turn
        self.writer.put_turn(self._turn_row(turn, fallback_phrase))

    def end(self, call: dict, hangup_cause: str | None, fallback_phrase: str) -> None:
        """The call is over: every turn's last state, then the call's row with its end."""
        if not self.active:
            return
        self.ended_at = utc_now()
        self.hangup_cause = (hangup_cause or "")[:MAX_NAME_CHARS] or None
        for turn in self._replies:
            self.writer.put_turn(self._turn_row(turn, fallback_phrase))
        self.update(call)

    # -- rows -----------------------------------------------------------------------------------

    def _call_row(self, call: dict) -> dict:
        return {
            "uuid": self.call_uuid,
            "agent": _short(call.get("agent")),
            "caller_number": _short(call.get("caller_number")),
            "variables": dict(call.get("variables") or {}),
            "started_at": self.started_at,
            "answered_at": self.answered_at,
            "ended_at": self.ended_at,
            "hangup_cause": self.hangup_cause,
            "transferred_to": _short(call.get("transferred_to")),
        }

    def _turn_row(self, turn: int, fallback_phrase: str) -> dict:
        replies = self._replies[turn]
        answer = replies[0]
        sent, heard, tool_calls = [], [], []
        for reply in replies:
            for item in reply.spoken:
                # The fallback phrase is broadcast with no sentence of the model's.
                text = item.sentence or (fallback_phrase if reply.fallback else "")
                if item.status != "not-sent" and text:
                    sent.append(text)
                if item.status == "done" and text:
                    heard.append(text)
            for call in reply.tool_calls:
                arguments = call.arguments if call.arguments is not None else call.raw_arguments[
                    :MAX_TOOL_ARGUMENTS_CHARS]
                tool_calls.append({"name": call.name[:MAX_NAME_CHARS], "arguments": arguments})
        first_audio_ms = None
        if answer.first_audio_s is not None and answer.turn_started_s is not None:
            first_audio_ms = round((answer.first_audio_s - answer.turn_started_s) * 1000, 1)
        return {
            "call_uuid": self.call_uuid,
            "turn_index": turn,
            "started_at": self._turn_started_at[turn],
            "transcript": answer.transcript or "",
            "reply": " ".join(sent),
            "heard": " ".join(heard),
            "interrupted": any(reply.interrupted for reply in replies),
            "used_fallback": any(reply.fallback for reply in replies),
            "llm_ms": round(answer.llm_ms, 1) if answer.llm_ms else None,
            "tts_ms": round(answer.tts_ms, 1) if answer.tts_ms else None,
            "first_audio_ms": first_audio_ms,
            "tool_calls": tool_calls,
        }


def _short(value: object) -> str | None:
    return None if value is None else str(value)[:MAX_NAME_CHARS]


def _freeswitch_time(raw: str | None) -> datetime.datetime | None:
    """``Caller-Channel-*-Time`` headers: microseconds since the epoch, "0" when it has not happened."""
    try:
        micros = int(raw or "0")
    except ValueError:
        return None
    if micros <= 0:
        return None
    return datetime.datetime.fromtimestamp(micros / 1_000_000, datetime.timezone.utc).replace(tzinfo=None)


__all__ = ["CallRecorder"]
