#!/usr/bin/env python
"""Loop slices: how long the daemon's gevent loop runs one greenlet, and one loop pass, without
letting IO in, during latency.py's overhead measurement (and what ran in the long ones).

A turn's event, its LLM answer or its synthesis result waits, once its bytes have landed, for
the loop's next poll: for whatever greenlet is running to switch out and for the rest of the
pass (the other ready greenlets and callbacks) to end. This runs latency.py's overhead load
(--calls calls, each asking once at a random moment within --spread-s; LLM first token after
--first-token-ms, then --tokens-per-s; null TTS; the daemon as ``ivr-daemon run`` in its own
process) with the daemon under a tracer:

- every greenlet switch (greenlet.settrace): a *slice* is a greenlet's run from a switch into it
  to its switch out (the hub's own runs are not slices: they include the poll), in the loop
  thread's CPU time (``time.thread_time``) and in wall time (on a loaded box mostly preemption);
- every loop pass: a libev check watcher at priority 2 (first after the poll) and a prepare
  watcher at priority -2 (last before the next poll): a *pass* is poll -> poll, everything the
  loop ran between two looks at the sockets;
- every frame the ESL reader routes, its CPU by kind (``reader_frames``).

Each slice of >= --detail-ms of CPU is kept with its greenlet's function and the innermost
project frames where it resumed and where it switched out (``top_sources``: where the long
stretches of work were), each pass of twice that with its biggest slices (``long_passes``).
Per turn, from its turn_complete line and the simulator's stamps (one clock, CLOCK_MONOTONIC):
``read`` (frame written -> parsed), ``queued`` (parsed -> turn started), ``in_turn`` (the rest,
less the idle lane's wait) and ``overhead_loop_cpu`` (the loop's CPU during the turn's overhead
windows: what ran in front of it, preemption left out). The tracer costs ~1-1.5 ms of CPU a
turn, so traced figures sit a little above the untraced daemon's.

Prints a line per run and, last, one JSON object of medians over the rounds: overhead p50/p99
(``overhead_less_lane_p99_ms`` too), the daemon's CPU a turn (process, and its loop thread alone:
null TTS writes its WAVs in gevent's thread pool). --baseline PATH runs another checkout's
daemon too, round by round, alternating which goes first; ours is this checkout's, named
(a bare ``python -m ivr_daemon`` runs whichever ivr_daemon the interpreter finds).
--no-trace runs the daemon untraced (``python -m ivr_daemon``): overhead and CPU only, the A/B.
--profile-reader PATH also runs the reader's frame routing under cProfile (traced runs), its stats
written to PATH.<ours|baseline>.<round>.prof for pstats: where a frame's CPU goes, by function
(the profiler roughly doubles ``reader_frames``' figures; compare those without it).

Usage: .venv/bin/python bench/loop_slices.py [--calls 200] [--spread-s 10] [--baseline /work/main]
                                              [--rounds 3] [--no-trace] [--profile-reader /tmp/reader]
"""

import latency as L  # noqa: F401 -- first: it monkey-patches, and puts tests/ on sys.path

import argparse  # noqa: E402
import bisect  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

