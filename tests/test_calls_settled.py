"""Events settled in the reader: a playback report the call's greenlet has nothing to do with
is followed by ``interrupt`` and not queued; everything that depends on playback still works."""

from __future__ import annotations

import uuid as uuid_lib
from pathlib import Path

import gevent
import gevent.event
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from harness import broadcasts, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.calls import CallRouter
from ivr_daemon.esl.protocol import EslEvent, build_plain_event
from ivr_daemon.records import RecordStore, RecordWriter
from ivr_daemon.replay.simulator import FreeswitchSimulator

CALL = str(uuid_lib.uuid4())
PLAYBACK = ("PLAYBACK_START", "PLAYBACK_STOP", "CHANNEL_EXECUTE_COMPLETE")


def event(name: str, sequence: int, uuid: str = CALL, **headers: str) -> EslEvent:
    return EslEvent(headers={"Event-Name": name, "Unique-ID": uuid, "Event-Sequence": str(sequence),
                             "Core-UUID": "core", **headers})


class Settling:
    """A handler whose interrupt settles what ``settle`` names; handle may be held."""

    def __init__(self, uuid, log, settle=("PLAYBACK_STOP",)):
        self.settle = settle
        self.interrupted: list[str] = []
        self.handled: list[str] = []
        self.release = gevent.event.Event()
        self.release.set()
        self.busy = False

    def interrupt(self, ev):
        self.interrupted.append(ev.name)
        return ev.name in self.settle

    def handle(self, ev):
        self.handled.append(ev.name)
        self.release.wait()

    def close(self):
        pass


def router_with(handlers: list, **kwargs) -> CallRouter:
    def factory(uuid, log):
        handler = Settling(uuid, log, **kwargs)
        handlers.append(handler)
        return handler

    return CallRouter(factory)


def answered_and_waiting(handlers: list, **kwargs):
    """A router whose call has answered and whose greenlet now waits for its next event."""
    router = router_with(handlers, **kwargs)
    router.route(event("CHANNEL_ANSWER", 1))
    call = router.calls[CALL]
    wait_until(lambda: call.waiting and call.queue.empty())
    return router, call


def test_an_event_interrupt_settles_is_not_queued_while_the_call_waits():
    handlers: list = []
    router, call = answered_and_waiting(handlers)
    router.route(event("PLAYBACK_STOP", 2))
    assert call.queue.empty()  # not put: the greenlet is not woken for it
    (handler,) = handlers
    assert handler.interrupted == ["CHANNEL_ANSWER", "PLAYBACK_STOP"]
    assert router.events_settled == 1 and router.events_routed == 2
    router.route(event("CHANNEL_HANGUP_COMPLETE", 3))
    router.join(5)
    assert handler.handled == ["CHANNEL_ANSWER", "CHANNEL_HANGUP_COMPLETE"]


def test_a_settled_event_is_still_deduplicated():
    handlers: list = []
    router, call = answered_and_waiting(handlers, settle=("DETECTED_SPEECH",))
    router.route(event("DETECTED_SPEECH", 2))
    router.route(event("DETECTED_SPEECH", 2))  # FreeSWITCH's second copy
    assert handlers[0].interrupted == ["CHANNEL_ANSWER", "DETECTED_SPEECH"] and router.dedup.dropped == 1
    assert router.events_settled == 1


def test_playback_reports_are_not_digested_for_dedup():
    """FreeSWITCH doubles only ASR events (DETECTED_SPEECH, while parked: every capture shows
    it); a playback report is never looked up in the deduplicator, so it costs no digest and
    takes no key from the speech events' bounded memory."""
    handlers: list = []
    router, call = answered_and_waiting(handlers, settle=PLAYBACK)
    for sequence, name in enumerate(PLAYBACK * 3, start=2):
        router.route(event(name, sequence))
    assert len(router.dedup) == 0 and router.dedup.dropped == 0
    assert handlers[0].interrupted == ["CHANNEL_ANSWER", *PLAYBACK * 3]
    assert router.events_settled == 9


def test_a_settled_event_is_queued_behind_a_handle_in_progress_or_earlier_events():
    """Handling the earlier events may change what the call knows: in order, as before."""
    handlers: list = []
    router, call = answered_and_waiting(handlers)
    (handler,) = handlers
    handler.release.clear()
    router.route(event("DETECTED_SPEECH", 2))
    wait_until(lambda: handler.handled == ["CHANNEL_ANSWER", "DETECTED_SPEECH"])
    assert not call.waiting
    router.route(event("PLAYBACK_STOP", 3))  # arrives during the turn
    assert call.queue.qsize() == 1 and router.events_settled == 0
    handler.release.set()
    wait_until(lambda: handler.handled[-1:] == ["PLAYBACK_STOP"])
    wait_until(lambda: call.waiting)
    router.route(event("PLAYBACK_STOP", 4))
    assert router.events_settled == 1 and handler.handled.count("PLAYBACK_STOP") == 1


