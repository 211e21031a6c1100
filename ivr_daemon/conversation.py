"""The conversational turn: a caller's final transcript in, a spoken answer out.

Per call: a rolling history (system prompt + the last ``MAX_CONVERSATION_HISTORY``
messages). On ``DETECTED_SPEECH`` with ``Speech-Type: detected-speech`` and a non-empty body
(plain text, or vosk JSON ``{"text": ...}`` when mod_vosk runs with ``return-json``), the
history gets the user message, the LLM is asked, the answer is synthesized off the gevent
loop into an 8 kHz WAV, and ``uuid_broadcast <uuid> <wav> aleg`` is sent. An LLM failure is
answered with ``FALLBACK_PHRASE`` (synthesized once at start-up), so the caller never gets
dead air. A transcript that arrives mid-turn waits in the call's queue.

Hangup skips the queue: :meth:`ConversationHandler.interrupt` kills the turn at once, so no
broadcast is sent after ``CHANNEL_HANGUP_COMPLETE``; the call's WAVs are deleted once any
synthesis still running in a worker thread has finished.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gevent
import gevent.threadpool
import structlog

from ivr_daemon.config import Settings
from ivr_daemon.esl import commands
from ivr_daemon.esl.connection import CommandReply, EslError
from ivr_daemon.esl.commands import EslCommand
from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.llm.base import LlmClient, LlmError, Message
from ivr_daemon.tts.base import TtsEngine, TtsError

FINAL_SPEECH = "detected-speech"
HANGUP_EVENT = "CHANNEL_HANGUP_COMPLETE"
CLEANUP_WAIT_S = 30.0


class ConversationHistory:
    """The system prompt plus the last ``max_messages`` user/assistant messages."""

    def __init__(self, system_prompt: str, max_messages: int):
        self.system_prompt = system_prompt
        self._messages: deque[Message] = deque(maxlen=max_messages if max_messages > 0 else 0)

    def add(self, role: str, content: str) -> None:
        self._messages.append({"role": role, "content": content})

    def messages(self) -> list[Message]:
        return [{"role": "system", "content": self.system_prompt}, *self._messages]

    def __len__(self) -> int:
        return len(self._messages)


def transcript_of(event: EslEvent) -> str | None:
    """The final recognised text of a DETECTED_SPEECH event, or None if it starts no turn."""
    if event.name != "DETECTED_SPEECH" or event.get("Speech-Type") != FINAL_SPEECH:
        return None
    text = (event.body or "").strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            text = str(parsed.get("text", "")).strip()
    return text or None


@dataclass(frozen=True)
class TurnResult:
    """What one turn did, for logs, the demo and tests."""

    call_uuid: str
    turn: int
    transcript: str
    reply: str
    used_fallback: bool
    wav_path: Path | None
    broadcast_reply: str | None
    llm_ms: float
    tts_ms: float
    total_ms: float


@dataclass
class TurnServices:
    """What every call's turns share: settings, the LLM, the TTS engine, the ESL writer."""

    settings: Settings
    llm: LlmClient
    tts: TtsEngine
    send: Callable[[EslCommand], CommandReply]
    synth_pool: gevent.threadpool.ThreadPool
    fallback_wav: Path | None = None
    on_turn: Callable[[TurnResult], None] | None = None

    def synthesize(self, text: str, path: Path) -> Path:
        """Run synthesis on a worker thread; the calling greenlet waits, the loop does not."""
        return self.synth_pool.spawn(self.tts.synthesize_to_wav, text, path).get()


def prepare_fallback_wav(tts: TtsEngine, settings: Settings, log: structlog.stdlib.BoundLogger) -> Path | None:
    """Synthesize FALLBACK_PHRASE once at start-up, so it plays even when the LLM is down."""
    settings.tts_output_dir.mkdir(parents=True, exist_ok=True)
    path = settings.tts_output_dir / f"fallback-{tts.name}.wav"
    try:
        return tts.synthesize_to_wav(settings.fallback_phrase, path)
    except TtsError as exc:
        log.error("fallback_phrase_synthesis_failed", error=str(exc))
        return None


