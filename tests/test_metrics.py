"""Prometheus metrics of the real daemon on the simulator, read back with prometheus_client's own parser."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import gevent.event
import gevent.threadpool
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import TurnLog, broadcasts, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer, FakeReply, FakeToolCall
from ivr_daemon.config import load_settings
from ivr_daemon.conversation import ConversationHandler, TurnServices
from ivr_daemon.esl.connection import CommandReply
from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.llm import make_llm_client
from ivr_daemon.logs import get_logger
from ivr_daemon.metrics import DaemonMetrics
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts.null import NullEngine

DASHBOARD = Path(__file__).parent.parent / "contrib" / "grafana" / "ivr_daemon_dashboard.json"
TWO = "We open at nine. We close at five."
THREE = "We open at nine. Saturdays from ten. Goodbye for now."

# Every metric issue 11 names: the dashboard must show each one.
ISSUE_METRICS = ("ivr_calls_active", "ivr_calls_total", "ivr_turns_total", "ivr_turn_first_audio_seconds",
                 "ivr_llm_first_sentence_seconds", "ivr_tts_synthesis_seconds", "ivr_barge_ins_total",
                 "ivr_esl_reconnects_total", "ivr_tts_cache_hits_total", "ivr_tts_cache_misses_total",
                 "ivr_llm_errors_total")


def scrape(metrics: DaemonMetrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, by (sample name, sorted labels)."""
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode("utf-8")) for sample in family.samples}


# Per switch (label ``switch``); a one-switch daemon's tests read its one switch's series.
SWITCH_METRICS = ("ivr_calls_active", "ivr_calls_total", "ivr_esl_connected", "ivr_esl_reconnects_total",
                  "ivr_turns_total", "ivr_barge_ins_total", "ivr_transfers_total", "ivr_transfers_refused_total",
                  "ivr_hangups_by_ivr_total",
                  *(f"{histogram}_{part}" for histogram in ("ivr_turn_first_audio_seconds",
                                                            "ivr_llm_first_sentence_seconds")
                    for part in ("count", "sum", "bucket")))


def value(daemon, name: str, **labels: str) -> float:
    samples = scrape(daemon.metrics)
    if name in SWITCH_METRICS and "switch" not in labels:
        (only,) = daemon.switches
        labels["switch"] = only.name
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not exposed"
    return samples[key]


def turns(daemon) -> dict[str, float]:
    return {outcome: value(daemon, "ivr_turns_total", outcome=outcome)
            for outcome in ("answered", "fallback", "interrupted")}


def observed(daemon, histogram: str) -> tuple[float, float]:
    """(count, sum) of a histogram; its +Inf bucket must hold every observation."""
    count = value(daemon, f"{histogram}_count")
    assert value(daemon, f"{histogram}_bucket", le="+Inf") == count
    return count, value(daemon, f"{histogram}_sum")


def test_a_phone_turn_and_a_call_move_the_counts_and_the_histograms(tmp_path):
    log = TurnLog()
    with FakeLlmServer("ollama", replies=TWO) as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings, on_turn=log) as daemon:
            assert turns(daemon) == {"answered": 0, "fallback": 0, "interrupted": 0}
            assert value(daemon, "ivr_calls_total") == 0 and value(daemon, "ivr_calls_active") == 0
            assert value(daemon, "ivr_esl_connected") == 1

            call = sim.new_call()
            wait_until(lambda: value(daemon, "ivr_calls_active") == 1)
            assert value(daemon, "ivr_calls_total") == 1
            sim.speak(call, "when do you open")
            [turn] = log.wait(1, call)
            wait_heard(sim, call, 2)
            # Counted once its answer has played to the end.
            wait_until(lambda: turns(daemon)["answered"] == 1)
            assert turns(daemon) == {"answered": 1, "fallback": 0, "interrupted": 0}
            count, total_s = observed(daemon, "ivr_turn_first_audio_seconds")
            assert count == 1 and total_s == pytest.approx(turn.first_audio_ms / 1000, abs=1e-6)
            count, total_s = observed(daemon, "ivr_llm_first_sentence_seconds")
            assert count == 1 and total_s == pytest.approx(turn.llm_ms / 1000, abs=1e-6)
            # Two sentences, two cache misses, each synthesized once on a worker thread.
            assert value(daemon, "ivr_tts_cache_misses_total") == 2 and value(daemon, "ivr_tts_cache_hits_total") == 0
            count, total_s = observed(daemon, "ivr_tts_synthesis_seconds")
            assert count == 2 and total_s > 0

            sim.hangup(call)
            wait_until(lambda: value(daemon, "ivr_calls_active") == 0)
            assert value(daemon, "ivr_calls_total") == 1

            # The same answer on the next call comes from the phrase cache: hits, no synthesis.
            second = sim.new_call()
            sim.speak(second, "when do you open")
            log.wait(1, second)
            wait_heard(sim, second, 2)
            wait_until(lambda: turns(daemon)["answered"] == 2)
            assert value(daemon, "ivr_tts_cache_hits_total") == 2 and value(daemon, "ivr_tts_cache_misses_total") == 2
            assert observed(daemon, "ivr_tts_synthesis_seconds")[0] == 2
            assert observed(daemon, "ivr_turn_first_audio_seconds")[0] == 2
            assert value(daemon, "ivr_calls_total") == 2 and value(daemon, "ivr_calls_active") == 1
            assert value(daemon, "ivr_llm_errors_total", kind="http") == 0 and daemon.metrics.last_llm_error is None


