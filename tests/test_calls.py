"""The call router: per-call order, calls independent, handler errors contained, dedup."""

from pathlib import Path

import gevent
import gevent.event

from harness import wait_until
from ivr_daemon.calls import DOUBLED_EVENTS, CallRouter
from ivr_daemon.esl.protocol import EslEvent, Frame, FrameParser, parse_event

A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"


def event(uuid, name, sequence, body=None, **headers):
    return EslEvent(headers={"Event-Name": name, "Unique-ID": uuid, "Event-Sequence": str(sequence),
                             "Core-UUID": "core", **headers}, body=body)


class Recorder:
    def __init__(self, uuid, log, seen, slow_uuid=None, gate=None, fail_on=None):
        self.uuid, self.seen = uuid, seen
        self.slow_uuid, self.gate, self.fail_on = slow_uuid, gate, fail_on
        self.interrupted = []
        self.at_gate = False

    def interrupt(self, ev):
        self.interrupted.append(ev.name)

    def handle(self, ev):
        if self.uuid == self.slow_uuid and self.gate is not None:
            self.at_gate = True
            self.gate.wait(5)
            self.at_gate = False
        if self.fail_on is not None and ev.body == self.fail_on:
            raise RuntimeError("handler bug")
        self.seen.append((self.uuid, ev.sequence))

    def close(self):
        self.seen.append((self.uuid, "closed"))


def test_interleaved_calls_keep_per_call_order_and_do_not_wait_on_each_other():
    seen, handlers = [], {}
    gate = gevent.event.Event()

    def factory(uuid, log):
        handlers[uuid] = Recorder(uuid, log, seen, slow_uuid=A, gate=gate)
        return handlers[uuid]

    router = CallRouter(factory)
    for i in range(1, 11):
        router.route(event(A if i % 2 else B, "DETECTED_SPEECH", i))
    # B works through all of its events while A's first one is held at the gate.
    wait_until(lambda: [s for u, s in seen if u == B] == [2, 4, 6, 8, 10], 5)
    assert handlers[A].at_gate and not [s for u, s in seen if u == A]
    gate.set()
    router.route(event(A, "CHANNEL_HANGUP_COMPLETE", 11))
    router.route(event(B, "CHANNEL_HANGUP_COMPLETE", 12))
    assert router.join(5)
    assert [s for u, s in seen if u == A] == [1, 3, 5, 7, 9, 11, "closed"]
    assert [s for u, s in seen if u == B] == [2, 4, 6, 8, 10, 12, "closed"]
    assert router.calls == {}


def test_handler_exception_is_logged_with_call_uuid_and_the_call_goes_on(caplog):
    seen = []
    router = CallRouter(lambda uuid, log: Recorder(uuid, log, seen, fail_on="boom"))
    router.route(event(A, "DETECTED_SPEECH", 1, body="boom"))
    router.route(event(A, "DETECTED_SPEECH", 2, body="fine"))
    router.route(event(A, "CHANNEL_HANGUP_COMPLETE", 3))
    assert router.join(5)
    assert seen == [(A, 2), (A, 3), (A, "closed")]
    failure = [r for r in caplog.records if "call_handler_failed" in str(r.msg)]
    assert failure and A in str(failure[0].msg)


def test_duplicates_dropped_out_of_order_sequences_kept():
    seen = []
    router = CallRouter(lambda uuid, log: Recorder(uuid, log, seen))
    for seq in (5, 5, 3, 4, 3, 6):
        router.route(event(A, "DETECTED_SPEECH", seq))
    router.route(event(A, "CHANNEL_HANGUP_COMPLETE", 7))
    assert router.join(5)
    assert seen == [(A, 5), (A, 3), (A, 4), (A, 6), (A, 7), (A, "closed")]
    assert router.dedup.dropped == 2


def test_hangup_reaches_interrupt_at_once_and_late_events_do_not_revive_the_call():
    seen, handlers = [], {}

    def factory(uuid, log):
        handlers[uuid] = Recorder(uuid, log, seen, slow_uuid=A, gate=gevent.event.Event())
        return handlers[uuid]

    router = CallRouter(factory)
    router.route(event(A, "DETECTED_SPEECH", 1))
    router.route(event(A, "CHANNEL_HANGUP_COMPLETE", 2))
    assert handlers[A].interrupted == ["DETECTED_SPEECH", "CHANNEL_HANGUP_COMPLETE"]
    handlers[A].gate.set()
    assert router.join(5)
    router.route(event(A, "DETECTED_SPEECH", 3))
    assert A not in router.calls


def test_events_without_unique_id_go_to_the_callless_handler():
    callless = []
    router = CallRouter(lambda uuid, log: Recorder(uuid, log, []), on_callless_event=callless.append)
    router.route(EslEvent(headers={"Event-Name": "HEARTBEAT", "Event-Sequence": "9"}))
    assert [e.name for e in callless] == ["HEARTBEAT"] and router.calls == {}


