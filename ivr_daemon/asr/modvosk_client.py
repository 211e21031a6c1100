"""A WebSocket client that behaves as FreeSWITCH's mod_vosk does towards its vosk server.

The simulator plays mod_vosk's part with it (``FreeswitchSimulator(asr_server=...)``), and the
tests and bench/asr.py drive ``ivr-daemon asr-server`` with it. The facts come from the capture
in tests/captures/mod_vosk-websocket/ (its README) and alphacep's mod_vosk.c: path ``/``, no
text frames, audio gathered per 20 ms media frame and sent in 3,200-byte binary frames, at most
one reply read per media frame without blocking, only the latest reply kept, replies
containing ``""`` ignored, ``"text"`` a final and ``"partial"`` a partial, and at hangup
libks's malformed close frame followed at once by closing the socket.

WebSocket framing is wsproto's (the library the server uses); none of it is ours. The sockets
are the standard library's, which gevent's monkey-patching makes cooperative.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import gevent
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, Request, TextMessage
from wsproto.utilities import LocalProtocolError

# What the capture measured (tests/asr_clients.py checks these against session.jsonl): 3,200
# bytes a frame, whatever the rate (8 kHz: 200 ms of audio, sent every 200 ms).
FRAME_BYTES = 3200
FRAME_INTERVAL_S = 0.2
MEDIA_FRAME_S = 0.02  # FreeSWITCH feeds the ASR once per 20 ms media frame
# What libks writes when mod_vosk closes the ASR handle (the capture's libks_close_frame.hex): a
# masked close frame whose status code is 1, which no server takes for a valid close.
LIBKS_CLOSE_FRAME = bytes.fromhex("888237fa213d37fb")


class HandshakeRefused(ConnectionError):
    """The server answered the upgrade with something else (``event``: wsproto's RejectConnection)."""

    def __init__(self, event):
        super().__init__(f"handshake refused: {event!r}")
        self.event = event
        self.status_code = getattr(event, "status_code", None)


class WsClient:
    """A blocking (gevent-cooperative) WebSocket client on wsproto."""

    def __init__(self, host: str, port: int, path: str = "/", *, timeout_s: float = 30.0,
                 extra_headers: list[tuple[bytes, bytes]] | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: deque = deque()
        self.closed: CloseConnection | None = None
        try:
            self.sock.sendall(self.ws.send(Request(host=host, target=path, extra_headers=extra_headers or [])))
            while True:
                event = self.next_event()
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, (RejectConnection, CloseConnection)) or event is None:
                    raise HandshakeRefused(event)
        except BaseException:
            self.sock.close()
            raise

    def _receive(self, data: bytes) -> None:
        self.ws.receive_data(data or None)
        for event in self.ws.events():
            if isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            else:
                self.events.append(event)

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        self._receive(data)  # b"": wsproto reports the lost connection as a close (1006)

    def next_event(self):
        """The next event, reading the socket when none is pending; None once the connection is gone."""
        while not self.events:
            if self.ws.state is ConnectionState.CLOSED:
                return None
            self._read()
        event = self.events.popleft()
        if isinstance(event, CloseConnection):
            self.closed = event
        return event

    def poll_event(self):
        """The next event if one can be had without waiting, else None (mod_vosk's kws_wait_sock(0))."""
        if not self.events and self.ws.state is not ConnectionState.CLOSED:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if readable:
                self._read()
        return self.next_event() if self.events else None

    def recv_message(self) -> str | bytes | CloseConnection | None:
        """The next whole message (text or bytes), or the close that came instead."""
        parts: list = []
        while True:
            event = self.next_event()
            if event is None or isinstance(event, CloseConnection):
                return event
            if isinstance(event, (TextMessage, BytesMessage)):
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

    def send_bytes(self, data: bytes) -> None:
        try:
            self.sock.sendall(self.ws.send(BytesMessage(data=data)))
        except LocalProtocolError as exc:  # the connection is closing or closed: as a failed send
            raise ConnectionError(f"cannot send on a {self.ws.state.name} WebSocket") from exc

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def close(self, code: int = 1000) -> None:
        self.sock.sendall(self.ws.send(CloseConnection(code=code)))

    def shut(self) -> None:
        self.sock.close()


@dataclass
class Heard:
    """A reply mod_vosk would have turned into a DETECTED_SPEECH event."""

    at_s: float  # since the first media frame
    final: bool
    text: str
    frame: int  # the audio frame this was the reply to (0: the first 3,200 bytes sent)


@dataclass
class ModVoskRun:
    heard: list[Heard] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)  # every reply read, ignored ones included
    frames_sent: int = 0
    started_s: float = 0.0  # time.monotonic() of the first media frame

    @property
    def finals(self) -> list[Heard]:
        return [h for h in self.heard if h.final]

    @property
    def partials(self) -> list[Heard]:
        return [h for h in self.heard if not h.final]


