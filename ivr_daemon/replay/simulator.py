"""A FreeSWITCH event socket (mod_event_socket + mod_commands) simulator that speaks the captured wire.

Every byte it writes follows ``tests/captures/`` (FreeSWITCH 1.11.3-dev with mod_vosk) and, where
no capture shows a case, FreeSWITCH's own source (mod_event_socket.c ``parse_command``,
``read_packet``, ``api_exec``; mod_commands.c). Events are built from captured events (see
:mod:`ivr_daemon.replay.event_templates`): the header list and order are FreeSWITCH's, only the
values change (uuids, dates, ``Event-Sequence``, caller number, channel variables).

Per connection, as mod_event_socket does: ``auth/request`` first; then each command (one line,
optional ``Name: value`` header lines, a blank line, and a body when a ``Content-Length``
header says so) gets its reply, in order. Before ``auth`` every command but ``auth``/``exit``
answers ``-ERR command not found`` and the socket stays open (FreeSWITCH's parse_command);
a wrong password answers ``-ERR invalid``, then ``text/disconnect-notice``, then closes (07).

The calls are one IVR leg each, modelled on the captured ``loopback/ai-b`` leg: answered,
``fire_asr_events=true``, ``detect_speech``, parked. Channel variables are kept in FreeSWITCH's
order (setting a variable moves it to the end, as ``switch_channel_set_variable`` does), so
``variable_*`` headers, ``uuid_getvar`` and ``uuid_dump`` agree with each other and with the
captures. Playback follows ``tests/captures/playback/README.md``.

Not simulated (documented so nobody relies on it): the originating A leg of a loopback call and
its events, CHANNEL_CREATE/STATE/CALLSTATE/HANGUP/DESTROY/UNPARK, HEARTBEAT, COMMAND/
PRIVATE_COMMAND, ``filter``, ``myevents``, ``sendevent``, log streaming, and any api command
not listed in :meth:`FreeswitchSimulator._run_api` (they answer ``-ERR <name> Command not found!``).
Everything runs on the gevent loop; call the simulator from that loop's thread only.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
import socket as socket_constants
import struct
import sys
import time
import uuid as uuid_lib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import gevent
import gevent.event
import gevent.queue
import gevent.server
import soundfile

from ivr_daemon.esl.protocol import (
    AUTH_REQUEST,
    Frame,
    FrameParser,
    MalformedEvent,
    build_api_response,
    build_command_reply,
    build_disconnect_notice,
    build_frame,
    build_json_event,
    build_plain_event,
    encode_header_value,
    parse_event,
)
from ivr_daemon.logs import get_logger
from ivr_daemon.replay.event_templates import load_channel_row_template, load_event_template

log = get_logger(__name__)

DEFAULT_PASSWORD = "ClueCon"
CHANNEL_RATE_HZ = 8000  # the captured IVR leg is L16 at 8 kHz
FRAME_SAMPLES = 160  # FreeSWITCH reads files in 20 ms frames: offsets come in whole frames (X09: 2560)
MAX_COMMAND_PACKET_BYTES = 10 * 1024 * 1024  # read_packet()'s max_len in mod_event_socket.c
RECV_CHUNK_BYTES = 65536
WRITER_DRAIN_TIMEOUT_S = 5.0
DEFAULT_DTMF_DURATION_SAMPLES = 2000  # switch_core_default_dtmf_duration(): 250 ms at 8 kHz
# Not in any capture: switch_channel_dequeue_dtmf's line in switch_channel.c varies by version.
DTMF_CALLING_LINE_NUMBER = "648"
STATUS_VERSION_LINE = "FreeSWITCH (Version 1.11.3-dev  64bit) is ready"  # capture 10, two spaces
HOSTNAME = "vm"  # FreeSWITCH-Hostname of every captured event

# switch_event.c EVENT_NAMES: what `event`/`nixevent` accept (anything else is ignored).
EVENT_NAMES = frozenset(
    """CUSTOM CLONE CHANNEL_CREATE CHANNEL_DESTROY CHANNEL_STATE CHANNEL_CALLSTATE CHANNEL_ANSWER
    CHANNEL_HANGUP CHANNEL_HANGUP_COMPLETE CHANNEL_EXECUTE CHANNEL_EXECUTE_COMPLETE CHANNEL_HOLD
    CHANNEL_UNHOLD CHANNEL_BRIDGE CHANNEL_UNBRIDGE CHANNEL_PROGRESS CHANNEL_PROGRESS_MEDIA
    CHANNEL_OUTGOING CHANNEL_PARK CHANNEL_UNPARK CHANNEL_APPLICATION CHANNEL_ORIGINATE CHANNEL_UUID
    API LOG INBOUND_CHAN OUTBOUND_CHAN STARTUP SHUTDOWN PUBLISH UNPUBLISH TALK NOTALK SESSION_CRASH
    MODULE_LOAD MODULE_UNLOAD DTMF MESSAGE PRESENCE_IN NOTIFY_IN PRESENCE_OUT PRESENCE_PROBE
    MESSAGE_WAITING MESSAGE_QUERY ROSTER CODEC BACKGROUND_JOB DETECTED_SPEECH DETECTED_TONE
    PRIVATE_COMMAND HEARTBEAT TRAP ADD_SCHEDULE DEL_SCHEDULE EXE_SCHEDULE RE_SCHEDULE RELOADXML
    NOTIFY PHONE_FEATURE PHONE_FEATURE_SUBSCRIBE SEND_MESSAGE RECV_MESSAGE REQUEST_PARAMS
    CHANNEL_DATA GENERAL COMMAND SESSION_HEARTBEAT CLIENT_DISCONNECTED SERVER_DISCONNECTED
    SEND_INFO RECV_INFO RECV_RTCP_MESSAGE SEND_RTCP_MESSAGE CALL_SECURE NAT RECORD_START
    RECORD_STOP PLAYBACK_START PLAYBACK_STOP CALL_UPDATE FAILURE SOCKET_DATA MEDIA_BUG_START
    MEDIA_BUG_STOP CONFERENCE_DATA_QUERY CONFERENCE_DATA CALL_SETUP_REQ CALL_SETUP_RESULT
    CALL_DETAIL DEVICE_STATE TEXT SHUTDOWN_REQUESTED ALL""".split()
)

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

LOG_LEVELS = {"console": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}
DTMF_DIGITS = frozenset("0123456789*#ABCD")

# uuid_dump's CHANNEL_DATA event (capture 56).
UUID_DUMP_CALLING = {
    "Event-Name": "CHANNEL_DATA",
    "Event-Calling-File": "mod_commands.c",
    "Event-Calling-Function": "uuid_dump_function",
    "Event-Calling-Line-Number": "6495",
}

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_CLOSE = object()


class SimulatorError(Exception):
    """Base of the simulator's own errors (never raised at a peer: peers get FreeSWITCH replies)."""


class NoSuchCall(SimulatorError, LookupError):
    """The uuid is not a live call of this simulator."""


class CallAlreadyExists(SimulatorError, ValueError):
    """new_call() was given the uuid of a call that is still up."""


class CommandNotReceived(SimulatorError, TimeoutError):
    """No matching command arrived before the timeout."""


class EventNotEmitted(SimulatorError, TimeoutError):
    """No matching event was emitted before the timeout."""


class SubscriptionNotMade(SimulatorError, TimeoutError):
    """No connection subscribed (to the wanted event) before the timeout."""


class NotAnEventFrame(SimulatorError, ValueError):
    """send_event_frame() was given bytes that are not complete, well-formed event frames."""


class UnknownHangupCause(SimulatorError, ValueError):
    """hangup() was given a cause FreeSWITCH does not know."""


class InvalidDtmfDigit(SimulatorError, ValueError):
    """dtmf() was given something other than one of 0-9 * # A-D."""


@dataclass(frozen=True)
class ReceivedCommand:
    """One command as the simulator read it: its first line, extra header lines and body."""

    line: str
    connection_id: int
    t_monotonic: float
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class CommandPacket:
    """What read_packet() makes of the bytes up to a blank line (plus a Content-Length body)."""

    line: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True)
