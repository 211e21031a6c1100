"""FreeswitchSimulator: the listening socket and mod_event_socket's per-connection command loop (auth, event, api, bgapi, sendmsg)."""

from __future__ import annotations

import itertools
import socket as socket_constants
import time
import uuid as uuid_lib
from typing import Callable

import gevent
import gevent.server

from ivr_daemon.esl.protocol import (
    AUTH_REQUEST,
    Frame,
    FrameParser,
    MalformedEvent,
    build_api_response,
    build_command_reply,
    build_disconnect_notice,
    parse_event,
)
from ivr_daemon.logs import get_logger
from ivr_daemon.replay.simulator.api import DEFAULT_LOADED_MODULES, ApiMixin
from ivr_daemon.replay.simulator.asr import AsrMixin
from ivr_daemon.replay.simulator.channels import HANGUP_CAUSES, CallState, ChannelsMixin
from ivr_daemon.replay.simulator.connection import WRITER_DRAIN_TIMEOUT_S, ClientConnection, ConnectionInfo
from ivr_daemon.replay.simulator.errors import NotAnEventFrame, SimulatorError
from ivr_daemon.replay.simulator.events import EventsMixin
from ivr_daemon.replay.simulator.history import HistoryMixin, ReceivedCommand
from ivr_daemon.replay.simulator.playback import PlaybackMixin
from ivr_daemon.replay.simulator.wire import (
    RECV_ANCILLARY_BYTES, RECV_CHUNK_BYTES, CommandPacket, CommandPacketParser, arrived_monotonic_s, redacted,
    stamp_arrivals,
)

log = get_logger(__package__)  # one logger name for the whole simulator

DEFAULT_PASSWORD = "ClueCon"

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

LOG_LEVELS = {"console": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}


def _event_type(token: str) -> str | None:
    """switch_name_event(): case-insensitive, with or without the SWITCH_EVENT_ prefix."""
    name = token.upper()
    if len(name) > 13 and name.startswith("SWITCH_EVENT_"):
        name = name[13:]
    return name if name in EVENT_NAMES else None