def _play_until_second_sentence(sim, call):
    stop = sim.wait_for_event(lambda e: e.name == "PLAYBACK_STOP" and e.unique_id == call, 10)
    sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call and e.sequence > stop.sequence, 10)


def test_a_barge_in_counts_and_its_turn_counts_as_interrupted_not_answered(tmp_path):
    log = TurnLog()
    with FakeLlmServer("ollama", replies=[THREE, "Sure."]) as llm, \
            FreeswitchSimulator(playback_speed=0.5, playback_gap_s=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings, on_turn=log) as daemon:
            call = sim.new_call()
            sim.speak(call, "when do you open")
            _play_until_second_sentence(sim, call)
            [turn] = log.wait(1, call)  # every sentence is sent: the turn is over, its answer still plays
            assert not turn.interrupted
            assert turns(daemon) == {"answered": 0, "fallback": 0, "interrupted": 0}  # not over yet
            sim.speak(call, "hold", final=False)
            sim.wait_for_command(f"api uuid_break {call} all", 5)
            wait_until(lambda: value(daemon, "ivr_barge_ins_total") == 1)
            assert turns(daemon) == {"answered": 0, "fallback": 0, "interrupted": 1}
            # The next turn, heard to the end, is answered.
            sim.speak(call, "hold on a second")
            log.wait(2, call)
            wait_until(lambda: turns(daemon)["answered"] == 1)
            assert turns(daemon) == {"answered": 1, "fallback": 0, "interrupted": 1}
            assert value(daemon, "ivr_barge_ins_total") == 1


def test_a_barge_in_while_the_llm_still_writes_counts_the_cut_turn_as_interrupted(tmp_path):
    with FakeLlmServer("ollama", replies=THREE, stream_hold_after=6) as llm, \
            FreeswitchSimulator(playback_speed=1.0, playback_gap_s=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "when do you open")
            sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 10)
            assert daemon.router.calls[call].handler.busy  # the turn still reads the LLM
            sim.speak(call, "wait", final=False)  # a partial: it cuts the answer, starts no turn
            llm.client_disconnected.wait(5)  # the cut turn closed its stream
            wait_until(lambda: turns(daemon)["interrupted"] == 1)
            assert value(daemon, "ivr_barge_ins_total") == 1
            assert turns(daemon)["answered"] == 0 and turns(daemon)["fallback"] == 0
            assert observed(daemon, "ivr_turn_first_audio_seconds")[0] == 1  # its first sentence went out
            llm.release_stream.set()


def test_a_caller_who_hangs_up_while_the_llm_thinks_cut_the_turn_short(tmp_path):
    with FakeLlmServer("ollama", replies="Hello.", hold_reply=True) as llm, FreeswitchSimulator() as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "hello")
            wait_until(lambda: len(llm.requests) == 1)
            sim.hangup(call)
            wait_until(lambda: turns(daemon)["interrupted"] == 1)
            wait_until(lambda: value(daemon, "ivr_calls_active") == 0)
            assert turns(daemon) == {"answered": 0, "fallback": 0, "interrupted": 1}
            assert observed(daemon, "ivr_llm_first_sentence_seconds")[0] == 0
            assert observed(daemon, "ivr_turn_first_audio_seconds")[0] == 0
            assert value(daemon, "ivr_barge_ins_total") == 0
            llm.release_reply.set()


