"""``ivr-daemon asr-server``: the vosk-server WebSocket protocol, as mod_vosk speaks it.

What mod_vosk does (tests/captures/mod_vosk-websocket/, alphacep's mod_vosk.c): one connection
per ``detect_speech``, path ``/``, no text frames at all, binary frames of 3,200 bytes of L16
at the channel's rate (8 kHz: 200 ms of audio every 200 ms, silence included). After each
20 ms media frame it reads at most one reply, without blocking, and keeps only the latest;
a reply containing ``""`` counts as nothing, one with ``"text"`` becomes a final
DETECTED_SPEECH, one with ``"partial"`` a partial. At hangup libks sends a malformed close
frame (status code 1, which is no valid code): that is the normal end of a stream.

So, as vosk-server's asr_server.py does, every audio message gets exactly one reply: the
final result when an utterance ended within it, else the partial one. One reply per 200 ms
frame also means mod_vosk, reading ten times as often, never drops a final behind a partial.
Other clients may send vosk-server's ``{"config": {"sample_rate": N}}`` first and
``{"eof": 1}`` last (answered with the final result, then a close).

Each stream is one greenlet; its decoding runs on a worker thread of a pool as large as the
number of streams allowed, one job at a time per stream, so a slow stream never waits for
another's decoding and the gevent loop never decodes. A client that sends garbage, a message
over 1 MiB or nothing for 60 s is closed with a log line; no client can stop the server.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from dataclasses import dataclass

import gevent
import gevent.event
import gevent.pool
import gevent.threadpool
from gevent.server import StreamServer
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage
from wsproto.frame_protocol import CloseReason

from ivr_daemon.asr.base import AsrEngine, AsrResult, AsrStream
from ivr_daemon.asr.websocket import RECV_BYTES, SessionClosed, WebSocketSession
from ivr_daemon.config import MAX_ASR_RATE_HZ, MIN_ASR_RATE_HZ
from ivr_daemon.logs import get_logger, spoken_text
from ivr_daemon.tts.base import one_line

log = get_logger(__name__)

MAX_MESSAGE_BYTES = 1 << 20
IDLE_TIMEOUT_S = 60.0
# Streams at once, each with its own greenlet and, while it decodes, its own worker thread.
MAX_STREAMS = 256
# After our close frame, how long a client gets to answer with its own before the socket goes.
CLOSE_LINGER_S = 1.0


@dataclass
class StreamSummary:
    """How one stream went: what the server logs when it closes, kept for health and tests."""

    stream_id: int
    peer: str
    path: str = ""
    sample_rate_hz: int = 0
    messages: int = 0
    audio_s: float = 0.0
    decode_s: float = 0.0  # on worker threads (wall time, waits for the GIL included)
    finals: int = 0
    # client_closed | client_closed_malformed | disconnected | eof | idle | too_big | bad_message
    # | protocol_error | handshake_failed | decode_failed | server_stopped
    reason: str = ""
    detail: str = ""


class AsrServer:
    """A WebSocket server on gevent: one greenlet per stream, decoding on native threads."""

    def __init__(self, engine: AsrEngine, *, host: str = "127.0.0.1", port: int = 2700, sample_rate_hz: int = 8000,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_streams: int = MAX_STREAMS, log_transcripts: bool = False):
        self.engine = engine
        self.sample_rate_hz = sample_rate_hz
        self.idle_timeout_s = idle_timeout_s
        self.max_message_bytes = max_message_bytes
        self.log_transcripts = log_transcripts
        self.pool = gevent.threadpool.ThreadPool(max_streams)
        # A pool of stream greenlets: stop() waits for them, then cuts them; beyond max_streams
        # connections wait in the listen backlog.
        self._server = StreamServer((host, port), self._handle, spawn=gevent.pool.Pool(max_streams))
        self._ids = itertools.count(1)
        self.open_streams = 0
        self.closed_streams: list[StreamSummary] = []
        self._stream_closed = gevent.event.Event()

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address[:2]

    def start(self) -> None:
        """Listen (raises OSError when the address is taken)."""
        self._server.start()
        host, port = self.address
        log.info("asr_server_listening", host=host, port=port, url=f"ws://{host}:{port}", engine=self.engine.name,
                 model_id=self.engine.model_id, sample_rate_hz=self.sample_rate_hz)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop listening; streams still open get ``timeout_s`` to end, then are cut."""
        self._server.stop(timeout=timeout_s)
        self.pool.kill()

    def __enter__(self) -> "AsrServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait_for_closed_streams(self, count: int, timeout_s: float = 30.0) -> list[StreamSummary]:
        """Block this greenlet until ``count`` streams have closed; their summaries."""
        deadline_s = time.monotonic() + timeout_s
        while len(self.closed_streams) < count:
            self._stream_closed.clear()
            if not self._stream_closed.wait(max(0.0, deadline_s - time.monotonic())):
                raise TimeoutError(f"{len(self.closed_streams)} of {count} streams closed in {timeout_s} s")
        return list(self.closed_streams)

    def _handle(self, sock: socket.socket, address) -> None:
        stream = _Stream(self, sock, f"{address[0]}:{address[1]}", next(self._ids))
        self.open_streams += 1
        try:
            stream.run()
        finally:
            self.open_streams -= 1
            self.closed_streams.append(stream.summary)
            self._stream_closed.set()