# Run as the daemon's process (``python -c``): the tracer, started by SIGUSR1, dumped by SIGUSR2.
TRACER = r"""
import collections, json, os, runpy, signal, sys, time, weakref
import greenlet, gevent, gevent.hub
clock = time.perf_counter
cpu = time.thread_time  # the loop's CPU: a slice's wall time on a loaded box includes preemption
PROJECT = os.sep + "ivr_daemon" + os.sep
DETAIL_S = {detail_s!r}
on = [False]
last = [None, None, (), None]  # switched in at, greenlet, resume frames (project ones), CPU then
poll = [None, None]            # the last poll's end: wall, CPU
slices, slices_cpu, passes, passes_cpu, details = [], [], [], [], []
in_pass = []      # this pass's slices: (CPU, greenlet, resumed at)
pass_details = []  # the long passes: CPU, wall, slices, their CPU, the biggest of them
marks = []  # every pass: its start and end, wall and CPU (the loop's CPU as a function of time)
labels = weakref.WeakKeyDictionary()
hub = gevent.hub.get_hub()

def sites(frame):
    out = []
    while frame is not None and len(out) < 4:
        code = frame.f_code
        if PROJECT in code.co_filename:
            out.append(code.co_filename.rsplit(PROJECT, 1)[1] + ":" + code.co_name + ":" + str(frame.f_lineno))
        frame = frame.f_back
    return tuple(out)

def label(g):
    name = labels.get(g)
    if name is None:
        run = getattr(g, "_run", None) or getattr(g, "run", None)
        func = getattr(run, "__func__", run)
        name = getattr(func, "__qualname__", None) or type(g).__name__
        module = getattr(func, "__module__", "") or ""
        name = module.rsplit(".", 1)[-1] + "." + name if module else name
        try:
            labels[g] = name
        except TypeError:
            pass
    return name

def trace(event, args):
    if not on[0]:
        return
    now, now_cpu = clock(), cpu()
    origin, target = args
    started, running, resumed, started_cpu = last
    if started is not None and running is origin and origin is not hub:
        length, length_cpu = now - started, now_cpu - started_cpu
        slices.append(length)
        slices_cpu.append(length_cpu)
        if length_cpu >= DETAIL_S:
            details.append((length_cpu, label(origin), resumed, sites(origin.gr_frame), length))
        in_pass.append((length_cpu, origin, resumed))
    last[0], last[1], last[3] = now, target, now_cpu
    last[2] = sites(sys._getframe(0).f_back) if target is not hub else ()

def after_poll():
    poll[0], poll[1] = clock(), cpu()

def before_poll():
    if on[0] and poll[0] is not None:
        now, now_cpu = clock(), cpu()
        length, length_cpu = now - poll[0], now_cpu - poll[1]
        passes.append(length)
        passes_cpu.append(length_cpu)
        marks.append((poll[0], poll[1], now, now_cpu))
        if length_cpu >= 2 * DETAIL_S:
            ranked = sorted(in_pass, key=lambda item: -item[0])
            pass_details.append((length_cpu, length, len(in_pass), sum(item[0] for item in in_pass),
                                 [(c, label(g), r[0] if r else "-") for c, g, r in ranked[:8]]))
    del in_pass[:]

check = hub.loop.check(ref=False, priority=2)     # first after the poll
check.start(after_poll)
prepare = hub.loop.prepare(ref=False, priority=-2)  # last before the next poll
prepare.start(before_poll)

def start(*_):
    for kept in (slices, slices_cpu, passes, passes_cpu, details, pass_details, in_pass, marks):
        del kept[:]
    routed.clear()
    last[0] = None
    poll[0] = None
    greenlet.settrace(trace)
    on[0] = True

def stop(*_):
    on[0] = False
    greenlet.settrace(None)
    if profiler is not None:
        profiler.dump_stats({profile_path!r})
    with open({path!r} + ".tmp", "w") as out:
        json.dump({{"slices_s": slices, "slices_cpu_s": slices_cpu, "passes_s": passes, "passes_cpu_s": passes_cpu,
                   "details": details, "pass_details": pass_details, "marks": marks,
                   "routed": routed}}, out)
    os.replace({path!r} + ".tmp", {path!r})

# What the ESL reader's frames cost, by kind: the reader's slices are the top source.
routed = collections.defaultdict(lambda: [0, 0.0, 0.0])  # kind -> frames, CPU, worst CPU
import ivr_daemon.esl.connection as esl_connection
_route = esl_connection.EslConnection._route
# --profile-reader: a cProfile of the reader's routing alone (it inflates reader_frames' figures).
import cProfile
profiler = cProfile.Profile() if {profile_path!r} else None

def timed_route(self, item, parser):
    if not on[0]:
        return _route(self, item, parser)
    began = cpu()
    if profiler is not None:
        profiler.enable()
    try:
        return _route(self, item, parser)
    finally:
        if profiler is not None:
            profiler.disable()
        spent = cpu() - began
        kind = getattr(item, "content_type", "malformed")
        if kind.startswith("text/event-"):
            kind = item.body.split(b"\n", 1)[0].decode("latin-1", "replace")[:60]
        entry = routed[kind]
        entry[0] += 1
        entry[1] += spent
        entry[2] = max(entry[2], spent)

esl_connection.EslConnection._route = timed_route
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
runpy.run_module("ivr_daemon", run_name="__main__")
"""

