"""One ``/ws/transcribe`` socket after its 101: audio in, transcripts and the agent's turns out.

The client streams binary messages of 16 kHz mono PCM16 (little-endian; any length, an odd byte
waits for the next message). The server sends JSON text messages, the original service's format::

    {"type": "connection", "status": "connected", "message": "..."}      once, on open
    {"type": "partial_transcript", "text": "..."}                       the utterance so far (when it changes)
    {"type": "final_transcript", "text": "..."}                         the utterance ended: a turn starts
    {"type": "llm_response", "text": "...", "user_message": "..."}      what the agent said
    <one binary message: the reply's audio as a WAV>                    right after each llm_response
    {"type": "error", "message": "..."}                                 what went wrong

The reply's audio is one binary WAV message (8 kHz mono PCM16, the very audio a phone call would
have been played), always sent right after its ``llm_response``: the page plays it as it comes.

A socket is one conversation: a :class:`~ivr_daemon.http.test_calls.TestCall` of its own, so each
final transcript takes the phone call's own turn (history, the agent's LLM and tools, goodbye and
operator words, synthesis through the phrase cache, the fallback phrase). While a turn is in
flight the audio that comes in is not listened to (a caller does not talk over the agent here;
the page's echo would come back as speech), and the utterance starts afresh after it.

Decoding runs on a worker thread (one job at a time per socket), never on the gevent loop. A
client that sends a text message, a message over MAX_MESSAGE_BYTES, broken frames or nothing for
IDLE_TIMEOUT_S is closed with a close code saying why and one log line; so is one past
MAX_SOCKETS, after an error message. The daemon never dies of a client.
"""

from __future__ import annotations

import json
import socket
import time

import gevent
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import generate_accept_token

from ivr_daemon.asr.base import PCM16_SAMPLE_BYTES, AsrResult
from ivr_daemon.asr.websocket import RECV_BYTES, SessionClosed, WebSocketSession
from ivr_daemon.http.talk import SAMPLE_RATE_HZ, SessionSummary, TalkSessions
from ivr_daemon.http.test_calls import TestCall
from ivr_daemon.logs import get_logger, spoken_text
from ivr_daemon.tts.base import one_line

log = get_logger(__name__)

CLOSE_LINGER_S = 1.0  # after our close frame, how long the client gets to answer with its own
TURN_STOP_S = 2.0  # at the end of a socket, how long a cut turn gets to wind down


def accept_token(key: str) -> str:
    """Sec-WebSocket-Accept for the client's Sec-WebSocket-Key (RFC 6455, through wsproto)."""
    return generate_accept_token(key.encode("latin-1")).decode("ascii")


