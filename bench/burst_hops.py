#!/usr/bin/env python
"""Where a burst turn's loop time goes, hop by hop: latency.py's burst (--burst-calls final
transcripts written back to back, an instant LLM, null TTS through a warm phrase cache, the
daemon as ``ivr-daemon run`` in its own process) with the daemon's hops stamped.

Each turn of the burst is stamped (wall clock and the loop thread's CPU time, ``thread_time``)
at: its final transcript routed by the ESL reader (``route``), its call's greenlet handling it
(``handle``), its turn's greenlet started (``turn``), its producer started (``produce``), the LLM
POST begun (``post``), a new connection's connect begun and done (``connect``, ``connected``), the
request written (``sent``), its answer waiting in the idle lane and let go (``lane_in``,
``lane_out``), the answer's status line and headers read (``posted``), its first sentence cut
(``first_sentence``), and its first ``uuid_broadcast`` handed to the ESL writer and answered
(``broadcast``, ``broadcast_answered``). Stamps are ~2 us each: the daemon runs at its usual pace.

Printed: per hop, when the turns reached it (ms since the burst's first route: min, p50, max;
and the loop's CPU by then, same), the loop's CPU per turn between the phases of the burst (all
routed, all handled, all turns started, all producers started, all requests written, all answers
let go, all first sentences, all first broadcasts), and per turn the parts of the overhead the
benchmark reports (``pre``: routed -> producer started; ``lane``: its answer's wait in the lane;
``post``: first sentence -> broadcast handed to the writer). Last line: one JSON object.
--baseline PATH runs that checkout's daemon too, round by round. --warm-calls N: the daemon has
just answered a burst of N other calls (its LLM connections kept alive in the pool: the measured
turns reuse up to N of them instead of opening new ones), as a daemon shortly after a burst is.

Usage: .venv/bin/python bench/burst_hops.py [--burst-calls 200] [--rounds 1] [--baseline /work/main]
                                           [--warm-calls 0]
"""

import latency as L  # noqa: F401 -- first: it monkey-patches, and puts tests/ on sys.path

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


HOPS = ("route", "handle", "turn", "produce", "post", "connect", "connected", "sent", "lane_in", "lane_out",
        "posted", "first_sentence", "broadcast", "broadcast_answered")
# (phase name, the hop every turn has passed at its end)
PHASES = (("routed", "route"), ("handled", "handle"), ("turns_started", "turn"), ("producers_started", "produce"),
          ("requests_written", "sent"), ("answers_let_go", "lane_out"), ("first_sentences", "first_sentence"),
          ("first_broadcasts", "broadcast"))

# The daemon's process: latency.py's SIGUSR1/SIGUSR2 protocol (see its PROFILER), stamps instead of cProfile.
TRACER = """
import collections, json, runpy, signal, time
from gevent import monkey
monkey.patch_all()
import gevent
from ivr_daemon import calls, call_flow, conversation, idle_lane, turn_services
from ivr_daemon.llm import paced, transport
on, hops, owner = [False], collections.defaultdict(dict), {{}}
tt, mono = time.thread_time, time.monotonic
def mark(uuid, hop):
    if on[0] and uuid is not None and hop not in hops[uuid]:
        hops[uuid][hop] = (mono(), tt())
def mine(hop):
    return lambda *_a, **_k: mark(owner.get(gevent.getcurrent()), hop)
def start(*_):
    on[0] = True
def stop(*_):
    on[0] = False
    with open({path!r}, "w") as out:
        json.dump(hops, out)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
""" + L.WRAP_METHOD + """def final(event):
    return event.headers.get("Event-Name") == "DETECTED_SPEECH" and event.headers.get("Speech-Type") == "detected-speech"
wrap(calls.CallRouter, "route", before=lambda _s, event: final(event) and mark(event.headers.get("Unique-ID"), "route"))
wrap(call_flow.PhoneCall, "handle", before=lambda s, event: final(event) and mark(s.call_uuid, "handle"))
def owned(hop):
    def stamp(s, *_a, **_k):
        owner[gevent.getcurrent()] = s.call_uuid
        mark(s.call_uuid, hop)
    return stamp
wrap(conversation.ConversationHandler, "_turn", before=owned("turn"))
wrap(conversation.ConversationHandler, "_produce", before=owned("produce"))
wrap(transport.LlmTransport, "post", before=mine("post"), after=mine("posted"))
wrap(paced._LanePacedConnection, "connect", before=mine("connect"), after=mine("connected"))
wrap(paced._LanePacedConnection, "getresponse", before=mine("sent"))
wrap(idle_lane.IdleLane, "wait", before=lambda _s, first=False, **_k: first and mine("lane_in")(),
     after=lambda _s, first=False, **_k: first and mine("lane_out")())
wrap(turn_services.TurnServices, "spawn_synthesis", before=mine("first_sentence"))
wrap(conversation.ConversationHandler, "_broadcast", before=lambda s, *_a: mark(s.call_uuid, "broadcast"),
     after=lambda s, *_a: mark(s.call_uuid, "broadcast_answered"))
runpy.run_module("ivr_daemon", run_name="__main__")
"""


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def analyse(hops: dict) -> dict:
    """The figures of one burst's stamps (see the module's doc)."""
    turns = [h for h in hops.values() if "route" in h]
    wall0 = min(h["route"][0] for h in turns)
    cpu0 = min(h["route"][1] for h in turns)
    figures: dict = {"turns": len(turns), "hops": {}, "phase_cpu_ms_per_turn": {}}
    for hop in HOPS:
        walls = [(h[hop][0] - wall0) * 1000 for h in turns if hop in h]
        cpus = [(h[hop][1] - cpu0) * 1000 for h in turns if hop in h]
        if walls:
            figures["hops"][hop] = {"n": len(walls), "wall_ms": [round(pct(walls, q), 1) for q in (0, 0.5, 1)],
                                    "loop_cpu_ms": [round(pct(cpus, q), 1) for q in (0, 0.5, 1)]}
    before_ms = 0.0
    for phase, hop in PHASES:
        if hop in figures["hops"]:
            end_ms = figures["hops"][hop]["loop_cpu_ms"][2]
            figures["phase_cpu_ms_per_turn"][phase] = round((end_ms - before_ms) / len(turns), 3)
            before_ms = end_ms
    parts = {"pre": [], "lane": [], "post": [], "sum": []}
    for h in turns:
        if not all(hop in h for hop in ("produce", "first_sentence", "broadcast")):
            continue
        pre = (h["produce"][0] - h["route"][0]) * 1000
        lane = (h["lane_out"][0] - h["lane_in"][0]) * 1000 if "lane_in" in h and "lane_out" in h else 0.0
        post = (h["broadcast"][0] - h["first_sentence"][0]) * 1000
        for name, value in (("pre", pre), ("lane", lane), ("post", post), ("sum", pre + lane + post)):
            parts[name].append(value)
    figures["overhead_parts_ms"] = {name: {"p50": round(pct(v, 0.5), 1), "p99": round(pct(v, 0.99), 1)}
                                    for name, v in parts.items()}
    figures["answers_read_outside_the_lane"] = len(turns) - figures["hops"].get("lane_in", {}).get("n", 0)
    return figures


