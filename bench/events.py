#!/usr/bin/env python
"""Event throughput: the ESL parser alone (ours and stock greenswitch's, same captured stream, same
run) and the whole daemon under a flood of partial transcripts.

The stream: real DETECTED_SPEECH partial frames as mod_vosk sends them (tests/captures/41_...,
rebuilt byte-compatible with a Unique-ID per call, a growing Event-Sequence and a growing partial
text), each sent twice as FreeSWITCH does while the leg is parked (capture 80_plain).

  parser_events_per_s           our reader's work per event, without a socket: FrameParser.feed in
                                64 KiB chunks (what one recv() gives the reader), parse_event, and
                                what the router and the call read off it (Event-Name, Unique-ID,
                                Event-Sequence, Core-UUID, Speech-Type, the body)
  greenswitch_events_per_s      stock greenswitch (ESLProtocol.receive_events on the same bytes as
                                its socket file), and the same header reads as each event is queued.
                                It glues each body onto the event's last header (upstream PR #86):
                                greenswitch_bodies_right says whether it got them right
  parser_over_greenswitch       the ratio, per round (same moment, same machine), median of rounds
  daemon_events_per_s           the whole daemon (`ivr-daemon run`, its own process, null TTS, an
                                instant LLM in another process) with --calls live calls on the
                                simulator: --events partials written as fast as the socket takes
                                them, then one final transcript; events / (first partial written
                                -> that transcript's uuid_broadcast read); daemon_cpu_events_per_s:
                                per second of the daemon process's CPU time meanwhile

--baseline PATH (a checkout of this project, e.g. main before a change) measures its parser and its
daemon the same way, interleaved with ours round by round: before/after figures from one run.
Figures are medians of --rounds rounds (best too); goals (issue 13): daemon >= 20,000 events/s,
parser >= 40,000 events/s and >= 2x greenswitch.

Prints a table, and as its last line one JSON object.

Usage: .venv/bin/python bench/events.py [--rounds 5] [--calls 500] [--events 20000] [--baseline ../main]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid as uuid_lib  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import psutil  # noqa: E402

from latency import ROOT, DaemonProcessRig  # noqa: E402  (it puts tests/ on sys.path)

from greenswitch.esl import ESLProtocol  # noqa: E402
from harness import captured_event  # noqa: E402

from ivr_daemon.esl import protocol as our_protocol  # noqa: E402
from ivr_daemon.logs import configure_logging  # noqa: E402

PARTIAL_CAPTURE = "41_event_plain_DETECTED_SPEECH_detected-partial-speech.txt"
CAPTURED_CORE_UUID = "199429e9-6028-49b6-a232-27b5c4e02b2f"
WORDS = "hello i would like to know when your store on main street opens on saturday please".split()
CHUNK_BYTES = 65536  # ivr_daemon.esl.connection.RECV_CHUNK_BYTES: what one recv() hands the parser
DAEMON_GOAL_EVENTS_PER_S = 20_000
PARSER_GOAL_EVENTS_PER_S = 40_000
PARSER_GOAL_OVER_GREENSWITCH = 2.0
# The simulator's own events (calls, the final transcript) are numbered from here; the partials
# written raw take 1..N, so no two events share a dedup key by accident.
SIM_FIRST_SEQUENCE = 10_000_000


def partial_text(index: int) -> str:
    """A partial transcript as it grows while the caller talks (never empty: it is speech)."""
    return " ".join(WORDS[: 1 + index % len(WORDS)])


def partial_stream(call_uuids: list[str], events: int, core_uuid: str = CAPTURED_CORE_UUID) -> bytes:
    """``events`` partial-speech frames (each distinct one twice, as while parked), round-robin over the calls."""
    frames = []
    for index in range(events // 2):
        call = call_uuids[index % len(call_uuids)]
        frame = captured_event(PARTIAL_CAPTURE, body=partial_text(index // len(call_uuids)), Unique_ID=call,
                               Channel_Call_UUID=call, Caller_Unique_ID=call, Core_UUID=core_uuid,
                               Event_Sequence=str(index + 1))
        frames += [frame, frame]
    return b"".join(frames)


def expected_reads(call_uuids: list[str], events: int) -> list[tuple]:
    """What each event of :func:`partial_stream` must read as: (name, uuid, sequence, speech type, body)."""
    reads = []
    for index in range(events // 2):
        read = ("DETECTED_SPEECH", call_uuids[index % len(call_uuids)], index + 1, "detected-partial-speech",
                partial_text(index // len(call_uuids)))
        reads += [read, read]
    return reads


# -- the parser alone ---------------------------------------------------------------------------


def load_protocol(checkout: Path):
    """Another checkout's ivr_daemon/esl/protocol.py as its own module (it imports only the stdlib)."""
    spec = importlib.util.spec_from_file_location("baseline_esl_protocol", checkout / "ivr_daemon" / "esl" / "protocol.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def run_our_parser(protocol, stream: bytes) -> list[tuple]:
    """The reader's part (ivr_daemon.esl.connection.EslConnection.receive_events/_route) and the
    router's reads, on ``stream`` cut as recv() would cut it."""
    parser = protocol.FrameParser()
    # The connection's parser reads its events (its repeat shortcut); a checkout from before
    # that kept the shortcut in a module global and had only the module's parse_event.
    parse_event = parser.parse_event if hasattr(parser, "parse_event") else protocol.parse_event
    reads = []
    for start in range(0, len(stream), CHUNK_BYTES):
        for frame in parser.feed(stream[start : start + CHUNK_BYTES]):
            event = parse_event(frame, received_s=0.0)
            headers = event.headers
            headers.get("Core-UUID")  # the dedup key
            reads.append((event.name, event.unique_id, event.sequence, event.get("Speech-Type"), event.body))
    return reads


class _ReadingQueue(list):
    """greenswitch's event queue, minus the queue: each event is read as it is put (as its
    process_events greenlet would take it) and not kept, so only its parsing is timed."""

    def put(self, event) -> None:
        headers = event.headers
        headers.get("Core-UUID")  # the dedup key
        sequence = headers.get("Event-Sequence", "")
        # It has no body: the text is glued onto the last header, "Content-Length: 5\n\nhello".
        self.append((headers.get("Event-Name"), headers.get("Unique-ID"),
                     int(sequence) if sequence.isdigit() else None, headers.get("Speech-Type"), None))


def run_greenswitch(stream: bytes) -> list[tuple]:
    """Stock greenswitch's reader on ``stream`` as its socket file, and the same header reads."""
    esl = ESLProtocol()
    esl.sock_file = io.BytesIO(stream)
    esl.sock = None
    esl.connected = True
    esl._esl_event_queue = _ReadingQueue()
    esl.receive_events()
    return esl._esl_event_queue


def bench_parsers(args, baseline) -> dict:
    calls = [str(uuid_lib.uuid4()) for _ in range(args.calls)]
    stream = partial_stream(calls, args.events)
    expected = expected_reads(calls, args.events)
    runners = {"ours": lambda: run_our_parser(our_protocol, stream), "greenswitch": lambda: run_greenswitch(stream)}
    if baseline is not None:
        runners["baseline"] = lambda: run_our_parser(baseline, stream)
    # Right before fast: ours and the baseline read exactly what was written; greenswitch reads the
    # headers right and the bodies wrong.
    for name, run in runners.items():
        reads = run()
        assert len(reads) == len(expected), (name, len(reads))
        if name != "greenswitch":
            assert reads == expected, f"{name} misread the stream"
        else:
            assert [r[:4] for r in reads] == [e[:4] for e in expected], "greenswitch misread the headers"
    rates: dict[str, list[float]] = {name: [] for name in runners}
    cpu_rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():  # interleaved: each round sees the same machine load
            started_s, started_cpu_s = time.perf_counter(), time.process_time()
            run()
            rates[name].append(args.events / (time.perf_counter() - started_s))
            cpu_rates[name].append(args.events / (time.process_time() - started_cpu_s))
    ratios = [ours / theirs for ours, theirs in zip(rates["ours"], rates["greenswitch"])]
    cpu_ratios = [ours / theirs for ours, theirs in zip(cpu_rates["ours"], cpu_rates["greenswitch"])]
    figures = {
        "stream_bytes": len(stream),
        "parser_events_per_s": round(statistics.median(rates["ours"])),
        "parser_best_events_per_s": round(max(rates["ours"])),
        "greenswitch_events_per_s": round(statistics.median(rates["greenswitch"])),
        "greenswitch_best_events_per_s": round(max(rates["greenswitch"])),
        "parser_over_greenswitch": round(statistics.median(ratios), 2),
        # Per second of this process's CPU time: what a busy machine (other processes on the
        # cores) does not take away.
        "parser_cpu_events_per_s": round(statistics.median(cpu_rates["ours"])),
        "greenswitch_cpu_events_per_s": round(statistics.median(cpu_rates["greenswitch"])),
        "parser_cpu_over_greenswitch": round(statistics.median(cpu_ratios), 2),
        "parser_bodies_right": True,  # asserted above
        "greenswitch_bodies_right": greenswitch_bodies_right(),
    }
    if baseline is not None:
        figures["baseline_parser_events_per_s"] = round(statistics.median(rates["baseline"]))
        figures["baseline_parser_cpu_events_per_s"] = round(statistics.median(cpu_rates["baseline"]))
        figures["parser_over_baseline"] = round(statistics.median(
            [ours / before for ours, before in zip(rates["ours"], rates["baseline"])]), 2)
    return figures


def greenswitch_bodies_right() -> bool:
    """Does greenswitch read capture 90's body ('héllo wörld ✓ "q" 100%AB', raw UTF-8) as it was sent?

    It has no body: the text is glued onto the event's last header ("Content-Length: 28\n\n...")
    and URL-decoded with the headers, so "100%AB" loses its last three bytes."""
    capture = ROOT / "tests" / "captures" / "90_event_plain_DETECTED_SPEECH_utf8_quotes_percent_body.txt"
    [event] = _greenswitch_events(capture.read_bytes())
    glued = event.headers.get("Content-Length", "")
    body = glued.split("\n\n", 1)[1] if "\n\n" in glued else None
    return glued == "28" and body == 'h\u00e9llo w\u00f6rld \u2713 "q" 100%AB'



def _greenswitch_events(stream: bytes) -> list:
    class Kept(list):
        put = list.append

    esl = ESLProtocol()
    esl.sock_file, esl.sock, esl.connected, esl._esl_event_queue = io.BytesIO(stream), None, True, Kept()
    esl.receive_events()
    return list(esl._esl_event_queue)


# -- the whole daemon -----------------------------------------------------------------------------


def bench_daemon_once(args, checkout: Path | None) -> tuple[float, float]:
    """events/s of one daemon (ours, or ``checkout``'s) from the first partial written to the
    final transcript's uuid_broadcast read; and per second of the daemon process's CPU time."""
    instant_llm = SimpleNamespace(first_token_ms=0.0, tokens_per_s=math.inf)  # latency.py's INSTANT_LLM_ARGS
    # The call flow as deployed (greeting, silence clock, INFO logs), but a silence timeout
    # longer than the set-up of 500 calls takes: a re-prompt playing when the partials come
    # would turn them into barge-ins, another path than the one measured.
    extra_env = {"GREETING": "Hello.", "SILENCE_TIMEOUT_S": "600", "LOG_LEVEL": "INFO"}
    rig = DaemonProcessRig(instant_llm, extra_env=extra_env, checkout=checkout or ROOT,
                           sim_options={"playback_speed": 0.0, "duplicate_speech_delay_s": 0.0,
                                        "first_event_sequence": SIM_FIRST_SEQUENCE, "history_limit": 20_000})
    try:
        sim = rig.sim
        calls = [sim.new_call() for _ in range(args.calls)]
        # Every call greeted, the greeting played to its end (nothing plays now: every partial can
        # be dropped early) and its silence clock running.
        for call in calls:
            sim.wait_for_event(lambda e, call=call: e.name == "PLAYBACK_STOP" and e.unique_id == call, 120,
                               consume=False)
        stream = partial_stream(calls, args.events, core_uuid=sim.core_uuid)
        asker = calls[len(calls) // 2]
        daemon = psutil.Process(rig.daemon.pid)
        cpu_before = daemon.cpu_times()
        started = time.monotonic()
        sim.inject_raw(stream)  # one write, taken as fast as the daemon reads
        sim.speak(asker, "when do you open on saturday")
        answered = sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {asker} ")
                                        and f"/{asker}-" in c.line, 300, consume=False)
        cpu_after = daemon.cpu_times()
        cpu_s = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        # Nothing played during the flood: a uuid_break would mean partials took another path.
        breaks = [c.line for c in sim.commands if c.line.startswith("api uuid_break")]
        assert not breaks, f"{len(breaks)} partials barged in ({checkout})"
        return (args.events + 1) / (answered.t_monotonic - started), (args.events + 1) / cpu_s
    finally:
        rig.close()


def bench_daemons(args, baseline_checkout: Path | None) -> dict:
    rates: dict[str, list[float]] = {"ours": [], "baseline": []}
    cpu_rates: dict[str, list[float]] = {"ours": [], "baseline": []}
    for _ in range(args.daemon_rounds):
        for name, checkout in (("ours", None), ("baseline", baseline_checkout)):
            if name == "baseline" and checkout is None:
                continue
            rate, cpu_rate = bench_daemon_once(args, checkout)
            rates[name].append(rate)
            cpu_rates[name].append(cpu_rate)
    figures = {"daemon_events_per_s": round(statistics.median(rates["ours"])),
               "daemon_best_events_per_s": round(max(rates["ours"])),
               "daemon_cpu_events_per_s": round(statistics.median(cpu_rates["ours"])),
               "daemon_calls": args.calls, "daemon_events": args.events}
    if baseline_checkout is not None:
        figures["baseline_daemon_events_per_s"] = round(statistics.median(rates["baseline"]))
        figures["baseline_daemon_cpu_events_per_s"] = round(statistics.median(cpu_rates["baseline"]))
        figures["daemon_over_baseline"] = round(statistics.median(
            [ours / before for ours, before in zip(rates["ours"], rates["baseline"])]), 2)
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--events", type=int, default=20_000, help="partial-speech events (even: each is sent twice)")
    parser.add_argument("--rounds", type=int, default=7, help="parser rounds (each times every parser once)")
    parser.add_argument("--daemon-rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a checkout of this project to compare with (before/after)")
    parser.add_argument("--only", choices=("parser", "daemon"), help="run one half")
    args = parser.parse_args(argv)
    configure_logging("ERROR", "console")
    baseline_checkout = args.baseline.resolve() if args.baseline else None
    started = time.monotonic()
    # Other processes on the cores show in the events/s (not in the CPU-time rates): say how many.
    figures: dict[str, object] = {"load_avg_1m_before": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    if args.only in (None, "parser"):
        baseline = load_protocol(baseline_checkout) if baseline_checkout else None
        figures.update(bench_parsers(args, baseline))
        print(f"parser, {args.events} partials: ours {figures['parser_events_per_s']:,}/s, stock greenswitch "
              f"{figures['greenswitch_events_per_s']:,}/s (x{figures['parser_over_greenswitch']}; its bodies right: "
              f"{figures['greenswitch_bodies_right']})"
              + (f", baseline {figures['baseline_parser_events_per_s']:,}/s" if baseline else ""))
    if args.only in (None, "daemon"):
        figures.update(bench_daemons(args, baseline_checkout))
        print(f"whole daemon, {args.calls} calls, {args.events} partials + 1 final transcript: "
              f"{figures['daemon_events_per_s']:,} events/s"
              + (f", baseline {figures['baseline_daemon_events_per_s']:,}/s" if baseline_checkout else ""))
    goals = {}
    if "parser_events_per_s" in figures:
        goals["parser_events_per_s"] = figures["parser_events_per_s"] >= PARSER_GOAL_EVENTS_PER_S
        goals["parser_over_greenswitch"] = figures["parser_over_greenswitch"] >= PARSER_GOAL_OVER_GREENSWITCH
    if "daemon_events_per_s" in figures:
        goals["daemon_events_per_s"] = figures["daemon_events_per_s"] >= DAEMON_GOAL_EVENTS_PER_S
    figures["goals"] = goals
    figures["goals_met"] = all(goals.values())
    figures["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    figures["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
