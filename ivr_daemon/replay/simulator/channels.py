"""Calls as FreeSWITCH channels: bring-up, speech and DTMF, channel variables in FreeSWITCH's order, apps, hangup."""

from __future__ import annotations

import collections
import itertools
import uuid as uuid_lib
from dataclasses import dataclass, field
from typing import Mapping

from ivr_daemon.logs import get_logger
from ivr_daemon.replay.event_templates import load_event_template
from ivr_daemon.replay.simulator.errors import CallAlreadyExists, InvalidDtmfDigit, NoSuchCall, UnknownHangupCause
from ivr_daemon.replay.simulator.events import local_stamp
from ivr_daemon.replay.simulator.playback import PlaybackItem, PlaybackRecord

log = get_logger(__package__)  # one logger name for the whole simulator

DEFAULT_DTMF_DURATION_SAMPLES = 2000  # switch_core_default_dtmf_duration(): 250 ms at 8 kHz
DTMF_SOURCE = "UNKNOWN"  # what a loopback leg reports (dtmf/README.md); RTP, INBAND... on real trunks
DTMF_DIGITS = frozenset("0123456789*#ABCD")
# Variables the captured originates set in their {...} block: a template's copy is not FreeSWITCH's.
CAPTURED_ORIGINATE_VARIABLES = frozenset({"ivr_agent"})

# switch_channel.c CAUSE_CHART (name -> Q.850 code); FreeSWITCH-only causes sit above 127.
HANGUP_CAUSES: Mapping[str, int] = {
    "NONE": 0, "UNALLOCATED_NUMBER": 1, "NO_ROUTE_TRANSIT_NET": 2, "NO_ROUTE_DESTINATION": 3,
    "CHANNEL_UNACCEPTABLE": 6, "CALL_AWARDED_DELIVERED": 7, "NORMAL_CLEARING": 16, "USER_BUSY": 17,
    "NO_USER_RESPONSE": 18, "NO_ANSWER": 19, "SUBSCRIBER_ABSENT": 20, "CALL_REJECTED": 21,
    "NUMBER_CHANGED": 22, "REDIRECTION_TO_NEW_DESTINATION": 23, "EXCHANGE_ROUTING_ERROR": 25,
    "DESTINATION_OUT_OF_ORDER": 27, "INVALID_NUMBER_FORMAT": 28, "FACILITY_REJECTED": 29,
    "RESPONSE_TO_STATUS_ENQUIRY": 30, "NORMAL_UNSPECIFIED": 31, "NORMAL_CIRCUIT_CONGESTION": 34,
    "NETWORK_OUT_OF_ORDER": 38, "NORMAL_TEMPORARY_FAILURE": 41, "SWITCH_CONGESTION": 42,
    "ACCESS_INFO_DISCARDED": 43, "REQUESTED_CHAN_UNAVAIL": 44, "PRE_EMPTED": 45,
    "FACILITY_NOT_SUBSCRIBED": 50, "OUTGOING_CALL_BARRED": 52, "INCOMING_CALL_BARRED": 54,
    "BEARERCAPABILITY_NOTAUTH": 57, "BEARERCAPABILITY_NOTAVAIL": 58, "SERVICE_UNAVAILABLE": 63,
    "BEARERCAPABILITY_NOTIMPL": 65, "CHAN_NOT_IMPLEMENTED": 66, "FACILITY_NOT_IMPLEMENTED": 69,
    "SERVICE_NOT_IMPLEMENTED": 79, "INVALID_CALL_REFERENCE": 81, "INCOMPATIBLE_DESTINATION": 88,
    "INVALID_MSG_UNSPECIFIED": 95, "MANDATORY_IE_MISSING": 96, "MESSAGE_TYPE_NONEXIST": 97,
    "WRONG_MESSAGE": 98, "IE_NONEXIST": 99, "INVALID_IE_CONTENTS": 100, "WRONG_CALL_STATE": 101,
    "RECOVERY_ON_TIMER_EXPIRE": 102, "MANDATORY_IE_LENGTH_ERROR": 103, "PROTOCOL_ERROR": 111,
    "INTERWORKING": 127, "SUCCESS": 142, "ORIGINATOR_CANCEL": 487, "CRASH": 700,
    "SYSTEM_SHUTDOWN": 701, "LOSE_RACE": 702, "MANAGER_REQUEST": 703, "BLIND_TRANSFER": 800,
    "ATTENDED_TRANSFER": 801, "ALLOTTED_TIMEOUT": 802, "USER_CHALLENGE": 803, "MEDIA_TIMEOUT": 804,
    "PICKED_OFF": 805, "USER_NOT_REGISTERED": 806, "PROGRESS_TIMEOUT": 807,
}