class ModVoskClient:
    """One detect_speech: connect, feed a call's audio one 20 ms media frame at a time, hang up like libks.

    ``speed`` only shortens the pacing of :meth:`talk` (2.0: twice as fast as real time); the
    frames and the one read per media frame stay mod_vosk's.
    """

    def __init__(self, host: str, port: int, *, sample_rate_hz: int = 8000, speed: float = 1.0):
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.ws = WsClient(host, port, "/")
        self.media_frame_bytes = round(sample_rate_hz * MEDIA_FRAME_S) * 2
        self.tick_s = MEDIA_FRAME_S / speed
        self._buffer = bytearray()
        self._result: str | None = None  # mod_vosk's vosk->result: the latest reply read

    def media_frame(self, audio: bytes, run: ModVoskRun) -> Heard | None:
        """What mod_vosk does with one media frame of the caller's audio (vosk_asr_feed, then
        vosk_asr_check_results): what it would fire as DETECTED_SPEECH, if anything."""
        # Buffer the frame, send 3,200 bytes once more than that is buffered...
        self._buffer += audio
        if len(self._buffer) > FRAME_BYTES:
            self.ws.send_bytes(bytes(self._buffer[:FRAME_BYTES]))
            del self._buffer[:FRAME_BYTES]
            run.frames_sent += 1
        return self.read_one(run)

    def read_one(self, run: ModVoskRun) -> Heard | None:
        """Read at most one reply, without blocking, keeping only the latest; a reply with
        ``""`` counts as nothing (vosk_asr_check_results / vosk_asr_get_results)."""
        event = self.ws.poll_event()
        if isinstance(event, TextMessage):
            if not event.message_finished:
                raise ConnectionError("a reply split over frames")
            self._result = event.data
            run.replies.append(event.data)
        if self._result is None or '""' in self._result:
            return None
        try:
            parsed = json.loads(self._result)
        except ValueError:
            parsed = {}
        self._result = None
        frame = len(run.replies) - 1  # one reply per frame, in order
        heard = None
        if isinstance(parsed, dict) and isinstance(parsed.get("text"), str):
            heard = Heard(time.monotonic() - run.started_s, True, parsed["text"], frame)
        elif isinstance(parsed, dict) and isinstance(parsed.get("partial"), str):
            heard = Heard(time.monotonic() - run.started_s, False, parsed["partial"], frame)
        if heard is not None:
            run.heard.append(heard)
        return heard

    @property
    def closed(self) -> bool:
        """The server closed the stream (or the connection is gone): feeding it fails from now on."""
        return self.ws.closed is not None or self.ws.ws.state is ConnectionState.CLOSED

    def talk(self, pcm: bytes, *, until_final: bool = True, max_silence_after_s: float = 4.0,
             drain_timeout_s: float = 30.0) -> ModVoskRun:
        """Send ``pcm`` paced like a call, then silence until a final with text is heard (or
        ``max_silence_after_s`` of it went by), then wait until every frame has had its reply."""
        run = ModVoskRun(started_s=time.monotonic())
        silence = bytes(self.media_frame_bytes)
        frames = [pcm[i:i + self.media_frame_bytes] for i in range(0, len(pcm), self.media_frame_bytes)]
        frames += [silence] * round(max_silence_after_s / MEDIA_FRAME_S)
        speech_frames = -(-len(pcm) // self.media_frame_bytes)
        for index, frame in enumerate(frames):
            if index >= speech_frames and until_final and any(h.text for h in run.finals):
                break
            self.media_frame(frame, run)
            # An absolute schedule: the pacing does not drift with the time spent working.
            sleep_until(run.started_s + (index + 1) * self.tick_s)
        deadline_s = time.monotonic() + drain_timeout_s
        while len(run.replies) < run.frames_sent and time.monotonic() < deadline_s:
            self.read_one(run)
            sleep_until(time.monotonic() + self.tick_s)
        return run

    def hang_up(self) -> None:
        """What libks does in kws_close(ws, KWS_CLOSE_SOCK): the malformed close frame, then close at once."""
        try:
            self.ws.sock.sendall(LIBKS_CLOSE_FRAME)
        except OSError:
            pass  # the server is gone already: closing is all that is left
        self.ws.shut()


def sleep_until(when_s: float) -> None:
    """Pacing (not synchronisation): sleep this greenlet until the monotonic time ``when_s``."""
    gevent.sleep(max(0.0, when_s - time.monotonic()))