class FreeswitchSimulator(ChannelsMixin, PlaybackMixin, ApiMixin, AsrMixin, EventsMixin, HistoryMixin):
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

    ``asr_server``: (host, port) of a vosk server (``ivr-daemon asr-server``): each IVR leg then
    plays mod_vosk, streaming what :meth:`caller_says` queued (silence otherwise) and firing the
    server's replies as DETECTED_SPEECH (see :mod:`ivr_daemon.replay.simulator.asr`).
    ``caller_audio_speed``: multiplier on that stream's pace (1.0 real time, as FreeSWITCH).

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
        asr_server: tuple[str, int] | None = None,
        caller_audio_speed: float = 1.0,
    ):
        self._init_history(history_limit)
        self.host = host
        self.simulate_media = simulate_media
        self._requested_port = port
        self.password = password
        self.refuse_auth = False
        # user/NAME endpoints an originate reaches; any other NAME: -ERR USER_NOT_REGISTERED.
        self.registered_users: set[str] = set()
        # What `api module_exists NAME` finds: take "mod_vosk" out to play a switch without it.
        self.loaded_modules: set[str] = set(DEFAULT_LOADED_MODULES)
        self.originate_args: list[str] = []  # every originate's argument, as received
        self.playback_gap_s = playback_gap_s
        self.playback_speed = playback_speed
        self.break_latency_s = break_latency_s
        self.duplicate_speech_while_parked = duplicate_speech_while_parked
        self.duplicate_speech_delay_s = duplicate_speech_delay_s
        self.auth_timeout_s = auth_timeout_s
        self._connection_ids = itertools.count(1)
        self._server: gevent.server.StreamServer | None = None
        self._connections: dict[int, ClientConnection] = {}
        self._init_events(first_event_sequence)
        self._init_channels()
        self._init_asr(asr_server, caller_audio_speed)
        self._init_status()

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
        self._stop_asr()
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

    @property
    def connections(self) -> list[ConnectionInfo]:
        return [conn.info() for conn in self._connections.values() if not conn.closed]

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
                self._calls[uuid] = CallState(
                    uuid=uuid,
                    other_leg_uuid=event.get("variable_other_loopback_leg_uuid") or str(uuid_lib.uuid4()),
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
        stamp_arrivals(sock)  # a command's time is when it reached the host, not when this loop read it
        conn = ClientConnection(next(self._connection_ids), sock, f"{address[0]}:{address[1]}", self._note_written)
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
                        data, ancdata, _flags, _address = sock.recvmsg(RECV_CHUNK_BYTES, RECV_ANCILLARY_BYTES)
                except gevent.Timeout:
                    # read_packet(listener, &event, 25) in the auth loop: silence means goodbye.
                    clog.info("sim_auth_timeout")
                    conn.send(build_disconnect_notice())
                    break
                if not data:
                    break
                arrived_s = arrived_monotonic_s(ancdata)
                for packet in parser.feed(data):
                    seen_packet = True
                    self._handle_packet(conn, packet, arrived_s)
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

    def _handle_packet(self, conn: ClientConnection, packet: CommandPacket, arrived_s: float) -> None:
        self._commands.append(ReceivedCommand(packet.line, conn.id, arrived_s, packet.headers, packet.body))
        self._trim_commands()
        log.debug("sim_command", connection_id=conn.id, line=redacted(packet.line))
        after: list[Callable[[], None]] = []
        try:
            reply, after = self._dispatch(conn, packet)
        except Exception:
            # A simulator bug must not kill the socket; answer in the shape the peer waits for.
            log.exception("sim_command_failed", connection_id=conn.id, line=redacted(packet.line))
            is_api = packet.line.lower().startswith("api ")
            reply = build_api_response("-ERR simulator error\n") if is_api else build_command_reply("-ERR command not found")
        if reply:
            conn.send(reply)
        if conn.closing:
            conn.send(build_disconnect_notice())
            conn.close_after_flush()
        for action in after:
            self._guarded(action)
        self._notify()

    def _dispatch(self, conn: ClientConnection, packet: CommandPacket) -> tuple[bytes | None, list[Callable[[], None]]]:
        """mod_event_socket's parse_command(), in its order of checks."""
        cmd = packet.line
        low = cmd.lower()
        if low.startswith("exit") or cmd.startswith("..."):
            conn.closing = True
            return build_command_reply("+OK bye"), []
        if not conn.authenticated:
            if low.startswith("auth "):
                if not self.refuse_auth and cmd[5:] == self.password:
                    conn.authenticated = True
                    return build_command_reply("+OK accepted"), []
                conn.closing = True
                return build_command_reply("-ERR invalid"), []
            if low.startswith("userauth "):
                conn.closing = True  # no directory users here: every userauth fails
                return build_command_reply("-ERR invalid"), []
            return build_command_reply("-ERR command not found"), []
        if low.startswith("divert_events"):
            return build_command_reply("-ERR not controlling a session."), []
        if low.startswith("sendmsg"):
            return self._cmd_sendmsg(packet)
        if low.startswith("api "):
            return self._cmd_api(cmd[4:])
        if low.startswith("bgapi "):
            return self._cmd_bgapi(cmd[6:], packet)
        if low.startswith("log"):
            return build_command_reply(self._cmd_log(conn, cmd)), []
        if low.startswith("linger") or low.startswith("nolinger"):
            return build_command_reply("-ERR not controlling a session"), []
        if low.startswith("nolog"):
            was_logging, conn.logging = conn.logging, False
            return build_command_reply("+OK no longer logging" if was_logging else "-ERR not loging"), []
        if low.startswith("event"):
            return build_command_reply(self._cmd_event(conn, cmd)), []
        if low.startswith("nixevent"):
            return build_command_reply(self._cmd_nixevent(conn, cmd)), []
        if low.startswith("noevents"):
            if not conn.events_enabled:
                return build_command_reply("-ERR not listening for events"), []
            conn.events_enabled, conn.all_events = False, False
            conn.event_names.clear()
            conn.custom_subclasses.clear()
            return build_command_reply("+OK no longer listening for events"), []
        return build_command_reply("-ERR command not found"), []

    def _cmd_event(self, conn: ClientConnection, cmd: str) -> str:
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

    def _cmd_nixevent(self, conn: ClientConnection, cmd: str) -> str:
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

    def _cmd_log(self, conn: ClientConnection, cmd: str) -> str:
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
            return build_command_reply(f"-ERR invalid session id [{target}]"), []
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
        return build_command_reply("+OK"), [action] if action else []

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

    @staticmethod
    def _guarded(action: Callable[..., object], *args) -> None:
        try:
            action(*args)
        except gevent.GreenletExit:
            raise
        except Exception:
            log.exception("sim_action_failed", action=getattr(action, "__name__", repr(action)))
