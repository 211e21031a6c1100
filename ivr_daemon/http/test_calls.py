"""Test conversations: a phone call's turns without a phone, for ``POST /test/transcription``.

A :class:`TestCall` is a :class:`~ivr_daemon.call_flow.PhoneCall` whose switch is the HTTP
response. Its turn is the phone call's own code path, the one a mod_vosk final transcript
takes (goodbye and operator words, history, the agent's LLM with its tools, sentence
splitting, synthesis on the thread pool through the phrase cache, the first-audio deadline,
the fallback phrase), with three differences, all at the switch's edge:

- a sentence that would be broadcast is kept instead, and counts as played to the end at once
  (nothing plays, so nothing can be barged in on);
- a hangup (``end_call``, goodbye words) or an allowed transfer says its phrase and is reported
  (``X-Call-Action``) instead of being sent; the conversation goes on afterwards;
- no silence watch: a test call has no line to be silent on.

Test calls are kept apart from live ones (their own table, their WAVs named ``test-<random>-``
so no live call's clean-up can match them), one turn at a time each, and are forgotten after
``IDLE_S`` without a turn (:meth:`TestCalls.sweep`, run every minute) or on DELETE.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gevent
import gevent.lock

from ivr_daemon.agents import TransferTarget
from ivr_daemon.audio import TELEPHONY_RATE_HZ, join_telephony_wavs
from ivr_daemon.call_flow import CallFlowServices, PhoneCall
from ivr_daemon.conversation import FINAL_SPEECH, ConversationHistory, _Reply
from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.logs import get_logger

log = get_logger(__name__)

IDLE_S = 30 * 60.0  # a test conversation without a turn for this long is forgotten
SWEEP_INTERVAL_S = 60.0
MAX_TEST_CALLS = 1000  # past this, the longest-idle one is forgotten first (bounded memory)


@dataclass(frozen=True)
class TestAnswer:
    """What one test turn said: the WAV body and what goes into the headers."""

    wav: bytes
    frames: int
    text: str  # every sentence in the WAV, in order (the fallback phrase when it was said)
    used_fallback: bool
    actions: tuple[str, ...]  # "end_call", "transfer:<name>": what a phone call would have done
    turn: int

    @property
    def duration_s(self) -> float:
        return self.frames / TELEPHONY_RATE_HZ


class TestCallBusy(Exception):
    """A turn of this test call is already in flight."""


class TestCallsFull(Exception):
    """Every one of the MAX_TEST_CALLS test calls has a turn in flight."""

# The ``switch`` label of the metrics of test calls (POST /test/turn, the talk page).
TEST_CALL_SWITCH = "test"

class AgentMismatch(Exception):
    """The test call exists and talks to another agent."""


class TestCall(PhoneCall):
    """One test conversation: a phone call's turns, answered into a WAV instead of a channel."""

    __test__ = False  # not a pytest test class, whatever its name says
    follows_playback = False  # nothing plays what it "broadcasts": a turn is over once all is sent
    metrics_switch = TEST_CALL_SWITCH  # on no switch: its turns count apart from the phone calls'

    def __init__(self, call_uuid: str, flow: CallFlowServices, agent_name: str, now_s: float):
        call_log = log.bind(call_uuid=call_uuid, test_call=True, agent=agent_name)
        super().__init__(call_uuid, call_log, flow)
        services = flow.by_agent[agent_name]
        self.agent_name = agent_name
        self.services = services
        self.history = ConversationHistory(services.settings.system_prompt, services.settings.max_conversation_history)
        # Random, fixed length: no live call's glob ("<uuid>-*.wav") and no other test call's matches it.
        self.wav_stem = f"test-{secrets.token_hex(8)}"
        self.last_used_s = now_s
        self._one_turn = gevent.lock.Semaphore()
        self._said: list[tuple[str, Path]] = []  # (sentence, WAV) as a phone call would broadcast them
        self._replies: list[_Reply] = []
        self._actions: list[str] = []

    @property
    def in_turn(self) -> bool:
        return self._one_turn.locked()

    @property
    def forgotten(self) -> bool:
        """DELETEd (or swept, or shut down): a turn in flight was cut."""
        return self._closed

    def answer(self, transcript: str) -> TestAnswer:
        """Run one turn on ``transcript`` and return what it said; raises TestCallBusy."""
        if not self._one_turn.acquire(blocking=False):
            raise TestCallBusy(self.call_uuid)
        try:
            self._said, self._replies, self._actions = [], [], []
            self.ended = False  # a goodbye or transfer is reported; the test conversation goes on
            # The final transcript as mod_vosk sends it (vosk JSON: the text is taken as it is).
            self.handle(EslEvent(headers={"Event-Name": "DETECTED_SPEECH", "Speech-Type": FINAL_SPEECH,
                                          "Unique-ID": self.call_uuid},
                                 body=json.dumps({"text": transcript}), received_s=time.monotonic()))
            try:
                # Reading, joining and encoding the WAVs is CPU and file work: on the synthesis
                # pool's thread, as synthesis is, so the loop stays free for ESL events (through
                # its queue: behind phone callers' first words, not beside them).
                paths = [path for _sentence, path in self._said]
                wav, frames = self.services.synth_queue.submit(join_telephony_wavs, paths, urgent=False).get()
            finally:
                # The answer is in memory now: no per-call file is left behind (cache files stay).
                self.delete_own_wavs()
            return TestAnswer(wav, frames, " ".join(sentence for sentence, _path in self._said),
                              any(reply.fallback for reply in self._replies), tuple(self._actions), self.turns)
        finally:
            self._one_turn.release()

    # -- where a phone call would talk to the switch ----------------------------------------

    def _broadcast(self, wav_path: Path, log) -> str | None:
        # _speak has just appended this sentence's item to the reply, as it does before every
        # broadcast: it is "played" to the end at once, so nothing is left playing.
        item = self._reply.spoken[-1]
        item.started, item.status = True, "done"
        # A sentence the TTS could not say is replaced by the fallback phrase with no text of its own.
        self._said.append((item.sentence or self.services.settings.fallback_phrase, wav_path))
        return "+OK (test call: kept for the HTTP answer)"

    def _speak(self, *args, **kwargs) -> _Reply:
        reply = super()._speak(*args, **kwargs)
        self._replies.append(reply)
        return reply

    def _hang_up(self, reason: str) -> None:
        self._actions.append("end_call")
        self.log.info("test_call_would_hang_up", reason=reason)

    def _send_transfer(self, target: TransferTarget, source: str) -> None:
        self._actions.append(f"transfer:{target.name}")
        self.log.info("test_call_would_transfer", target=target.name, source=source)

    def _start_silence_watch(self) -> None:
        """No silence watch: a test call has no line to be silent on."""