@pytest.fixture(params=["http", "connection", "bad_reply", "timeout"])
def failing_llm(request, refusing_url):
    """(kind, LLM URL, settings) for an LLM that fails that way."""
    if request.param == "connection":
        yield "connection", refusing_url, {}
        return
    knobs = {"http": {"status": 500}, "bad_reply": {"body": "this is not json"},
             "timeout": {"hold_reply": True}}[request.param]
    with FakeLlmServer("ollama", **knobs) as llm:
        yield request.param, llm.url, {"LLM_TIMEOUT": "1"} if request.param == "timeout" else {}
        llm.release_reply.set()


def test_a_fallback_turn_counts_as_fallback_and_the_llm_error_by_kind(tmp_path, failing_llm):
    kind, url, extra = failing_llm
    log = TurnLog()
    with FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=url, LLM_STREAM="false", **extra)
        with running_daemon(sim, settings, on_turn=log) as daemon:
            call = sim.new_call()
            sim.speak(call, "hello")
            [turn] = log.wait(1, call)
            assert turn.used_fallback
            wait_heard(sim, call)
            wait_until(lambda: turns(daemon)["fallback"] == 1)
            assert turns(daemon) == {"answered": 0, "fallback": 1, "interrupted": 0}
            errors = {k: value(daemon, "ivr_llm_errors_total", kind=k)
                      for k in ("timeout", "connection", "http", "bad_reply")}
            assert errors == {k: (1 if k == kind else 0) for k in errors}
            last = daemon.metrics.last_llm_error
            assert last is not None and last["kind"] == kind and last["error"]
            # The fallback phrase is the turn's first audio; the LLM gave no sentence.
            assert observed(daemon, "ivr_turn_first_audio_seconds")[0] == 1
            assert observed(daemon, "ivr_llm_first_sentence_seconds")[0] == 0


def test_a_reconnect_counts_and_esl_connected_follows_the_connection(tmp_path):
    backoff_over = gevent.event.Event()

    def backoff(delay_s: float) -> None:  # the daemon waits for the test, not for a clock
        backoff_over.wait()

    with FakeLlmServer("ollama", replies="Hello.") as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings, sleep=backoff) as daemon:
            assert value(daemon, "ivr_esl_reconnects_total") == 0 and value(daemon, "ivr_esl_connected") == 1
            sim.drop_connections()
            wait_until(lambda: value(daemon, "ivr_esl_connected") == 0)
            assert value(daemon, "ivr_esl_reconnects_total") == 0
            backoff_over.set()
            wait_until(lambda: value(daemon, "ivr_esl_reconnects_total") == 1)
            assert value(daemon, "ivr_esl_connected") == 1
            sim.drop_connections()
            wait_until(lambda: value(daemon, "ivr_esl_reconnects_total") == 2)


AGENTS = """
[agents.reception]
greeting = ""
transfer_phrase = "Transferring you now."
goodbye_phrase = "Goodbye."
silence_timeout_s = 0

[agents.reception.transfer_targets]
sales = "2000 XML default"

[agents.reception.dtmf]
"9" = "hangup"
"""


