"""Bytes on the socket: mod_event_socket's command packets in; command replies and plain/json/xml event frames out."""

from __future__ import annotations

import json
import re
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from ivr_daemon.esl.protocol import (
    FrameParser,
    build_frame,
    build_json_event,
    build_plain_event,
    encode_header_value,
)

MAX_COMMAND_PACKET_BYTES = 10 * 1024 * 1024  # read_packet()'s max_len in mod_event_socket.c
RECV_CHUNK_BYTES = 65536

# Linux's SO_TIMESTAMPNS (socket(7)): the kernel stamps each packet it receives, and recvmsg
# hands the stamp over. Python's socket module does not name it; elsewhere, no stamp.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform.startswith("linux") else None)
_TIMESPEC = struct.Struct("@ll")  # struct timespec: tv_sec, tv_nsec (CLOCK_REALTIME)
RECV_ANCILLARY_BYTES = socket.CMSG_SPACE(_TIMESPEC.size)


def stamp_arrivals(sock) -> None:
    """Have the kernel stamp what ``sock`` receives (see :func:`arrived_monotonic_s`), where it can."""
    if SO_TIMESTAMPNS is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            pass  # no stamps: arrived_monotonic_s falls back to the time of the read


def arrived_monotonic_s(ancdata) -> float:
    """When the bytes of one ``recvmsg`` reached this host, on time.monotonic()'s clock: the
    kernel's stamp (for TCP, of the last packet the read took), else now.

    What the simulator reports as a command's arrival must not include how long its own loop
    took to get to the read: a benchmark with a thousand calls in this process would charge the
    daemon for the simulator's lag (milliseconds at p99).
    """
    now_s = time.monotonic()
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            age_s = (time.time_ns() - (seconds * 1_000_000_000 + nanoseconds)) / 1e9
            return now_s - min(max(age_s, 0.0), 60.0)  # a clock step must not rewrite history
    return now_s


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


FRAME_BUILDERS: Mapping[str, Callable[..., bytes]] = {
    "plain": build_plain_event,
    "json": build_json_event,
    "xml": build_xml_event,
}


def frame_body(frame_bytes: bytes) -> bytes:
    """The body of the one frame in ``frame_bytes``."""
    items = FrameParser().feed(frame_bytes)
    return items[0].body  # type: ignore[union-attr]


def json_text(obj: object) -> str:
    """JSON as cJSON_PrintUnformatted writes it: no blanks, raw UTF-8."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def redacted(line: str) -> str:
    """A command line fit for a log: the password of ``auth`` hidden."""
    return "auth ***" if line.lower().startswith("auth ") else line
