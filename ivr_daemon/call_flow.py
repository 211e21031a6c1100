"""The phone call around the turns: its agent, the greeting, silence, DTMF, transfers and the goodbye.

:class:`PhoneCall` is the call handler ``ivr-daemon run`` uses. From answer to hangup:

1. **Agent**: the channel variable ``ivr_agent`` (``variable_ivr_agent`` on CHANNEL_ANSWER and
   CHANNEL_PARK; DTMF and DETECTED_SPEECH events carry no variables) picks the agent; an
   unknown name gets the default agent and a warning.
2. **Greeting** when the IVR leg parks: the leg whose CHANNEL_PARK carries
   ``variable_fire_asr_events: true`` (the dialplan sets it for mod_vosk). A loopback ``&park()``
   A leg parks too, with ``ivr_agent`` but without it, and a PBX parks calls for its own reasons:
   neither is greeted (captures dtmf/).
3. **Silence**: nothing of ours queued or playing, no turn in flight, and no caller speech or
   DTMF for ``silence_timeout_s``: the re-prompt; after ``max_reprompts`` in a row, the goodbye.
4. **Goodbye** (the LLM's ``end_call`` tool; goodbye words for LLMs without tools; DTMF
   ``hangup``; silence): the goodbye phrase, and after its PLAYBACK_STOP (or a bounded wait)
   ``uuid_kill <uuid> NORMAL_CLEARING``.
5. **DTMF**: the agent's map from digit to ``transfer:<target>``, ``hangup``, ``repeat`` or ``llm``.
6. **Transfer**: only to a *name* in the agent's allowlist; the destination comes from the
   agents file, never from the caller or the LLM. The transfer phrase plays, then
   ``uuid_transfer``; FreeSWITCH answers ``+OK`` even for a missing extension (capture S6b), so
   after it the call is left alone. Anything else is refused: nothing is sent, a warning and a
   counter, and the LLM is told (the caller hears its answer).
7. **Webhooks** (``webhook_url``, see :mod:`ivr_daemon.webhooks`): ``call.started`` when the IVR
   leg parks (or at its first turn, for a call up before the daemon started), ``turn.completed``,
   ``call.transferred`` and ``call.ended``, queued without waiting: the receiver never slows a call.
8. **HTTP tools** (the agent's ``tools``, see :mod:`ivr_daemon.tools`): each runs on its own
   greenlet once the words before it are said; if one takes longer than
   ``tool_filler_after_s`` the pinned filler phrase plays; the results (or errors) go back to
   the LLM, whose answer the caller hears. At most ``max_tool_calls`` tool rounds per turn: the
   last request offers no tools, so the model must answer in words.
8. **Dynamic variables** (an outbound call's ``--var``, :mod:`ivr_daemon.outbound`): channel
   variables named in ``ivr_variables`` (``a:b``) or by a ``{name}`` placeholder of the agent's
   system prompt or greeting, read from the events' ``variable_<name>``. They fill the
   placeholders per call and go to HTTP tools as ``variables``. A placeholder with no value
   (an inbound call without it): the system prompt stays as written and the greeting is not
   said (a template is never spoken aloud); both logged. A greeting with placeholders is not
   pinned: it is synthesized per call through the phrase cache.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Mapping

import gevent
import gevent.lock
import soundfile
import structlog

from ivr_daemon.agents import OPERATOR_TARGET, TransferTarget
from ivr_daemon.config import normalize_words
from ivr_daemon.conversation import (
    FINAL_SPEECH, ConversationHandler, ConversationHistory, TurnResult, TurnServices, _Reply, speech_text,
    transcript_of)
from ivr_daemon.esl import commands
from ivr_daemon.esl.connection import EslError
from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.llm.base import Message, ToolCall, ToolSpec
from ivr_daemon.outbound import BadCallRequest, fill, placeholders
from ivr_daemon.records.recorder import CallRecorder
from ivr_daemon.records.writer import RecordWriter
from ivr_daemon.tools import CallContext, HttpTool, ToolOutcome, run_tool
from ivr_daemon.webhooks import WebhookSender

HANGUP_CAUSE = "NORMAL_CLEARING"
# How long past its own length a goodbye or transfer phrase may take to report PLAYBACK_STOP.
PHRASE_STOP_MARGIN_S = 3.0
MAX_CALLER_NUMBER_CHARS = 64  # caller ID is the caller's to set: kept short
MAX_VARIABLE_CHARS = 256
MAX_DYNAMIC_VARIABLES = 32
VARIABLE_NAME_RE = re.compile(r"^[a-z0-9_]{1,64}$")
# What the call knows of itself, sent to HTTP tools as its variables (event header -> name).
# Dynamic variables (point 8) join them.
CALL_VARIABLES = {"Caller-Destination-Number": "destination_number", "Caller-Caller-ID-Name": "caller_name"}
# A tool greenlet's own gevent.Timeout ends it by timeout_s; this margin only guards a bug.
TOOL_JOIN_MARGIN_S = 2.0
END_CALL_TOOL = ToolSpec(
    "end_call",
    "End the phone call, after the caller said goodbye or has nothing more to ask. The caller hears a goodbye.",
    {"type": "object", "properties": {}, "additionalProperties": False},
)


def transfer_tool(target_names: list[str]) -> ToolSpec:
    """``transfer_call``: the target is one of the allowlisted names, nothing else."""
    return ToolSpec(
        "transfer_call",
        "Transfer the caller to a person or department. Use only when the caller asks for it.",
        {"type": "object", "properties": {"target": {"type": "string", "enum": target_names,
                                                     "description": "who to transfer to"}},
         "required": ["target"], "additionalProperties": False},
    )


@dataclass
class CallFlowCounters:
    """Counted across calls (the Prometheus metrics count the same, in ``services.metrics``)."""

    transfers: int = 0
    transfers_refused: int = 0
    hangups_by_ivr: int = 0
    unknown_agents: int = 0
    http_tool_calls: int = 0  # asked for by the LLM (valid arguments or not)
    http_tool_failures: int = 0  # of those, what the LLM was told failed
    tool_fillers: int = 0


@dataclass
class CallFlowServices:
    """The services of every agent, and which one a call gets when it names none."""

    by_agent: Mapping[str, TurnServices]
    default_agent: str
    counters: CallFlowCounters = field(default_factory=CallFlowCounters)
    webhooks: WebhookSender | None = None  # the daemon's; each agent's webhook_url says where to
    records: RecordWriter | None = None  # the daemon's call records (DATABASE_URL), None: not kept


class PhoneCall(ConversationHandler):
    """One call from answer to hangup; turns are :class:`ConversationHandler`'s."""

    def __init__(self, call_uuid: str, call_log: structlog.stdlib.BoundLogger, flow: CallFlowServices):
        super().__init__(call_uuid, call_log, flow.by_agent[flow.default_agent])
        self.flow = flow
        self.agent_name: str | None = None  # as the call named it (ivr_agent)
        self.caller_number: str | None = None  # Caller-Caller-ID-Number, for GET /calls
        self.variables: dict[str, str] = {}  # CALL_VARIABLES and the dynamic ones, for the HTTP tools
        self.dynamic_variables: dict[str, str] = {}  # point 8: they fill the prompts' placeholders
        self._prompt_filled = False
        self._prompt_warned = False
        self.greeted = False
        self.ended = False  # goodbye said or transferred: no more turns, no silence timer
        self.transferred_to: str | None = None
        self.reprompts = 0
        # When the caller last spoke or pressed a key: a timestamp, not an Event, so a partial
        # transcript (one every ~200 ms) costs the reader a clock read, not a greenlet switch.
        self._last_activity_s = time.monotonic()
        self._exclusive = gevent.lock.Semaphore()  # one thing speaks at a time: turn, phrase
        self._silence_watch: gevent.Greenlet | None = None
        self._last_reply_text = ""
        self._created_s = time.monotonic()
        self._started_sent = False  # call.started: call.ended only follows it
        self.recorder = CallRecorder(flow.records, call_uuid) if flow.records is not None else None

    @property
    def agent(self):
        return self.services.agent

    # -- CallHandler ----------------------------------------------------------------------------

    def absorb(self, event: EslEvent) -> bool:
        if not super().absorb(event):
            return False
        if self.agent_name is None and event.headers.get("variable_ivr_agent") is not None:
            return False  # it names the agent (DETECTED_SPEECH never does): learn it in handle()
        if speech_text(event):  # a non-empty partial: the caller spoke (_caller_spoke)
            self._caller_active()  # the silence clock starts again; nothing else to do with it
        return True

    def interrupt(self, event: EslEvent) -> bool:
        settled = super().interrupt(event)
        name = event.headers.get("Event-Name")  # read once: a playback report needs nothing more here
        if name == "DETECTED_SPEECH":
            if _caller_spoke(event):
                self._caller_active()
        elif name == "DTMF":
            self._caller_active()
            if (self.agent is not None and event.get("DTMF-Digit") in self.agent.dtmf
                    and not self.ended and self._reply is not None and self._reply.barge_in
                    and not self._reply.interrupted and (self.playing or self.busy)):
                self._barge_in(event)  # a key that does something cuts what plays, as speech does
        return settled

    def _handle_would_learn(self, event: EslEvent) -> bool:
        """What :meth:`handle` does with a playback report is learn the call (its records'
        times, agent, caller, variables: point 8), nothing else: no CHANNEL_PARK, DTMF or
        transcript. Each test below mirrors one learning step of handle and is True when that
        step could change something with this event; all False: handle would be a no-op.
        Usually from the call's third event on: one header read (``variable_ivr_variables``)."""
        recorder = self.recorder
        if recorder is not None and not (recorder.active and recorder.answered_at is not None):
            return True  # learn_times still reads the event's times
        if not (self._prompt_filled or self._prompt_warned):
            return True  # _fill_system_prompt would run again (and may warn)
        headers = event.headers  # read straight from the headers: no EslEvent.get frame per read
        if self.agent_name is None and headers.get("variable_ivr_agent") is not None:
            return True
        if self.caller_number is None and headers.get("Caller-Caller-ID-Number"):
            return True
        variables = self.variables
        for header, name in CALL_VARIABLES.items():
            if name not in variables and headers.get(header):
                return True
        known = self.dynamic_variables
        for name in self._watched_variable_names(event):
            if name not in known and headers.get(f"variable_{name}") is not None:
                return True
        return False

    def handle(self, event: EslEvent) -> None:
        if self.recorder is not None:
            self.recorder.learn_times(event.headers)
            if event.name == "CHANNEL_ANSWER":
                self.recorder.answered()
        if event.name == "CHANNEL_HANGUP_COMPLETE":
            if self._started_sent:
                self._emit("call.ended", {
                    "duration_s": round(time.monotonic() - self._created_s, 3), "turns": self.turns,
                    "hangup_cause": (event.get("Hangup-Cause") or "")[:64] or None,
                    "transferred_to": self.transferred_to})
            super().handle(event)  # the clean-up settles the turns: what was heard is known now
            if self.recorder is not None:
                self.recorder.end(self._record_fields(), event.get("Hangup-Cause"),
                                  self.services.settings.fallback_phrase)
            return
        self._learn_agent(event)
        if self.caller_number is None and event.get("Caller-Caller-ID-Number"):
            self.caller_number = event.get("Caller-Caller-ID-Number")[:MAX_CALLER_NUMBER_CHARS]
        for header, name in CALL_VARIABLES.items():
            if name not in self.variables and event.get(header):
                self.variables[name] = event.get(header)[:MAX_VARIABLE_CHARS]
        self._learn_dynamic_variables(event)
        if self.ended or self.hung_up:
            return
        if event.name == "CHANNEL_PARK" and event.get("variable_fire_asr_events") == "true":
            self._on_ivr_leg_parked()
        elif event.name == "DTMF":
            self._on_dtmf(event.get("DTMF-Digit") or "")
        else:
            transcript = transcript_of(event)
            if transcript is None:
                return
            self._start_silence_watch()  # a call already up when the daemon started
            if not self.services.accepting_turns:
                super().handle(event)  # says why it does nothing
            elif self._is_goodbye(transcript):
                self.log.info("goodbye_words_heard", **self.services.spoken("transcript", transcript))
                self._exclusively(self._goodbye, "goodbye_words")
            elif self._asks_for_operator(transcript):
                self.log.info("operator_words_heard", **self.services.spoken("transcript", transcript))
                self._exclusively(self._transfer, OPERATOR_TARGET, "operator_words")
            else:
                with self._exclusive:
                    super().handle(event)

    def close(self) -> None:
        watch = self._silence_watch
        if watch is not None and watch is not gevent.getcurrent():
            watch.kill(block=False)
        super().close()

    # -- agent, greeting --------------------------------------------------------------------------

    def _learn_agent(self, event: EslEvent) -> None:
        if self.agent_name is not None:
            return  # learnt: every later event of the call would only repeat it
        name = event.get("variable_ivr_agent")
        if name is None:
            return
        self.agent_name = name
        services = self.flow.by_agent.get(name)
        if services is None:
            self.flow.counters.unknown_agents += 1
            self.log.warning("unknown_agent", agent=name[:64], using=self.flow.default_agent)
            return
        self.log.info("call_agent", agent=name)
        if self.recorder is not None:
            self.recorder.update(self._record_fields())
        if services is not self.services:
            self.services = services
            self._prompt_filled = False  # the new agent's prompt, filled by the caller
            if len(self.history) == 0:
                self.history = ConversationHistory(services.settings.system_prompt,
                                                   services.settings.max_conversation_history)
            else:  # learnt late (a call up before the daemon started): keep what was said
                self.history.system_prompt = services.settings.system_prompt

    def _watched_variable_names(self, event: EslEvent) -> frozenset[str]:
        """The dynamic variables this event could teach: those it lists (``ivr_variables``) and
        the placeholders of the agent's prompts."""
        settings = self.services.settings
        return _watched_names(event.get("variable_ivr_variables") or "", settings.system_prompt or "",
                              settings.greeting or "")

    def _learn_dynamic_variables(self, event: EslEvent) -> None:
        learnt = False
        for name in self._watched_variable_names(event):
            value = event.get(f"variable_{name}")
            if value is not None and name not in self.dynamic_variables:
                self.dynamic_variables[name] = value[:MAX_VARIABLE_CHARS]
                self.variables.setdefault(name, self.dynamic_variables[name])
                learnt = True
        if learnt or not self._prompt_filled:
            self._fill_system_prompt()

    def _fill_system_prompt(self) -> None:
        raw = self.services.settings.system_prompt
        filled, missing = fill(raw, self.dynamic_variables)
        if not missing:
            self._prompt_filled = True
            if len(self.history) == 0 or self.history.system_prompt == raw:
                self.history.system_prompt = filled
        elif not self._prompt_warned and self.greeted:
            self._prompt_warned = True
            self.log.warning("system_prompt_placeholders_unfilled", missing=missing)

    def _on_ivr_leg_parked(self) -> None:
        if self.greeted:
            return
        self.greeted = True
        self._fill_system_prompt()
        if not self._prompt_filled:
            self._prompt_warned = True
            self.log.warning("system_prompt_placeholders_unfilled",
                             missing=fill(self.services.settings.system_prompt, self.dynamic_variables)[1])
        self._emit_started()
        if self.recorder is not None:
            self.recorder.begin(self._record_fields())
        greeting = self.services.settings.greeting
        if greeting and self.services.accepting_turns:
            filled, missing = fill(greeting, self.dynamic_variables)
            if missing:
                self.log.warning("greeting_not_said_placeholders_unfilled", missing=missing)
            elif filled != greeting or _placeholder_names(greeting):
                # Per call: not pinned (it differs per call), through the phrase cache.
                self._exclusively(self._say, filled, self.log, "greeting", True, False)
            else:
                self._exclusively(self._say, greeting, self.log, "greeting")
        self._start_silence_watch()

    # -- webhooks -------------------------------------------------------------------------------

    def _emit_started(self) -> None:
        if not self._started_sent:
            self._started_sent = True
            self._emit("call.started", {"agent": self.agent.name if self.agent is not None else None,
                                        "caller_number": self.caller_number, "variables": dict(self.variables),
                                        "dynamic_variables": dict(self.dynamic_variables)})

    def _emit(self, event_type: str, data: dict) -> None:
        """Queue an event for the agent's webhook receiver: returns at once, whatever it does."""
        url = self.services.settings.webhook_url
        if self.flow.webhooks is None or not url:
            return
        if event_type != "call.started":
            self._emit_started()  # a call up before the daemon started: its start is learnt late
        self.flow.webhooks.send(event_type, self.call_uuid, {"agent": self.agent.name if self.agent else None,
                                                             **data}, url=url)

    def _record_fields(self) -> dict:
        """What the call's record holds besides its times (records/recorder.py)."""
        return {"agent": self.agent.name if self.agent is not None else self.agent_name,
                "caller_number": self.caller_number, "variables": self.dynamic_variables,
                "transferred_to": self.transferred_to}

    def _turn_changed(self, reply: _Reply) -> None:
        if self.recorder is not None:
            self.recorder.reply_changed(reply, self._record_fields(), self.services.settings.fallback_phrase)

    def _turn_completed(self, result: TurnResult) -> None:
        if self._reply is not None and self._reply.turn == result.turn:
            self._turn_changed(self._reply)  # sent: its row now, what was heard of it follows
        self._emit("turn.completed", {
            "turn": result.turn, "transcript": result.transcript, "reply": result.reply,
            "interrupted": result.interrupted, "used_fallback": result.used_fallback,
            "first_audio_ms": round(result.first_audio_ms, 1) if result.first_audio_ms is not None else None,
            "llm_ms": round(result.llm_ms, 1), "total_ms": round(result.total_ms, 1)})

    # -- silence --------------------------------------------------------------------------------

    def _start_silence_watch(self) -> None:
        if self._silence_watch is None and self.services.settings.silence_timeout_s > 0:
            self._silence_watch = gevent.spawn(self._watch_silence)

    def _caller_active(self) -> None:
        self.reprompts = 0  # any speech resets the count
        self._last_activity_s = time.monotonic()

    def _watch_silence(self) -> None:
        """Re-prompt after ``silence_timeout_s`` of silence while nothing of ours plays; the
        goodbye after ``max_reprompts`` re-prompts in a row. The clock runs only while idle, from
        the later of the caller's last speech (or key) and the moment our audio ended."""
        idle_since_s = time.monotonic()
        while not (self.hung_up or self.ended or self._closed) and self.services.accepting_turns:
            timeout_s = self.services.settings.silence_timeout_s
            self._playback_changed.clear()
            if self.busy or self.playing:
                self._playback_changed.wait()
                idle_since_s = time.monotonic()
                continue
            silent_s = time.monotonic() - max(idle_since_s, self._last_activity_s)
            if silent_s < timeout_s:
                # Speech meanwhile moves the deadline: checked when this one is reached.
                self._playback_changed.wait(timeout_s - silent_s)
                continue
            if self.hung_up or self.ended or self.busy or self.playing or not self.services.accepting_turns:
                continue
            if self.reprompts >= self.services.settings.max_reprompts:
                self.log.info("silence_goodbye", reprompts=self.reprompts)
                self._exclusively(self._goodbye, "silence")
                return
            self.reprompts += 1
            self.log.info("silence_reprompt", reprompt=self.reprompts, silence_s=timeout_s)
            self._exclusively(self._say, self.services.settings.reprompt_phrase, self.log, "reprompt")
            idle_since_s = time.monotonic()

    # -- DTMF -----------------------------------------------------------------------------------

    def _on_dtmf(self, digit: str) -> None:
        action = self.agent.dtmf.get(digit) if self.agent is not None else None
        if action is None:
            self.log.info("dtmf_ignored", digit=digit[:4])
            return
        self.log.info("dtmf", digit=digit, action=action.kind, target=action.target)
        if action.kind == "transfer":
            self._exclusively(self._transfer, action.target, "dtmf")
        elif action.kind == "hangup":
            self._exclusively(self._goodbye, "dtmf")
        elif action.kind == "repeat":
            if self._last_reply_text:
                self._exclusively(self._say, self._last_reply_text, self.log, "repeat", True, False)
        elif action.kind == "llm":
            with self._exclusive:
                self._run_turn(self._turn, f"[the caller pressed {digit}]")

    # -- goodbye and transfer ---------------------------------------------------------------------

    def _goodbye(self, reason: str) -> None:
        self.ended = True
        reply = self._say(self.services.settings.goodbye_phrase, self.log, "goodbye", barge_in=False)
        self._wait_played(reply)
        if self.hung_up:
            return
        self._hang_up(reason)

    def _hang_up(self, reason: str) -> None:
        """``uuid_kill``: the IVR ends the call, once its goodbye has played."""
        try:
            answer = self.services.send(commands.uuid_kill(self.call_uuid, HANGUP_CAUSE))
            self.flow.counters.hangups_by_ivr += 1
            self.services.metrics.hangups_by_ivr_total.labels(switch=self.metrics_switch, reason=reason).inc()
            self.log.info("call_hung_up_by_ivr", reason=reason, reply=answer.text.strip()[:80])
        except (EslError, commands.UnsafeCommandArgument) as exc:
            self.log.error("uuid_kill_not_sent", reason=reason, error=str(exc))

    def _transfer(self, requested: object, source: str) -> str | None:
        """Transfer to the allowlisted target called exactly ``requested``: None once done (or
        tried); else, sending nothing, why it was refused (what the LLM is told)."""
        targets = self.agent.transfer_targets if self.agent is not None else {}
        target = targets.get(requested) if isinstance(requested, str) else None
        if target is None:
            return self._refuse_transfer(requested, source)
        self.ended = True
        reply = self._say(self.services.settings.transfer_phrase, self.log, "transfer", barge_in=False)
        self._wait_played(reply)
        if self.hung_up:
            return None
        self._send_transfer(target, source)
        return None

    def _send_transfer(self, target: TransferTarget, source: str) -> None:
        """``uuid_transfer`` to an allowlisted target, once the transfer phrase has played."""
        try:
            answer = self.services.send(
                commands.uuid_transfer(self.call_uuid, target.destination, target.dialplan, target.context))
        except (EslError, commands.UnsafeCommandArgument) as exc:
            self.log.error("transfer_not_sent", target=target.name, error=str(exc))
            return
        self.transferred_to = target.name
        if self.recorder is not None:
            self.recorder.update(self._record_fields())
        self._emit("call.transferred", {"target": target.name, "source": source})
        self.flow.counters.transfers += 1
        self.services.metrics.transfers_total.labels(switch=self.metrics_switch).inc()
        # +OK even for an extension that does not exist (capture S6b): the switch owns the call now.
        self.log.info("call_transferred", target=target.name, source=source, reply=answer.text.strip()[:80],
                      destination=f"{target.destination} {target.dialplan} {target.context}")

    def _refuse_transfer(self, requested: object, source: str) -> str:
        """Send nothing; log and count it; what the LLM is told."""
        targets = self.agent.transfer_targets if self.agent is not None else {}
        self.flow.counters.transfers_refused += 1
        self.services.metrics.transfers_refused_total.labels(switch=self.metrics_switch).inc()
        self.log.warning("transfer_refused", requested=repr(requested)[:120], source=source, allowed=sorted(targets))
        allowed = ", ".join(sorted(targets)) or "none"
        return f"Transfer refused: {str(requested)[:60]!r} is not an allowed target. Allowed: {allowed}."

    def _wait_played(self, reply: _Reply) -> None:
        """Until every broadcast of ``reply`` has stopped playing, at most its length + a margin."""
        paths = [item.path for item in reply.spoken if item.status is None]
        if not paths:
            return
        try:
            budget_s = sum(soundfile.info(path).duration for path in paths) + PHRASE_STOP_MARGIN_S
        except (OSError, RuntimeError):
            budget_s = 30.0
        with gevent.Timeout(budget_s, False):
            while not self.hung_up and any(item.status is None for item in reply.spoken):
                self._playback_changed.clear()
                self._playback_changed.wait()
        if any(item.status is None for item in reply.spoken) and not self.hung_up:
            self.log.warning("playback_stop_not_seen", waited_s=round(budget_s, 1))

    def _exclusively(self, work, *args) -> None:
        """Run ``work`` as the call's turn once nothing else speaks; not after the call ended."""
        with self._exclusive:
            if not (self.hung_up or self.ended):
                self._run_turn(work, *args)

    # -- the LLM's tools -------------------------------------------------------------------------

    @property
    def _llm_has_tools(self) -> bool:
        return self.services.settings.llm_tools and getattr(self.services.llm, "supports_tools", False)

    def _tools(self) -> tuple[ToolSpec, ...]:
        if not self._llm_has_tools:
            return ()
        targets = sorted(self.agent.transfer_targets) if self.agent is not None else []
        http_tools = tuple(tool.spec() for tool in self.agent.tools) if self.agent is not None else ()
        return (*((transfer_tool(targets),) if targets else ()), END_CALL_TOOL, *http_tools)

    def _is_goodbye(self, transcript: str) -> bool:
        if self._llm_has_tools:
            return False  # the LLM decides, with end_call
        return normalize_words(transcript) in self.services.settings.goodbye_words

    def _asks_for_operator(self, transcript: str) -> bool:
        """An operator word in the transcript, when the LLM cannot transfer and there is an operator."""
        if self._llm_has_tools or self.agent is None or OPERATOR_TARGET not in self.agent.transfer_targets:
            return False
        spoken = f" {normalize_words(transcript)} "
        return any(f" {words} " in spoken for words in self.services.settings.operator_words)

    def _after_reply(self, reply: _Reply, messages: list[Message], log, tool_round: int = 0) -> None:
        if reply.text and not reply.fallback:
            self._last_reply_text = reply.text
        if not reply.tool_calls or self.hung_up or reply.interrupted:
            return
        max_rounds = self.services.settings.max_tool_calls
        if tool_round >= max_rounds:
            # Asked without tools: a model that calls one anyway is not obeyed.
            log.warning("llm_tool_rounds_exhausted", rounds=tool_round, ignored=[c.name[:64] for c in reply.tool_calls])
            return
        http_tools = {tool.name: tool for tool in self.agent.tools} if self.agent is not None else {}
        results: list[str | None] = []  # the tool message of each call, in order
        http_calls: list[tuple[int, ToolCall, HttpTool]] = []
        for call in reply.tool_calls:
            log.info("llm_tool_call", tool=call.name[:64], arguments=call.raw_arguments[:200])
            if call.name == END_CALL_TOOL.name:
                self._goodbye("llm_end_call")
                return
            if call.name == "transfer_call":
                arguments = call.arguments
                if isinstance(arguments, dict) and set(arguments) == {"target"}:
                    refusal = self._transfer(arguments["target"], "llm")
                else:
                    # Not exactly {"target": ...}: refused whatever it holds (even a bare "sales").
                    refusal = self._refuse_transfer(call.raw_arguments, "llm")
                if refusal is None:
                    return
                results.append(json.dumps({"error": refusal}))
            elif call.name in http_tools:
                http_calls.append((len(results), call, http_tools[call.name]))
                results.append(None)
            else:
                results.append(json.dumps({"error": f"There is no tool called {call.name[:60]!r}."}))
        for index, outcome in self._run_http_tools(http_calls, log).items():
            results[index] = outcome.content
        if self.hung_up:
            return
        # Tell the model what came of its calls, and speak what it says to that; in the last
        # round without tools, so that it answers in words.
        follow_up = [*messages, {"role": "assistant", "content": reply.text, "tool_calls": list(reply.tool_calls)},
                     *({"role": "tool", "tool_call_id": call.call_id, "name": call.name, "content": content}
                       for call, content in zip(reply.tool_calls, results))]
        tools = None if tool_round + 1 < max_rounds else ()
        answer = self._speak(lambda r, sentences: self._produce(follow_up, sentences, log, r, tools), log,
                             turn=reply.turn)
        answer.sent_all = True
        self._count_turn_if_over(answer)  # records: the turn's row gets this answer too
        if answer.text and not answer.fallback and not answer.interrupted:
            self.history.add("assistant", answer.text)
        self._after_reply(answer, follow_up, log, tool_round + 1)

    def _run_http_tools(self, calls: list[tuple[int, ToolCall, HttpTool]], log) -> dict[int, ToolOutcome]:
        """Run the calls, each on its own greenlet; the filler phrase if they take longer than
        ``tool_filler_after_s``. Killed with the turn (hangup), they are killed too."""
        if not calls:
            return {}
        context = CallContext(self.call_uuid, self.agent.name if self.agent is not None else None,
                              self.caller_number, dict(self.variables))
        self.flow.counters.http_tool_calls += len(calls)
        running = {index: gevent.spawn(run_tool, tool, call.arguments, context, log) for index, call, tool in calls}
        try:
            settings = self.services.settings
            gevent.joinall(list(running.values()), timeout=settings.tool_filler_after_s)
            if not all(greenlet.ready() for greenlet in running.values()):
                # No dead air while the endpoint thinks: the filler, from the pinned cache.
                self.flow.counters.tool_fillers += 1
                self._say(settings.tool_filler_phrase, log, "tool_filler", barge_in=False)
                budget_s = max(tool.timeout_s for _, _, tool in calls) + TOOL_JOIN_MARGIN_S
                gevent.joinall(list(running.values()), timeout=budget_s)
        finally:
            for greenlet in running.values():
                if not greenlet.ready():
                    greenlet.kill(block=False)
        outcomes: dict[int, ToolOutcome] = {}
        for index, call, tool in calls:
            greenlet = running[index]
            outcome = greenlet.value if greenlet.successful() and greenlet.value is not None else ToolOutcome(
                json.dumps({"error": f"The tool {tool.name} failed. Tell the caller it cannot be done now."}),
                False, "error", True)
            if not greenlet.ready():
                log.error("tool_call_overran", tool=tool.name, timeout_s=tool.timeout_s)
            elif not greenlet.successful():
                log.error("tool_call_crashed", tool=tool.name, error=repr(greenlet.exception)[:200])
            if not outcome.ok:
                self.flow.counters.http_tool_failures += 1
            outcomes[index] = outcome
        return outcomes