class Subscription:
    """A connection's ``event`` state: format and names, as mod_event_socket keeps them."""

    wire_format: str
    event_names: frozenset[str]
    all_events: bool
    custom_subclasses: frozenset[str] = frozenset()

    def matches(self, event_name: str, subclass: str | None = None) -> bool:
        # mod_event_socket event_handler(): ALL takes everything; CUSTOM needs the subclass too.
        if self.all_events:
            return True
        if event_name not in self.event_names:
            return False
        return event_name != "CUSTOM" or not subclass or subclass in self.custom_subclasses


@dataclass(frozen=True)
class ConnectionInfo:
    """A snapshot of one client connection; ``subscription`` is None until events are enabled."""

    connection_id: int
    peer: str
    authenticated: bool
    subscription: Subscription | None


@dataclass(frozen=True)
class EmittedEvent:
    """An event the simulator fired (whether or not anyone was subscribed to it)."""

    name: str
    sequence: int
    unique_id: str | None
    headers: tuple[tuple[str, str], ...]
    body: str | None
    t_monotonic: float

    def get(self, key: str, default: str | None = None) -> str | None:
        for name, value in self.headers:
            if name == key:
                return value
        return default


@dataclass(frozen=True)
class PlaybackRecord:
    """How one broadcast ended: ``done``, ``break``, ``hangup``, ``not-found`` or ``flushed``."""

    path: str
    status: str
    offset_samples: int


class CommandPacketParser:
    """mod_event_socket's read_packet(): split client bytes into command packets, never raising.

    Leading CR/LF are skipped; a packet ends at two LFs (CRs in between are ignored); the
    first line is the command, the others ``Name: value`` headers; a ``Content-Length``
    header makes the next N bytes the packet's body.
    """

    _END = re.compile(rb"\n\r*\n")
    _LINES = re.compile(rb"[\r\n]+")

    def __init__(self, max_packet_bytes: int = MAX_COMMAND_PACKET_BYTES):
        self._buf = bytearray()
        self._max_packet_bytes = max_packet_bytes

    def feed(self, data: bytes) -> list[CommandPacket]:
        self._buf += data
        packets: list[CommandPacket] = []
        while True:
            start = 0
            while start < len(self._buf) and self._buf[start] in (0x0A, 0x0D):
                start += 1
            if start:
                del self._buf[:start]
            match = self._END.search(self._buf)
            if match is None:
                if len(self._buf) < self._max_packet_bytes:
                    return packets
                # read_packet() stops at max_len and takes what it has as one packet.
                head_end = body_start = len(self._buf)
            else:
                head_end, body_start = match.start(), match.end()
            lines = [line.decode("utf-8", "replace") for line in self._LINES.split(bytes(self._buf[:head_end])) if line]
            if not lines:
                del self._buf[:body_start]
                continue
            headers: list[tuple[str, str]] = []
            body_length = 0
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name:
                    continue  # read_packet() ignores a header line without ':'
                value = value.lstrip(" ")
                headers.append((name, value))
                if name.lower() == "content-length":
                    digits = re.match(r"\d+", value)
                    body_length = int(digits.group()) if digits else 0
            if body_length > self._max_packet_bytes:
                body_length = 0  # never buffer what a hostile length claims
            if len(self._buf) < body_start + body_length:
                return packets
            body = bytes(self._buf[body_start : body_start + body_length])
            del self._buf[: body_start + body_length]
            packets.append(CommandPacket(lines[0], tuple(headers), body))


