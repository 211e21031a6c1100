"""mod_commands' api commands (status, show, uuid_*, originate, ...) with FreeSWITCH's reply texts."""

from __future__ import annotations

import collections
import re
import time
import uuid as uuid_lib
from typing import TYPE_CHECKING, Callable, Mapping

from ivr_daemon.esl.protocol import build_json_event, build_plain_event
from ivr_daemon.replay.event_templates import load_channel_row_template
from ivr_daemon.replay.simulator.channels import HANGUP_CAUSES
from ivr_daemon.replay.simulator.events import local_stamp
from ivr_daemon.replay.simulator.wire import frame_body, json_text

if TYPE_CHECKING:
    from ivr_daemon.replay.simulator.channels import CallState

STATUS_VERSION_LINE = "FreeSWITCH (Version 1.11.3-dev  64bit) is ready"  # capture 10, two spaces
HOSTNAME = "vm"  # FreeSWITCH-Hostname of every captured event
# What `module_exists` finds loaded unless a test takes one away (FreeswitchSimulator.loaded_modules):
# the modules a switch serving this daemon has (modules.conf.xml in freeswitch_conf/ adds mod_vosk).
DEFAULT_LOADED_MODULES = frozenset({
    "mod_console", "mod_logfile", "mod_event_socket", "mod_commands", "mod_dptools", "mod_dialplan_xml",
    "mod_sofia", "mod_loopback", "mod_sndfile", "mod_native_file", "mod_tone_stream", "mod_vosk",
})

# "-USAGE: ...\n" texts of mod_commands.c.
USAGE = {
    "uuid_broadcast": "<uuid> <path> [aleg|bleg|holdb|both]",
    "uuid_break": "<uuid> [all]",
    "uuid_kill": "<uuid> [cause]",
    "uuid_setvar": "<uuid> <var> [value]",
    "uuid_getvar": "<uuid> <var>",
    "uuid_transfer": "<uuid> [-bleg|-both] <dest-exten> [<dialplan>] [<context>]",
    "uuid_dump": "<uuid> [format]",
    "originate": (
        "<call url> <exten>|&<application_name>(<app_args>) [<dialplan>] [<context>] [<cid_name>] [<cid_num>] [<timeout_sec>]"
    ),
    "show": (
        "codec|endpoint|application|api|dialplan|file|timer|calls [count]|channels [count|like <match string>]|calls"
        "|detailed_calls|bridged_calls|detailed_bridged_calls|aliases|complete|chat|management|modules|nat_map|say"
        "|interfaces|interface_types|tasks|limits|status"
    ),
}

# uuid_dump's CHANNEL_DATA event (capture 56).
UUID_DUMP_CALLING = {
    "Event-Name": "CHANNEL_DATA",
    "Event-Calling-File": "mod_commands.c",
    "Event-Calling-Function": "uuid_dump_function",
    "Event-Calling-Line-Number": "6495",
}