def test_transfers_refused_transfers_and_the_daemons_hangups_count(tmp_path):
    agents_file = tmp_path / "agents.toml"
    agents_file.write_text(AGENTS)
    replies = [FakeReply("", [FakeToolCall("transfer_call", {"target": "1000 XML default"})]),
               "Sorry, I can only transfer you to sales.",
               FakeReply("Putting you through.", [FakeToolCall("transfer_call", {"target": "sales"})])]
    with FakeLlmServer("openai", replies=replies) as llm, FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="openai", LLM_API_URL=llm.url,
                                AGENTS_FILE=str(agents_file))
        with running_daemon(sim, settings) as daemon:
            refused = sim.new_call()
            sim.speak(refused, "put me through to extension 1000")
            wait_until(lambda: value(daemon, "ivr_transfers_refused_total") == 1)
            wait_until(lambda: len(llm.requests) == 2 and not daemon.router.calls[refused].handler.busy)
            transferred = sim.new_call()
            sim.speak(transferred, "sales please")
            wait_until(lambda: value(daemon, "ivr_transfers_total") == 1)
            hung_up = sim.new_call()
            sim.dtmf(hung_up, "9")
            sim.wait_for_command(f"api uuid_kill {hung_up} NORMAL_CLEARING", 10)
            wait_until(lambda: value(daemon, "ivr_hangups_by_ivr_total", reason="dtmf") == 1)
            assert value(daemon, "ivr_transfers_refused_total") == 1 and value(daemon, "ivr_transfers_total") == 1
            assert value(daemon, "ivr_hangups_by_ivr_total", reason="silence") == 0
            # The phrases (transfer, goodbye) are not turns; the two LLM turns are.
            wait_until(lambda: sum(turns(daemon).values()) == 2)


def test_two_daemons_in_one_process_do_not_share_counts(tmp_path):
    log = TurnLog()
    with FakeLlmServer("ollama", replies="Hello.") as llm, FreeswitchSimulator(playback_speed=0.02) as busy_sim, \
            FreeswitchSimulator(playback_speed=0.02) as idle_sim:
        with running_daemon(busy_sim, settings_for(busy_sim, tmp_path / "a", LLM_PROVIDER="ollama",
                                                   LLM_API_URL=llm.url), on_turn=log) as busy, \
                running_daemon(idle_sim, settings_for(idle_sim, tmp_path / "b", LLM_PROVIDER="ollama",
                                                      LLM_API_URL=llm.url)) as idle:
            assert busy.metrics.registry is not idle.metrics.registry
            call = busy_sim.new_call()
            busy_sim.speak(call, "hi")
            log.wait(1, call)
            wait_heard(busy_sim, call)
            wait_until(lambda: turns(busy)["answered"] == 1)
            busy_sim.drop_connections()
            wait_until(lambda: value(busy, "ivr_esl_reconnects_total") == 1)
            assert value(busy, "ivr_calls_total") == 1 and value(busy, "ivr_tts_cache_misses_total") == 1
            assert turns(idle) == {"answered": 0, "fallback": 0, "interrupted": 0}
            assert value(idle, "ivr_calls_total") == 0 and value(idle, "ivr_calls_active") == 0
            assert value(idle, "ivr_tts_cache_misses_total") == 0
            assert observed(idle, "ivr_turn_first_audio_seconds")[0] == 0
            assert observed(idle, "ivr_tts_synthesis_seconds")[0] == 0
            assert value(idle, "ivr_esl_reconnects_total") == 0


class _NoSwitch(ConversationHandler):
    follows_playback = False  # nothing plays what it broadcasts (as a test turn over HTTP)


@pytest.mark.parametrize("handler_class, counted_at_once", [(ConversationHandler, False), (_NoSwitch, True)])
def test_a_turn_whose_broadcasts_nothing_plays_is_counted_when_it_ends(tmp_path, handler_class, counted_at_once):
    """With a switch, a turn counts once its answer has played (or the call ended); without
    one, as soon as it has sent everything: a test turn must count at once."""
    with FakeLlmServer("ollama", replies="Hello there.") as llm:
        settings = load_settings(environ={"TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(tmp_path), "LLM_TIMEOUT": "5",
                                          "LLM_PROVIDER": "ollama", "LLM_API_URL": llm.url})
        pool = gevent.threadpool.ThreadPool(1)

        def send(command):  # what FreeSWITCH answers; no PLAYBACK_* event ever follows
            return CommandReply(command=command, text="+OK\n")

        services = TurnServices(settings=settings, llm=make_llm_client(settings), tts=NullEngine(), send=send,
                                synth_pool=pool)
        try:
            handler = handler_class("0b7c3f6e-3a52-4c55-9d7b-2d1f5b1c9a10", get_logger("test"), services)
            handler.handle(EslEvent(headers={"Event-Name": "DETECTED_SPEECH", "Speech-Type": "detected-speech",
                                             "Unique-ID": handler.call_uuid}, body="hi"))
            # Services on no switch (switch=""): their calls' series carry that.
            answered = lambda: value_of(services.metrics, "ivr_turns_total", switch="", outcome="answered")  # noqa: E731
            assert handler.turns == 1 and answered() == (1 if counted_at_once else 0)
            handler.close()  # the call ended: whatever it was, it is counted now
            assert answered() == 1
            assert value_of(services.metrics, "ivr_turn_first_audio_seconds_count", switch="") == 1
            # No phrase cache: the sentence was synthesized into a per-call WAV, and timed.
            assert value_of(services.metrics, "ivr_tts_synthesis_seconds_count") == 1
        finally:
            pool.kill()