THRESHOLDS_MS = (1, 2, 5, 10)


def distribution(lengths_s):
    """Counts over each of THRESHOLDS_MS, p50/p99/max in ms."""
    ms = sorted(s * 1000 for s in lengths_s)
    out = {"count": len(ms), "p50_ms": round(L.percentile(ms, 50), 3), "p99_ms": round(L.percentile(ms, 99), 3),
           "p999_ms": round(L.percentile(ms, 99.9), 3), "max_ms": round(ms[-1], 3) if ms else None,
           "total_ms": round(sum(ms), 1)}
    for threshold in THRESHOLDS_MS:
        over = [m for m in ms if m >= threshold]
        out[f"over_{threshold}ms"] = len(over)
        out[f"over_{threshold}ms_total_ms"] = round(sum(over), 1)
    return out


def top_sources(details, top=12):
    """Long slices grouped by greenlet function and where they resumed and switched out (the
    innermost project frame of each), with their share of the long slices' time."""
    groups = collections.defaultdict(lambda: [0, 0.0, 0.0])
    total_s = sum(d[0] for d in details) or 1.0
    for length_s, name, resumed, suspended, _wall_s in details:
        key = (name, resumed[0] if resumed else "-", suspended[0] if suspended else "-")
        group = groups[key]
        group[0] += 1
        group[1] += length_s
        group[2] = max(group[2], length_s)
    ranked = sorted(groups.items(), key=lambda item: -item[1][1])[:top]
    return [{"greenlet": name, "resumed_at": resumed, "switched_out_at": suspended, "count": count,
             "total_ms": round(length_s * 1000, 1), "share": round(length_s / total_s, 3),
             "max_ms": round(longest_s * 1000, 2)}
            for (name, resumed, suspended), (count, length_s, longest_s) in ranked]