@dataclass(eq=False)
class CallState:
    """One simulated leg: its caller profile, channel variables (in order), app, playback and fate.

    ``loopback_leg`` "B" is an IVR leg (``loopback/ai-b``, the one a call is about); "A" is the
    leg a loopback originate parks with ``&park()``, reached through its IVR leg's ``a_leg``.
    """

    uuid: str
    other_leg_uuid: str  # variable_other_loopback_leg_uuid
    caller_id_number: str
    caller_id_name: str
    destination_number: str
    context: str
    channel_name: str
    created_us: int
    session_id: int
    variables: dict[str, str] = field(default_factory=dict)
    live: bool = True
    parked: bool = True
    hangup_cause: str = ""
    hangup_us: int = 0
    app_name: str = ""
    app_data: str = ""
    park_app_uuid: str = ""
    current: PlaybackItem | None = None
    queue: collections.deque = field(default_factory=collections.deque)
    played: list[str] = field(default_factory=list)
    playback_log: list[PlaybackRecord] = field(default_factory=list)
    transfers: list[str] = field(default_factory=list)
    loopback_leg: str = "B"
    a_leg: CallState | None = None
    # The caller profile a uuid_transfer replaces (S6: Caller-Profile-Index 2, Caller-RDNIS...).
    dialplan: str = "xml"
    profile_index: int = 1
    profile_created_us: int = 0  # 0: the channel's created_us
    transfer_source: str = ""
    rdnis: str = ""
    initial_destination_number: str = ""
    initial_context: str = ""


def _q850(cause: str) -> int:
    # switch_channel_cause_q850(): FreeSWITCH-only causes report 16 (NORMAL_CLEARING).
    code = HANGUP_CAUSES.get(cause, 16)
    return code if code <= 127 else 16


