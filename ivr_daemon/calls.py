"""One Call per channel Unique-ID, each with its own queue and greenlet.

The ESL reader calls :meth:`CallRouter.route` for every event; routing never blocks, so a slow
LLM stalls one call, never the switch. Events of one call are handled in arrival order on that
call's greenlet; different calls never wait on each other. An exception in a handler is logged
with the call UUID and the call goes on. Events that must not wait behind a long turn (hangup,
barge-in) reach :meth:`CallHandler.interrupt` at once, before they are queued. Events that
cannot matter (a partial transcript while nothing of the call's plays: mod_vosk sends one every
~200 ms per caller, twice while parked) are taken by :meth:`CallHandler.absorb` first and stop
there: no dedup entry, no queue, no greenlet switch, no log line. Events that ``interrupt``
settles entirely (playback reports once the call has learnt all it learns from its events:
10 of a call's 15) are counted but not queued: the call's greenlet is not woken for an event
its ``handle`` would do nothing with. Only the events FreeSWITCH delivers twice
(``DOUBLED_EVENTS``: DETECTED_SPEECH) are looked up in the deduplicator.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict, deque
from typing import Callable, Protocol

import gevent
import gevent.queue
import structlog

from ivr_daemon.esl.dedup import EventDeduplicator
from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.logs import get_logger, spoken_text

log = get_logger(__name__)

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

CALL_END_EVENT = "CHANNEL_HANGUP_COMPLETE"
# The events FreeSWITCH can deliver twice: while a channel is parked an ASR event is fired once
# for fire_asr_events=true and once more from the session's queue, byte-identical (the captures'
# README; in every capture of tests/captures/ and ../shared/esl-captures/ only DETECTED_SPEECH
# repeats an Event-Sequence). Only these are looked up in the deduplicator: a digest of every
# playback report (10 of a call's 15 events) was ~10 % of the reader's CPU for nothing.
DOUBLED_EVENTS = frozenset({"DETECTED_SPEECH"})
# Dedup keys of the call's last absorbed events: FreeSWITCH's second copy of one (while parked,
# ~20 ms later, capture 80_plain) must still count as a copy if the call's state changed
# meanwhile and it is not absorbed. Partials come every ~200 ms: 8 cover well over a second.
ABSORBED_KEYS_PER_CALL = 8


class CallHandler(Protocol):
    """What the router drives for one call; made by the handler factory per Unique-ID."""

    def absorb(self, event: EslEvent) -> bool:
        """Optional. Called first, from the reader, for each event of a call already routed;
        True: the event needs nothing more than what absorb just noted (it is then not
        deduplicated, not passed to interrupt, not queued, not logged). Quick, never blocking.
        Only for events whose repeat is harmless: FreeSWITCH's duplicates are not dropped."""

    def interrupt(self, event: EslEvent) -> bool | None:
        """Called at once from the reader for every event of the call: quick, never blocking.
        True: what interrupt just did is all the event asks for, ``handle`` called now would do
        nothing with it. It is then not queued if the call's greenlet waits for its next event
        with none queued (else handling the others may change what the call knows first, and
        whoever waits for the queue to empty expects it handled after them); never the hangup.
        None or False: it is queued."""

    def handle(self, event: EslEvent) -> None:
        """Called in arrival order on the call's own greenlet; may take long."""

    def close(self) -> None:
        """Called once on the call's greenlet after its last event: free everything."""

    @property
    def busy(self) -> bool:
        """Work is in flight for the call (a turn): shutdown and replays wait for it."""

    def after_reconnect(self) -> None:
        """The switch connection came back: state that depended on lost events is stale."""


HandlerFactory = Callable[[str, structlog.stdlib.BoundLogger], CallHandler]


