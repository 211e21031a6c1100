#!/usr/bin/env python
"""Where the daemon's loop CPU goes, per turn, by the greenlet that spent it.

The daemon (``ivr-daemon run``, its own process) runs one of the benchmarks' scenarios with a
tracer on its loop thread (greenlet.settrace): at every switch the thread's CPU time
(``thread_time``) since the last switch is charged to the greenlet that ran, named by what it
runs (the ESL reader and writer, a call's worker, a turn, the hub: libev's wake-ups, timers and
callbacks...). A turn's LLM producer is split by phase:

  producer/before_post     built the prompt, up to its POST
  producer/post            the POST: connection, request, the answer's wait in the idle lane,
                           its status line and headers
  producer/to_first_chunk  the answer's head read -> its first chunk handed to synthesis
  producer/rest            the rest of the reply (later chunks, their syntheses started)

Scenarios:

  burst     latency.py's burst: --burst-calls callers finishing a sentence in the same instant,
            an instant LLM, cached null TTS; from the burst's first transcript to its last first
            broadcast (as latency.py's --profile-daemon)
  one       multiswitch.py's 1 x --calls-per-switch calls, each asking once within --spread-s,
  several   and --switches x --calls-per-switch (the issue's 4 x 250); an LLM at
            --first-token-ms and --tokens-per-s; from the calls' first event to the last turn

The tracer costs ~2 us a switch (~0.2 ms of a 4 x 250 turn's ~110 switches), in the figures.
The split says where to cut; the figures of record are the scenarios' own benchmarks. Prints,
per round, the total and the biggest greenlets; last line one JSON object: per greenlet (and
producer phase) ms of loop CPU per turn and switches per turn, averaged over the rounds.
--baseline PATH runs that checkout's daemon too, round by round, each round's first in turn (noise
hits both alike): its figures under ``baseline``.

Usage: .venv/bin/python bench/loop_by_greenlet.py burst [--burst-calls 200] [--rounds 3]
       .venv/bin/python bench/loop_by_greenlet.py several [--switches 4] [--calls-per-switch 250]
                                                          [--spread-s 10] [--rounds 1]
       (either with [--baseline /path/to/another/checkout])
"""

import latency as L  # noqa: F401 -- first: it monkey-patches, and puts tests/ on sys.path

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# The daemon's process: latency.py's SIGUSR1/SIGUSR2 protocol (see its PROFILER), per-greenlet
# CPU instead of cProfile.
TRACER = """
import collections, json, runpy, signal, time, weakref
from gevent import monkey
monkey.patch_all()
import gevent, greenlet
from ivr_daemon import turn_services
from ivr_daemon.llm import transport
cpu_s, switches = collections.Counter(), collections.Counter()
on, last_s = [False], [0.0]
names, phases = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()
thread_time = time.thread_time
PRODUCER = "conversation:ConversationHandler._turn.<locals>.<lambda>"
def name_of(glet):
    try:
        return names[glet]
    except (KeyError, TypeError):
        pass
    if type(glet).__name__ == "Hub":
        name = "hub"
    elif glet.parent is None:
        name = "main"
    else:
        run = getattr(glet, "_run", None) or getattr(glet, "run", None)
        function = getattr(run, "__func__", run)
        name = ((getattr(function, "__module__", None) or "").rsplit(".", 1)[-1] + ":"
                + (getattr(function, "__qualname__", None) or type(run).__name__))
    if name == PRODUCER:
        name = "producer"
    try:
        names[glet] = name
    except TypeError:
        pass
    return name
def charge(glet, count):
    now_s = thread_time()
    name = name_of(glet)
    if name == "producer":
        name += "/" + phases.get(glet, "before_post")
    cpu_s[name] += now_s - last_s[0]
    switches[name] += count
    last_s[0] = now_s
def trace(event, args):
    if on[0] and event in ("switch", "throw"):
        charge(args[0], 1)
def phase(name):
    def enter(*_args, **_kwargs):
        glet = gevent.getcurrent()
        if on[0] and name_of(glet) == "producer" and phases.get(glet) != "rest":
            charge(glet, 0)  # what it spent so far goes to the phase it was in
            phases[glet] = name
    return enter
""" + L.WRAP_METHOD + """wrap(transport.LlmTransport, "post", before=phase("post"), after=phase("to_first_chunk"))
wrap(turn_services.TurnServices, "spawn_synthesis", before=phase("rest"))
def start(*_):
    cpu_s.clear()
    switches.clear()
    last_s[0] = thread_time()
    on[0] = True
    greenlet.settrace(trace)
def stop(*_):
    on[0] = False
    greenlet.settrace(None)
    with open({path!r}, "w") as out:
        json.dump({{"cpu_s": cpu_s, "switches": switches}}, out)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
runpy.run_module("ivr_daemon", run_name="__main__")
"""