class ConversationHandler:
    """One call's conversation: implements :class:`ivr_daemon.calls.CallHandler`."""

    def __init__(self, call_uuid: str, call_log: structlog.stdlib.BoundLogger, services: TurnServices):
        self.call_uuid = call_uuid
        self.log = call_log
        self.services = services
        self.history = ConversationHistory(services.settings.system_prompt, services.settings.max_conversation_history)
        self.turns = 0
        self.hung_up = False
        self._turn_greenlet: gevent.Greenlet | None = None
        self._pending_syntheses: list[gevent.event.AsyncResult] = []
        self._closed = False

    @property
    def busy(self) -> bool:
        """A turn is in flight (asking the LLM, synthesizing or broadcasting)."""
        turn = self._turn_greenlet
        return turn is not None and not turn.dead

    # -- CallHandler ------------------------------------------------------------------------

    def interrupt(self, event: EslEvent) -> None:
        if event.name == HANGUP_EVENT:
            self.hung_up = True
            turn = self._turn_greenlet
            if turn is not None and not turn.dead:
                turn.kill(block=False)

    def handle(self, event: EslEvent) -> None:
        if event.name == HANGUP_EVENT:
            self.log.info("call_hangup", hangup_cause=event.get("Hangup-Cause"), turns=self.turns)
            self.close()
            return
        transcript = transcript_of(event)
        if transcript is None or self.hung_up:
            return
        self._turn_greenlet = gevent.spawn(self._turn, transcript)
        self._turn_greenlet.join()
        if self._turn_greenlet.exception is not None:
            self.log.error("turn_failed", error=repr(self._turn_greenlet.exception))
        self._turn_greenlet = None

    def close(self) -> None:
        """Drop the history and delete this call's WAVs, after any running synthesis ends."""
        if self._closed:
            return
        self._closed = True
        for pending in self._pending_syntheses:
            pending.wait(CLEANUP_WAIT_S)
        removed = 0
        for path in self.services.settings.tts_output_dir.glob(f"{self.call_uuid}-*.wav"):
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.log.warning("wav_delete_failed", path=str(path), error=str(exc))
        self.history = ConversationHistory(self.services.settings.system_prompt, 0)
        self.log.info("call_cleaned_up", wavs_deleted=removed)

    # -- the turn ---------------------------------------------------------------------------

    def _turn(self, transcript: str) -> None:
        started_s = time.monotonic()
        self.turns += 1
        turn = self.turns
        log = self.log.bind(turn=turn)
        log.info("turn_started", transcript=transcript)

        self.history.add("user", transcript)
        llm_started_s = time.monotonic()
        try:
            reply = self.services.llm.complete(self.history.messages())
            used_fallback = False
            self.history.add("assistant", reply)
        except LlmError as exc:
            # The user's words stay in history (once); the fallback is not the model's answer.
            log.error("llm_failed", error=str(exc), error_type=type(exc).__name__)
            reply = self.services.settings.fallback_phrase
            used_fallback = True
        llm_ms = (time.monotonic() - llm_started_s) * 1000

        tts_started_s = time.monotonic()
        wav_path = self._speak(reply, turn, used_fallback, log)
        tts_ms = (time.monotonic() - tts_started_s) * 1000

        broadcast_reply = None
        if wav_path is not None and not self.hung_up:
            broadcast_reply = self._broadcast(wav_path, log)
        total_ms = (time.monotonic() - started_s) * 1000
        log.info(
            "turn_complete", transcript=transcript, reply=reply, used_fallback=used_fallback,
            wav_path=str(wav_path) if wav_path else None, broadcast=broadcast_reply,
            llm_ms=round(llm_ms, 1), tts_ms=round(tts_ms, 1), total_ms=round(total_ms, 1),
        )
        if self.services.on_turn is not None:
            self.services.on_turn(TurnResult(
                self.call_uuid, turn, transcript, reply, used_fallback, wav_path, broadcast_reply,
                llm_ms, tts_ms, total_ms,
            ))

    def _speak(self, text: str, turn: int, used_fallback: bool, log) -> Path | None:
        if used_fallback and self.services.fallback_wav is not None:
            return self.services.fallback_wav
        path = self.services.settings.tts_output_dir / f"{self.call_uuid}-{turn:04d}-{os.getpid()}.wav"
        pending = self.services.synth_pool.spawn(self.services.tts.synthesize_to_wav, text, path)
        self._pending_syntheses.append(pending)
        try:
            return pending.get()
        except TtsError as exc:
            log.error("tts_failed", error=str(exc))
            return None
        finally:
            if pending.ready():
                self._pending_syntheses.remove(pending)

    def _broadcast(self, wav_path: Path, log) -> str | None:
        try:
            command = commands.uuid_broadcast(self.call_uuid, str(wav_path), "aleg")
        except commands.UnsafeCommandArgument as exc:
            log.error("broadcast_refused", error=str(exc))
            return None
        try:
            reply = self.services.send(command)
        except EslError as exc:
            log.error("broadcast_not_sent", error=str(exc))
            return None
        if not reply.ok:
            log.warning("broadcast_rejected", reply=reply.text.strip())
        return reply.text.strip()


def conversation_factory(services: TurnServices):
    """The handler factory the router calls for each new call UUID."""

    def make(call_uuid: str, call_log: structlog.stdlib.BoundLogger) -> ConversationHandler:
        return ConversationHandler(call_uuid, call_log, services)

    return make