def value_of(metrics: DaemonMetrics, name: str, **labels: str) -> float:
    return scrape(metrics)[(name, tuple(sorted(labels.items())))]


# -- the Grafana dashboard --------------------------------------------------------------------------

def exposed_sample_names() -> set[str]:
    """Every sample name the daemon exposes (histograms as _bucket, _sum and _count)."""
    metrics = DaemonMetrics()
    metrics.watch_switch("freeswitch:8021", calls_active=lambda: 0, connected=lambda: True)  # as a Daemon does
    return {name for name, _labels in scrape(metrics)}


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, nested rows included, and of every query variable."""
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"variable {variable['name']}", variable["query"]["query"]))
    return found


def test_the_dashboard_only_queries_metrics_the_daemon_exposes():
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = exposed_sample_names()
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    used: set[str] = set()
    for where, expr in queries:
        names = set(re.findall(r"\bivr_[a-z0-9_]+\b", expr))
        assert names, f"{where} queries no ivr_ metric: {expr}"
        assert names <= exposed, f"{where} queries {sorted(names - exposed)}, which the daemon does not expose"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{where}: {expr}"
        used |= names
    for metric in ISSUE_METRICS:  # every metric the issue names has a panel
        assert any(name == metric or name.startswith(metric + "_") for name in used), f"no panel shows {metric}"


def test_the_dashboard_imports_anywhere():
    dashboard = json.loads(DASHBOARD.read_text())
    assert [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == \
        [("DS_PROMETHEUS", "datasource", "prometheus")]
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["id"] is None
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    prometheus = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in panels:
        assert panel["datasource"] == prometheus and panel["title"] and panel["description"]
        assert all(target["datasource"] == prometheus for target in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0
    titles = " / ".join(panel["title"] for panel in panels)
    for expected in ("Calls active", "Calls per minute", "Turns by outcome", "First audio p50 / p95 / p99",
                     "LLM first sentence p95", "TTS synthesis p95", "TTS cache hit ratio", "Barge-ins per minute",
                     "LLM errors by kind", "ESL reconnects"):
        assert expected in titles
    quantiles = [t["expr"] for p in panels if p["title"].startswith("First audio") for t in p["targets"]]
    assert [re.match(r"histogram_quantile\((0\.\d+),", expr).group(1) for expr in quantiles] == ["0.5", "0.95", "0.99"]


def _burn_cpu_s(seconds: float) -> float:
    """Spin on this thread until it has used ``seconds`` of CPU; the CPU it used."""
    started_s = time.thread_time()
    while time.thread_time() - started_s < seconds:
        sum(range(1000))
    return time.thread_time() - started_s


def test_the_event_loops_cpu_is_the_thread_that_runs_it_and_no_other():
    metrics = DaemonMetrics()  # made on this thread: the one whose loop a daemon runs
    before = scrape(metrics)[("ivr_event_loop_cpu_seconds_total", ())]
    used_s = _burn_cpu_s(0.15)
    after = scrape(metrics)[("ivr_event_loop_cpu_seconds_total", ())]
    # The same clock: what this thread used, plus the scrapes' own few milliseconds.
    assert used_s <= after - before < used_s + 0.05

    # A synthesis or records thread burning CPU beside the loop is not the loop's.
    pool = gevent.threadpool.ThreadPool(1)
    other_thread_s = pool.apply(_burn_cpu_s, (0.3,))
    pool.kill()
    later = scrape(metrics)[("ivr_event_loop_cpu_seconds_total", ())]
    assert other_thread_s >= 0.3
    assert later - after < 0.1