class TranscribeSession(WebSocketSession):
    """The socket's greenlet reads and decodes; each turn runs on a greenlet of its own (both send)."""

    log_prefix = "talk"
    close_linger_s = CLOSE_LINGER_S

    def __init__(self, sessions: TalkSessions, flow, agent: str, *, session_id: str, peer: str):
        # The handshake is done (pywsgi sent the 101): frames only.
        super().__init__(Connection(ConnectionType.SERVER), log.bind(call_uuid=session_id, peer=peer, websocket=True),
                         sessions.max_message_bytes)
        self.sessions = sessions
        self.flow = flow
        self.summary = SessionSummary(session_id=session_id, peer=peer, agent=agent)
        self.call: TestCall | None = None
        self.recognizer = None
        self.turn: gevent.Greenlet | None = None
        self._last_partial = ""
        self._opened_s = time.monotonic()
        self._last_message_s = self._opened_s

    # --- the socket's life ---------------------------------------------------------------------

    def __call__(self, sock: socket.socket, rfile) -> None:
        """Run on the connection's greenlet once pywsgi has sent the 101; returns when it is closed."""
        self.sock = sock
        sessions = self.sessions
        sessions.open_sockets += 1
        try:
            self._run(rfile)
        finally:
            sessions.open_sockets -= 1
            self._clean_up()
            sessions.session_ended(self.summary)
            self._log_end()

    def _run(self, rfile) -> None:
        try:
            if self.sessions.open_sockets > self.sessions.max_sockets:
                self.log.warning("talk_too_many_sockets", max_sockets=self.sessions.max_sockets)
                self._error(f"too many sockets at once (at most {self.sessions.max_sockets}): try again later")
                self._close(CloseReason.TRY_AGAIN_LATER, "too many sockets")
                raise SessionClosed("too_many_sockets")
            early = _buffered(self.sock, rfile)  # what pywsgi's reader took past the headers
            self.call = TestCall(self.summary.session_id, self.flow, self.summary.agent, time.monotonic())
            self._send_json(type="connection", status="connected",
                            message=f"send 16 kHz mono PCM16 audio as binary messages; agent {self.summary.agent}")
            self._open_recognizer()
            if early:
                self._receive(early)
            self._serve()
        except SessionClosed as closed:
            self.summary.reason, self.summary.detail = closed.reason, closed.detail
        except gevent.GreenletExit:  # the HTTP server stops: its connections are cut
            self.summary.reason = "server_stopped"
            self._close(CloseReason.GOING_AWAY, "server stopping")
        except Exception as exc:  # a bug of ours: this socket ends, the server goes on
            self.log.exception("talk_session_failed", error=one_line(exc))
            self.summary.reason, self.summary.detail = "failed", one_line(exc)
            self._close(CloseReason.INTERNAL_ERROR, "internal error")

    def _open_recognizer(self) -> None:
        try:
            engine = self.sessions.engine()
            self.recognizer = self._decode(engine.open_stream, SAMPLE_RATE_HZ)
        except SessionClosed:
            raise
        except Exception as exc:  # no model, no extra: the client hears why
            self.log.error("talk_asr_unavailable", error=one_line(exc))
            self._error(f"speech recognition is not available: {one_line(exc)}")
            self._close(CloseReason.INTERNAL_ERROR, "no speech recognition")
            raise SessionClosed("asr_unavailable", one_line(exc)) from None

    def _serve(self) -> None:
        idle_s = self.sessions.idle_timeout_s
        self._last_message_s = time.monotonic()
        while True:
            # Idle is measured from the last whole message, not the last byte: a client that
            # trickles a frame a byte at a time is idle too.
            if self.turn is not None:
                self._last_message_s = time.monotonic()  # the client waits for the answer: not idle
            left_s = idle_s - (time.monotonic() - self._last_message_s)
            try:
                if left_s <= 0:
                    raise socket.timeout()
                self.sock.settimeout(left_s)
                data = self.sock.recv(RECV_BYTES)
            except socket.timeout:
                if self.turn is not None or time.monotonic() - self._last_message_s < idle_s:
                    continue  # a turn is in flight, or one just ended: the idle time starts after it
                self.log.warning("talk_socket_idle", idle_s=self.sessions.idle_timeout_s)
                self._error(f"nothing received for {self.sessions.idle_timeout_s:g} s: closing")
                self._close(CloseReason.POLICY_VIOLATION, "idle")
                raise SessionClosed("idle", f"nothing received for {self.sessions.idle_timeout_s:g} s") from None
            except OSError as exc:
                raise SessionClosed("disconnected", one_line(exc)) from None
            self._receive(data)
            if not data:
                raise SessionClosed("disconnected", "connection closed without a close frame")

    def _on_message(self, message: bytes, is_text: bool) -> None:
        self.summary.messages += 1
        self._last_message_s = time.monotonic()
        if is_text:
            self.log.warning("talk_bad_message", error="a text message", chars=len(message))
            self._error("send audio as binary messages of 16 kHz mono PCM16; text messages are not understood")
            self._close(CloseReason.UNSUPPORTED_DATA, "binary audio only")
            raise SessionClosed("bad_message", f"a text message of {len(message)} bytes")
        self._on_audio(message)

    # --- audio and turns -------------------------------------------------------------------------

    def _on_audio(self, pcm: bytes) -> None:
        duration_s = len(pcm) / PCM16_SAMPLE_BYTES / SAMPLE_RATE_HZ
        self.summary.audio_s += duration_s
        if self.turn is not None:
            self.summary.dropped_audio_s += duration_s
            return
        result: AsrResult = self._decode(self.recognizer.accept, pcm)
        if result.final:
            self._last_partial = ""
            if result.text:
                self._start_turn(result.text)
        elif result.text and result.text != self._last_partial:
            self._last_partial = result.text
            self.summary.partials += 1
            self._send_json(type="partial_transcript", text=result.text)

    def _start_turn(self, text: str) -> None:
        self.summary.finals += 1
        self.log.info("talk_final_transcript", **spoken_text("text", text, verbatim=self.sessions.settings.log_transcripts))
        self._send_json(type="final_transcript", text=text)
        self.turn = gevent.spawn(self._take_turn, text)

    def _take_turn(self, text: str) -> None:
        try:
            reply = self._answer(text)
        except Exception as exc:
            self.log.exception("talk_turn_failed", error=one_line(exc))
            reply = [f"the turn failed: {one_line(exc)}"]
        finally:
            # Before the answer goes out, so that what the client says once it has the answer is
            # heard: what came during the turn is dropped, the next utterance starts clean.
            try:
                if self.recognizer is not None and not self.call.forgotten:
                    self._decode(self.recognizer.reset)
            except Exception as exc:
                self.log.warning("talk_asr_reset_failed", error=one_line(exc))
            self._last_message_s = time.monotonic()  # the client's idle time starts with the answer
            self.turn = None
        try:
            for message in reply:
                if isinstance(message, str):
                    self._error(message)
                else:
                    self._send(message)
        except SessionClosed:
            pass  # the client is gone; the reader sees it too

    def _answer(self, text: str) -> list:
        """The turn; what to send: an error's text, or the llm_response and the WAV."""
        if not self.call.services.accepting_turns:
            return ["the daemon is stopping: no more turns"]
        slots = self.sessions.turn_slots
        if not slots.try_acquire():
            return ["every turn slot is busy: say it again in a moment"]
        try:
            answer = self.call.answer(text)
        finally:
            slots.release()
        if self.call.forgotten:
            return []  # the socket is closing
        self.summary.turns += 1
        return [TextMessage(data=json.dumps({"type": "llm_response", "text": answer.text, "user_message": text},
                                            ensure_ascii=False)),
                BytesMessage(data=answer.wav)]

    def _decode(self, function, *args):
        """``function(*args)`` on a decoding thread; this greenlet waits, the loop runs on."""
        started_s = time.monotonic()
        try:
            return self.sessions.pool.spawn(function, *args).get()
        finally:
            self.summary.decode_s += time.monotonic() - started_s

    # --- sending ----------------------------------------------------------------------------------

    def _send_json(self, **message) -> None:
        self._send(TextMessage(data=json.dumps(message, ensure_ascii=False)))

    def _tell_client(self, text: str) -> None:
        self._error(text)

    def _error(self, message: str) -> None:
        self.summary.errors += 1
        try:
            self._send_json(type="error", message=message)
        except SessionClosed:
            pass

    # --- the end ----------------------------------------------------------------------------------

    def _clean_up(self) -> None:
        if self.call is not None:
            self.call.close()  # cuts a turn in flight, deletes the conversation's WAVs
        turn = self.turn
        if turn is not None and turn is not gevent.getcurrent():
            turn.join(timeout=TURN_STOP_S)
            turn.kill(block=False)
        recognizer, self.recognizer = self.recognizer, None
        if recognizer is not None:
            self.sessions.pool.spawn(recognizer.close)  # a decoder goes back to the engine's pool
        try:
            self.sock.close()
        except OSError:
            pass

    def _log_end(self) -> None:
        summary = self.summary
        fields = dict(reason=summary.reason, agent=summary.agent, messages=summary.messages,
                      audio_s=round(summary.audio_s, 2), dropped_audio_s=round(summary.dropped_audio_s, 2),
                      decode_s=round(summary.decode_s, 3), partials=summary.partials, finals=summary.finals,
                      turns=summary.turns, errors=summary.errors, open_s=round(time.monotonic() - self._opened_s, 2))
        if summary.detail:
            fields["detail"] = summary.detail
        self.log.info("talk_socket_closed", **fields)


def _buffered(sock: socket.socket, rfile) -> bytes:
    """Bytes pywsgi's buffered reader already holds past the request (a client that did not wait
    for the 101), without waiting for more."""
    timeout_s = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return rfile.peek(RECV_BYTES) if rfile is not None else b""
    except (OSError, ValueError):
        return b""
    finally:
        sock.settimeout(timeout_s)