def long_passes(pass_details, top=12):
    """The passes of >= 2 x --detail-ms of CPU: how much of them greenlet slices were, how many
    slices a pass, and which greenlets (by function and where they resumed) had the CPU."""
    if not pass_details:
        return {}
    total_s = sum(p[0] for p in pass_details)
    groups = collections.defaultdict(lambda: [0, 0.0])
    for _cpu_s, _wall_s, _count, _slices_s, biggest in pass_details:
        for cpu_s, name, resumed in biggest:
            group = groups[(name, resumed)]
            group[0] += 1
            group[1] += cpu_s
    ranked = sorted(groups.items(), key=lambda item: -item[1][1])[:top]
    counts = sorted(p[2] for p in pass_details)
    return {"count": len(pass_details), "total_cpu_ms": round(total_s * 1000, 1),
            "slices_share": round(sum(p[3] for p in pass_details) / total_s, 3),
            "slices_a_pass_p50": counts[len(counts) // 2], "slices_a_pass_max": counts[-1],
            "top": [{"greenlet": name, "resumed_at": resumed, "count": count, "cpu_ms": round(cpu_s * 1000, 1),
                     "share": round(cpu_s / total_s, 3)} for (name, resumed), (count, cpu_s) in ranked]}


def loop_thread_cpu_s(pid: int) -> float:
    """The CPU seconds (user + system) of the daemon's loop thread (the process's first thread):
    the rest of the process's CPU is its worker threads' (null TTS writes its WAVs in gevent's
    thread pool)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LoopCpu:
    """The daemon loop's CPU seconds at a moment of CLOCK_MONOTONIC (the machine's, shared by the
    processes): linear within a pass, flat while the loop waits in its poll."""

    def __init__(self, marks):
        self.marks = sorted(marks)
        self.starts = [m[0] for m in self.marks]

    def __call__(self, t_s: float) -> float:
        index = bisect.bisect_right(self.starts, t_s) - 1
        if index < 0:
            return self.marks[0][1] if self.marks else 0.0
        start_s, start_cpu_s, end_s, end_cpu_s = self.marks[index]
        if t_s >= end_s or end_s <= start_s:
            return end_cpu_s
        return start_cpu_s + (end_cpu_s - start_cpu_s) * (t_s - start_s) / (end_s - start_s)


def one_run(args, checkout=None, trace=True, profile_path=None):
    """latency.py's overhead load against a daemon (``checkout``'s, or this one's), traced or not;
    with ``profile_path``, the reader's routing under cProfile too (its stats written there)."""
    tmp = tempfile.mkdtemp(prefix="ivr-slices-")
    dump = Path(tmp) / "slices.json"
    argv = ["-c", TRACER.format(path=str(dump), detail_s=args.detail_ms / 1000,
                                profile_path=str(profile_path) if profile_path else "")] if trace else None
    rig = L.DaemonProcessRig(args, sim_options={"playback_speed": 0.0, "duplicate_speech_delay_s": 0.0},
                             checkout=checkout, daemon_argv=argv)
    try:
        calls = [rig.sim.new_call() for _ in range(args.calls)]
        gevent.sleep(1.0)  # every call's CHANNEL_ANSWER/PARK handled: only the turns are measured
        if trace:
            rig.daemon.send_signal(signal.SIGUSR1)
            gevent.sleep(0.2)
        cpu_before_s, loop_cpu_before_s = rig.cpu_s(), loop_thread_cpu_s(rig.daemon.pid)
        rng = random.Random(7)
        sequences = {}

        def ask(call, index):
            sequences[call] = rig.sim.speak(call, f"question number {index}")

        gevent.joinall([gevent.spawn_later(rng.uniform(0, args.spread_s), ask, call, i)
                        for i, call in enumerate(calls)])
        rig.wait_turns(len(calls))
        cpu_ms = (rig.cpu_s() - cpu_before_s) * 1000
        loop_cpu_ms = (loop_thread_cpu_s(rig.daemon.pid) - loop_cpu_before_s) * 1000
        result = {}
        if trace:
            rig.daemon.send_signal(signal.SIGUSR2)
            deadline_s = time.monotonic() + 60
            while not dump.exists() and time.monotonic() < deadline_s:
                gevent.sleep(0.05)
            data = json.loads(dump.read_text())
            result["slices_cpu"] = distribution(data["slices_cpu_s"])
            result["passes_cpu"] = distribution(data["passes_cpu_s"])
            result["slices_wall"] = distribution(data["slices_s"])
            result["passes_wall"] = distribution(data["passes_s"])
            result["top_sources"] = top_sources(data["details"])
            result["long_passes"] = long_passes(data["pass_details"])
            result["reader_frames"] = {kind: {"count": count, "cpu_us_each": round(cpu_s / count * 1e6, 1),
                                              "max_us": round(worst_s * 1e6), "total_ms": round(cpu_s * 1000, 1)}
                                       for kind, (count, cpu_s, worst_s) in
                                       sorted(data["routed"].items(), key=lambda item: -item[1][1])}
        overheads, lanes = [], []
        hops = collections.defaultdict(list)
        loop_cpu_at = LoopCpu(data["marks"]) if trace else None
        for call in calls:
            turn = rig.turns.get(call)
            if turn is None or turn.get("first_audio_ms") is None:
                continue
            first_ms = L._first_broadcast_ms(rig.sim, call, sequences[call])
            overheads.append(first_ms - turn["llm_ms"] - turn["tts_ms"])
            lane_ms = turn.get("lane_wait_ms") or 0.0
            lanes.append(lane_ms)
            if turn.get("received_s") and turn.get("queued_ms") is not None:
                # Where the overhead went (one clock: CLOCK_MONOTONIC is the machine's): the frame
                # waiting to be parsed, the transcript waiting for its turn to start, and the
                # rest (the turn's own hops: producer, sentence, writer), less the lane's wait.
                read_ms = (turn["received_s"] - rig.sim.written_at(sequences[call])) * 1000
                hops["read"].append(read_ms)
                hops["queued"].append(turn["queued_ms"])
                hops["in_turn"].append(overheads[-1] - read_ms - turn["queued_ms"] - lane_ms)
                if loop_cpu_at is not None:
                    # The loop's CPU while the turn's overhead ran (preemption does not count): the
                    # work in front of its hops, and theirs. Its second window starts at the first
                    # sentence (~ the turn's start + its LLM time and lane wait).
                    written_s = rig.sim.written_at(sequences[call])
                    started_s = turn["received_s"] + turn["queued_ms"] / 1000
                    sentence_s = started_s + (turn["llm_ms"] + lane_ms) / 1000
                    broadcast_s = written_s + first_ms / 1000
                    hops["overhead_loop_cpu"].append(
                        (loop_cpu_at(started_s) - loop_cpu_at(written_s)
                         + loop_cpu_at(broadcast_s) - loop_cpu_at(sentence_s)) * 1000)
        result.update({
            "turns": len(overheads),
            "overhead_p50_ms": round(L.percentile(overheads, 50), 2),
            "overhead_p99_ms": round(L.percentile(overheads, 99), 2),
            "overhead_less_lane_p99_ms": round(L.percentile([o - w for o, w in zip(overheads, lanes)], 99), 2),
            "lane_wait_p99_ms": round(L.percentile(lanes, 99), 2),
            "daemon_cpu_ms_per_turn": round(cpu_ms / max(1, len(overheads)), 2),
            "daemon_loop_thread_cpu_ms_per_turn": round(loop_cpu_ms / max(1, len(overheads)), 2),
        })
        for hop, values in hops.items():
            result[f"{hop}_p50_ms"] = round(L.percentile(values, 50), 2)
            result[f"{hop}_p99_ms"] = round(L.percentile(values, 99), 2)
        return result
    finally:
        rig.close()
        dump.unlink(missing_ok=True)
        os.rmdir(tmp)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--spread-s", type=float, default=10.0)
    parser.add_argument("--first-token-ms", type=float, default=200.0)
    parser.add_argument("--tokens-per-s", type=float, default=30.0)
    parser.add_argument("--detail-ms", type=float, default=1.0, help="slices this long are kept with their source")
    parser.add_argument("--baseline", type=Path, help="also run this checkout's daemon, alternating")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-trace", action="store_true", help="the daemon untraced: overhead and CPU only")
    parser.add_argument("--tts-worker-priority", default=None)
    parser.add_argument("--profile-reader", type=Path, metavar="PATH",
                        help="cProfile the ESL reader's frame routing (traced runs): stats written to "
                             "PATH.<ours|baseline>.<round>.prof (pstats); its overhead inflates reader_frames")
    args = parser.parse_args()
    L.configure_logging("ERROR", "console")
    # Ours is this checkout's daemon, named: a bare `python -m ivr_daemon` would import whichever
    # ivr_daemon the interpreter finds (the editable install of another checkout, say).
    runs = [("baseline", args.baseline), ("ours", L.ROOT)] if args.baseline else [("ours", L.ROOT)]
    results = collections.defaultdict(list)
    for round_index in range(args.rounds):
        # Alternate which goes first: a load that comes and goes hits both alike.
        for name, checkout in (runs if round_index % 2 == 0 else runs[::-1]):
            profile_path = (args.profile_reader.with_name(f"{args.profile_reader.name}.{name}.{round_index}.prof")
                            if args.profile_reader and not args.no_trace else None)
            result = one_run(args, checkout=checkout, trace=not args.no_trace, profile_path=profile_path)
            result["load_average_1min"] = os.getloadavg()[0]
            results[name].append(result)
            print(round_index, name, json.dumps(result), flush=True)
    summary = {}
    for name, rounds in results.items():
        for key in ("overhead_p50_ms", "overhead_p99_ms", "overhead_less_lane_p99_ms", "daemon_cpu_ms_per_turn",
                    "daemon_loop_thread_cpu_ms_per_turn",
                    "overhead_loop_cpu_p50_ms", "overhead_loop_cpu_p99_ms"):
            values = [r[key] for r in rounds if key in r]
            if not values:
                continue
            summary[f"{name}_{key}"] = values
            summary[f"{name}_{key}_median"] = sorted(values)[len(values) // 2]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
