"""Event rendering: a captured template's headers with this call's values, sent to each subscriber in its format."""

from __future__ import annotations

import itertools
import time
import uuid as uuid_lib
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import gevent

from ivr_daemon.replay.event_templates import load_event_template
from ivr_daemon.replay.simulator.history import EmittedEvent
from ivr_daemon.replay.simulator.wire import FRAME_BUILDERS

if TYPE_CHECKING:
    from ivr_daemon.replay.simulator.channels import CallState

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def render(pairs: Iterable[tuple[str, str]], subst: Mapping[str, str | None]) -> list[tuple[str, str]]:
    """Template headers with values replaced; a None replacement drops the header."""
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        if key in subst:
            new = subst[key]
            if new is None:
                continue
            out.append((key, new))
        else:
            out.append((key, value))
    return out


def local_stamp(epoch_us: int) -> str:
    """``Event-Date-Local`` and the ``*_stamp`` variables: ``2026-12-01 04:16:00``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_us / 1e6))


def _gmt_stamp(epoch_us: int) -> str:
    tm = time.gmtime(epoch_us / 1e6)
    return f"{_DAYS[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} {tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} GMT"


class EventsMixin:
    """FreeswitchSimulator's events: headers from :mod:`ivr_daemon.replay.event_templates`, fired to subscribers.

    The host provides ``self._connections`` (:class:`ClientConnection` by id) and the history
    (``self._emitted``, ``_trim_events``, ``_notify``).
    """

    def _init_events(self, first_event_sequence: int) -> None:
        self.core_uuid = str(uuid_lib.uuid4())
        self._sequence = itertools.count(first_event_sequence)

    @staticmethod
    def _now_us() -> int:
        return time.time_ns() // 1000

    def _common_head(self) -> dict[str, str | None]:
        now_us = self._now_us()
        return {
            "Core-UUID": self.core_uuid,
            "Event-Date-Local": local_stamp(now_us),
            "Event-Date-GMT": _gmt_stamp(now_us),
            "Event-Date-Timestamp": str(now_us),
            "Event-Sequence": str(next(self._sequence)),
        }

    def _plain_event(self, kind: str, head: Mapping[str, str | None]) -> list[tuple[str, str]]:
        """A non-channel event (API, BACKGROUND_JOB) from its template."""
        template = load_event_template(kind)
        return render(template.head, {**self._common_head(), **head})

    def _channel_event(
        self,
        kind: str,
        call: CallState,
        head: Mapping[str, str | None] | None = None,
        tail: Mapping[str, str | None] | None = None,
    ) -> list[tuple[str, str]]:
        template = load_event_template(kind)
        created = str(call.created_us)
        if call.loopback_leg == "A":
            # The A leg's caller id is flipped (variable_channel_cid_flipped): the caller's number
            # is its callee's, its own stays the template's "Outbound Call" <ivr>.
            caller_id = {"Caller-Callee-ID-Number": call.caller_id_number}
        else:
            caller_id = {"Caller-Caller-ID-Number": call.caller_id_number}
        subst: dict[str, str | None] = {
            **self._common_head(),
            "Unique-ID": call.uuid,
            "Channel-Call-UUID": call.uuid,
            "Caller-Unique-ID": call.uuid,
            "Channel-Name": call.channel_name,
            "Caller-Channel-Name": call.channel_name,
            **caller_id,
            "Caller-Orig-Caller-ID-Number": call.caller_id_number,
            "Caller-ANI": call.caller_id_number,
            "Caller-Destination-Number": call.destination_number,
            "Caller-Context": call.context,
            "Caller-Dialplan": call.dialplan,
            "Caller-Profile-Index": str(call.profile_index),
            "Caller-Profile-Created-Time": str(call.profile_created_us or call.created_us),
            "Caller-Channel-Created-Time": created,
            "Caller-Channel-Answered-Time": created,
            "Caller-Channel-Hangup-Time": str(call.hangup_us),
            "Hangup-Cause": call.hangup_cause or None,
            **(head or {}),
        }
        pairs: list[tuple[str, str]] = []
        for key, value in render(template.head, subst):
            if call.caller_id_name and key in ("Caller-Caller-ID-Number", "Caller-Orig-Caller-ID-Number"):
                # The caller profile only lists a name when there is one (none on loopback).
                pairs.append((key.replace("Number", "Name"), call.caller_id_name))
            pairs.append((key, value))
            # A transferred leg's profile names where it came from (S6).
            if key == "Caller-Source" and call.transfer_source:
                pairs.append(("Caller-Transfer-Source", call.transfer_source))
            elif key == "Caller-Context" and call.rdnis:
                pairs.append(("Caller-RDNIS", call.rdnis))
        if template.variables:
            pairs.extend((f"variable_{name}", value) for name, value in call.variables.items())
        pairs.extend(render(template.tail, tail or {}))
        return pairs

    def _emit_api_event(self, name: str, argument: str | None) -> None:
        # switch_api_execute() fires API for every call, known command or not (80_all: 473).
        self._emit(self._plain_event("API", {"API-Command": name, "API-Command-Argument": argument or None}))

    def _emit(self, pairs: Sequence[tuple[str, str]], body: str | None = None, *, copies: int = 1, copy_delay_s: float = 0.0) -> int:
        headers = dict(pairs)
        name = headers.get("Event-Name", "")
        subclass = headers.get("Event-Subclass")
        sequence = int(headers.get("Event-Sequence", "0"))
        self._emitted.append(EmittedEvent(name, sequence, headers.get("Unique-ID"), tuple(pairs), body, time.monotonic()))
        self._trim_events()
        targets = [conn for conn in self._connections.values() if conn.wants(name, subclass)]
        frames: dict[str, bytes] = {}

        def deliver() -> None:
            for conn in targets:
                frame = frames.get(conn.wire_format)
                if frame is None:
                    frame = frames[conn.wire_format] = FRAME_BUILDERS[conn.wire_format](pairs, body)
                conn.send(frame, sequence)

        deliver()
        for _ in range(copies - 1):
            # The repeat is the very same bytes: same Event-Sequence, same dates (80_plain).
            if copy_delay_s > 0:
                gevent.spawn_later(copy_delay_s, deliver)
            else:
                deliver()
        self._notify()
        return sequence