def _timed(function, args):
    started_s = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started_s


class _Stream(WebSocketSession):
    """One WebSocket connection: handshake, messages in, one reply per audio message."""

    log_prefix = "asr"
    close_linger_s = 0.0  # an error close: the socket goes at once (after eof the client gets CLOSE_LINGER_S)
    malformed_close_is_normal = True  # libks's close at every mod_vosk hangup

    def __init__(self, server: AsrServer, sock: socket.socket, peer: str, stream_id: int):
        super().__init__(WSConnection(ConnectionType.SERVER), log.bind(asr_stream=stream_id, peer=peer),
                         server.max_message_bytes, sock)
        self.server = server
        self.summary = StreamSummary(stream_id=stream_id, peer=peer, sample_rate_hz=server.sample_rate_hz)
        self.recognizer: AsrStream | None = None
        self._job: gevent.event.AsyncResult | None = None  # a decode running on a worker thread
        self._opened_s = time.monotonic()

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._serve()
        except SessionClosed as closed:
            self.summary.reason, self.summary.detail = closed.reason, closed.detail
        except gevent.GreenletExit:
            self.summary.reason = "server_stopped"
            self._close(CloseReason.GOING_AWAY, "server stopping")
            raise
        except Exception as exc:  # a bug of ours: this stream ends, the server goes on
            self.log.exception("asr_stream_failed", error=one_line(exc))
            self.summary.reason, self.summary.detail = "decode_failed", one_line(exc)
            self._close(CloseReason.INTERNAL_ERROR, "internal error")
        finally:
            self._release_recognizer()
            try:
                self.sock.close()
            except OSError:
                pass
            self._log_end()

    def _serve(self) -> None:
        self.sock.settimeout(self.server.idle_timeout_s)
        while True:
            try:
                data = self.sock.recv(RECV_BYTES)
            except socket.timeout:
                self.log.warning("asr_stream_idle", idle_s=self.server.idle_timeout_s)
                self._close(CloseReason.POLICY_VIOLATION, "idle")
                raise SessionClosed("idle", f"nothing received for {self.server.idle_timeout_s} s") from None
            except OSError as exc:
                raise SessionClosed("disconnected", one_line(exc)) from None
            self._receive(data)
            if not data:
                raise SessionClosed("disconnected", "connection closed without a close frame")

    def _on_request(self, event: Request) -> None:
        self.summary.path = event.target
        self._send(AcceptConnection())
        self.log.debug("asr_stream_opened", path=event.target)

    def _on_message(self, message: bytes, is_text: bool) -> None:
        self.summary.messages += 1
        if is_text:
            self._on_text(message.decode("utf-8"))
        else:
            self._on_audio(message)

    # --- messages --------------------------------------------------------------------------

    def _on_audio(self, pcm: bytes) -> None:
        if self.recognizer is None:
            self.recognizer = self._decode(self.server.engine.open_stream, self.summary.sample_rate_hz)
        self._reply(self._decode(self.recognizer.accept, pcm))
        self.summary.audio_s = self.recognizer.audio_received_s

    def _bad_message(self, problem: str) -> None:
        self.log.warning("asr_bad_message", error=problem)
        self._close(CloseReason.INVALID_FRAME_PAYLOAD_DATA, "bad message")
        raise SessionClosed("bad_message", problem)

    def _on_text(self, text: str) -> None:
        try:
            parsed = json.loads(text)
        except ValueError:
            self._bad_message(f"a text message that is not JSON ({len(text)} chars)")
        if not isinstance(parsed, dict):
            self._bad_message("a text message that is not a JSON object")
        if "config" in parsed:
            self._configure(parsed["config"])
        elif "eof" in parsed:
            final = self._decode(self.recognizer.finish) if self.recognizer is not None else AsrResult("", True)
            self._reply(final)
            self._close(CloseReason.NORMAL_CLOSURE, "", linger_s=CLOSE_LINGER_S)
            raise SessionClosed("eof")
        else:
            self.log.warning("asr_unknown_message", keys=sorted(map(str, parsed))[:10])

    def _configure(self, config) -> None:
        if not isinstance(config, dict):
            self._bad_message("config is not a JSON object")
        if "sample_rate" in config:
            rate = config["sample_rate"]
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not MIN_ASR_RATE_HZ <= rate <= MAX_ASR_RATE_HZ:
                self._bad_message(f"sample_rate must be a number from {MIN_ASR_RATE_HZ} to {MAX_ASR_RATE_HZ}")
            if self.recognizer is not None:
                # vosk-server too takes the rate only before the first audio.
                self.log.warning("asr_config_after_audio", sample_rate=rate)
            else:
                self.summary.sample_rate_hz = int(rate)
        ignored = sorted(str(key) for key in config if key != "sample_rate")
        if ignored:
            self.log.debug("asr_config_ignored", keys=ignored[:10])

    def _reply(self, result: AsrResult) -> None:
        self._send(TextMessage(json.dumps(result.as_vosk(), ensure_ascii=False)))
        if result.final and result.text:
            self.summary.finals += 1
            self.log.info("asr_final", words=len(result.words),
                          **spoken_text("text", result.text, verbatim=self.server.log_transcripts))

    # --- decoding off the loop ---------------------------------------------------------------

    def _decode(self, function, *args):
        """``function(*args)`` on a worker thread; this greenlet waits, the loop runs on."""
        self._job = self.server.pool.spawn(_timed, function, args)
        try:
            result, elapsed_s = self._job.get()
            self.summary.decode_s += elapsed_s
            return result
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            self.log.error("asr_decode_failed", error=one_line(exc), engine=self.server.engine.name)
            self._close(CloseReason.INTERNAL_ERROR, "decoding failed")
            raise SessionClosed("decode_failed", one_line(exc)) from exc
        finally:
            if self._job.ready():
                self._job = None

    def _release_recognizer(self) -> None:
        """Close the recognizer on a worker thread too: ending an utterance is a decoding pass."""
        recognizer, self.recognizer = self.recognizer, None
        if recognizer is None:
            return
        if self._job is not None:
            # A decode of this stream still runs (the server is stopping): close after it.
            self._job.rawlink(lambda _job: gevent.spawn(self.server.pool.spawn, recognizer.close))
        else:
            self.server.pool.spawn(recognizer.close)

    def _log_end(self) -> None:
        summary = self.summary
        fields = dict(reason=summary.reason, messages=summary.messages, audio_s=round(summary.audio_s, 2),
                      decode_s=round(summary.decode_s, 3), finals=summary.finals,
                      open_s=round(time.monotonic() - self._opened_s, 2))
        if summary.detail:
            fields["detail"] = summary.detail
        # Streams end by hangup: the malformed close of libks and a dropped TCP are normal.
        self.log.info("asr_stream_closed", **fields)
