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
``fire_asr_events=true``, ``detect_speech``, parked. A loopback originate with ``&park()`` (or
``new_call(loopback_a_leg=True)``) also parks its A leg (``loopback/ai-a``, tests/captures/dtmf),
which hangs up with the IVR leg. DTMF arrives on the IVR leg, one event per digit, with no
channel variables. Channel variables are kept in FreeSWITCH's order (setting a variable moves it
to the end, as ``switch_channel_set_variable`` does), so ``variable_*`` headers, ``uuid_getvar``
and ``uuid_dump`` agree with each other and with the captures. Playback follows
``tests/captures/playback/README.md``; ``uuid_transfer`` gives the leg a new caller profile and
ends its park as in S6, but no dialplan runs: the leg stays up until it is hung up.

Not simulated (documented so nobody relies on it): the A leg's events other than its
CHANNEL_PARK and CHANNEL_HANGUP_COMPLETE, and api commands on it (it is not one of ``calls()``),
CHANNEL_CREATE/STATE/CALLSTATE/HANGUP/DESTROY/UNPARK, HEARTBEAT, COMMAND/
PRIVATE_COMMAND, ``filter``, ``myevents``, ``sendevent``, log streaming, and any api command
not listed in :meth:`FreeswitchSimulator._run_api` (they answer ``-ERR <name> Command not found!``).
Everything runs on the gevent loop; call the simulator from that loop's thread only.

The rooms (``FreeswitchSimulator`` is assembled from one mixin per room; they call each
other only through ``self``, so a test can monkeypatch any method on an instance):

==============  ==========================================================================
``server``      FreeswitchSimulator itself: the listening socket, mod_event_socket's
                per-connection loop and ``_dispatch`` (auth, event, api, bgapi, sendmsg),
                fault injection (drop, raw bytes, recorded frames)
``connection``  one client connection: its subscription and the writer that owns the socket
``wire``        command packets in, xml event frames out (plain/json: :mod:`ivr_daemon.esl`)
``api``         mod_commands' api commands, ``_run_api(name, arg)``, with FreeSWITCH's texts
``channels``    calls: bring-up, speech, DTMF, hangup, channel variables, apps
``playback``    uuid_broadcast's queue, PLAYBACK_START/STOP, uuid_break
``asr``         mod_vosk: a leg's caller audio streamed to a vosk server (``asr_server``),
                its replies fired as DETECTED_SPEECH
``events``      events rendered from captured templates and fanned out to subscribers
``history``     commands received and events emitted, and the waits tests block on
``errors``      the simulator's exceptions
``cli``         ``run_standalone``, the interactive ``ivr-daemon simulator``
==============  ==========================================================================
"""

from ivr_daemon.replay.simulator.asr import CallerUtterance
from ivr_daemon.replay.simulator.channels import DEFAULT_DTMF_DURATION_SAMPLES, HANGUP_CAUSES
from ivr_daemon.replay.simulator.cli import run_standalone
from ivr_daemon.replay.simulator.connection import ConnectionInfo, Subscription
from ivr_daemon.replay.simulator.errors import (
    CallAlreadyExists,
    CommandNotReceived,
    EventNotEmitted,
    InvalidDtmfDigit,
    NoSuchCall,
    NotAnEventFrame,
    SimulatorError,
    SubscriptionNotMade,
    UnknownHangupCause,
)
from ivr_daemon.replay.simulator.history import EmittedEvent, ReceivedCommand
from ivr_daemon.replay.simulator.playback import PlaybackRecord
from ivr_daemon.replay.simulator.server import DEFAULT_PASSWORD, FreeswitchSimulator
from ivr_daemon.replay.simulator.wire import CommandPacket, CommandPacketParser, build_xml_event

__all__ = [
    "CallAlreadyExists",
    "CallerUtterance",
    "CommandNotReceived",
    "CommandPacket",
    "CommandPacketParser",
    "ConnectionInfo",
    "DEFAULT_DTMF_DURATION_SAMPLES",
    "DEFAULT_PASSWORD",
    "EmittedEvent",
    "EventNotEmitted",
    "FreeswitchSimulator",
    "HANGUP_CAUSES",
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