class ChannelsMixin:
    """FreeswitchSimulator's calls: the public call API and the channel state behind it.

    The host provides the events (``_emit``, ``_channel_event``, ``_now_us``), the history
    (``_notify``, ``_call_ended``), playback (``_finish_playback``), ``_count_session``,
    mod_vosk (``_start_detect_speech``) and the
    settings ``duplicate_speech_while_parked`` and ``duplicate_speech_delay_s``.
    """

    def _init_channels(self) -> None:
        self._calls: dict[str, CallState] = {}
        self._session_ids = itertools.count(1)

    # -- calls -------------------------------------------------------------------------------

    def new_call(
        self,
        caller_id_number: str = "5551234",
        *,
        uuid: str | None = None,
        caller_id_name: str = "",
        destination_number: str = "ai",
        context: str = "ivr",
        channel_name: str = "loopback/ai-b",
        variables: Mapping[str, str] | None = None,
        a_leg_uuid: str | None = None,
        loopback_a_leg: bool = False,
    ) -> str:
        """Bring up an answered, parked IVR leg: CHANNEL_ANSWER, CHANNEL_EXECUTE park, CHANNEL_PARK.

        ``variables`` are the originate's ``{k=v}`` channel variables: they show on every event
        that carries variables, in their order. The default is a SIP-like call: the IVR leg alone.
        ``loopback_a_leg``: the call is a loopback originate with ``&park()`` (tests/captures/dtmf):
        its A leg (``a_leg_uuid``, ``loopback/ai-a``) parks too, after the IVR leg, with the same
        variables but without ``fire_asr_events``, and hangs up with it. The A leg is not one of
        :meth:`calls` and api commands do not know it (it only exists to be told apart).
        """
        call_uuid = uuid or str(uuid_lib.uuid4())
        existing = self._calls.get(call_uuid)
        if existing is not None and existing.live:
            raise CallAlreadyExists(f"call {call_uuid} is already up")
        other_uuid = a_leg_uuid or str(uuid_lib.uuid4())
        created_us = self._now_us()
        # The A leg is created first (session_id 1 and 2 in tests/captures/dtmf).
        a_leg = None
        if loopback_a_leg:
            a_leg = CallState(
                uuid=other_uuid,
                other_leg_uuid=call_uuid,
                caller_id_number=caller_id_number,
                caller_id_name="",
                destination_number=destination_number,
                context=context,
                channel_name=channel_name[:-2] + "-a" if channel_name.endswith("-b") else f"{channel_name}-a",
                created_us=created_us,
                session_id=next(self._session_ids),
                loopback_leg="A",
            )
            a_leg.variables = self._initial_variables(a_leg, variables or {}, "CHANNEL_PARK_A_LEG")
            a_leg.app_name = "park"
        call = CallState(
            uuid=call_uuid,
            other_leg_uuid=other_uuid,
            caller_id_number=caller_id_number,
            caller_id_name=caller_id_name,
            destination_number=destination_number,
            context=context,
            channel_name=channel_name,
            created_us=created_us,
            session_id=next(self._session_ids),
            a_leg=a_leg,
        )
        call.variables = self._initial_variables(call, variables or {})
        self._calls[call_uuid] = call
        self._count_session()
        log.bind(call_uuid=call_uuid).info("sim_call_up", caller_id_number=caller_id_number)

        self._emit(self._channel_event("CHANNEL_ANSWER", call))
        # What answer; set fire_asr_events=true; detect_speech; park leave behind (capture 80_all).
        self._set_var(call, "endpoint_disposition", "ANSWER")
        self._set_var(call, "fire_asr_events", "true")
        call.park_app_uuid = self._execute_app(call, "park", None)
        self._emit(self._channel_event("CHANNEL_PARK", call))
        if a_leg is not None:
            self._emit(self._channel_event("CHANNEL_PARK_A_LEG", a_leg))
        self._start_detect_speech(call)  # with an asr_server: mod_vosk streams the caller's audio
        self._notify()
        return call_uuid

    def speak(self, uuid: str, text: str, final: bool = True) -> int:
        """DETECTED_SPEECH as mod_vosk fires it; returns its Event-Sequence."""
        call = self._live_call(uuid)
        speech_type = "detected-speech" if final else "detected-partial-speech"
        pairs = self._channel_event("DETECTED_SPEECH", call, head={"Speech-Type": speech_type})
        # Only a parked, idle leg shows the double delivery (playback/README.md point 3).
        copies = 2 if self.duplicate_speech_while_parked and call.parked and call.current is None else 1
        return self._emit(pairs, text, copies=copies, copy_delay_s=self.duplicate_speech_delay_s)

    def dtmf(self, uuid: str, digit: str, duration_samples: int = DEFAULT_DTMF_DURATION_SAMPLES, source: str = DTMF_SOURCE) -> int:
        """One DTMF event on the leg, as tests/captures/dtmf/event_plain_DTMF.txt; returns its Event-Sequence.

        FreeSWITCH fires it once per digit (no duplicate, unlike DETECTED_SPEECH while parked)
        and with no channel variables at all: who the call is must come from an earlier event.
        ``uuid`` may be a loopback A leg's (the caller's phone): the digit arrives on its IVR leg.
        """
        call = self._ivr_leg(uuid)
        digit = digit.upper()
        if len(digit) != 1 or digit not in DTMF_DIGITS:
            raise InvalidDtmfDigit(f"not a DTMF digit: {digit!r}")
        # The frame has no variable block, so its DTMF-* headers are part of the template's head.
        digit_headers = {"DTMF-Digit": digit, "DTMF-Duration": str(duration_samples), "DTMF-Source": source}
        return self._emit(self._channel_event("DTMF", call, head=digit_headers))

    def hangup(self, uuid: str, cause: str = "NORMAL_CLEARING") -> None:
        """Hang the leg up: playback stops (STOP ``done``), park completes, ASR closes, HANGUP_COMPLETE."""
        if cause not in HANGUP_CAUSES:
            raise UnknownHangupCause(f"unknown hangup cause {cause!r}")
        call = self._live_call(uuid)
        self._hangup(call, cause)

    def calls(self) -> list[str]:
        """The uuids of the live calls, oldest first."""
        return [call.uuid for call in self._calls.values() if call.live]

    def call_exists(self, uuid: str) -> bool:
        call = self._calls.get(uuid)
        return call is not None and call.live

    def call_variables(self, uuid: str) -> dict[str, str]:
        """A copy of the leg's channel variables, in FreeSWITCH's order."""
        return dict(self._known_call(uuid).variables)

    def transfers(self, uuid: str) -> list[str]:
        """The uuid_transfer arguments (after the uuid) this leg received, in order."""
        return list(self._known_call(uuid).transfers)

    # -- hangup ------------------------------------------------------------------------------

    def _hangup(self, call: CallState, cause: str) -> None:
        call.live = False
        clog = log.bind(call_uuid=call.uuid)
        item = call.current
        call.current = None
        while call.queue:
            dropped = call.queue.popleft()
            call.playback_log.append(PlaybackRecord(dropped.path, "flushed", 0))
        if item is not None:
            if item.state == "playing":
                # Hangup mid-file: STOP says "done" (README point 1), the app "PLAYBACK ERROR".
                self._finish_playback(call, item, "hangup", "PLAYBACK ERROR", wire_status="done")
            item.state = "finished"
            if item.greenlet is not None:
                item.greenlet.kill(block=False)
        a_leg = call.a_leg
        if a_leg is not None and a_leg.live:
            # The loopback pair goes down together, the A leg's HANGUP_COMPLETE first (80_all: 583, 592).
            a_leg.live = False
            a_leg.hangup_cause = cause
            a_leg.hangup_us = self._now_us()
            self._add_hangup_variables(a_leg, "CHANNEL_HANGUP_COMPLETE_A_LEG")
            self._emit(self._channel_event("CHANNEL_HANGUP_COMPLETE_A_LEG", a_leg))
        call.hangup_cause = cause
        call.hangup_us = self._now_us()
        if call.parked:  # a transfer already ended park (S6)
            response = call.variables.get("current_application_response", "_none_")
            tail = {"Application": "park", "Application-Response": response, "Application-UUID": call.park_app_uuid}
            self._emit(self._channel_event("CHANNEL_EXECUTE_COMPLETE_AT_HANGUP", call, tail=tail))
        self._emit(self._channel_event("DETECTED_SPEECH_CLOSED", call))
        self._add_hangup_variables(call)
        self._emit(self._channel_event("CHANNEL_HANGUP_COMPLETE", call))
        self._call_ended(call)
        clog.info("sim_call_down", cause=cause)
        self._notify()

    # -- transfer (tests/captures/playback/S6, S6b) ---------------------------------------------

    def _transfer(self, call: CallState, destination: str, dialplan: str, context: str) -> None:
        """switch_ivr_session_transfer(): a new caller profile; a parked leg's park ends (S6).

        No dialplan runs here: the leg stays up, out of park, until it is hung up.
        """
        if not call.live:
            return
        now_us = self._now_us()
        call.initial_destination_number = call.initial_destination_number or call.destination_number
        call.initial_context = call.initial_context or call.context
        call.rdnis = call.destination_number
        call.destination_number, call.dialplan, call.context = destination, dialplan, context
        call.profile_index += 1
        call.profile_created_us = now_us
        call.transfer_source = f"{now_us // 1_000_000}:{uuid_lib.uuid4()}:bl_xfer:{destination}/{context}/{dialplan}"
        forwards = call.variables.get("max_forwards")
        self._set_var(call, "max_forwards", str(int(forwards) - 1) if forwards and forwards.isdigit() else "70")
        history = call.variables.get("transfer_history")
        if history:  # switch_channel_add_variable_var_check(..., SWITCH_STACK_PUSH)
            history = f"{history}|:{call.transfer_source}" if history.startswith("ARRAY::") else f"ARRAY::{history}|:{call.transfer_source}"
        self._set_var(call, "transfer_history", history or call.transfer_source)
        self._set_var(call, "transfer_source", call.transfer_source)
        log.bind(call_uuid=call.uuid).info("sim_call_transferred", destination=destination, context=context)
        if call.parked:
            call.parked = False
            self._complete_app(call, "park", None, call.park_app_uuid)

    def _add_hangup_variables(self, call: CallState, kind: str = "CHANNEL_HANGUP_COMPLETE") -> None:
        template = load_event_template(kind)
        names = template.variable_names()
        start_us, end_us = call.created_us, call.hangup_us
        profile_us = call.profile_created_us or start_us
        duration_us = max(end_us - start_us, 0)
        name, number = call.caller_id_name, call.caller_id_number
        computed: dict[str, str | None] = {
            "hangup_cause": call.hangup_cause,
            "hangup_cause_q850": str(_q850(call.hangup_cause)),
            "start_stamp": local_stamp(start_us),
            "profile_start_stamp": local_stamp(profile_us),
            "answer_stamp": local_stamp(start_us),
            "end_stamp": local_stamp(end_us),
            "start_epoch": str(start_us // 1_000_000),
            "start_uepoch": str(start_us),
            "profile_start_epoch": str(profile_us // 1_000_000),
            "profile_start_uepoch": str(profile_us),
            "answer_epoch": str(start_us // 1_000_000),
            "answer_uepoch": str(start_us),
            "end_epoch": str(end_us // 1_000_000),
            "end_uepoch": str(end_us),
            "last_app": call.variables.get("current_application"),
            "last_arg": call.variables.get("current_application_data"),
            "caller_id": number if not name else f'"{name}" <{number}>',
        }
        if call.loopback_leg == "A":
            del computed["caller_id"]  # flipped: the template's '"Outbound Call" <ivr>'
        # The leg is answered as it is created (loopback): bill = whole duration.
        for prefix in ("", "bill", "flow_bill"):
            computed[f"{prefix}sec" if prefix else "duration"] = str(duration_us // 1_000_000)
            computed[f"{prefix}msec" if prefix else "mduration"] = str(duration_us // 1000)
            computed[f"{prefix}usec" if prefix else "uduration"] = str(duration_us)
        for var_name, template_value in template.variables[names.index("hangup_cause") :]:
            value = computed.get(var_name, template_value)
            if value is not None:
                self._set_var(call, var_name, value)

    # -- channel variables -------------------------------------------------------------------

    def _initial_variables(self, call: CallState, extra: Mapping[str, str], kind: str = "CHANNEL_ANSWER") -> dict[str, str]:
        template = load_event_template(kind)
        by_name = {
            "uuid": call.uuid,
            "session_id": str(call.session_id),
            "channel_name": call.channel_name,
            "origination_caller_id_number": call.caller_id_number,
            "pre_transfer_caller_id_number": call.caller_id_number,
            "other_loopback_leg_uuid": call.other_leg_uuid,
            "call_uuid": call.uuid,
        }
        # originate's {k=v} variables sit where origination_caller_id_number is, in the order
        # written (X14; dtmf/); variables given without it come right before it.
        given = {key: value for key, value in extra.items() if value}
        given.setdefault("origination_caller_id_number", call.caller_id_number)
        variables: dict[str, str] = {}
        for name, value in template.variables:
            if name == "origination_caller_id_number":
                for key, given_value in given.items():
                    variables.pop(key, None)
                    variables[key] = call.caller_id_number if key == name else given_value
                continue
            if name in CAPTURED_ORIGINATE_VARIABLES:
                continue
            variables.pop(name, None)
            variables[name] = by_name.get(name, value)
        return variables

    @staticmethod
    def _set_var(call: CallState, name: str, value: str | None) -> None:
        # switch_channel_set_variable: delete, then append if non-empty (so it moves last).
        call.variables.pop(name, None)
        if value:
            call.variables[name] = value

    @staticmethod
    def _get_var(call: CallState, name: str) -> str | None:
        if name in call.variables:
            return call.variables[name]
        # switch_channel_get_variable falls back on the caller profile's fields.
        profile = {
            "caller_id_number": call.caller_id_number,
            "caller_id_name": call.caller_id_name,
            "ani": call.caller_id_number,
            "destination_number": call.destination_number,
            "context": call.context,
            "dialplan": "xml",
            "chan_name": call.channel_name,
            "source": "mod_loopback",
            "uuid": call.uuid,
        }
        return profile.get(name) or None

    def _unset_loop_vars(self, call: CallState) -> None:
        self._set_var(call, "current_loop", None)
        self._set_var(call, "total_loops", None)

    def _execute_app(self, call: CallState, app: str, data: str | None, app_uuid: str | None = None) -> str:
        """switch_core_session_exec(): name the app, its data, clear the last response; CHANNEL_EXECUTE."""
        app_uuid = app_uuid or str(uuid_lib.uuid4())
        self._set_var(call, "current_application", app)
        self._set_var(call, "current_application_data", data)
        self._set_var(call, "current_application_response", None)
        call.app_name, call.app_data = app, data or ""
        tail = {"Application": app, "Application-Data": data, "Application-UUID": app_uuid}
        self._emit(self._channel_event("CHANNEL_EXECUTE", call, tail=tail))
        return app_uuid

    def _complete_app(self, call: CallState, app: str, data: str | None, app_uuid: str) -> None:
        response = call.variables.get("current_application_response", "_none_")
        tail = {"Application": app, "Application-Data": data, "Application-Response": response, "Application-UUID": app_uuid}
        self._emit(self._channel_event("CHANNEL_EXECUTE_COMPLETE", call, tail=tail))

    # -- lookups -----------------------------------------------------------------------------

    def _live_call(self, uuid: str) -> CallState:
        call = self._calls.get(uuid)
        if call is None or not call.live:
            raise NoSuchCall(f"no live call {uuid}")
        return call

    def _ivr_leg(self, uuid: str) -> CallState:
        """The live IVR leg ``uuid`` names, directly or as its loopback A leg."""
        call = self._calls.get(uuid)
        if call is not None and call.live:
            return call
        for call in self._calls.values():
            if call.live and call.a_leg is not None and call.a_leg.uuid == uuid:
                return call
        raise NoSuchCall(f"no live call {uuid}")

    def _known_call(self, uuid: str) -> CallState:
        call = self._calls.get(uuid)
        if call is None:
            raise NoSuchCall(f"no call {uuid} was ever made here")
        return call