class Call:
    """A live channel: its queue of events and the greenlet that works through it."""

    def __init__(self, uuid: str, handler_factory: HandlerFactory, on_done: Callable[["Call"], None],
                 log_speech_text: bool = True, log_context: dict[str, str] | None = None):
        self.uuid = uuid
        self.started_unix_s = time.time()  # when the daemon first heard of it (GET /calls)
        self._log_speech_text = log_speech_text
        self.log = log.bind(call_uuid=uuid, **(log_context or {}))
        self._log_events = logging.getLogger(__name__).isEnabledFor(logging.DEBUG)
        self.queue: gevent.queue.Queue = gevent.queue.Queue()
        self._on_done = on_done
        self.ended = False
        self.handler = handler_factory(uuid, self.log)
        self.absorb: Callable[[EslEvent], bool] | None = getattr(self.handler, "absorb", None)
        self.absorbed: deque[tuple[str | None, str]] = deque(maxlen=ABSORBED_KEYS_PER_CALL)
        self.waiting = False  # the greenlet waits for its next event: no handle() in progress
        self.greenlet = gevent.spawn(self._work)

    def _work(self) -> None:
        try:
            while True:
                self.waiting = True
                event = self.queue.get()
                self.waiting = False
                if event is None:
                    break
                # Every event at DEBUG: a call's story at INFO is its turns, transfers and
                # hangup (each line says what it acted on). An INFO line per playback event
                # was three lines per sentence, and the line before a turn delayed its start.
                if self._log_events:  # checked first: partials come 5 times a second per call
                    self.log_event(event)
                try:
                    self.handler.handle(event)
                except Exception:
                    self.log.exception("call_handler_failed", event_name=event.name)
                if event.name == CALL_END_EVENT:
                    break
        finally:
            try:
                self.handler.close()
            except Exception:
                self.log.exception("call_close_failed")
            self._on_done(self)

    def log_event(self, event: EslEvent) -> None:
        """The event's DEBUG line: on the call's greenlet as it handles it, or from the reader
        for one that interrupt settled (never queued)."""
        self.log.debug(
            "esl_event", event_name=event.name, event_sequence=event.sequence,
            speech_type=event.get("Speech-Type"),
            # A DETECTED_SPEECH body is what the caller said (LOG_TRANSCRIPTS).
            **spoken_text("body", event.body, verbatim=self._log_speech_text))