SHOWN = 12  # greenlets per round's line


def one_round(args, path: Path, checkout: Path | None) -> int:
    """Run the scenario once (the daemon of ``checkout``, None: this one) with the tracer writing
    to ``path``; the number of turns it had."""
    if args.scenario == "burst":
        L.bench_burst(args, profile_path=path, checkout=checkout)
        return args.burst_calls
    import multiswitch  # here: its argument defaults are not this script's

    switches = args.switches if args.scenario == "several" else 1
    llm = subprocess.Popen(L.fake_llm_cmd(L.REPLY, args.first_token_ms, args.tokens_per_s), stdout=subprocess.PIPE,
                           text=True)
    try:
        llm_url = llm.stdout.readline().strip()
        _overheads, turns, *_rest = multiswitch.one_setup(args, switches, args.calls_per_switch, llm_url, seed=7,
                                                          llm_pid=llm.pid, checkout=checkout or L.ROOT,
                                                          profile_path=str(path))
        return turns
    finally:
        llm.terminate()
        llm.wait(10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("burst", "one", "several"))
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 for the burst, 1 otherwise")
    parser.add_argument("--burst-calls", type=int, default=200)
    parser.add_argument("--switches", type=int, default=4)
    parser.add_argument("--calls-per-switch", type=int, default=250)
    parser.add_argument("--spread-s", type=float, default=10.0)
    parser.add_argument("--first-token-ms", type=float, default=200.0, help="one and several: the LLM's")
    parser.add_argument("--tokens-per-s", type=float, default=30.0, help="one and several: the LLM's")
    parser.add_argument("--playback-speed", type=float, default=0.0, help="one and several: the simulators'")
    parser.add_argument("--baseline", type=Path, default=None, help="also run this checkout's daemon, round by round")
    args = parser.parse_args()
    args.whole_calls, args.tts_worker_priority = False, None  # multiswitch.one_setup's other options: defaults
    rounds = args.rounds or (3 if args.scenario == "burst" else 1)
    L.configure_logging("ERROR", "console")  # the simulators' lines: not this report's
    L.PROFILER = TRACER  # the scenarios' SIGUSR1/SIGUSR2 now start and dump the tracer
    variants = [("", None)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    cpu_ms = {name: collections.Counter() for name, _ in variants}
    switch_count = {name: collections.Counter() for name, _ in variants}
    all_turns = {name: 0 for name, _ in variants}
    with tempfile.TemporaryDirectory(prefix="loop-by-greenlet-") as scratch:
        for round_index in range(rounds):
            # Which goes first alternates: in one order, the first of each pair ran ~8 % cheaper on
            # every greenlet alike (4 x 250, two variants, two rounds).
            for name, checkout in variants[round_index % len(variants):] + variants[:round_index % len(variants)]:
                path = Path(scratch) / f"{name or 'ours'}-{round_index}.json"
                turns = one_round(args, path, checkout)
                traced = json.loads(path.read_text())
                round_ms = {greenlet: seconds * 1000 for greenlet, seconds in traced["cpu_s"].items()}
                cpu_ms[name].update(round_ms)
                switch_count[name].update(traced["switches"])
                all_turns[name] += turns
                top = sorted(round_ms.items(), key=lambda item: -item[1])[:SHOWN]
                print(f"{name or 'ours'} round {round_index + 1}: {turns} turns, loop CPU "
                      f"{sum(round_ms.values()) / max(1, turns):.3f} ms a turn: "
                      + ", ".join(f"{greenlet} {ms / max(1, turns):.3f}" for greenlet, ms in top), flush=True)
    figures: dict = {"scenario": args.scenario, "rounds": rounds}
    for name, _checkout in variants:
        turns = max(1, all_turns[name])
        per_turn = {greenlet: {"cpu_ms_per_turn": round(ms / turns, 3),
                               "switches_per_turn": round(switch_count[name][greenlet] / turns, 1)}
                    for greenlet, ms in sorted(cpu_ms[name].items(), key=lambda item: -item[1])}
        variant = {"turns": all_turns[name], "loop_cpu_ms_per_turn": round(sum(cpu_ms[name].values()) / turns, 3),
                   "switches_per_turn": round(sum(switch_count[name].values()) / turns, 1), "by_greenlet": per_turn}
        if name:
            figures[name] = variant
        else:
            figures.update(variant)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