def test_the_hangup_is_always_queued_and_none_means_queued():
    handlers: list = []
    router, call = answered_and_waiting(handlers, settle=("CHANNEL_HANGUP_COMPLETE",))
    router.route(event("PLAYBACK_STOP", 2))  # interrupt returns False: queued as always
    router.route(event("CHANNEL_HANGUP_COMPLETE", 3))  # "settled", yet the call must end
    assert router.join(5)
    assert handlers[0].handled == ["CHANNEL_ANSWER", "PLAYBACK_STOP", "CHANNEL_HANGUP_COMPLETE"]
    assert CALL not in router.calls and router.events_settled == 0


# -- the call flow on the simulator ------------------------------------------------------------

def handled_names(daemon, call) -> list[str]:
    """Every event the call's handle() gets from now on."""
    handler = daemon.router.calls[call].handler
    seen: list[str] = []
    handle = handler.handle

    def recording_handle(ev):
        seen.append(ev.name)
        handle(ev)

    handler.handle = recording_handle
    return seen


def metric(daemon, name: str, **labels: str) -> float:
    text = daemon.metrics.exposition()[0].decode()
    (only,) = daemon.switches
    wanted = {"switch": only.name, **labels}
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and s.labels == wanted)


def test_a_learnt_calls_playback_reports_do_not_wake_its_greenlet_and_what_needs_them_works(tmp_path):
    """A 3-sentence answer played to the end, then a goodbye by key: the turn is counted once
    played, the records say what was heard, the goodbye's PLAYBACK_STOP lets uuid_kill go;
    the playback reports that came while the call's greenlet waited were never queued."""
    url = f"sqlite:///{tmp_path}/records.db"
    records = RecordWriter(RecordStore(url, connect_timeout_s=2))
    agents = tmp_path / "agents.toml"
    agents.write_text('default_agent = "desk"\n[agents.desk]\ngoodbye_phrase = "Bye now."\n'
                      '[agents.desk.dtmf]\n"9" = "hangup"\n')
    with FakeLlmServer("ollama", replies="One. Two. Three.") as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                DATABASE_URL=url, AGENTS_FILE=str(agents))
        with running_daemon(sim, settings, records=records) as daemon:
            call = sim.new_call(variables={"ivr_agent": "desk"})
            wait_until(lambda: call in daemon.router.calls and daemon.router.calls[call].waiting
                       and daemon.router.calls[call].handler.agent_name == "desk")
            handled = handled_names(daemon, call)
            sim.speak(call, "count to three")
            wait_heard(sim, call, 3)
            wait_until(lambda: metric(daemon, "ivr_turns_total", outcome="answered") == 1)
            wait_until(lambda: daemon.router.calls[call].waiting and daemon.router.calls[call].queue.empty())
            settled = daemon.router.events_settled
            assert settled > 0  # at least the last sentence's reports came after the turn
            assert handled.count("PLAYBACK_STOP") + settled >= 3
            sim.dtmf(call, "9")
            kill = sim.wait_for_command(f"api uuid_kill {call}", 10)
            bye = sim.wait_for_event(lambda e: e.name == "PLAYBACK_STOP" and e.unique_id == call
                                     and e.get("Playback-File-Path") == broadcasts(sim, call)[-1].split()[3], 5)
            assert bye.t_monotonic <= kill.t_monotonic
            wait_until(lambda: call not in daemon.router.calls)
            assert records.flush(10)
            found = records.using_store(records.store.call, call)
    assert "DETECTED_SPEECH" in handled and "CHANNEL_HANGUP_COMPLETE" in handled
    ((turn),) = found["turns"]
    assert turn["reply"] == turn["heard"] == "One. Two. Three." and not turn["interrupted"]
    assert found["agent"] == "desk" and found["answered_at"] is not None