class CallRouter:
    """Routes events to their call; drops FreeSWITCH's duplicate deliveries."""

    def __init__(
        self,
        handler_factory: HandlerFactory,
        dedup: EventDeduplicator | None = None,
        on_callless_event: Callable[[EslEvent], None] | None = None,
        remember_ended: int = 4096,
        owns: Callable[[str], bool] | None = None,
        log_speech_text: bool = True,
        on_call_started: Callable[[str], None] | None = None,
        log_context: dict[str, str] | None = None,
    ):
        self._handler_factory = handler_factory
        self._log_context = log_context  # bound to every call's log (its switch, with several)
        self._log = log.bind(**log_context) if log_context else log
        self._on_call_started = on_call_started  # the daemon's count of calls; gets the UUID
        self._log_speech_text = log_speech_text
        self._owns = owns
        self.dedup = dedup if dedup is not None else EventDeduplicator()
        self._log_debug = logging.getLogger(__name__).isEnabledFor(logging.DEBUG)
        self._on_callless_event = on_callless_event
        self.calls: dict[str, Call] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._remember_ended = remember_ended
        self.events_routed = 0
        self.events_absorbed = 0  # taken by their call's absorb(): dropped as early as can be
        self.events_settled = 0  # of events_routed, settled by interrupt(): not queued
        self.foreign_ids = 0

    def route(self, event: EslEvent) -> None:
        headers = event.headers
        uuid = headers.get("Unique-ID") or None
        call = self.calls.get(uuid)  # type: ignore[arg-type]
        if call is not None and call.absorb is not None:
            try:
                absorbed = call.absorb(event)
            except Exception:
                call.log.exception("call_absorb_failed", event_name=event.name)
                absorbed = False
            if absorbed:
                self.events_absorbed += 1
                sequence = headers.get("Event-Sequence")
                if sequence:
                    call.absorbed.append((headers.get("Core-UUID"), sequence))
                return
        name = headers.get("Event-Name", "")
        if name in DOUBLED_EVENTS:
            duplicate = self.dedup.is_duplicate(event)
            if not duplicate and call is not None and call.absorbed and _copy_of_absorbed(call, event):
                duplicate = True
                self.dedup.dropped += 1
            if duplicate:
                if self._log_debug:  # a structlog call below its level still costs ~6-12 µs
                    self._log.debug("esl_duplicate_event_dropped", event_name=name, call_uuid=uuid,
                                    event_sequence=headers.get("Event-Sequence"))
                return
        if call is not None:
            self._route_to(call, event, name)  # its Unique-ID was checked when the call was made
            return
        if uuid is not None and not _UUID_RE.match(uuid):
            # FreeSWITCH's Unique-IDs are UUIDs; another value cannot be controlled by any
            # command (the builders refuse it) and must not name files either.
            self.foreign_ids += 1
            level = "warning" if name == "DETECTED_SPEECH" else "debug"
            getattr(self._log, level)("event_with_non_uuid_unique_id_ignored", event_name=name,
                                unique_id=uuid[:80])
            return
        if uuid is None:
            if self._on_callless_event is not None:
                self._on_callless_event(event)
            return
        if uuid in self._ended:
            self._log.debug("event_after_call_ended", event_name=name, call_uuid=uuid)
            return
        if self._owns is not None and not self._owns(uuid):
            return  # another daemon's shard
        call = Call(uuid, self._handler_factory, self._call_done, self._log_speech_text, self._log_context)
        self.calls[uuid] = call
        if self._on_call_started is not None:
            self._on_call_started(uuid)
        self._route_to(call, event, name)

    def _route_to(self, call: Call, event: EslEvent, name: str) -> None:
        """Hand ``event`` (named ``name``) to its live ``call``: interrupt, then its queue."""
        if name == CALL_END_EVENT:
            call.ended = True
            self._remember(call.uuid)
        self.events_routed += 1
        try:
            settled = call.handler.interrupt(event)
        except Exception:
            call.log.exception("call_interrupt_failed", event_name=name)
            settled = False
        if settled and call.waiting and call.queue.empty() and name != CALL_END_EVENT:
            # Nothing for the call's greenlet to do: no queue put, no two greenlet switches.
            # Only while it waits with nothing queued: queued, this event would be handled
            # next, on exactly what the call knows now, which interrupt judged.
            self.events_settled += 1
            if call._log_events:
                call.log_event(event)
            return
        call.queue.put(event)

    def end_call(self, uuid: str, reason: str) -> None:
        """End a call whose hangup event will never come (gone after a reconnect, shutdown).

        It goes the way a real hangup goes: interrupt (the turn is cut at once), then the
        handler's clean-up in order on the call's greenlet.
        """
        call = self.calls.get(uuid)
        if call is None or call.ended:
            return
        call.log.info("call_ended_without_hangup_event", reason=reason)
        self.route(EslEvent(headers={"Event-Name": CALL_END_EVENT, "Unique-ID": uuid, "Hangup-Cause": reason}))

    def busy_calls(self) -> list[Call]:
        """Calls with events still queued or a turn in flight."""
        return [call for call in list(self.calls.values()) if not call.queue.empty() or call.handler.busy]

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait until every call's greenlet has finished."""
        greenlets = [call.greenlet for call in list(self.calls.values())]
        done = gevent.joinall(greenlets, timeout=timeout_s)
        return len(done) == len(greenlets)

    def _remember(self, uuid: str) -> None:
        self._ended[uuid] = None
        if len(self._ended) > self._remember_ended:
            self._ended.popitem(last=False)

    def _call_done(self, call: Call) -> None:
        if self.calls.get(call.uuid) is call:
            del self.calls[call.uuid]


def _copy_of_absorbed(call: Call, event: EslEvent) -> bool:
    """The event has the dedup key (Core-UUID, Event-Sequence) of one the call absorbed."""
    sequence = event.headers.get("Event-Sequence")
    return bool(sequence) and (event.headers.get("Core-UUID"), sequence) in call.absorbed