def _variable_names(listed: str) -> list[str]:
    return [n for n in listed.split(":") if VARIABLE_NAME_RE.match(n)][:MAX_DYNAMIC_VARIABLES]


@functools.lru_cache(maxsize=256)
def _watched_names(listed: str, system_prompt: str, greeting: str) -> frozenset[str]:
    # Asked with every event a call's handle (or, for playback, its interrupt) sees: a few
    # agents' texts and ivr_variables lists, parsed once each.
    return frozenset(_variable_names(listed)) | _placeholder_names(system_prompt) | _placeholder_names(greeting)


@functools.lru_cache(maxsize=256)
def _placeholder_names(text: str) -> frozenset[str]:
    # Of the agents' prompts and greetings: a few texts, asked about with every event of every call.
    try:
        return frozenset(placeholders(text))
    except BadCallRequest:
        return frozenset()


def _caller_spoke(event: EslEvent) -> bool:
    speech_type = event.get("Speech-Type")
    if speech_type == FINAL_SPEECH or speech_type == "begin-speaking":
        return True
    return speech_type == "detected-partial-speech" and bool(speech_text(event))


def call_flow_factory(flow: CallFlowServices):
    """The handler factory the router calls for each new call UUID."""

    def make(call_uuid: str, call_log: structlog.stdlib.BoundLogger) -> PhoneCall:
        return PhoneCall(call_uuid, call_log, flow)

    return make