class _Connection:
    """One client socket: its ``event`` state and a writer greenlet draining an ordered outbox."""

    def __init__(self, connection_id: int, sock, peer: str, on_written: Callable[[int], None] | None = None):
        self.id = connection_id
        self._on_written = on_written
        self.sock = sock
        self.peer = peer
        self.authenticated = False
        self.events_enabled = False
        self.wire_format = "plain"
        self.event_names: set[str] = set()
        self.all_events = False
        self.custom_subclasses: set[str] = set()
        self.logging = False
        self.closing = False
        self.closed = False
        self._outbox: gevent.queue.Queue = gevent.queue.Queue()
        self._writer = gevent.spawn(self._write_loop)

    def subscription(self) -> Subscription | None:
        if not self.events_enabled:
            return None
        return Subscription(self.wire_format, frozenset(self.event_names), self.all_events, frozenset(self.custom_subclasses))

    def wants(self, event_name: str, subclass: str | None) -> bool:
        subscription = self.subscription()
        return not self.closed and subscription is not None and subscription.matches(event_name, subclass)

    def info(self) -> ConnectionInfo:
        return ConnectionInfo(self.id, self.peer, self.authenticated, self.subscription())

    def send(self, data: bytes, sequence: int | None = None) -> None:
        """Queue bytes for the writer; an event's ``sequence`` gets its write time noted."""
        if not self.closed:
            self._outbox.put(data if sequence is None else (data, sequence))

    def close_after_flush(self) -> None:
        self._outbox.put(_CLOSE)

    def abort(self, reset: bool = False) -> None:
        """Close at once, dropping whatever is still queued: no disconnect-notice."""
        if self.closed:
            return
        self.closed = True
        self._writer.kill(block=False)
        try:
            if reset:
                # Linger 0 makes close() send RST, like a crashed switch or a cut cable.
                self.sock.setsockopt(socket_constants.SOL_SOCKET, socket_constants.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.sock.shutdown(socket_constants.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def wait_written(self, timeout_s: float) -> None:
        """Wait for the writer to flush and close; abort if the peer does not read in time."""
        self._writer.join(timeout_s)
        if not self._writer.dead:
            self.abort()

    def _write_loop(self) -> None:
        try:
            while True:
                item = self._outbox.get()
                if item is _CLOSE:
                    break
                if isinstance(item, tuple):
                    data, sequence = item
                    self.sock.sendall(data)
                    if self._on_written is not None:
                        self._on_written(sequence)
                else:
                    self.sock.sendall(item)
        except OSError:
            pass
        finally:
            self.closed = True
            try:
                self.sock.shutdown(socket_constants.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


@dataclass(eq=False)
class _PlaybackItem:
    source: str  # as given to uuid_broadcast
    app: str
    path: str  # Application-Data and Playback-File-Path ("playback::" prefix removed, S5)
    app_uuid: str = field(default_factory=lambda: str(uuid_lib.uuid4()))
    state: str = "queued"  # queued -> starting -> playing -> finished
    total_samples: int = 0
    started_monotonic: float = 0.0
    stop_event: gevent.event.Event = field(default_factory=gevent.event.Event)
    greenlet: gevent.Greenlet | None = None


@dataclass(eq=False)
class _Call:
    uuid: str
    a_leg_uuid: str
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
    current: _PlaybackItem | None = None
    queue: collections.deque = field(default_factory=collections.deque)
    played: list[str] = field(default_factory=list)
    playback_log: list[PlaybackRecord] = field(default_factory=list)
    transfers: list[str] = field(default_factory=list)


def _reply(text: str) -> bytes:
    return build_command_reply(text)


def _render(pairs: Iterable[tuple[str, str]], subst: Mapping[str, str | None]) -> list[tuple[str, str]]:
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


def _separate(text: str | None, max_parts: int) -> list[str]:
    # switch_separate_string(): blanks collapse, the last part keeps the rest of the line.
    if not text:
        return []
    return text.split(None, max_parts - 1)


def _local_stamp(epoch_us: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_us / 1e6))


def _gmt_stamp(epoch_us: int) -> str:
    tm = time.gmtime(epoch_us / 1e6)
    return f"{_DAYS[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} {tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} GMT"


def _xml_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#xD;")


def build_xml_event(headers: Iterable[tuple[str, str]], body: str | None = None) -> bytes:
    """A whole ``text/event-xml`` frame laid out as capture 46 (values URL-encoded as in plain)."""
    lines = ["<event>", "  <headers>"]
    for key, value in headers:
        if key != "Content-Length":
            lines.append(f"    <{key}>{_xml_text(encode_header_value(value))}</{key}>")
    lines.append("  </headers>")
    if body is not None:
        lines.append(f"  <Content-Length>{len(body.encode('utf-8'))}</Content-Length>")
        lines.append(f"  <body>{_xml_text(body)}</body>")
    lines.append("</event>")
    inner = ("\n".join(lines) + "\n").encode("utf-8")
    return build_frame([("Content-Length", str(len(inner))), ("Content-Type", "text/event-xml")], inner)


_FRAME_BUILDERS: Mapping[str, Callable[..., bytes]] = {
    "plain": build_plain_event,
    "json": build_json_event,
    "xml": build_xml_event,
}


def _probe_media_seconds(path: str) -> float | None:
    """Duration FreeSWITCH would play, or None when it could not open the file (FILE NOT FOUND)."""
    if path.startswith("silence_stream://"):
        digits = re.match(r"-?\d+", path[len("silence_stream://") :])
        if not digits:
            return None
        ms = int(digits.group())
        return math.inf if ms <= 0 else ms / 1000.0
    if path.startswith("tone_stream://"):
        segments = re.findall(r"%\((\d+),(\d+)", path)
        if not segments:
            return None
        loops_match = re.search(r"loops=(-?\d+)", path)
        loops = int(loops_match.group(1)) if loops_match else 1
        once_ms = sum(int(on) + int(off) for on, off in segments)
        return math.inf if loops < 0 else once_ms * max(loops, 1) / 1000.0
    if "://" in path or not os.path.isfile(path):
        return None
    try:
        info = soundfile.info(path)
    except (RuntimeError, OSError, ValueError):
        return None
    return info.frames / info.samplerate if info.samplerate else None


class FreeswitchSimulator:
    """A fake FreeSWITCH event socket on ``host:port`` (port 0: the OS picks; read ``.port``).

    ``playback_gap_s``: delay before each broadcast starts (FreeSWITCH: ~100 ms after the api
    call or the previous file's end). ``playback_speed``: multiplier on each file's real
    duration (1.0 real time, 0.1 ten times faster, 0 instant). ``break_latency_s``: delay
    between ``uuid_break``'s reply and its PLAYBACK_STOP (FreeSWITCH: ~20 ms).
    ``duplicate_speech_while_parked``: send each DETECTED_SPEECH twice, byte-identical, while the
    leg is parked and not playing (as mod_vosk + fire_asr_events do, 80_plain), the second copy
    ``duplicate_speech_delay_s`` later. ``auth_timeout_s``: mod_event_socket hangs up on a
    client that sends nothing for 25 s after ``auth/request``. ``simulate_media``: play
    broadcasts and emit their PLAYBACK_* events; off when replaying a recording, whose frames
    already hold what the real switch played.

    ``history_limit``: None keeps every received command, emitted event (and its write time)
    and ended call for the test to inspect. A number keeps only about that many of the newest
    of each (between it and twice it), so a long soak runs in bounded memory; positions
    (``start_index``, :attr:`commands_received`, :attr:`events_emitted`) still count from the
    first ever, and an ended call that was forgotten answers as one never made.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str = DEFAULT_PASSWORD,
        *,
        playback_gap_s: float = 0.1,
        playback_speed: float = 1.0,
        break_latency_s: float = 0.02,
        duplicate_speech_while_parked: bool = True,
        duplicate_speech_delay_s: float = 0.02,
        auth_timeout_s: float | None = 25.0,
        first_event_sequence: int = 1,
        simulate_media: bool = True,
        history_limit: int | None = None,
    ):
        if history_limit is not None and history_limit < 1:
            raise ValueError(f"history_limit must be None or >= 1, got {history_limit}")
        self.host = host
        self.simulate_media = simulate_media
        self._requested_port = port
        self.password = password
        self.refuse_auth = False
        self.playback_gap_s = playback_gap_s
        self.playback_speed = playback_speed
        self.break_latency_s = break_latency_s
        self.duplicate_speech_while_parked = duplicate_speech_while_parked
        self.duplicate_speech_delay_s = duplicate_speech_delay_s
        self.auth_timeout_s = auth_timeout_s
        self.core_uuid = str(uuid_lib.uuid4())
        self._sequence = itertools.count(first_event_sequence)
        self._connection_ids = itertools.count(1)
        self._session_ids = itertools.count(1)
        self._server: gevent.server.StreamServer | None = None
        self._connections: dict[int, _Connection] = {}
        self._calls: dict[str, _Call] = {}
        self._commands: list[ReceivedCommand] = []
        self._consumed_commands: set[int] = set()
        self._consumed_events: set[int] = set()
        self._emitted: list[EmittedEvent] = []
        self._written_at: dict[int, float] = {}
        self._history_limit = history_limit
        # Absolute positions of _commands[0] and _emitted[0]: the count trimmed off so far.
        self._commands_base = 0
        self._emitted_base = 0
        self._ended_calls: collections.deque[str] = collections.deque()
        self._waiters: list[gevent.event.Event] = []
        self._started_monotonic = time.monotonic()
        self._sessions_since_start = 0
        self._peak_sessions = 0
        self._session_starts: collections.deque[float] = collections.deque(maxlen=1000)
        self._peak_sps = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FreeswitchSimulator":
        if self._server is not None:
            return self
        self._server = gevent.server.StreamServer((self.host, self._requested_port), self._handle_connection)
        self._server.start()
        self._started_monotonic = time.monotonic()
        log.info("sim_listening", host=self.host, port=self.port)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        for conn in list(self._connections.values()):
            conn.abort()
        for call in self._calls.values():
            call.live = False
            for item in [call.current, *call.queue]:
                if item is not None and item.greenlet is not None:
                    item.greenlet.kill(block=False)
        if server is not None:
            server.stop(timeout=1)
            log.info("sim_stopped")
        self._notify()

    def __enter__(self) -> "FreeswitchSimulator":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise SimulatorError("the simulator is not started")
        return self._server.server_port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # -- what the peers did ------------------------------------------------------------------

    @property
    def commands(self) -> list[ReceivedCommand]:
        return list(self._commands)

    def commands_for(self, connection_id: int) -> list[ReceivedCommand]:
        return [c for c in self._commands if c.connection_id == connection_id]

    @property
    def emitted_events(self) -> list[EmittedEvent]:
        return list(self._emitted)

    @property
    def commands_received(self) -> int:
        """Commands received since start: the ``start_index`` of a wait for the next one."""
        return self._commands_base + len(self._commands)

    @property
    def events_emitted(self) -> int:
        """Events emitted since start: the ``start_index`` of a wait for the next one."""
        return self._emitted_base + len(self._emitted)

    @property
    def connections(self) -> list[ConnectionInfo]:
        return [conn.info() for conn in self._connections.values() if not conn.closed]

    def wait_for_command(
        self,
        predicate_or_prefix: Callable[[ReceivedCommand], bool] | str,
        timeout_s: float | None = 5.0,
        *,
        start_index: int = 0,
        consume: bool = True,
    ) -> ReceivedCommand:
        """The next matching command not yet returned by a wait, waiting for it if need be.

        Commands are searched in arrival order from position ``start_index`` (0: the first
        command ever received; :attr:`commands_received`: the next one to come),
        skipping those an earlier consuming wait returned, so two waits for "a uuid_broadcast"
        get the first and then the second one; ``consume=False`` neither skips nor marks (a
        plain search of the history). A ``str`` matches as a prefix.
        Raises :class:`CommandNotReceived` after ``timeout_s`` (None: wait forever).
        """
        if callable(predicate_or_prefix):
            matches = predicate_or_prefix
        else:
            prefix = predicate_or_prefix
            matches = lambda command: command.line.startswith(prefix)  # noqa: E731
        index = start_index

        def probe() -> ReceivedCommand | None:
            nonlocal index
            index = max(index, self._commands_base)  # what history_limit dropped is gone
            while index - self._commands_base < len(self._commands):
                position, command = index, self._commands[index - self._commands_base]
                index += 1
                if (not consume or position not in self._consumed_commands) and matches(command):
                    if consume:
                        self._consumed_commands.add(position)
                    return command
            return None

        found = self._wait_until(probe, timeout_s)
        if found is None:
            raise CommandNotReceived(f"no command matching {predicate_or_prefix!r} within {timeout_s} s")
        return found

    def wait_for_event(
        self,
        predicate_or_name: Callable[[EmittedEvent], bool] | str,
        timeout_s: float | None = 5.0,
        *,
        start_index: int = 0,
        consume: bool = True,
    ) -> EmittedEvent:
        """The next matching emitted event, with :meth:`wait_for_command`'s rules; a str is an Event-Name."""
        if callable(predicate_or_name):
            matches = predicate_or_name
        else:
            wanted = predicate_or_name
            matches = lambda event: event.name == wanted  # noqa: E731
        index = start_index

        def probe() -> EmittedEvent | None:
            nonlocal index
            index = max(index, self._emitted_base)
            while index - self._emitted_base < len(self._emitted):
                position, event = index, self._emitted[index - self._emitted_base]
                index += 1
                if (not consume or position not in self._consumed_events) and matches(event):
                    if consume:
                        self._consumed_events.add(position)
                    return event
            return None

        found = self._wait_until(probe, timeout_s)
        if found is None:
            raise EventNotEmitted(f"no event matching {predicate_or_name!r} within {timeout_s} s")
        return found

    def wait_for_subscription(self, event_name: str | None = None, timeout_s: float | None = 5.0) -> ConnectionInfo:
        """A connection whose subscription takes ``event_name`` (any subscription if None)."""

        def probe() -> ConnectionInfo | None:
            for info in self.connections:
                if info.subscription is not None and (event_name is None or info.subscription.matches(event_name)):
                    return info
            return None

        found = self._wait_until(probe, timeout_s)
        if found is None:
            raise SubscriptionNotMade(f"no connection subscribed to {event_name or 'events'} within {timeout_s} s")
        return found

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
    ) -> str:
        """Bring up an answered, parked IVR leg: CHANNEL_ANSWER, CHANNEL_EXECUTE park, CHANNEL_PARK."""
        call_uuid = uuid or str(uuid_lib.uuid4())
        existing = self._calls.get(call_uuid)
        if existing is not None and existing.live:
            raise CallAlreadyExists(f"call {call_uuid} is already up")
        call = _Call(
            uuid=call_uuid,
            a_leg_uuid=a_leg_uuid or str(uuid_lib.uuid4()),
            caller_id_number=caller_id_number,
            caller_id_name=caller_id_name,
            destination_number=destination_number,
            context=context,
            channel_name=channel_name,
            created_us=self._now_us(),
            session_id=next(self._session_ids),
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

    def dtmf(self, uuid: str, digit: str, duration_samples: int = DEFAULT_DTMF_DURATION_SAMPLES, source: str = "RTP") -> int:
        """A DTMF event (headers of switch_channel_dequeue_dtmf; not in the captures)."""
        call = self._live_call(uuid)
        digit = digit.upper()
        if len(digit) != 1 or digit not in DTMF_DIGITS:
            raise InvalidDtmfDigit(f"not a DTMF digit: {digit!r}")
        head = {
            "Event-Name": "DTMF",
            "Event-Calling-File": "switch_channel.c",
            "Event-Calling-Function": "switch_channel_dequeue_dtmf",
            "Event-Calling-Line-Number": DTMF_CALLING_LINE_NUMBER,
            "Speech-Type": None,
        }
        pairs = self._channel_event("DETECTED_SPEECH", call, head=head)
        pairs += [("DTMF-Digit", digit), ("DTMF-Duration", str(duration_samples)), ("DTMF-Source", source)]
        return self._emit(pairs)

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

    def playing(self, uuid: str) -> str | None:
        """The Playback-File-Path playing now (between PLAYBACK_START and STOP), else None."""
        item = self._known_call(uuid).current
        return item.path if item is not None and item.state == "playing" else None

    def played_files(self, uuid: str) -> list[str]:
        """Every Playback-File-Path that got a PLAYBACK_START on this leg, in order."""
        return list(self._known_call(uuid).played)

    def playback_log(self, uuid: str) -> list[PlaybackRecord]:
        """How each broadcast on this leg ended, in order."""
        return list(self._known_call(uuid).playback_log)

    def transfers(self, uuid: str) -> list[str]:
        """The uuid_transfer argument lines this leg received."""
        return list(self._known_call(uuid).transfers)

    # -- fault injection ---------------------------------------------------------------------

    def drop_connections(self, reset: bool = False) -> int:
        """Close every client socket at once, no disconnect-notice (RST with ``reset``)."""
        connections = list(self._connections.values())
        for conn in connections:
            conn.abort(reset=reset)
        log.warning("sim_connections_dropped", count=len(connections), reset=reset)
        self._notify()
        return len(connections)

    def inject_raw(self, data: bytes, connection: int | None = None) -> int:
        """Write arbitrary bytes, in order with events, to one connection or to every subscribed one."""
        if connection is not None:
            targets = [self._connections[connection]] if connection in self._connections else []
        else:
            targets = [conn for conn in self._connections.values() if conn.events_enabled]
        for conn in targets:
            conn.send(bytes(data))
        return len(targets)

    def replay_frame(self, data: bytes) -> None:
        """Write recorded bytes verbatim to every subscriber, keeping track of which calls are up.

        A well-formed event of an unknown Unique-ID brings that call up (silently: the recording
        holds its events), and its CHANNEL_HANGUP_COMPLETE takes it down, so api commands get
        the replies FreeSWITCH gave. Malformed bytes are written as they are.
        """
        parser = FrameParser()
        items = parser.feed(bytes(data))
        for item in items:
            if not isinstance(item, Frame) or not item.content_type.startswith("text/event-"):
                continue
            try:
                event = parse_event(item)
            except MalformedEvent:
                continue
            uuid = event.unique_id
            if uuid is None:
                continue
            call = self._calls.get(uuid)
            if event.name == "CHANNEL_HANGUP_COMPLETE":
                if call is not None:
                    call.live = False
                    call.current = None
                    call.queue.clear()
                    self._call_ended(call)
            elif call is None:
                self._calls[uuid] = _Call(
                    uuid=uuid,
                    a_leg_uuid=event.get("variable_other_loopback_leg_uuid") or str(uuid_lib.uuid4()),
                    caller_id_number=event.get("Caller-Caller-ID-Number", ""),
                    caller_id_name=event.get("Caller-Caller-ID-Name", ""),
                    destination_number=event.get("Caller-Destination-Number", ""),
                    context=event.get("Caller-Context", ""),
                    channel_name=event.get("Channel-Name", ""),
                    created_us=self._now_us(),
                    session_id=next(self._session_ids),
                )
        self.inject_raw(data)
        self._notify()

    def send_event_frame(self, data: bytes) -> int:
        """Push prebuilt event frames (e.g. cut from a capture) verbatim to matching subscribers.

        Each frame is routed by its own Event-Name (and Event-Subclass) whatever the subscriber's
        format; returns how many frames were routed. Raises :class:`NotAnEventFrame`.
        """
        parser = FrameParser()
        items = parser.feed(bytes(data))
        if parser.buffered_bytes:
            raise NotAnEventFrame(f"{parser.buffered_bytes} trailing bytes do not make a whole frame")
        routed: list[tuple[Frame, str, str | None]] = []
        for item in items:
            if not isinstance(item, Frame):
                raise NotAnEventFrame(f"malformed frame: {item.reason}")
            if not item.content_type.startswith("text/event-"):
                raise NotAnEventFrame(f"not an event frame: Content-Type {item.content_type!r}")
            try:
                event = parse_event(item)
            except MalformedEvent as exc:
                raise NotAnEventFrame(str(exc)) from None
            routed.append((item, event.name, event.get("Event-Subclass")))
        for frame, name, subclass in routed:
            for conn in self._connections.values():
                if conn.wants(name, subclass):
                    conn.send(frame.raw)
        return len(routed)

    # -- connections -------------------------------------------------------------------------

    def _handle_connection(self, sock, address) -> None:
        # mod_event_socket's listener_run() sets SWITCH_SO_TCP_NODELAY on every connection.
        sock.setsockopt(socket_constants.IPPROTO_TCP, socket_constants.TCP_NODELAY, 1)
        conn = _Connection(next(self._connection_ids), sock, f"{address[0]}:{address[1]}", self._note_written)
        self._connections[conn.id] = conn
        clog = log.bind(connection_id=conn.id)
        clog.info("sim_connection_opened", peer=conn.peer)
        conn.send(AUTH_REQUEST)
        parser = CommandPacketParser()
        seen_packet = False
        first_packet_deadline = None if self.auth_timeout_s is None else time.monotonic() + self.auth_timeout_s
        try:
            while not conn.closing and not conn.closed:
                wait_s = None
                if not seen_packet and first_packet_deadline is not None:
                    wait_s = max(first_packet_deadline - time.monotonic(), 0.0)
                try:
                    with gevent.Timeout(wait_s):
                        data = sock.recv(RECV_CHUNK_BYTES)
                except gevent.Timeout:
                    # read_packet(listener, &event, 25) in the auth loop: silence means goodbye.
                    clog.info("sim_auth_timeout")
                    conn.send(build_disconnect_notice())
                    break
                if not data:
                    break
                for packet in parser.feed(data):
                    seen_packet = True
                    self._handle_packet(conn, packet)
                    if conn.closing or conn.closed:
                        break
        except OSError as exc:
            if not conn.closed:  # our own drop/stop closes the socket under recv(): not news
                clog.info("sim_connection_error", error=str(exc))
        finally:
            self._connections.pop(conn.id, None)
            conn.close_after_flush()
            # gevent's StreamServer closes the socket as soon as this handler returns: let the
            # writer deliver the last replies and the disconnect-notice first.
            conn.wait_written(WRITER_DRAIN_TIMEOUT_S)
            clog.info("sim_connection_closed")
            self._notify()

    def _handle_packet(self, conn: _Connection, packet: CommandPacket) -> None:
        self._commands.append(ReceivedCommand(packet.line, conn.id, time.monotonic(), packet.headers, packet.body))
        self._trim_commands()
        log.debug("sim_command", connection_id=conn.id, line=_redacted(packet.line))
        after: list[Callable[[], None]] = []
        try:
            reply, after = self._dispatch(conn, packet)
        except Exception:
            # A simulator bug must not kill the socket; answer in the shape the peer waits for.
            log.exception("sim_command_failed", connection_id=conn.id, line=_redacted(packet.line))
            is_api = packet.line.lower().startswith("api ")
            reply = build_api_response("-ERR simulator error\n") if is_api else _reply("-ERR command not found")
        if reply:
            conn.send(reply)
        if conn.closing:
            conn.send(build_disconnect_notice())
            conn.close_after_flush()
        for action in after:
            self._guarded(action)
        self._notify()

    def _dispatch(self, conn: _Connection, packet: CommandPacket) -> tuple[bytes | None, list[Callable[[], None]]]:
        """mod_event_socket's parse_command(), in its order of checks."""
        cmd = packet.line
        low = cmd.lower()
        if low.startswith("exit") or cmd.startswith("..."):
            conn.closing = True
            return _reply("+OK bye"), []
        if not conn.authenticated:
            if low.startswith("auth "):
                if not self.refuse_auth and cmd[5:] == self.password:
                    conn.authenticated = True
                    return _reply("+OK accepted"), []
                conn.closing = True
                return _reply("-ERR invalid"), []
            if low.startswith("userauth "):
                conn.closing = True  # no directory users here: every userauth fails
                return _reply("-ERR invalid"), []
            return _reply("-ERR command not found"), []
        if low.startswith("divert_events"):
            return _reply("-ERR not controlling a session."), []
        if low.startswith("sendmsg"):
            return self._cmd_sendmsg(packet)
        if low.startswith("api "):
            return self._cmd_api(cmd[4:])
        if low.startswith("bgapi "):
            return self._cmd_bgapi(cmd[6:], packet)
        if low.startswith("log"):
            return _reply(self._cmd_log(conn, cmd)), []
        if low.startswith("linger") or low.startswith("nolinger"):
            return _reply("-ERR not controlling a session"), []
        if low.startswith("nolog"):
            was_logging, conn.logging = conn.logging, False
            return _reply("+OK no longer logging" if was_logging else "-ERR not loging"), []
        if low.startswith("event"):
            return _reply(self._cmd_event(conn, cmd)), []
        if low.startswith("nixevent"):
            return _reply(self._cmd_nixevent(conn, cmd)), []
        if low.startswith("noevents"):
            if not conn.events_enabled:
                return _reply("-ERR not listening for events"), []
            conn.events_enabled, conn.all_events = False, False
            conn.event_names.clear()
            conn.custom_subclasses.clear()
            return _reply("+OK no longer listening for events"), []
        return _reply("-ERR command not found"), []

    def _cmd_event(self, conn: _Connection, cmd: str) -> str:
        space = cmd.find(" ", 5)
        key_count = 0
        custom = False
        if space >= 0:
            for index, token in enumerate(cmd[space + 1 :].split(" ")):
                if index == 0 and token.lower() in ("plain", "json", "xml"):
                    conn.wire_format = token.lower()
                    continue
                if custom:
                    conn.custom_subclasses.add(token)
                    continue
                name = _event_type(token)
                if name is None:
                    continue
                key_count += 1
                if name == "ALL":
                    conn.all_events = True
                conn.event_names.add(name)
                if name == "CUSTOM":
                    custom = True
        if not key_count:
            return "-ERR no keywords supplied"
        conn.events_enabled = True
        return f"+OK event listener enabled {conn.wire_format}"

    def _cmd_nixevent(self, conn: _Connection, cmd: str) -> str:
        space = cmd.find(" ", 8)
        key_count = 0
        custom = False
        if space >= 0:
            for token in cmd[space + 1 :].split(" "):
                if custom:
                    conn.custom_subclasses.discard(token)
                    continue
                name = _event_type(token)
                if name is None:
                    continue
                key_count += 1
                if name == "CUSTOM":
                    custom = True
                elif name == "ALL":
                    conn.all_events = False
                    conn.event_names.clear()
                else:
                    if conn.all_events:
                        conn.all_events = False
                        conn.event_names = set(EVENT_NAMES - {"ALL"})
                    conn.event_names.discard(name)
        if not key_count:
            return "-ERR no keywords supplied"
        conn.events_enabled = True
        return "+OK events nixed"

    def _cmd_log(self, conn: _Connection, cmd: str) -> str:
        level_text = cmd[3:].lstrip(" ").split(" ", 1)[0]
        if not level_text:
            level = LOG_LEVELS["debug"]
        elif level_text.isdigit() and int(level_text) <= 7:
            level = int(level_text)
        elif level_text.lower() in LOG_LEVELS:
            level = LOG_LEVELS[level_text.lower()]
        else:
            return "-ERR invalid log level"
        conn.logging = True  # no log/data is ever sent: the simulator has no log lines
        return f"+OK log level {level_text} [{level}]"

    def _cmd_sendmsg(self, packet: CommandPacket) -> tuple[bytes, list[Callable[[], None]]]:
        target = packet.line[7:].strip() or (packet.header("session-id") or "")
        call = self._calls.get(target)
        if call is None or not call.live:
            return _reply(f"-ERR invalid session id [{target}]"), []
        action: Callable[[], None] | None = None
        command = (packet.header("call-command") or "").lower()
        if command == "hangup":
            cause = (packet.header("hangup-cause") or "NORMAL_CLEARING").upper()
            cause = cause if cause in HANGUP_CAUSES else "NORMAL_CLEARING"
            action = lambda: call.live and self._hangup(call, cause)  # noqa: E731
        elif command == "execute":
            app = packet.header("execute-app-name") or ""
            arg = packet.header("execute-app-arg") or ""
            # A queued private event, the same path a broadcast takes.
            action = lambda: self._broadcast(call, f"{app}::{arg}")  # noqa: E731
        return _reply("+OK"), [action] if action else []

    def _cmd_api(self, rest: str) -> tuple[bytes, list[Callable[[], None]]]:
        name, sep, arg = rest.partition(" ")
        argument = arg.strip() if sep else None
        self._emit_api_event(name.strip(), argument)
        text, after = self._run_api(name.strip(), argument)
        return build_api_response(text or "-ERR no reply\n"), after

    def _cmd_bgapi(self, rest: str, packet: CommandPacket) -> tuple[bytes, list[Callable[[], None]]]:
        name, sep, arg = rest.partition(" ")
        raw_arg = arg if sep else None
        job_uuid = packet.header("job-uuid") or str(uuid_lib.uuid4())

        def run_job() -> None:
            argument = raw_arg.strip() if raw_arg is not None else None
            self._emit_api_event(name.strip(), argument)
            text, after = self._run_api(name.strip(), argument)
            head = {"Job-UUID": job_uuid, "Job-Command": name, "Job-Command-Arg": raw_arg}
            self._emit(self._plain_event("BACKGROUND_JOB", head), text)
            for action in after:
                self._guarded(action)

        reply = build_command_reply(f"+OK Job-UUID: {job_uuid}", [("Job-UUID", job_uuid)])
        return reply, [lambda: gevent.spawn(self._guarded, run_job)]

    # -- api commands (mod_commands.c texts) -------------------------------------------------

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
            "uuid_transfer": lambda a: (self._api_uuid_transfer(a), []),
            "uuid_dump": lambda a: (self._api_uuid_dump(a), []),
            "originate": lambda a: (self._api_originate(a), []),
            "echo": lambda a: (a or "", []),
            "hostname": lambda a: (HOSTNAME, []),
        }
        handler = handlers.get(name.lower())
        if handler is None:
            return f"-ERR {name} Command not found!\n", []
        return handler(arg)

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
        argv = _separate(arg, 6)
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
                return _json_text({"row_count": len(rows), "rows": []})
            if not rows:
                return '{"row_count": 0}\n'  # capture 11: FreeSWITCH's literal, space and LF
            return _json_text({"row_count": len(rows), "rows": rows})
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
        argv = _separate(arg, 4)
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
        argv = _separate(arg, 3)
        if len(argv) not in (2, 3):
            return f"-USAGE: {USAGE['uuid_setvar']}\n"
        call = self._calls.get(argv[0])
        if call is None or not call.live:
            return "-ERR No such channel!\n"
        self._set_var(call, argv[1], argv[2] if len(argv) == 3 else None)
        return "+OK\n"

    def _api_uuid_getvar(self, arg: str | None) -> str:
        argv = _separate(arg, 4)
        if len(argv) < 2:
            return f"-USAGE: {USAGE['uuid_getvar']}\n"
        call = self._calls.get(argv[0])
        if call is None or not call.live:
            return "-ERR No such channel!\n"
        value = self._get_var(call, argv[1])
        return "_undef_" if value is None else value

    def _api_uuid_transfer(self, arg: str | None) -> str:
        argv = _separate(arg, 5)
        if len(argv) < 2:
            return f"-USAGE: {USAGE['uuid_transfer']}\n"
        call = self._calls.get(argv[0])
        if call is None or not call.live:
            return "-ERR No such channel!\n"
        # No dialplan here: the reply is FreeSWITCH's (S6, S6b), the leg just stops being parked.
        call.transfers.append(" ".join(argv[1:]))
        call.parked = False
        return "+OK\n"

    def _api_uuid_dump(self, arg: str | None) -> str:
        argv = _separate(arg, 2)
        if not argv:
            return f"-USAGE: {USAGE['uuid_dump']}\n"
        call = self._calls.get(argv[0])
        if call is None or not call.live:
            return "-ERR No such channel!\n"
        fmt = argv[1].lower() if len(argv) > 1 else "txt"
        pairs = self._channel_event("CHANNEL_PARK", call, head=dict(UUID_DUMP_CALLING))
        if fmt == "json":
            return _frame_body(build_json_event(pairs)).decode("utf-8")
        if fmt == "plain":
            # switch_event_serialize(event, &buf, strcasecmp(format, "plain")): plain is not encoded.
            return "".join(f"{key}: {value}\n" for key, value in pairs) + "\n"
        return _frame_body(build_plain_event(pairs)).decode("utf-8")

    def _api_originate(self, arg: str | None) -> str:
        argv = _separate(arg, 10)
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
        if parts[0].lower() != "loopback" or len(parts) < 2:
            return "-ERR CHAN_NOT_IMPLEMENTED\n"
        # With loopback the returned uuid is the A leg's (origination_uuid sets it, S8);
        # the simulated IVR leg (loopback/<dest>-b) gets its own.
        a_leg = variables.get("origination_uuid") or str(uuid_lib.uuid4())
        extra = {k: v for k, v in variables.items() if k != "origination_caller_id_number"}
        destination = parts[1]
        self.new_call(
            variables.get("origination_caller_id_number", "0000000000"),
            destination_number=destination,
            context=parts[2] if len(parts) > 2 and parts[2] else "default",
            channel_name=f"loopback/{destination}-b",
            variables=extra,
            a_leg_uuid=a_leg,
        )
        return f"+OK {a_leg}\n"

    # -- playback (tests/captures/playback/README.md) ----------------------------------------

    def _broadcast(self, call: _Call, source: str) -> None:
        app, sep, data = source.partition("::")
        if not sep:
            app, data = "playback", source
        item = _PlaybackItem(source=source, app=app.lower() or "playback", path=data)
        if call.current is None:
            self._start_item(call, item)
        else:
            call.queue.append(item)

    def _start_item(self, call: _Call, item: _PlaybackItem) -> None:
        call.current = item
        item.state = "starting"
        item.greenlet = gevent.spawn(self._guarded, self._run_item, call, item)

    def _advance(self, call: _Call) -> None:
        call.current = None
        if call.live and call.queue:
            self._start_item(call, call.queue.popleft())

    def _run_item(self, call: _Call, item: _PlaybackItem) -> None:
        gevent.sleep(max(self.playback_gap_s, 0.0))
        if item.state == "finished" or not call.live:
            return
        clog = log.bind(call_uuid=call.uuid)
        self._set_var(call, "current_loop", "1")
        self._set_var(call, "total_loops", "1")
        self._execute_app(call, item.app, item.path or None, app_uuid=item.app_uuid)
        if item.app != "playback":
            self._complete_app(call, item.app, item.path or None, item.app_uuid)
            self._unset_loop_vars(call)
            item.state = "finished"
            self._advance(call)
            return
        seconds = _probe_media_seconds(item.path)
        # switch_ivr_play_file() names the file before it tries to open it (X11).
        self._set_var(call, "current_application_data", item.path)
        self._set_var(call, "current_application", "playback")
        if seconds is None:
            clog.info("sim_playback_file_not_found", path=item.path)
            self._set_var(call, "current_application_response", "FILE NOT FOUND")
            self._complete_app(call, "playback", item.path, item.app_uuid)
            self._unset_loop_vars(call)
            item.state = "finished"
            call.playback_log.append(PlaybackRecord(item.path, "not-found", 0))
            self._advance(call)
            return
        item.total_samples = int(round(seconds * CHANNEL_RATE_HZ)) if math.isfinite(seconds) else 0
        item.state = "playing"
        item.started_monotonic = time.monotonic()
        call.played.append(item.path)
        clog.info("sim_playback_start", path=item.path, duration_s=seconds)
        self._emit(self._channel_event("PLAYBACK_START", call, tail={"Playback-File-Path": item.path}))
        wait_s = seconds * self.playback_speed
        broken = item.stop_event.wait(None if math.isinf(wait_s) else max(wait_s, 0.0))
        if item.state == "finished" or not call.live:
            return
        self._finish_playback(call, item, "break" if broken else "done", "FILE PLAYED")
        self._advance(call)

    def _finish_playback(self, call: _Call, item: _PlaybackItem, status: str, response: str, wire_status: str | None = None) -> None:
        item.state = "finished"
        offset = item.total_samples if status == "done" else self._elapsed_samples(item)
        total_ms = item.total_samples * 1000 // CHANNEL_RATE_HZ
        # On a break FreeSWITCH reports the real position but the whole file's length (X09).
        self._set_var(call, "playback_last_offset_pos", str(offset))
        self._set_var(call, "playback_seconds", str(total_ms // 1000))
        self._set_var(call, "playback_ms", str(total_ms))
        self._set_var(call, "playback_samples", str(item.total_samples))
        tail = {"Playback-File-Path": item.path, "Playback-Status": wire_status or status}
        self._emit(self._channel_event("PLAYBACK_STOP", call, tail=tail))
        self._set_var(call, "current_application_response", response)
        self._complete_app(call, "playback", item.path, item.app_uuid)
        self._unset_loop_vars(call)
        call.playback_log.append(PlaybackRecord(item.path, status, offset))
        log.bind(call_uuid=call.uuid).info("sim_playback_stop", path=item.path, status=status, offset_samples=offset)

    def _elapsed_samples(self, item: _PlaybackItem) -> int:
        elapsed_s = time.monotonic() - item.started_monotonic
        audio_s = elapsed_s / self.playback_speed if self.playback_speed > 0 else math.inf
        samples = item.total_samples if not math.isfinite(audio_s) else int(audio_s * CHANNEL_RATE_HZ)
        if item.total_samples:
            samples = min(samples, item.total_samples)
        return samples - samples % FRAME_SAMPLES

    def _break(self, call: _Call, all_: bool) -> None:
        if all_:
            # uuid_break all flushes the queued broadcasts: they never produce an event (S2a).
            while call.queue:
                dropped = call.queue.popleft()
                call.playback_log.append(PlaybackRecord(dropped.path, "flushed", 0))
        item = call.current
        # Only a started file stops; one still being picked up plays on (capture 70).
        if item is None or item.state != "playing":
            return

        def stop_now() -> None:
            if item.state == "playing":
                item.stop_event.set()

        if self.break_latency_s > 0:
            gevent.spawn_later(self.break_latency_s, stop_now)
        else:
            stop_now()

    # -- hangup ------------------------------------------------------------------------------

    def _hangup(self, call: _Call, cause: str) -> None:
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
        call.hangup_cause = cause
        call.hangup_us = self._now_us()
        response = call.variables.get("current_application_response", "_none_")
        tail = {"Application": "park", "Application-Response": response, "Application-UUID": call.park_app_uuid}
        self._emit(self._channel_event("CHANNEL_EXECUTE_COMPLETE_AT_HANGUP", call, tail=tail))
        self._emit(self._channel_event("DETECTED_SPEECH_CLOSED", call))
        self._add_hangup_variables(call)
        self._emit(self._channel_event("CHANNEL_HANGUP_COMPLETE", call))
        self._call_ended(call)
        clog.info("sim_call_down", cause=cause)
        self._notify()

    def _add_hangup_variables(self, call: _Call) -> None:
        template = load_event_template("CHANNEL_HANGUP_COMPLETE")
        names = template.variable_names()
        start_us, end_us = call.created_us, call.hangup_us
        duration_us = max(end_us - start_us, 0)
        name, number = call.caller_id_name, call.caller_id_number
        computed: dict[str, str | None] = {
            "hangup_cause": call.hangup_cause,
            "hangup_cause_q850": str(_q850(call.hangup_cause)),
            "start_stamp": _local_stamp(start_us),
            "profile_start_stamp": _local_stamp(start_us),
            "answer_stamp": _local_stamp(start_us),
            "end_stamp": _local_stamp(end_us),
            "start_epoch": str(start_us // 1_000_000),
            "start_uepoch": str(start_us),
            "profile_start_epoch": str(start_us // 1_000_000),
            "profile_start_uepoch": str(start_us),
            "answer_epoch": str(start_us // 1_000_000),
            "answer_uepoch": str(start_us),
            "end_epoch": str(end_us // 1_000_000),
            "end_uepoch": str(end_us),
            "last_app": call.variables.get("current_application"),
            "last_arg": call.variables.get("current_application_data"),
            "caller_id": number if not name else f'"{name}" <{number}>',
        }
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

    def _initial_variables(self, call: _Call, extra: Mapping[str, str]) -> dict[str, str]:
        template = load_event_template("CHANNEL_ANSWER")
        by_name = {
            "uuid": call.uuid,
            "session_id": str(call.session_id),
            "channel_name": call.channel_name,
            "origination_caller_id_number": call.caller_id_number,
            "other_loopback_leg_uuid": call.a_leg_uuid,
            "call_uuid": call.uuid,
        }
        variables: dict[str, str] = {}
        for name, value in template.variables:
            if name == "origination_caller_id_number":
                # originate's {k=v} variables come right before it (X14).
                for key, extra_value in extra.items():
                    if extra_value:
                        variables[key] = extra_value
            variables.pop(name, None)
            variables[name] = by_name.get(name, value)
        return variables

    @staticmethod
    def _set_var(call: _Call, name: str, value: str | None) -> None:
        # switch_channel_set_variable: delete, then append if non-empty (so it moves last).
        call.variables.pop(name, None)
        if value:
            call.variables[name] = value

    @staticmethod
    def _get_var(call: _Call, name: str) -> str | None:
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

    def _unset_loop_vars(self, call: _Call) -> None:
        self._set_var(call, "current_loop", None)
        self._set_var(call, "total_loops", None)

    def _execute_app(self, call: _Call, app: str, data: str | None, app_uuid: str | None = None) -> str:
        """switch_core_session_exec(): name the app, its data, clear the last response; CHANNEL_EXECUTE."""
        app_uuid = app_uuid or str(uuid_lib.uuid4())
        self._set_var(call, "current_application", app)
        self._set_var(call, "current_application_data", data)
        self._set_var(call, "current_application_response", None)
        call.app_name, call.app_data = app, data or ""
        tail = {"Application": app, "Application-Data": data, "Application-UUID": app_uuid}
        self._emit(self._channel_event("CHANNEL_EXECUTE", call, tail=tail))
        return app_uuid

    def _complete_app(self, call: _Call, app: str, data: str | None, app_uuid: str) -> None:
        response = call.variables.get("current_application_response", "_none_")
        tail = {"Application": app, "Application-Data": data, "Application-Response": response, "Application-UUID": app_uuid}
        self._emit(self._channel_event("CHANNEL_EXECUTE_COMPLETE", call, tail=tail))

    # -- events ------------------------------------------------------------------------------

    def _common_head(self) -> dict[str, str | None]:
        now_us = self._now_us()
        return {
            "Core-UUID": self.core_uuid,
            "Event-Date-Local": _local_stamp(now_us),
            "Event-Date-GMT": _gmt_stamp(now_us),
            "Event-Date-Timestamp": str(now_us),
            "Event-Sequence": str(next(self._sequence)),
        }

    def _plain_event(self, kind: str, head: Mapping[str, str | None]) -> list[tuple[str, str]]:
        """A non-channel event (API, BACKGROUND_JOB) from its template."""
        template = load_event_template(kind)
        return _render(template.head, {**self._common_head(), **head})

    def _channel_event(
        self,
        kind: str,
        call: _Call,
        head: Mapping[str, str | None] | None = None,
        tail: Mapping[str, str | None] | None = None,
    ) -> list[tuple[str, str]]:
        template = load_event_template(kind)
        created = str(call.created_us)
        subst: dict[str, str | None] = {
            **self._common_head(),
            "Unique-ID": call.uuid,
            "Channel-Call-UUID": call.uuid,
            "Caller-Unique-ID": call.uuid,
            "Channel-Name": call.channel_name,
            "Caller-Channel-Name": call.channel_name,
            "Caller-Caller-ID-Number": call.caller_id_number,
            "Caller-Orig-Caller-ID-Number": call.caller_id_number,
            "Caller-ANI": call.caller_id_number,
            "Caller-Destination-Number": call.destination_number,
            "Caller-Context": call.context,
            "Caller-Profile-Created-Time": created,
            "Caller-Channel-Created-Time": created,
            "Caller-Channel-Answered-Time": created,
            "Caller-Channel-Hangup-Time": str(call.hangup_us),
            "Hangup-Cause": call.hangup_cause or None,
            **(head or {}),
        }
        pairs: list[tuple[str, str]] = []
        for key, value in _render(template.head, subst):
            if call.caller_id_name and key in ("Caller-Caller-ID-Number", "Caller-Orig-Caller-ID-Number"):
                # The caller profile only lists a name when there is one (none on loopback).
                pairs.append((key.replace("Number", "Name"), call.caller_id_name))
            pairs.append((key, value))
        if template.variables:
            pairs.extend((f"variable_{name}", value) for name, value in call.variables.items())
        pairs.extend(_render(template.tail, tail or {}))
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
                    frame = frames[conn.wire_format] = _FRAME_BUILDERS[conn.wire_format](pairs, body)
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

    def _note_written(self, sequence: int) -> None:
        self._written_at.setdefault(sequence, time.monotonic())
        limit = self._history_limit
        if limit is not None and len(self._written_at) >= 2 * limit:
            # Oldest first: a dict keeps insertion order, and that is write order.
            for old in list(itertools.islice(self._written_at, len(self._written_at) - limit)):
                del self._written_at[old]

    # -- bounded history (history_limit) -----------------------------------------------------

    def _trim_commands(self) -> None:
        limit = self._history_limit
        if limit is None or len(self._commands) < 2 * limit:
            return
        # Trimming in halves keeps appends amortized O(1).
        drop = len(self._commands) - limit
        del self._commands[:drop]
        self._commands_base += drop
        self._consumed_commands = {p for p in self._consumed_commands if p >= self._commands_base}

    def _trim_events(self) -> None:
        limit = self._history_limit
        if limit is None or len(self._emitted) < 2 * limit:
            return
        drop = len(self._emitted) - limit
        del self._emitted[:drop]
        self._emitted_base += drop
        self._consumed_events = {p for p in self._consumed_events if p >= self._emitted_base}

    def _call_ended(self, call: _Call) -> None:
        if self._history_limit is None:
            return
        self._ended_calls.append(call.uuid)
        while len(self._ended_calls) > self._history_limit:
            uuid = self._ended_calls.popleft()
            old = self._calls.get(uuid)
            if old is not None and not old.live:  # a uuid reused by a live call stays
                del self._calls[uuid]

    def written_at(self, sequence: int) -> float | None:
        """When the event with this Event-Sequence was first written to a socket (monotonic s)."""
        return self._written_at.get(sequence)

    # -- helpers -----------------------------------------------------------------------------

    def _live_call(self, uuid: str) -> _Call:
        call = self._calls.get(uuid)
        if call is None or not call.live:
            raise NoSuchCall(f"no live call {uuid}")
        return call

    def _known_call(self, uuid: str) -> _Call:
        call = self._calls.get(uuid)
        if call is None:
            raise NoSuchCall(f"no call {uuid} was ever made here")
        return call

    def _channel_row(self, call: _Call) -> dict[str, str]:
        values = {
            "uuid": call.uuid,
            "created": _local_stamp(call.created_us),
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
            "initial_dest": call.destination_number,
            "initial_context": call.context,
        }
        return {key: values.get(key, value) for key, value in load_channel_row_template()}

    def _count_session(self) -> None:
        now = time.monotonic()
        self._sessions_since_start += 1
        self._session_starts.append(now)
        self._peak_sessions = max(self._peak_sessions, len(self.calls()) + 1)
        self._peak_sps = max(self._peak_sps, sum(1 for t in self._session_starts if now - t < 1.0))

    @staticmethod
    def _now_us() -> int:
        return time.time_ns() // 1000

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.set()

    def _wait_until(self, probe: Callable[[], object], timeout_s: float | None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            found = probe()
            if found is not None:
                return found
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            waiter = gevent.event.Event()
            self._waiters.append(waiter)
            waiter.wait(remaining)

    @staticmethod
    def _guarded(action: Callable[..., object], *args) -> None:
        try:
            action(*args)
        except gevent.GreenletExit:
            raise
        except Exception:
            log.exception("sim_action_failed", action=getattr(action, "__name__", repr(action)))


def _event_type(token: str) -> str | None:
    """switch_name_event(): case-insensitive, with or without the SWITCH_EVENT_ prefix."""
    name = token.upper()
    if len(name) > 13 and name.startswith("SWITCH_EVENT_"):
        name = name[13:]
    return name if name in EVENT_NAMES else None


def _q850(cause: str) -> int:
    # switch_channel_cause_q850(): FreeSWITCH-only causes report 16 (NORMAL_CLEARING).
    code = HANGUP_CAUSES.get(cause, 16)
    return code if code <= 127 else 16


def _json_text(obj: object) -> str:
    # cJSON_PrintUnformatted: no blanks, raw UTF-8.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _frame_body(frame_bytes: bytes) -> bytes:
    items = FrameParser().feed(frame_bytes)
    return items[0].body  # type: ignore[union-attr]


def _redacted(line: str) -> str:
    return "auth ***" if line.lower().startswith("auth ") else line


# -- standalone runner ---------------------------------------------------------------------------

_STANDALONE_HELP = """commands:
  call [caller_number]          new parked call (prints its uuid)
  say <uuid|last> <text...>     final DETECTED_SPEECH
  partial <uuid|last> <text...> detected-partial-speech
  dtmf <uuid|last> <digit>      DTMF event
  hangup <uuid|last>            hang the call up
  drop                          close every client socket abruptly
  calls                         list live calls
  commands                      every command the daemon sent
  help                          this text
  quit                          stop the simulator"""


def run_standalone(port: int, password: str, host: str = "127.0.0.1") -> int:
    """Run the simulator until ``quit`` or end of input, driven by lines on stdin."""
    sim = FreeswitchSimulator(host=host, port=port, password=password)
    sim.start()
    print(f"FreeSWITCH simulator listening on {host}:{sim.port} (password {'*' * len(password)}); type 'help'", flush=True)

    def echo_commands() -> None:
        index = 0
        while True:
            command = sim.wait_for_command(lambda c: True, timeout_s=None, start_index=index, consume=False)
            index += 1
            print(f"<- [conn {command.connection_id}] {_redacted(command.line)}", flush=True)

    watcher = gevent.spawn(echo_commands)
    last_uuid: str | None = None
    threadpool = gevent.get_hub().threadpool
    try:
        while True:
            # readline in a native thread: the gevent loop keeps serving the sockets meanwhile.
            line = threadpool.apply(sys.stdin.readline)
            if not line:
                break
            words = line.split()
            if not words:
                continue
            verb, args = words[0].lower(), words[1:]

            def target() -> str:
                if not args:
                    raise NoSuchCall("give a uuid or 'last'")
                if args[0] == "last":
                    if last_uuid is None:
                        raise NoSuchCall("no call made yet")
                    return last_uuid
                return args[0]

            try:
                if verb in ("quit", "exit"):
                    break
                elif verb == "help":
                    print(_STANDALONE_HELP, flush=True)
                elif verb == "call":
                    last_uuid = sim.new_call(args[0]) if args else sim.new_call()
                    print(last_uuid, flush=True)
                elif verb in ("say", "partial"):
                    uuid = target()
                    sequence = sim.speak(uuid, " ".join(args[1:]), final=verb == "say")
                    print(f"DETECTED_SPEECH Event-Sequence {sequence}", flush=True)
                elif verb == "dtmf":
                    uuid = target()
                    sim.dtmf(uuid, args[1] if len(args) > 1 else "")
                elif verb == "hangup":
                    sim.hangup(target())
                elif verb == "drop":
                    print(f"dropped {sim.drop_connections()} connection(s)", flush=True)
                elif verb == "calls":
                    for uuid in sim.calls():
                        print(f"{uuid} playing={sim.playing(uuid)}", flush=True)
                elif verb == "commands":
                    for command in sim.commands:
                        print(f"[conn {command.connection_id}] {_redacted(command.line)}", flush=True)
                else:
                    print(f"unknown command {verb!r}; type 'help'", flush=True)
            except SimulatorError as exc:
                print(f"error: {exc}", flush=True)
    finally:
        watcher.kill(block=False)
        sim.stop()
    return 0


__all__ = [
    "CallAlreadyExists",
    "CommandNotReceived",
    "CommandPacket",
    "CommandPacketParser",
    "ConnectionInfo",
    "EmittedEvent",
    "EventNotEmitted",
    "FreeswitchSimulator",
    "InvalidDtmfDigit",
    "NoSuchCall",
    "NotAnEventFrame",
    "PlaybackRecord",
    "ReceivedCommand",
    "SimulatorError",
    "Subscription",
    "SubscriptionNotMade",
    "UnknownHangupCause",
    "build_xml_event",
    "run_standalone",
]