def test_a_playback_report_that_teaches_the_call_something_is_still_handled(tmp_path):
    """handle() learns the call from any event: one carrying a variable not known yet is queued."""
    with FakeLlmServer("ollama", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            wait_until(lambda: call in daemon.router.calls and daemon.router.calls[call].waiting)
            handler = daemon.router.calls[call].handler
            handled = handled_names(daemon, call)
            stop = [("Event-Name", "PLAYBACK_STOP"), ("Core-UUID", str(uuid_lib.uuid4())), ("Unique-ID", call),
                    ("Playback-File-Path", "/tmp/none.wav"), ("Playback-Status", "done")]
            with capture_logs() as logs:
                sim.send_event_frame(build_plain_event([*stop, ("Event-Sequence", "900")]))
                wait_until(lambda: daemon.router.events_settled == 1)
                sim.send_event_frame(build_plain_event([*stop, ("Event-Sequence", "901"),
                                                        ("variable_ivr_variables", "account"),
                                                        ("variable_account", "42")]))
                wait_until(lambda: handler.dynamic_variables.get("account") == "42")
            assert handled == ["PLAYBACK_STOP"] and daemon.router.events_settled == 1
            # The settled one still has its DEBUG line, from the reader.
            assert [line["event_sequence"] for line in logs
                    if line["event"] == "esl_event" and line.get("call_uuid") == call] == [900, 901]


def learnt_state(handler) -> tuple:
    recorder = handler.recorder
    return (handler.agent_name, handler.services, handler.caller_number, dict(handler.variables),
            dict(handler.dynamic_variables), handler._prompt_filled, handler._prompt_warned,
            handler.history.system_prompt, handler.greeted, handler.ended, handler.turns,
            None if recorder is None else (recorder.active, recorder.started_at, recorder.answered_at))


def test_would_learn_is_false_only_when_handle_changes_nothing(tmp_path):
    """The reader's judgement against handle() itself, for playback reports carrying each thing
    handle learns from, on a fresh call and on one that has learnt all it could."""
    agents = tmp_path / "agents.toml"
    agents.write_text('default_agent = "desk"\n[agents.desk]\nsystem_prompt = "Help {name}."\n'
                      '[agents.other]\nsystem_prompt = "Other."\n')
    url = f"sqlite:///{tmp_path}/records.db"
    records = RecordWriter(RecordStore(url, connect_timeout_s=2))
    with FakeLlmServer("ollama", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                AGENTS_FILE=str(agents), DATABASE_URL=url)
        with running_daemon(sim, settings, records=records) as daemon:
            call = sim.new_call(caller_id_name="Ann", variables={"ivr_agent": "desk", "name": "Ann"})
            wait_until(lambda: call in daemon.router.calls and daemon.router.calls[call].waiting
                       and daemon.router.calls[call].handler.recorder.active)
            learnt = daemon.router.calls[call].handler
            fresh = daemon.router._handler_factory(str(uuid_lib.uuid4()), learnt.log)
            extras = [{}, {"variable_ivr_agent": "other"}, {"Caller-Caller-ID-Number": "5550100"},
                      {"Caller-Caller-ID-Name": "Bob"}, {"Caller-Destination-Number": "77"},
                      {"variable_name": "Zed"}, {"variable_ivr_variables": "extra", "variable_extra": "x"},
                      {"variable_ivr_variables": "extra"}, {"Caller-Channel-Answered-Time": "1700000000000000"}]
            judged = {}
            for label, handler in (("learnt", learnt), ("fresh", fresh)):
                for index, extra in enumerate(extras):
                    for name in PLAYBACK:
                        ev = event(name, 1000 + index, uuid=handler.call_uuid, **extra)
                        would = handler._handle_would_learn(ev)
                        before = learnt_state(handler)
                        handler.handle(ev)
                        if not would:
                            assert learnt_state(handler) == before, (label, extra, name)
                        judged[label, index, name] = would
            assert not judged["learnt", 0, "PLAYBACK_STOP"]  # nothing new: settled
            assert judged["learnt", 6, "PLAYBACK_START"]  # a variable it lists and carries (learnt then)
            assert not judged["learnt", 6, "PLAYBACK_STOP"]
            assert judged["fresh", 0, "PLAYBACK_STOP"]  # nothing learnt yet
            fresh.close()


def test_a_broadcast_whose_file_is_gone_is_followed_by_its_execute_complete(tmp_path, monkeypatch):
    """FreeSWITCH reports a file it cannot open with CHANNEL_EXECUTE_COMPLETE alone (FILE NOT
    FOUND, capture X11): the sentence is marked so, said in the log, and the turn is counted
    without waiting for a PLAYBACK_STOP that never comes."""
    from ivr_daemon.esl.connection import EslClient

    send = EslClient.send

    def send_after_deleting_the_wav(self, command, timeout_s=None):
        if command.line.startswith("api uuid_broadcast "):
            Path(command.line.split()[3]).unlink()  # gone before FreeSWITCH opens it
        return send(self, command, timeout_s)

    monkeypatch.setattr(EslClient, "send", send_after_deleting_the_wav)
    with FakeLlmServer("ollama", replies="Hi.") as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon, capture_logs() as logs:
            call = sim.new_call()
            wait_until(lambda: call in daemon.router.calls and daemon.router.calls[call].waiting)
            sim.speak(call, "hello")
            complete = sim.wait_for_event(lambda e: e.name == "CHANNEL_EXECUTE_COMPLETE" and e.unique_id == call
                                          and e.get("Application-Response") == "FILE NOT FOUND", 10)
            wait_until(lambda: metric(daemon, "ivr_turns_total", outcome="answered") == 1)
            handler = daemon.router.calls[call].handler
            (spoken,) = handler._reply.spoken
            assert spoken.status == "not-found" and spoken.path == complete.get("Application-Data")
            assert not handler.playing
    assert [line["path"] for line in logs if line["event"] == "playback_file_not_found"] == [spoken.path]
