"""The conversational turn: a caller's final transcript in, a spoken answer out, sentence by sentence.

Per call: a rolling history (system prompt + the last ``MAX_CONVERSATION_HISTORY``
messages). On ``DETECTED_SPEECH`` with ``Speech-Type: detected-speech`` and a non-empty body
(plain text, or vosk JSON ``{"text": ...}`` when mod_vosk runs with ``return-json``), the
history gets the user message and the LLM is asked. With ``LLM_STREAM`` on, its reply is cut
into sentences as it streams (the first may be cut after its first clause, ``FIRST_CHUNK``,
to be heard sooner); each sentence is synthesized off the gevent loop into an 8 kHz
WAV (through the phrase cache) and broadcast as soon as it and every sentence before it are
ready. FreeSWITCH queues back-to-back ``uuid_broadcast``s and plays them in order (capture
playback/S1), so sentence 1 plays while the LLM still writes sentence 3. An LLM failure before
any sentence is answered with ``FALLBACK_PHRASE`` (synthesized at start-up).

Playback is followed from PLAYBACK_START/PLAYBACK_STOP (``Playback-File-Path``, and
``Playback-Status`` ``done`` or ``break``). While something of ours is queued or playing, caller
speech interrupts it (barge-in, ``BARGE_IN``): ``uuid_break <uuid> all`` stops the file and
drops the queued ones (capture playback/S2a), the rest of the reply is cancelled (LLM stream
closed, pending synthesis dropped), and the history keeps only the sentences the caller heard
to the end, marked as interrupted.

Hangup and barge-in skip the call's queue: :meth:`ConversationHandler.interrupt` runs in the
reader as each event arrives and only flips state, kills the turn and spawns the ``uuid_break``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gevent
import gevent.event
import gevent.queue
import structlog

from ivr_daemon.esl import commands
from ivr_daemon.esl.connection import CommandOutcomeUnknown, EslError, NotConnectedError
from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.history import (  # noqa: F401 (the turn's vocabulary, imported from here too)
    BEGIN_SPEAKING, FINAL_SPEECH, PARTIAL_SPEECH, ConversationHistory, speech_text, transcript_of,
)
from ivr_daemon.idle_lane import idle_lane
from ivr_daemon.llm.base import LlmError, Message, ToolCall, ToolSpec
from ivr_daemon.llm.paced import BatchedReads, lane_wait_s
from ivr_daemon.logs import get_logger
from ivr_daemon.sentences import FIRST_CLAUSE_MIN_WORDS, SentenceSplitter
from ivr_daemon.tts.base import TtsError
from ivr_daemon.turn_services import (  # noqa: F401 (imported from here too)
    TurnResult, TurnServices, prepare_fallback_wav,
)

log = get_logger(__name__)

HANGUP_EVENT = "CHANNEL_HANGUP_COMPLETE"
# What FreeSWITCH reports of our broadcasts: followed by interrupt() in the reader (10 of a
# call's 15 events); handle() starts no turn on them.
PLAYBACK_EVENTS = frozenset({"PLAYBACK_START", "PLAYBACK_STOP", "CHANNEL_EXECUTE_COMPLETE"})
RECONNECT_WAIT_S = 30.0  # how long a ready answer waits for the switch to come back
RETRY_PAUSE_S = 0.05
FIRST_AUDIO_MARGIN_S = 0.5
INTERRUPTED_MARK = "[interrupted by the caller]"


@dataclass
class _Spoken:
    """One broadcast sentence and what FreeSWITCH said about its playback."""

    sentence: str
    path: str
    started: bool = False
    status: str | None = None  # "done" | "break" from PLAYBACK_STOP


@dataclass
class _Reply:
    """The reply of one turn as it is spoken; its history entry is fixed up on barge-in."""

    spoken: list[_Spoken] = field(default_factory=list)
    history_entry: Message | None = None
    interrupted: bool = False
    fallback: bool = False  # the fallback phrase, not the model's words: never in history
    text: str = ""  # what the LLM wrote (all of it, or up to where its stream broke)
    llm_ms: float = 0.0  # until the first sentence was complete (streaming) or the whole reply
    lane_wait_ms: float = 0.0  # of the time before the first sentence, its answer's wait in the idle lane
    queued: int = 0  # sentences the LLM gave (each queued for synthesis)
    settled: int = 0  # of those, broadcast (in ``spoken``) or dropped
    llm_done: bool = False  # the LLM's answer is over: no sentence will be queued any more
    barge_in: bool = True  # caller speech may cut it (not a goodbye)
    started_s: float = field(default_factory=time.monotonic)
    first_path: Path | None = None  # the first broadcast's WAV
    first_broadcast: str | None = None  # FreeSWITCH's reply to it
    first_audio_s: float | None = None  # when it was sent
    tts_ms: float = 0.0  # synthesis of the first sentence
    tool_calls: list[ToolCall] = field(default_factory=list)  # what the LLM asked for besides words
    waiting_syntheses: list[gevent.Greenlet] = field(default_factory=list)  # for the first clause's; die with the turn
    # A turn's answer (not a phrase of the call flow): when the turn began. It is counted in
    # ivr_turns_total once it is over: sent and played, cut by the caller, or the call ended.
    turn_started_s: float | None = None
    sent_all: bool = False  # the turn sent everything it will: no more sentences of it
    counted: bool = False
    # Which turn this reply answers (the answer itself, or the answer to its tool calls), and
    # what the caller said (the answer only): for the call records.
    turn: int | None = None
    transcript: str | None = None

    @property
    def playing(self) -> bool:
        """Some broadcast of this reply is queued or playing in FreeSWITCH."""
        for item in self.spoken:  # not any(<generator>): asked for every partial transcript
            if item.status is None:
                return True
        return False

    @property
    def more_to_come(self) -> bool:
        """A sentence of this reply may still be broadcast: the LLM still writes, or one is synthesizing."""
        return not self.llm_done or self.settled < self.queued

    def heard_text(self) -> str:
        return " ".join(s.sentence for s in self.spoken if s.status == "done")


class ConversationHandler:
    """One call's conversation: implements :class:`ivr_daemon.calls.CallHandler`."""

    # FreeSWITCH reports the playback of what we broadcast (PLAYBACK_START/STOP), so a turn is
    # counted once its answer has played. False for a handler whose broadcasts nothing plays
    # (no switch behind ``send``): its turns are counted as soon as they have sent everything.
    follows_playback = True

    metrics_switch = property(lambda self: self.services.switch)  # the ``switch`` label of its metrics

    def __init__(self, call_uuid: str, call_log: structlog.stdlib.BoundLogger, services: TurnServices):
        self.call_uuid = call_uuid
        # What this call's own WAVs are named after: its UUID.
        self.wav_stem = call_uuid
        # Every per-call WAV path handed to a synthesis, deleted at clean-up. Not a glob of
        # TTS_OUTPUT_DIR: that compiled a fresh pattern and listed the whole directory on the
        # loop at every hangup (~1-4 ms each, growing with the live calls' files).
        self._own_wavs: list[Path] = []
        self.log = call_log
        self.services = services
        settings = services.settings
        self.history = ConversationHistory(settings.system_prompt, settings.max_conversation_history)
        self.turns = 0
        self.hung_up = False
        self._turn_greenlet: gevent.Greenlet | None = None
        self._reply: _Reply | None = None  # the latest reply that may still be playing
        # Turns' replies something else was said after while they still played (a goodbye after
        # the answer): followed to the end only for what the records say was heard of them.
        self._earlier_replies: list[_Reply] = []
        # This call's syntheses still running -> the per-call WAV each writes (None: a cache file).
        self._pending_syntheses: dict[gevent.event.AsyncResult, Path | None] = {}
        self._closed = False
        self._hangup_line: dict | None = None  # the hangup's fields, logged with the clean-up's
        self.barge_ins = 0
        # Set whenever what plays may have changed (PLAYBACK_*, barge-in, a reply's end):
        # waits for "our audio is over" wake on it.
        self._playback_changed = gevent.event.Event()

    @property
    def busy(self) -> bool:
        """A turn is in flight (asking the LLM, synthesizing or broadcasting)."""
        turn = self._turn_greenlet
        return turn is not None and not turn.dead

    @property
    def playing(self) -> bool:
        reply = self._reply
        # Between two sentences nothing plays, yet speech then cuts the answer; after the last
        # one has played it does not, even if the turn's greenlet has not finished yet.
        return reply is not None and not reply.interrupted and (
            reply.playing or (self.busy and bool(reply.spoken) and reply.more_to_come))

    @property
    def state(self) -> str:
        """speaking (something of ours is queued or playing), thinking (a turn is in flight) or listening."""
        if self.playing:
            return "speaking"
        return "thinking" if self.busy else "listening"

    # -- CallHandler: absorb and interrupt run in the reader, at once, and never block ---------

    def absorb(self, event: EslEvent) -> bool:
        """A partial transcript that cannot barge in (nothing of ours plays, or BARGE_IN is not
        ``partial``) is of no use to a turn: the reader drops it here. Only a final transcript
        starts one, and a repeat of a partial changes nothing, so it needs no dedup either."""
        headers = event.headers
        # The name first: decoded with every event, where Speech-Type is decoded when read.
        if headers.get("Event-Name") != "DETECTED_SPEECH" or headers.get("Speech-Type") != PARTIAL_SPEECH:
            return False
        reply = self._reply
        return (reply is None or reply.interrupted or not reply.barge_in or self.hung_up
                or self.services.settings.barge_in != "partial" or not self.playing)

    def interrupt(self, event: EslEvent) -> bool:
        """Hangup, playback and barge-in, at once. True (the event is not queued): a playback
        report, followed here, that :meth:`handle` would do nothing with."""
        name = event.headers.get("Event-Name")
        if name == HANGUP_EVENT:
            self.hung_up = True
            self._kill_turn()
        elif name in PLAYBACK_EVENTS:
            self._follow_playback(event, name)
            # Whatever waits on playback (a turn's count, the goodbye's PLAYBACK_STOP, the
            # silence clock, records) waits on what _follow_playback just did, not on handle.
            return not self._handle_would_learn(event)
        elif name == "DETECTED_SPEECH" and self._is_barge_in(event):
            self._barge_in(event)
        return False

    def _handle_would_learn(self, event: EslEvent) -> bool:
        """:meth:`handle` would do something with this playback report (``PLAYBACK_EVENTS``).
        A conversation's never does: it starts turns on final transcripts and cleans up at
        hangup. The call flow's learns the call from its first events (its override)."""
        return False

    def handle(self, event: EslEvent) -> None:
        if event.name == HANGUP_EVENT:
            hangup = {"hangup_cause": event.get("Hangup-Cause"), "turns": self.turns}
            if self._closed:
                self.log.info("call_hangup", **hangup)
            else:
                # One line for the hangup and its clean-up, said by close(): two lines a call
                # before, each ~50-90 µs of the loop's CPU.
                self._hangup_line = hangup
                self.close()
            return
        transcript = transcript_of(event)
        if transcript is None or self.hung_up:
            return
        if not self.services.accepting_turns:
            self.log.info("turn_refused_shutting_down", **self.services.spoken("transcript", transcript))
            return
        self._run_turn(self._turn, transcript, event.received_s)

    def _run_turn(self, work: Callable[..., object], *args, **kwargs) -> None:
        """Run ``work`` as the call's one turn (what barge-in and hangup cut short) and wait for it."""
        turn = self._turn_greenlet = gevent.spawn(work, *args, **kwargs)
        turn.join()
        self._playback_changed.set()  # "busy" just ended
        if turn.exception is not None:
            self.log.error("turn_failed", error=repr(turn.exception))

    def close(self) -> None:
        """Drop the history and delete this call's own WAVs, at once.

        A synthesis still running for the call cannot be stopped (it is native code on a
        worker thread), so its WAV is deleted when it lands: close() never waits for one, and
        no file of the call is left behind either way.
        """
        if self._closed:
            return
        self._closed = True
        self._kill_turn()
        if self._reply is not None and self._reply.sent_all:
            self._count_turn(self._reply)  # the call ended while it played: it was answered
        removed, late = self.delete_own_wavs()
        self.history = ConversationHistory(self.services.settings.system_prompt, 0)
        if self._hangup_line is not None:  # closed by the hangup: its line says both
            self.log.info("call_hangup", **self._hangup_line, wavs_deleted=removed, syntheses_still_running=late)
        else:
            self.log.info("call_cleaned_up", wavs_deleted=removed, syntheses_still_running=late)

    def delete_own_wavs(self) -> tuple[int, int]:
        """Delete the call's own WAVs now, and those of its syntheses still running when they
        land (never the cache's or pinned phrases). Returns (deleted now, still running)."""
        late = 0
        for pending, per_call_path in list(self._pending_syntheses.items()):
            if pending.ready() or self.services.cancel_synthesis(pending):
                continue  # done, or dropped before it started: no WAV will come
            if per_call_path is not None:
                pending.rawlink(lambda _done, path=per_call_path: self._delete_wav(path))
                late += 1
        own, self._own_wavs = self._own_wavs, []
        removed = sum(self._delete_wav(path) for path in own)
        return removed, late

    def _delete_wav(self, path: Path) -> bool:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            self.log.warning("wav_delete_failed", path=str(path), error=str(exc))
            return False

    def after_reconnect(self) -> None:
        """PLAYBACK_* events of the outage are lost: stop believing something still plays, or
        the caller's next words would count as barge-in on audio that ended long ago."""
        reply = self._reply
        if reply is None:
            return
        for item in reply.spoken:
            if item.status is None:
                item.status = "unknown"
        self._count_turn_if_over(reply)
        self._playback_changed.set()

    # -- playback and barge-in ----------------------------------------------------------------

    def _follow_playback(self, event: EslEvent, name: str) -> None:
        """What a playback report (``name``, one of PLAYBACK_EVENTS) says of our broadcasts.
        In the reader for 10 of a call's 15 events: each header is read once, from the headers."""
        self._playback_changed.set()
        reply = self._reply
        if reply is None:
            return
        headers = event.headers
        if name == "CHANNEL_EXECUTE_COMPLETE":
            # A file FreeSWITCH could not open: no PLAYBACK_* at all, only this (capture X11).
            # The response last: a file that played has started (its PLAYBACK_START came first),
            # so its "FILE%20PLAYED" is never decoded.
            if headers.get("Application") == "playback":
                path = headers.get("Application-Data")
                item = next((s for s in reply.spoken if s.path == path and not s.started), None)
                if item is not None and headers.get("Application-Response") == "FILE NOT FOUND":
                    item.status = "not-found"
                    self.log.error("playback_file_not_found", path=item.path)
                    self._count_turn_if_over(reply)
            return
        path = headers.get("Playback-File-Path")
        if not path:
            return
        starting = name == "PLAYBACK_START"
        for earlier in (reply, *self._earlier_replies) if self._earlier_replies else (reply,):
            # The current reply's, almost always. Plain loops: a generator for next() per
            # report cost more than the search.
            if starting:
                for item in earlier.spoken:
                    if item.path == path and not item.started:
                        item.started = True
                        return
                continue
            for item in earlier.spoken:
                if item.path == path and item.started and item.status is None:
                    break
            else:
                continue
            item.status = headers.get("Playback-Status") or "done"
            if earlier is reply:
                self._count_turn_if_over(reply)
            elif not earlier.playing:
                self._earlier_replies.remove(earlier)
                self._turn_changed(earlier)
            return

    def _is_barge_in(self, event: EslEvent) -> bool:
        mode = self.services.settings.barge_in
        if mode == "off" or self.hung_up or not self.playing or not self._reply.barge_in:
            return False
        speech_type = event.get("Speech-Type")
        if speech_type == BEGIN_SPEAKING:
            return mode == "partial"
        if speech_type not in ((PARTIAL_SPEECH, FINAL_SPEECH) if mode == "partial" else (FINAL_SPEECH,)):
            return False
        return len(speech_text(event).split()) >= self.services.settings.barge_in_min_words

    def _barge_in(self, event: EslEvent) -> None:
        reply = self._reply
        reply.interrupted = True
        self._playback_changed.set()
        self.barge_ins += 1
        self.services.metrics.barge_ins_total.labels(switch=self.metrics_switch).inc()
        self._count_turn(reply)  # interrupted, whether the turn still runs or its answer plays
        gevent.spawn(self._send_break)  # the one writer; the reader must not wait for its reply
        self._kill_turn()
        for item in reply.spoken:
            if item.status is None:
                item.status = "break" if item.started else "dropped"
        heard = reply.heard_text()
        if reply.history_entry is not None:
            reply.history_entry["content"] = f"{heard} {INTERRUPTED_MARK}".strip()
        elif not reply.fallback:
            reply.history_entry = self.history.add("assistant", f"{heard} {INTERRUPTED_MARK}".strip())
        self.log.info("barge_in", speech_type=event.get("Speech-Type"), **self.services.spoken("heard", heard),
                      sentences_heard=sum(s.status == "done" for s in reply.spoken), sentences=len(reply.spoken))

    def _send_break(self) -> None:
        try:
            reply = self.services.send(commands.uuid_break(self.call_uuid, all_=True))
            if not reply.ok:
                self.log.warning("uuid_break_rejected", reply=reply.text.strip())
        except (EslError, commands.UnsafeCommandArgument) as exc:
            self.log.error("uuid_break_not_sent", error=str(exc))

    def _kill_turn(self) -> None:
        turn = self._turn_greenlet
        if turn is not None and not turn.dead and turn is not gevent.getcurrent():
            turn.kill(block=False)

    def _count_turn_if_over(self, reply: _Reply) -> None:
        """Count a turn's answer once it has sent everything and nothing of it plays any more."""
        if reply.sent_all and not (self.follows_playback and reply.playing):
            self._count_turn(reply)

    def _count_turn(self, reply: _Reply | None, outcome: str | None = None) -> None:
        """ivr_turns_total, once per turn: interrupted (the caller cut it: barge-in, or hung up
        before it was sent) over fallback over answered. Phrases of the call flow do not count."""
        if reply is None:
            return
        if reply.turn is not None:
            self._turn_changed(reply)  # what was heard of it may have changed: records
        if reply.turn_started_s is None or reply.counted:
            return
        reply.counted = True
        outcome = outcome or ("interrupted" if reply.interrupted else "fallback" if reply.fallback else "answered")
        self.services.metrics.turns_total.labels(switch=self.metrics_switch, outcome=outcome).inc()

    # -- the turn -----------------------------------------------------------------------------

    def _turn(self, transcript: str, received_s: float = 0.0) -> None:
        started_s = time.monotonic()
        # How long the transcript waited (reader, call queue, an earlier turn) before this turn.
        queued_ms = (started_s - received_s) * 1000 if received_s else None
        self.turns += 1
        turn = self.turns
        log = self.log.bind(turn=turn)
        # At DEBUG (and only built when logged): an INFO line here cost ~0.3 ms of the loop before
        # the LLM request, and in a burst every later turn's request waited for it; turn_complete
        # says all it said.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("turn_started", **self.services.spoken("transcript", transcript))
        messages = self.history.ask(transcript)
        try:
            reply = self._speak(lambda reply, sentences: self._produce(messages, sentences, log, reply), log,
                                turn_started_s=started_s, turn=turn, transcript=transcript)
        except gevent.GreenletExit:
            # Killed: by a barge-in (counted there already) or by the hangup.
            self._count_turn(self._reply, "interrupted")
            raise
        reply.sent_all = True
        self._count_turn_if_over(reply)
        said = [s.sentence for s in reply.spoken if s.status != "not-sent"]
        if not reply.fallback and reply.text and not reply.interrupted:
            reply.history_entry = self.history.add("assistant", reply.text)
        total_ms = (time.monotonic() - started_s) * 1000
        first_audio_ms = (reply.first_audio_s - started_s) * 1000 if reply.first_audio_s else None
        result = TurnResult(
            self.call_uuid, turn, transcript, " ".join(said) if said else "", reply.fallback, reply.first_path,
            reply.first_broadcast, reply.llm_ms, reply.tts_ms, total_ms, first_audio_ms=first_audio_ms,
            sentences=len(said), interrupted=reply.interrupted,
        )
        log.info("turn_complete", **self.services.spoken("transcript", transcript),
                 **self.services.spoken("reply", result.reply), used_fallback=reply.fallback,
                 sentences=len(said), wav_path=str(reply.first_path) if reply.first_path else None,
                 broadcast=reply.first_broadcast, llm_ms=round(result.llm_ms, 1), tts_ms=round(reply.tts_ms, 1),
                 total_ms=round(total_ms, 1), first_audio_ms=round(first_audio_ms, 1) if first_audio_ms else None,
                 lane_wait_ms=round(reply.lane_wait_ms, 1),
                 queued_ms=round(queued_ms, 2) if queued_ms is not None else None, received_s=received_s or None,
                 tool_calls=[call.name for call in reply.tool_calls] or None)
        if self.services.on_turn is not None:
            self.services.on_turn(result)
        self._turn_completed(result)
        self._after_reply(reply, messages, log)

    def _turn_completed(self, result: TurnResult) -> None:
        """A turn's answer is sent (or cut); the call flow tells the webhook receiver."""

    def _turn_changed(self, reply: _Reply) -> None:
        """A turn's reply is over or changed (cut, played out): the call flow records it."""

    def _after_reply(self, reply: _Reply, messages: list[Message], log) -> None:
        """What a reply leads to once spoken (tool calls: transfer, end the call); the call flow's."""

    def _tools(self) -> tuple[ToolSpec, ...]:
        """The tools the LLM is offered; none for a plain conversation."""
        return ()

    def _say(self, text: str, log, kind: str, barge_in: bool = True, pinned: bool = True) -> _Reply:
        """Speak a fixed text like a reply: one of the daemon's own phrases (``pinned``: at once,
        even with the LLM down), or words said before (through the cache or a per-call WAV).
        Barge-in works on it when ``barge_in``, and the history keeps what was heard."""

        def produce(reply: _Reply, sentences: gevent.queue.Queue) -> None:
            reply.text = text
            reply.queued = 1
            per_call_path = self.services.settings.tts_output_dir / f"{self.wav_stem}-{kind}-{self.turns:04d}.wav"
            if not pinned:
                self._own_wavs.append(per_call_path)
            pending = (self.services.pinned_phrase(text) if pinned
                       else self.services.spawn_synthesis(text, per_call_path))
            sentences.put((text, pending, False))
            reply.llm_done = True
            sentences.put(None)

        reply = self._speak(produce, log, barge_in=barge_in)
        if reply.first_path is not None and not reply.interrupted and not reply.fallback:
            reply.history_entry = self.history.add("assistant", text)
        log.info("phrase_said", kind=kind, sent=reply.first_path is not None, interrupted=reply.interrupted,
                 first_audio_ms=round((reply.first_audio_s - reply.started_s) * 1000, 1) if reply.first_audio_s else None)
        return reply

    def _speak(self, produce: Callable[[_Reply, gevent.queue.Queue], None], log, barge_in: bool = True,
               turn_started_s: float | None = None, turn: int | None = None,
               transcript: str | None = None) -> _Reply:
        """Broadcast, in order and as each is ready, the sentences ``produce`` queues (with their
        pending syntheses); the fallback phrase if nothing is ready by the first-audio deadline.
        ``turn_started_s``: this is a turn's answer (metrics); ``turn``: the turn it answers
        (records; ``transcript`` for the answer itself)."""
        previous = self._reply
        if previous is not None and previous.sent_all:
            self._count_turn(previous)  # something else speaks now: that answer is over
        if previous is not None and previous.turn is not None and previous.playing:
            self._earlier_replies = [*self._earlier_replies[-3:], previous]
        reply = self._reply = _Reply(barge_in=barge_in, turn_started_s=turn_started_s, turn=turn,
                                     transcript=transcript)
        sentences: gevent.queue.Queue = gevent.queue.Queue()
        producer = gevent.spawn(produce, reply, sentences)
        # No dead air: the first audio goes out by LLM_TIMEOUT (+ a margin that lets the LLM
        # client's own timeout, which says more, fire first), or the fallback phrase does.
        first_audio_deadline_s = reply.started_s + self.services.settings.llm_timeout_s + FIRST_AUDIO_MARGIN_S
        try:
            index = 0
            while True:
                wait_s = None if reply.first_path else max(0.0, first_audio_deadline_s - time.monotonic())
                try:
                    job = sentences.get(timeout=wait_s)
                    counted = 1
                except gevent.queue.Empty:
                    log.error("no_answer_in_time", waited_s=round(time.monotonic() - reply.started_s, 2))
                    job, counted = ("", None, True), 0
                if job is None:
                    break
                sentence, pending, is_fallback = job
                if pending is None:
                    pending = self.services.pinned_phrase(self.services.settings.fallback_phrase)
                index += 1
                synth_started_s = time.monotonic()
                # Before the first audio: what is left until the deadline. After it a sentence
                # may take as long as the LLM may, then it is skipped: a stuck engine must not
                # hold the call (the LLM side is bounded by the client's own timeouts).
                wait_s = (self.services.settings.llm_timeout_s if reply.first_path
                          else max(0.0, first_audio_deadline_s - time.monotonic()))
                path = self._wait_synthesis(pending, sentence, log, wait_s)
                if index == 1:
                    reply.tts_ms = (time.monotonic() - synth_started_s) * 1000
                if path is None and not reply.first_path and not is_fallback:
                    # The answer cannot be spoken (TTS failed or took too long): say the
                    # fallback instead, and drop the rest of this answer.
                    is_fallback, sentence = True, ""
                    path = self._wait_synthesis(self.services.pinned_phrase(self.services.settings.fallback_phrase),
                                                "(fallback phrase)", log, self.services.settings.llm_timeout_s)
                if path is None or self.hung_up or reply.interrupted:
                    reply.settled += counted
                    if is_fallback:
                        break  # one fallback per turn, at most: never again on every pass
                    continue
                # Known before it is sent: FreeSWITCH may start and end it before send() returns
                # here (the reader handles PLAYBACK_START/STOP before this greenlet runs again).
                item = _Spoken(sentence, str(path))
                reply.spoken.append(item)
                reply.settled += counted
                text = self._broadcast(path, log)
                if text is None:
                    item.status = "not-sent"
                else:
                    reply.fallback = reply.fallback or is_fallback
                    if reply.first_path is None:
                        reply.first_path, reply.first_broadcast, reply.first_audio_s = path, text, time.monotonic()
                        if reply.turn_started_s is not None:
                            self.services.metrics.turn_first_audio_seconds.labels(switch=self.metrics_switch).observe(
                                reply.first_audio_s - reply.turn_started_s)
                if is_fallback:
                    # Sent or refused (-ERR, a call that just went away), the fallback is the
                    # turn's last word: trying it again would loop until the LLM gives up.
                    break
        finally:
            if not producer.dead:
                producer.kill()  # closes the LLM stream if the turn was cut short
            gevent.killall([g for g in reply.waiting_syntheses if not g.dead], block=False)
            # Cut short (barge-in, hangup): what is still queued of this answer will never play.
            for pending in list(self._pending_syntheses):
                self.services.cancel_synthesis(pending)
            self._playback_changed.set()
        return reply

    def _produce(self, messages: list[Message], sentences: gevent.queue.Queue, log, reply: _Reply,
                 tools: tuple[ToolSpec, ...] | None = None) -> None:
        """Read the LLM, cut sentences, start each one's synthesis; None at the end. Tool calls
        the LLM makes are kept in ``reply.tool_calls``. ``tools``: offered instead of ``_tools()``
        (``()``: the LLM must answer in words)."""
        started_s = time.monotonic()
        # FIRST_CHUNK=clause: the first chunk may be a clause, heard while the rest of its sentence
        # is synthesized: two broadcasts, one sentence for MAX_REPLY_SENTENCES.
        clause = self.services.settings.first_chunk == "clause"
        splitter = SentenceSplitter(first_clause_min_words=FIRST_CLAUSE_MIN_WORDS if clause else 0)
        max_sentences = self.services.settings.max_reply_sentences
        submitted: list[str] = []
        parts: list[str] = []
        first_clause: list[gevent.event.AsyncResult] = []  # the first chunk's synthesis, when a clause

        def submit(sentence: str) -> bool:
            """Queue one chunk's synthesis; False once the reply has said enough sentences."""
            if not submitted:
                # The LLM's time to the first chunk: not the time its answer waited in the idle
                # lane for a loop with nothing more urgent (the daemon's own queueing, said apart).
                reply.lane_wait_ms = lane_wait_s() * 1000
                reply.llm_ms = (time.monotonic() - started_s) * 1000 - reply.lane_wait_ms
                first_sentence = self.services.metrics.llm_first_sentence_seconds
                first_sentence.labels(switch=self.metrics_switch).observe(reply.llm_ms / 1000)
            submitted.append(sentence)
            path = self.services.settings.tts_output_dir / f"{self.wav_stem}-{self.turns:04d}-{len(submitted):02d}-{os.getpid()}.wav"
            self._own_wavs.append(path)  # written there unless the cache serves it: deleted at clean-up
            # The first chunk is what the caller waits for; the later ones have until it has played.
            pending = self._synthesis_after_first_clause(sentence, path, reply, first_clause, urgent=not submitted[1:])
            if not submitted[1:] and splitter.first_chunk_is_clause:
                first_clause.append(pending)
            if not pending.ready():
                self._pending_syntheses[pending] = None if self.services.cache is not None else path
                pending.rawlink(lambda done: self._pending_syntheses.pop(done, None))
            reply.queued += 1
            sentences.put((sentence, pending, False))
            return len(submitted) - (1 if splitter.first_chunk_is_clause else 0) < max_sentences

        def submit_all(new_sentences: list[str]) -> bool:
            return all(submit(sentence) for sentence in new_sentences)

        stream = None
        tools = self._tools() if tools is None else tools
        try:
            cut = False
            if self.services.settings.llm_stream:
                stream = self.services.llm.stream(messages, tools) if tools else self.services.llm.stream(messages)
                reads = BatchedReads(stream, self.services.settings.llm_stream_batch_ms / 1000)
                for delta in reads:
                    if isinstance(delta, ToolCall):
                        reply.tool_calls.append(delta)  # acted on once the words before it are said
                        continue
                    parts.append(delta)
                    ready = splitter.feed(delta)
                    if not submit_all(ready):
                        cut = True  # a model that loops: stop reading, stop speaking
                        break
                    if ready:
                        # The rest of the reply is needed once this sentence has played: it is
                        # read when the loop has nothing more urgent to do (this sentence's
                        # broadcast, other turns' requests and first sentences), not before,
                        # and in batches (LLM_STREAM_BATCH_MS).
                        reads.batch_from_now()
                        idle_lane().wait()
                else:
                    submit_all(splitter.flush())
            else:
                if tools:
                    whole, reply.tool_calls[:] = self.services.llm.respond(messages, tools)
                else:
                    whole = self.services.llm.complete(messages)
                parts.append(whole)
                kept, cut = at_most_sentences(whole, max_sentences)
                if kept.strip():
                    submit(kept)  # one broadcast, FIRST_CHUNK or not: the LLM's whole wait is paid
            if cut:
                log.warning("reply_cut", max_reply_sentences=max_sentences)
            # The history holds what the caller is told, not what a runaway model went on to say.
            reply.text = " ".join(submitted) if cut else "".join(parts).strip()
        except LlmError as exc:
            log.error("llm_failed", error=str(exc), error_type=type(exc).__name__, sentences_before=len(submitted))
            self.services.metrics.note_llm_error(exc)
            if not submitted:
                reply.queued += 1
                sentences.put((self.services.settings.fallback_phrase, None, True))
            else:
                # What was said stands; the history keeps what the LLM produced before it broke.
                reply.text = " ".join(submitted)
        finally:
            if stream is not None:
                stream.close()
            reply.llm_done = True
            sentences.put(None)

    def _synthesis_after_first_clause(self, sentence: str, path: Path, reply: _Reply,
                                      first_clause: list[gevent.event.AsyncResult],
                                      urgent: bool = True) -> gevent.event.AsyncResult:
        """``sentence``'s synthesis; after a first clause, started once the clause's has landed: beside
        it, it would take a core from the clause, and it is needed only once the clause has played."""
        first = first_clause[0] if first_clause else None
        if first is None or first.ready():
            return self.services.spawn_synthesis(sentence, path, urgent=urgent)
        chained = gevent.event.AsyncResult()

        def after_first() -> None:
            first.wait()  # its outcome is the first chunk's business, not this one's
            self.services.spawn_synthesis(sentence, path, urgent=urgent).rawlink(chained)  # lands when it does

        reply.waiting_syntheses.append(gevent.spawn(after_first))
        return chained

    def _wait_synthesis(self, pending: gevent.event.AsyncResult, sentence: str, log, timeout_s: float | None) -> Path | None:
        try:
            return pending.get(timeout=timeout_s)
        except TtsError as exc:
            log.error("tts_failed", error=str(exc), **self.services.spoken("sentence", sentence))
        except gevent.Timeout:
            log.error("tts_too_slow", waited_s=timeout_s, **self.services.spoken("sentence", sentence))
        return None

    def _broadcast(self, wav_path: Path, log) -> str | None:
        try:
            command = commands.uuid_broadcast(self.call_uuid, str(wav_path), "aleg")
        except commands.UnsafeCommandArgument as exc:
            log.error("broadcast_refused", error=str(exc))
            return None
        give_up_s = time.monotonic() + RECONNECT_WAIT_S
        while True:
            try:
                reply = self.services.send(command)
                break
            except NotConnectedError as exc:
                # Not sent: the switch is away. Wait for the reconnect (the resync ends this
                # call if it is gone) and send it then: the caller still gets the answer.
                log.warning("broadcast_waiting_for_reconnect", error=str(exc))
                remaining_s = give_up_s - time.monotonic()
                if (self.hung_up or self.services.wait_connected is None or remaining_s <= 0
                        or not self.services.wait_connected(remaining_s)):
                    log.error("broadcast_not_sent", error=str(exc))
                    return None
                gevent.sleep(RETRY_PAUSE_S)  # never spin, even if "connected" turns out stale
                if self.hung_up:
                    return None
            except CommandOutcomeUnknown as exc:
                # Written, unanswered: it may have played. Sending it again could say it twice.
                log.warning("broadcast_outcome_unknown", error=str(exc))
                return None
            except EslError as exc:
                log.error("broadcast_not_sent", error=str(exc))
                return None
        if not reply.ok:
            log.warning("broadcast_rejected", reply=reply.text.strip())
            return None
        return reply.text.strip()


def at_most_sentences(text: str, max_sentences: int) -> tuple[str, bool]:
    """The first ``max_sentences`` sentences of ``text``, and whether anything was cut."""
    splitter = SentenceSplitter()
    sentences = [*splitter.feed(text), *splitter.flush()]
    if len(sentences) <= max_sentences:
        return text, False
    return " ".join(sentences[:max_sentences]), True


def conversation_factory(services: TurnServices):
    """The handler factory the router calls for each new call UUID."""

    def make(call_uuid: str, call_log: structlog.stdlib.BoundLogger) -> ConversationHandler:
        return ConversationHandler(call_uuid, call_log, services)

    return make