def test_dedup_memory_is_bounded():
    router = CallRouter(lambda uuid, log: Recorder(uuid, log, []))
    router.dedup._max_keys = 100
    for seq in range(1000):
        router.dedup.is_duplicate(event(A, "DETECTED_SPEECH", seq))
    assert len(router.dedup) == 100


class Absorbing(Recorder):
    """Absorbs the partials it is told to (as a call with nothing playing does)."""

    def __init__(self, uuid, log, seen, absorb_bodies=(), fail=False):
        super().__init__(uuid, log, seen)
        self.absorb_bodies, self.fail = set(absorb_bodies), fail
        self.absorbed = []

    def absorb(self, ev):
        if self.fail:
            raise RuntimeError("absorb bug")
        if ev.body in self.absorb_bodies:
            self.absorbed.append(ev.sequence)
            return True
        return False


def test_absorbed_events_skip_dedup_interrupt_and_queue_and_their_copies_stay_copies():
    seen, handlers = [], {}

    def factory(uuid, log):
        handlers[uuid] = Absorbing(uuid, log, seen, absorb_bodies={"idle"})
        return handlers[uuid]

    router = CallRouter(factory)
    router.route(event(A, "CHANNEL_ANSWER", 1))  # the call exists: later events may be absorbed
    for seq in (2, 2, 3):
        router.route(event(A, "DETECTED_SPEECH", seq, body="idle"))
    assert handlers[A].absorbed == [2, 2, 3] and router.events_absorbed == 3
    assert handlers[A].interrupted == ["CHANNEL_ANSWER"] and len(router.dedup) == 0  # none digested
    # The copy of an absorbed event, arriving when it is no longer absorbed, is still a copy.
    router.route(event(A, "DETECTED_SPEECH", 3, body="playing"))
    router.route(event(A, "DETECTED_SPEECH", 4, body="playing"))
    router.route(event(A, "CHANNEL_HANGUP_COMPLETE", 5))
    assert router.join(5)
    assert seen == [(A, 1), (A, 4), (A, 5), (A, "closed")]
    assert router.dedup.dropped == 1 and router.events_routed == 3


def test_a_failing_absorb_is_logged_and_the_event_goes_the_normal_way(caplog):
    seen = []
    router = CallRouter(lambda uuid, log: Absorbing(uuid, log, seen, fail=True))
    router.route(event(A, "CHANNEL_ANSWER", 1))
    router.route(event(A, "DETECTED_SPEECH", 2, body="hello"))
    router.route(event(A, "CHANNEL_HANGUP_COMPLETE", 3))
    assert router.join(5)
    assert seen == [(A, 1), (A, 2), (A, 3), (A, "closed")]
    assert any("call_absorb_failed" in str(r.msg) for r in caplog.records)


CAPTURES = Path(__file__).parent / "captures"


def test_only_the_doubled_events_are_deduplicated_as_every_capture_shows():
    """FreeSWITCH repeats an Event-Sequence only for DETECTED_SPEECH (fired once for
    fire_asr_events, once from the parked session's queue): the router asks the deduplicator
    about those alone. If a capture ever shows another event doubled, DOUBLED_EVENTS must grow."""
    doubled, streams = set(), 0
    for path in sorted(CAPTURES.rglob("*_plain*.txt")):
        keys = set()
        for item in FrameParser().feed(path.read_bytes()):
            if isinstance(item, Frame) and item.content_type == "text/event-plain":
                ev = parse_event(item)
                key = (ev.get("Core-UUID"), ev.get("Event-Sequence"))
                if key in keys:
                    doubled.add(ev.name)
                keys.add(key)
        streams += 1
    assert streams >= 10 and doubled == set(DOUBLED_EVENTS) == {"DETECTED_SPEECH"}

    # The whole captured stream of a parked call with three broadcasts, through a router: every
    # copy of a transcript is dropped, nothing else is digested, every other event gets through.
    handlers = []

    def factory(uuid, log):
        handlers.append(Recorder(uuid, log, []))
        return handlers[-1]

    router = CallRouter(factory)
    events = [parse_event(f) for f in FrameParser().feed((CAPTURES / "playback" / "S1_broadcast_x3_queue_plain.txt").read_bytes())
              if isinstance(f, Frame) and f.content_type == "text/event-plain"]
    speech = [e for e in events if e.name == "DETECTED_SPEECH"]
    copies = len(speech) - len({(e.get("Core-UUID"), e.sequence) for e in speech})
    for ev in events:
        router.route(ev)
    assert copies > 0 and router.dedup.dropped == copies
    assert len(router.dedup) == len(speech) - copies  # one key per transcript, none for the rest
    interrupted = [name for handler in handlers for name in handler.interrupted]
    assert len(interrupted) == len([e for e in events if e.unique_id]) - copies
    assert interrupted.count("DETECTED_SPEECH") == len(speech) - copies
    assert {"PLAYBACK_START", "PLAYBACK_STOP", "CHANNEL_EXECUTE_COMPLETE"} <= set(interrupted)