def burst(args, path: Path, checkout=None, warm_calls: int = 0):
    """latency.py's bench_burst (its rig, its instant LLM, its SIGUSR1/SIGUSR2 around the burst,
    here the stamps), after a burst of ``warm_calls`` other calls when asked: (overheads in ms,
    daemon CPU ms a turn)."""
    _samples, overheads, _strict, cpu_ms = L.bench_burst(args, profile_path=path, checkout=checkout,
                                                         warm_calls=max(1, warm_calls))
    return overheads, cpu_ms["daemon"] / args.burst_calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst-calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", type=Path, help="also run this checkout's daemon, round by round")
    parser.add_argument("--warm-calls", type=int, default=0,
                        help="a burst of this many other calls first: their LLM connections kept in the pool")
    parser.add_argument("--tts-worker-priority", default=None)
    args = parser.parse_args()
    L.configure_logging("ERROR", "console")  # the simulator's lines: not this report's
    args.first_token_ms, args.tokens_per_s = 0.0, float("inf")  # unused by the burst: its LLM is instant
    L.PROFILER = TRACER  # the burst's SIGUSR1/SIGUSR2 now start and dump the stamps
    variants = [("baseline_", args.baseline), ("", None)] if args.baseline else [("", None)]
    results: dict = {prefix: [] for prefix, _ in variants}
    with tempfile.TemporaryDirectory(prefix="burst-hops-") as scratch:
        for round_index in range(args.rounds):
            for prefix, checkout in variants:
                path = Path(scratch) / f"{prefix}hops-{round_index}.json"
                overheads, cpu_ms_per_turn = burst(args, path, checkout, args.warm_calls)
                figures = analyse(json.loads(path.read_text()))
                figures.update(overhead_p50_ms=round(pct(overheads, 0.5), 1), overhead_p99_ms=round(pct(overheads, 0.99), 1),
                               daemon_cpu_ms_per_turn=round(cpu_ms_per_turn, 2))
                results[prefix].append(figures)
                print(f"{prefix or 'ours: '}round {round_index + 1}: overhead p50 {figures['overhead_p50_ms']} ms, "
                      f"p99 {figures['overhead_p99_ms']} ms; daemon CPU {figures['daemon_cpu_ms_per_turn']} ms a turn; "
                      f"answers read outside the lane {figures['answers_read_outside_the_lane']}")
                for hop, row in figures["hops"].items():
                    print(f"    {hop:20s} n={row['n']:4d}  wall ms {row['wall_ms']}  loop CPU ms {row['loop_cpu_ms']}")
                print(f"    loop CPU a turn by phase (ms): {figures['phase_cpu_ms_per_turn']}")
                print(f"    overhead parts (ms): {figures['overhead_parts_ms']}")
    summary = {}
    for prefix, runs in results.items():
        for phase in runs[0]["phase_cpu_ms_per_turn"]:
            summary[f"{prefix}{phase}_cpu_ms_per_turn"] = round(
                statistics.median(run["phase_cpu_ms_per_turn"].get(phase, float("nan")) for run in runs), 3)
        for name in ("overhead_p50_ms", "overhead_p99_ms", "daemon_cpu_ms_per_turn", "answers_read_outside_the_lane"):
            summary[f"{prefix}{name}"] = statistics.median(run[name] for run in runs)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