def separate_quoted(text: str | None, max_parts: int) -> list[str]:
    """switch_separate_string() as originate uses it: blanks inside '...' do not split, and the
    quotes are dropped."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for index, char in enumerate(text or ""):
        if char == "'":
            quoted = not quoted
        elif char.isspace() and not quoted:
            if current:
                parts.append("".join(current))
                current = []
                if len(parts) == max_parts - 1:
                    rest = (text or "")[index:].strip()
                    if rest:
                        parts.append(rest)
                    return parts
        else:
            current.append(char)
    if current:
        parts.append("".join(current))
    return parts


def separate(text: str | None, max_parts: int) -> list[str]:
    """switch_separate_string(): blanks collapse, the last part keeps the rest of the line."""
    if not text:
        return []
    return text.split(None, max_parts - 1)


class ApiMixin:
    """FreeswitchSimulator's ``api``/``bgapi`` commands: ``_run_api(name, arg)`` is the one entry.

    Each handler returns the reply text and the actions to run once the reply is queued (so
    events a command causes follow its reply on the wire). The host provides the calls
    (``_calls``, ``new_call``, ``call_exists``, ``calls``, ``_set_var``, ``_get_var``,
    ``_hangup``), playback (``_broadcast``, ``_break``), events (``_channel_event``) and
    ``simulate_media``.
    """

    def _init_status(self) -> None:
        self._started_monotonic = time.monotonic()
        self._sessions_since_start = 0
        self._peak_sessions = 0
        self._session_starts: collections.deque[float] = collections.deque(maxlen=1000)
        self._peak_sps = 0

    def _run_api(self, name: str, arg: str | None) -> tuple[str, list[Callable[[], None]]]:
        handlers: Mapping[str, Callable[[str | None], tuple[str, list[Callable[[], None]]]]] = {
            "status": lambda a: (self._api_status(), []),
            "show": lambda a: (self._api_show(a), []),
            "uuid_broadcast": self._api_uuid_broadcast,
            "uuid_break": self._api_uuid_break,
            "uuid_kill": self._api_uuid_kill,
            "uuid_setvar": lambda a: (self._api_uuid_setvar(a), []),
            "uuid_getvar": lambda a: (self._api_uuid_getvar(a), []),
            "uuid_exists": lambda a: ("true" if a is not None and self.call_exists(a) else "false", []),
            "module_exists": lambda a: (self._api_module_exists(a), []),
            "uuid_transfer": self._api_uuid_transfer,
            "uuid_dump": lambda a: (self._api_uuid_dump(a), []),
            "originate": lambda a: (self._api_originate(a), []),
            "echo": lambda a: (a or "", []),
            "hostname": lambda a: (HOSTNAME, []),
        }
        handler = handlers.get(name.lower())
        if handler is None:
            return f"-ERR {name} Command not found!\n", []
        return handler(arg)

    def _api_module_exists(self, arg: str | None) -> str:
        """mod_commands.c module_exists_function: "true"/"false" with no newline, nothing (so
        mod_event_socket's "-ERR no reply") without an argument. The whole argument is the name."""
        if not arg:
            return ""
        return "true" if arg in self.loaded_modules else "false"

    def _api_status(self) -> str:
        up_us = int((time.monotonic() - self._started_monotonic) * 1e6)
        up_s, us = divmod(up_us, 1_000_000)
        ms, us = divmod(us, 1000)
        days, rem = divmod(up_s, 86400)
        years, days = divmod(days, 365)
        hours, rem = divmod(rem, 3600)
        minutes, seconds = divmod(rem, 60)

        def unit(value: int, word: str) -> str:
            return f"{value} {word}{'' if value == 1 else 's'}"

        now = time.monotonic()
        sps_now = sum(1 for t in self._session_starts if now - t < 1.0)
        live = len(self.calls())
        return (
            f"UP {unit(years, 'year')}, {unit(days, 'day')}, {unit(hours, 'hour')}, {unit(minutes, 'minute')}, "
            f"{unit(seconds, 'second')}, {unit(ms, 'millisecond')}, {unit(us, 'microsecond')}\n"
            f"{STATUS_VERSION_LINE}\n"
            f"{self._sessions_since_start} session(s) since startup\n"
            f"{live} session(s) - peak {self._peak_sessions}, last 5min {self._peak_sessions} \n"
            f"{sps_now} session(s) per Sec out of max 30, peak {self._peak_sps}, last 5min {self._peak_sps} \n"
            "1000 session(s) max\n"
            "min idle cpu 0.00/98.07\n"
            "Current Stack Size/Max 240K/8192K\n"
        )

    def _api_show(self, arg: str | None) -> str:
        argv = separate(arg, 6)
        if not argv:
            return f"-USAGE: {USAGE['show']}\n"
        command = argv[0].lower()
        if command.startswith("status"):
            return self._api_status()
        if command != "channels":
            return f"-USAGE: {USAGE['show']}\n"
        just_count = len(argv) > 1 and argv[1].lower() == "count"
        fmt = "delim"
        if just_count and len(argv) > 3 and argv[2].lower() == "as":
            fmt = argv[3].lower()
        elif not just_count and len(argv) > 2 and argv[1].lower() == "as":
            fmt = argv[2].lower()
        rows = [self._channel_row(call) for call in self._calls.values() if call.live]
        if fmt == "json":
            if just_count:
                return json_text({"row_count": len(rows), "rows": []})
            if not rows:
                return '{"row_count": 0}\n'  # capture 11: FreeSWITCH's literal, space and LF
            return json_text({"row_count": len(rows), "rows": rows})
        if fmt in ("delim", "csv"):
            if just_count:
                return f"\n{len(rows)} total.\n"
            lines = []
            if rows:
                lines.append(",".join(rows[0].keys()) + "\n")
                lines.extend(",".join(row.values()) + "\n" for row in rows)
            return "".join(lines) + f"\n{len(rows)} total.\n"
        return f"-ERR Cannot find format {fmt}\n"

    def _api_uuid_broadcast(self, arg: str | None) -> tuple[str, list[Callable[[], None]]]:
        argv = separate(arg, 4)
        if len(argv) < 2:
            return f"-USAGE: {USAGE['uuid_broadcast']}\n", []
        call = self._calls.get(argv[0])
        if call is None or not call.live:
            return "-ERR invalid uuid\n", []
        source = argv[1]
        if not self.simulate_media:
            return "+OK Message sent\n", []
        return "+OK Message sent\n", [lambda: call.live and self._broadcast(call, source)]

    def _api_uuid_break(self, arg: str | None) -> tuple[str, list[Callable[[], None]]]:
        if not arg:
            return f"-USAGE: {USAGE['uuid_break']}\n", []
        target, _, flag = arg.partition(" ")
        call = self._calls.get(target)
        if call is None or not call.live:
            return "-ERR No such channel!\n", []
        if not self.simulate_media:
            return "+OK\n", []
        return "+OK\n", [lambda: self._break(call, all_="all" in flag)]

    def _api_uuid_kill(self, arg: str | None) -> tuple[str, list[Callable[[], None]]]:
        if not arg:
            return f"-USAGE: {USAGE['uuid_kill']}\n", []
        target, _, cause = arg.partition(" ")
        call = self._calls.get(target)
        if call is None or not call.live:
            return "-ERR No such channel!\n", []
        cause = cause.strip().upper()
        cause = cause if cause in HANGUP_CAUSES else "NORMAL_CLEARING"
        return "+OK\n", [lambda: call.live and self._hangup(call, cause)]

    def _api_uuid_setvar(self, arg: str | None) -> str:
        argv = separate(arg, 3)
        if len(argv) not in (2, 3):
            return f"-USAGE: {USAGE['uuid_setvar']}\n"
        call = self._calls.get(argv[0])
        if call is None or not call.live:
            return "-ERR No such channel!\n"
        self._set_var(call, argv[1], argv[2] if len(argv) == 3 else None)
        return "+OK\n"

    def _api_uuid_getvar(self, arg: str | None) -> str:
        argv = separate(arg, 4)
        if len(argv) < 2:
            return f"-USAGE: {USAGE['uuid_getvar']}\n"
        call = self._calls.get(argv[0])
        if call is None or not call.live:
            return "-ERR No such channel!\n"
        value = self._get_var(call, argv[1])
        return "_undef_" if value is None else value

    def _api_uuid_transfer(self, arg: str | None) -> tuple[str, list[Callable[[], None]]]:
        argv = separate(arg, 5)
        if len(argv) < 2:
            return f"-USAGE: {USAGE['uuid_transfer']}\n", []
        call = self._calls.get(argv[0])
        if call is None or not call.live:
            return "-ERR No such channel!\n", []
        call.transfers.append(" ".join(argv[1:]))
        # -bleg/-both name the bridged leg: there is none here, the leg itself goes.
        rest = argv[2:] if argv[1].lower() in ("-bleg", "-both") and len(argv) > 2 else argv[1:]
        destination = rest[0]
        # switch_ivr_session_transfer(): a missing dialplan or context keeps the profile's.
        dialplan = rest[1] if len(rest) > 1 else call.dialplan
        context = rest[2] if len(rest) > 2 else call.context
        # The extension is never checked: +OK even for one that does not exist (S6b).
        return "+OK\n", [lambda: self._transfer(call, destination, dialplan, context)]

    def _api_uuid_dump(self, arg: str | None) -> str:
        argv = separate(arg, 2)
        if not argv:
            return f"-USAGE: {USAGE['uuid_dump']}\n"
        call = self._calls.get(argv[0])
        if call is None or not call.live:
            return "-ERR No such channel!\n"
        fmt = argv[1].lower() if len(argv) > 1 else "txt"
        pairs = self._channel_event("CHANNEL_PARK", call, head=dict(UUID_DUMP_CALLING))
        if fmt == "json":
            return frame_body(build_json_event(pairs)).decode("utf-8")
        if fmt == "plain":
            # switch_event_serialize(event, &buf, strcasecmp(format, "plain")): plain is not encoded.
            return "".join(f"{key}: {value}\n" for key, value in pairs) + "\n"
        return frame_body(build_plain_event(pairs)).decode("utf-8")

    def _api_originate(self, arg: str | None) -> str:
        self.originate_args.append(arg or "")
        argv = separate_quoted(arg, 10)
        if not 2 <= len(argv) <= 7:
            return f"-USAGE: {USAGE['originate']}\n"
        dial = argv[0]
        variables: dict[str, str] = {}
        if dial.startswith("{") and "}" in dial:
            block, dial = dial[1 : dial.index("}")], dial[dial.index("}") + 1 :]
            for pair in filter(None, block.split(",")):
                key, _, value = pair.partition("=")
                variables[key] = value
        parts = dial.split("/")
        if parts[0].lower() == "user" and len(parts) >= 2:
            return self._originate_user(parts[1], argv, variables)
        if parts[0].lower() != "loopback" or len(parts) < 2:
            return "-ERR CHAN_NOT_IMPLEMENTED\n"
        # With loopback the returned uuid is the A leg's (origination_uuid sets it, S8);
        # the simulated IVR leg (loopback/<dest>-b) gets its own. An A leg running &park()
        # parks too (tests/captures/dtmf); another app's A leg is not simulated.
        a_leg = variables.get("origination_uuid") or str(uuid_lib.uuid4())
        destination = parts[1]
        self.new_call(
            variables.get("origination_caller_id_number", "0000000000"),
            destination_number=destination,
            context=parts[2] if len(parts) > 2 and parts[2] else "default",
            channel_name=f"loopback/{destination}-b",
            variables=variables,
            a_leg_uuid=a_leg,
            loopback_a_leg=re.fullmatch(r"&park(\(\))?", argv[1], re.IGNORECASE) is not None,
        )
        return f"+OK {a_leg}\n"

    def _originate_user(self, user: str, argv: list[str], variables: dict[str, str]) -> str:
        """``originate {..}user/NAME <exten> [dialplan] [context]``: an unregistered NAME fails the
        way FreeSWITCH does (capture 21's job body, ``-ERR USER_NOT_REGISTERED``); a registered
        one answers and its leg (uuid = origination_uuid) runs the extension. Only the IVR
        extension (``ai`` in context ``ivr``: answer, fire_asr_events, detect_speech, park) is
        simulated; another extension or an &app() is answered +OK and then not played out."""
        if user.split("@")[0] not in self.registered_users:
            return "-ERR USER_NOT_REGISTERED\n"
        call_uuid = variables.get("origination_uuid") or str(uuid_lib.uuid4())
        extension = argv[1]
        context = argv[3] if len(argv) > 3 else "default"
        if extension == "ai" and context == "ivr":
            self.new_call(
                variables.get("origination_caller_id_number", "0000000000"),
                uuid=call_uuid,
                destination_number=extension,
                context=context,
                channel_name=f"sofia/internal/{user}",
                variables=variables,
            )
        return f"+OK {call_uuid}\n"

    def _channel_row(self, call: CallState) -> dict[str, str]:
        values = {
            "uuid": call.uuid,
            "created": local_stamp(call.created_us),
            "created_epoch": str(call.created_us // 1_000_000),
            "name": call.channel_name,
            "cid_name": call.caller_id_name,
            "cid_num": call.caller_id_number,
            "dest": call.destination_number,
            "application": call.app_name,
            "application_data": call.app_data,
            "context": call.context,
            "initial_cid_name": call.caller_id_name,
            "initial_cid_num": call.caller_id_number,
            "initial_dest": call.initial_destination_number or call.destination_number,
            "initial_context": call.initial_context or call.context,
        }
        return {key: values.get(key, value) for key, value in load_channel_row_template()}

    def _count_session(self) -> None:
        now = time.monotonic()
        self._sessions_since_start += 1
        self._session_starts.append(now)
        self._peak_sessions = max(self._peak_sessions, len(self.calls()) + 1)
        self._peak_sps = max(self._peak_sps, sum(1 for t in self._session_starts if now - t < 1.0))