class TestCalls:
    """Every test conversation by its ``call_uuid``, apart from the live calls."""

    __test__ = False

    def __init__(self, flow: CallFlowServices, *, idle_s: float = IDLE_S, max_calls: int = MAX_TEST_CALLS,
                 now_s: Callable[[], float] = time.monotonic):
        self.flow = flow
        self.idle_s = idle_s
        self.max_calls = max_calls
        self._now_s = now_s
        self._calls: OrderedDict[str, TestCall] = OrderedDict()  # least recently used first
        self._sweeper: gevent.Greenlet | None = None

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, call_uuid: str) -> bool:
        return call_uuid in self._calls

    def open(self, call_uuid: str, agent_name: str | None) -> TestCall:
        """The test call ``call_uuid``, made on first use with ``agent_name`` (None: the default
        agent). Raises AgentMismatch, TestCallsFull."""
        call = self._calls.get(call_uuid)
        if call is not None:
            if agent_name is not None and agent_name != call.agent_name:
                raise AgentMismatch(call.agent_name)
            self._calls.move_to_end(call_uuid)
        else:
            if len(self._calls) >= self.max_calls:
                self._make_room()
            call = TestCall(call_uuid, self.flow, agent_name or self.flow.default_agent, self._now_s())
            self._calls[call_uuid] = call
            call.log.info("test_call_opened", test_calls=len(self._calls))
        call.last_used_s = self._now_s()
        return call

    def touch(self, call: TestCall) -> None:
        """A turn of ``call`` just ended: its idle time starts now."""
        call.last_used_s = self._now_s()

    def forget(self, call_uuid: str, reason: str = "deleted") -> bool:
        """Drop the conversation (a turn in flight is cut) and its files; False if unknown."""
        call = self._calls.pop(call_uuid, None)
        if call is None:
            return False
        call.log.info("test_call_forgotten", reason=reason, turns=call.turns)
        call.close()
        return True

    def sweep(self) -> int:
        """Forget every test call idle for ``idle_s`` or more; how many were."""
        now_s = self._now_s()
        idle = [uuid for uuid, call in self._calls.items()
                if not call.in_turn and now_s - call.last_used_s >= self.idle_s]
        for uuid in idle:
            self.forget(uuid, reason="idle")
        return len(idle)

    def _make_room(self) -> None:
        oldest = next((uuid for uuid, call in self._calls.items() if not call.in_turn), None)
        if oldest is None:
            raise TestCallsFull(self.max_calls)
        self.forget(oldest, reason="too_many_test_calls")

    def start_sweeping(self, interval_s: float = SWEEP_INTERVAL_S) -> None:
        def sweep_forever() -> None:
            while True:
                gevent.sleep(interval_s)
                try:
                    self.sweep()
                except Exception:
                    log.exception("test_call_sweep_failed")

        if self._sweeper is None:
            self._sweeper = gevent.spawn(sweep_forever)

    def close(self) -> None:
        """Stop sweeping and forget every test call (at shutdown)."""
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
            self._sweeper = None
        for uuid in list(self._calls):
            self.forget(uuid, reason="shutdown")
