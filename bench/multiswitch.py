#!/usr/bin/env python
"""Several switches on one daemon: does the daemon's overhead change with the number of switches?

The real daemon (``ivr-daemon run``, its own process, null TTS) with ``FREESWITCH_HOSTS`` listing
N simulators (here), and bench/fake_llm.py (its own process: first token after
--first-token-ms, then --tokens-per-s, latency.py's 3-sentence reply). Every call is up for the
whole run and asks once at a random moment within --spread-s. Overhead, per turn, as
bench/latency.py measures it: DETECTED_SPEECH frame written -> first uuid_broadcast read, minus
the LLM's time to its first sentence and minus synthesis.

Three setups, each its own daemon, in rounds that alternate them (noise hits all alike):

  one        1 switch  x --calls-per-switch calls
  several    --switches switches x --calls-per-switch calls (the issue's 4 x 250)
  one_same_load
             1 switch x (--switches x --calls-per-switch) calls: the same load on one switch,
             to tell what the switches cost from what the load costs

Prints a line per round and, last, one JSON object: per setup overhead_p50_ms, overhead_p99_ms,
lane_wait_p99_ms (the part of a turn's overhead its LLM answer waited in the idle lane, as its
turn_complete line says), turns (of calls) and daemon_cpu_ms_per_turn (the daemon process's CPU
time from its calls' first event to the last turn, per turn: the machine's other load does not
move it, a busy VM host does: see host_probe_ms in latency.py) and daemon_setup_cpu_ms_per_call
(the part of it spent before anyone spoke: CHANNEL_ANSWER/PARK), box_busy_share, rig_cores and
daemon_cores (medians of the rounds: from the calls' first event to the last turn, the share of
the box's cores busy with anything, and the cores the rig -- this process's simulators and the
fake LLM -- and the daemon's own process kept busy), then several_over_same_load_p99
and several_over_same_load_cpu_per_turn (the switches' own cost: 1.0 is none),
several_over_one_p99, and host_probe_ms_before/after.

With --baseline PATH the one-switch setups also run the daemon of that checkout (configured the
same way, FREESWITCH_HOST alone) in the same rounds: ``one_baseline``, ``one_same_load_baseline``.

--profile-daemon PATH runs this checkout's daemon under latency.py's cProfile (the loop's thread,
thread CPU time) from its first call to its last turn: stats in PATH.<setup>.<round>.

Usage: .venv/bin/python bench/multiswitch.py [--switches 4] [--calls-per-switch 250] [--rounds 2]
                                             [--baseline /path/to/main] [--profile-daemon PATH]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

# One reply, one percentile, one way to read the daemon's log for every benchmark.
from latency import (  # noqa: E402
    REPLY, DaemonProcessRig, _cpu_s, _first_broadcast_ms, box_cpu_s, fake_llm_cmd, host_probe_ms, percentile,
)

from ivr_daemon.logs import configure_logging  # noqa: E402

def one_setup(args, switches: int, calls_per_switch: int, llm_url: str, seed: int, llm_pid: int,
              checkout: Path = ROOT, profile_path: str | None = None) -> tuple:
    """(overheads in ms, turns seen, calls made, the daemon's CPU seconds for them, of which the
    calls' set-up before anyone spoke, --whole-calls: INFO lines per call, each turn's lane wait in
    ms, the box's cores meanwhile: ``Cores``) of one daemon on ``switches`` simulators.
    ``profile_path``: the daemon under cProfile from its first call to its last turn, stats
    written there; ``llm_pid``: the fake LLM's process, part of the rig."""
    rig = DaemonProcessRig(args, sim_options={"playback_speed": args.playback_speed, "duplicate_speech_delay_s": 0.0},
                           checkout=checkout, profile_path=profile_path, switches=switches, llm_url=llm_url)
    try:
        if profile_path is not None:
            Path(profile_path).unlink(missing_ok=True)
            rig.daemon.send_signal(signal.SIGUSR1)
            gevent.sleep(0.2)
        cpu_before_s = rig.cpu_s()  # after start-up: the calls' work only
        cores = Cores(llm_pid, rig.daemon.pid)
        calls = [(sim, sim.new_call()) for sim in rig.sims for _ in range(calls_per_switch)]
        gevent.sleep(1.0)  # the calls' CHANNEL_ANSWER/PARK handled before anyone speaks (as latency.py)
        setup_cpu_s = rig.cpu_s() - cpu_before_s
        rng = random.Random(seed)
        sequences: dict[str, int] = {}

        def ask(sim, call: str, index: int) -> None:
            sequences[call] = sim.speak(call, f"question number {index}")

        greenlets = [gevent.spawn_later(rng.uniform(0, args.spread_s), ask, sim, call, i)
                     for i, (sim, call) in enumerate(calls)]
        gevent.joinall(greenlets)
        rig.wait_turns(len(calls), timeout_s=300)
        cores.stop()
        if args.whole_calls:
            cpu_s = whole_calls(rig, calls) - cpu_before_s
        else:
            cpu_s = rig.cpu_s() - cpu_before_s
        if profile_path is not None:
            rig.daemon.send_signal(signal.SIGUSR2)
            deadline_s = time.monotonic() + 60
            while not Path(profile_path).exists() and time.monotonic() < deadline_s:
                gevent.sleep(0.05)
        overheads, lane_waits = [], []
        for sim, call in calls:
            turn = rig.turns.get(call)
            if turn is None or turn.get("first_audio_ms") is None:
                continue
            overheads.append(_first_broadcast_ms(sim, call, sequences[call]) - turn["llm_ms"] - turn["tts_ms"])
            lane_waits.append(turn.get("lane_wait_ms") or 0.0)
        return (overheads, len(rig.turns), len(calls), cpu_s, setup_cpu_s, getattr(rig, "info_lines", None),
                lane_waits, cores)
    finally:
        rig.close()


class Cores:
    """How busy the box's cores were from construction to ``stop()``, and by whom: the whole
    machine (/proc/stat: every process, the daemon's children included), the daemon's own
    process, and the rig (this process's simulators and the fake LLM). Turns that wait for a free
    core wait whoever took it: on a box the rig shares, its share says how much."""

    def __init__(self, llm_pid: int, daemon_pid: int):
        self.pids = {"rig": (os.getpid(), llm_pid), "daemon": (daemon_pid,)}
        self.started = self._read()

    def _read(self) -> dict[str, float]:
        busy_s, all_s = box_cpu_s()
        reading = {"box_busy_s": busy_s, "box_all_s": all_s, "wall_s": time.monotonic()}
        for name, pids in self.pids.items():
            reading[name] = sum(_cpu_s(pid) for pid in pids)
        return reading

    def stop(self) -> None:
        ended = self._read()
        wall_s = max(1e-9, ended["wall_s"] - self.started["wall_s"])
        self.box_busy_share = (ended["box_busy_s"] - self.started["box_busy_s"]) / max(
            1e-9, ended["box_all_s"] - self.started["box_all_s"])
        self.rig_cores = (ended["rig"] - self.started["rig"]) / wall_s
        self.daemon_cores = (ended["daemon"] - self.started["daemon"]) / wall_s

    def figures(self) -> dict[str, float]:
        return {"box_busy_share": round(self.box_busy_share, 3), "rig_cores": round(self.rig_cores, 3),
                "daemon_cores": round(self.daemon_cores, 3)}


REPLY_SENTENCES = 3  # latency.py's REPLY: three broadcasts, three PLAYBACK_STOPs a call


def whole_calls(rig: DaemonProcessRig, calls: list) -> float:
    """--whole-calls: every call's answer played to the end, then every call hung up and cleaned
    up; the daemon's CPU seconds then, and in ``rig.info_lines`` its INFO (and above) lines per call."""
    own = {call for _sim, call in calls}
    for sim in rig.sims:
        mine = {call for s, call in calls if s is sim}

        def played_out() -> bool:
            stops: dict[str, int] = {}
            for event in sim.emitted_events:
                if event.name == "PLAYBACK_STOP" and event.unique_id in mine:
                    stops[event.unique_id] = stops.get(event.unique_id, 0) + 1
            return len(stops) == len(mine) and min(stops.values()) >= REPLY_SENTENCES

        deadline_s = time.monotonic() + 300
        while not played_out():
            assert time.monotonic() < deadline_s, "answers still playing after 300 s"
            gevent.sleep(0.2)
    for sim, call in calls:
        sim.hangup(call)
    lines: dict[str, int] = {}
    rig.cleaned_up = set()
    deadline_s = time.monotonic() + 300
    while sum(1 for call in own if lines.get(call, 0) and call in rig.cleaned_up) < len(own):
        assert time.monotonic() < deadline_s, "calls not cleaned up after 300 s"
        with open(rig.log_path) as log_file:
            text = log_file.read()
        lines.clear()
        rig.cleaned_up = set()
        for line in text.splitlines():
            if '"call_uuid"' not in line:
                continue
            record = json.loads(line)
            call = record.get("call_uuid")
            if call in own and record.get("level") in ("info", "warning", "error", "critical"):
                lines[call] = lines.get(call, 0) + 1
                if record["event"] in ("call_cleaned_up", "call_hangup") and "wavs_deleted" in record:
                    rig.cleaned_up.add(call)
        gevent.sleep(0.2)
    rig.info_lines = sum(lines.values()) / len(own)
    return rig.cpu_s()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--switches", type=int, default=4)
    parser.add_argument("--calls-per-switch", type=int, default=250)
    parser.add_argument("--spread-s", type=float, default=10.0, help="callers ask within this many seconds")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--first-token-ms", type=float, default=200.0)
    parser.add_argument("--tokens-per-s", type=float, default=30.0)
    parser.add_argument("--only", choices=("one", "several", "one_same_load"), action="append")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout (e.g. main): its daemon runs the one-switch setups too, in the same rounds")
    parser.add_argument("--playback-speed", type=float, default=0.0,
                        help="the simulators' playback speed (0: a broadcast plays at once; 1: real time)")
    parser.add_argument("--whole-calls", action="store_true",
                        help="play every answer out, hang every call up: daemon_cpu_ms_per_call (first event "
                             "to clean-up) and info_lines_per_call")
    parser.add_argument("--profile-daemon", metavar="PATH",
                        help="cProfile this checkout's daemon (its loop's thread) from the first call to the last "
                             "turn: stats to PATH.<setup>.<round>")
    args = parser.parse_args()
    configure_logging("WARNING", "console")  # the simulators' lines would drown the figures
    started = time.monotonic()
    host_probe_before_ms = host_probe_ms()
    setups = {"one": (1, args.calls_per_switch), "several": (args.switches, args.calls_per_switch),
              "one_same_load": (1, args.switches * args.calls_per_switch)}
    selected = args.only or list(setups)
    checkouts = {name: ROOT for name in selected}
    if args.baseline is not None:
        for name in [n for n in selected if setups[n][0] == 1]:
            setups[f"{name}_baseline"] = setups[name]
            checkouts[f"{name}_baseline"] = args.baseline.resolve()
            selected.append(f"{name}_baseline")
    llm = subprocess.Popen(fake_llm_cmd(REPLY, args.first_token_ms, args.tokens_per_s), stdout=subprocess.PIPE, text=True)
    samples: dict[str, list[float]] = {name: [] for name in selected}
    counts: dict[str, list[int]] = {name: [0, 0] for name in selected}
    cpu: dict[str, float] = {name: 0.0 for name in selected}
    setup_cpu: dict[str, float] = {name: 0.0 for name in selected}
    lines: dict[str, list[float]] = {name: [] for name in selected}
    lanes: dict[str, list[float]] = {name: [] for name in selected}  # each turn's lane_wait_ms (part of its overhead)
    usage: dict[str, list[dict[str, float]]] = {name: [] for name in selected}  # Cores.figures() a round
    try:
        llm_url = llm.stdout.readline().strip()
        for round_no in range(args.rounds):
            for name in selected:
                switches, per_switch = setups[name]
                profile_path = (f"{args.profile_daemon}.{name}.{round_no + 1}"
                                if args.profile_daemon and checkouts[name] == ROOT else None)
                overheads, turns, calls, cpu_s, setup_cpu_s, info_lines, lane_waits, cores = one_setup(
                    args, switches, per_switch, llm_url, seed=7 + round_no, llm_pid=llm.pid, checkout=checkouts[name],
                    profile_path=profile_path)
                usage[name].append(cores.figures())
                samples[name] += overheads
                lanes[name] += lane_waits
                counts[name][0] += turns
                counts[name][1] += calls
                cpu[name] += cpu_s
                setup_cpu[name] += setup_cpu_s
                if info_lines is not None:
                    lines[name].append(info_lines)
                print(f"round {round_no + 1} {name}: {switches} switch(es) x {per_switch} calls: turns {turns}/{calls}, "
                      f"overhead p50 {percentile(overheads, 50):.1f} ms, p99 {percentile(overheads, 99):.1f} ms, "
                      f"of it in the idle lane p50 {percentile(lane_waits, 50):.1f} ms, p99 {percentile(lane_waits, 99):.1f} ms, "
                      f"daemon CPU {cpu_s * 1000 / max(1, turns):.2f} ms a turn "
                      f"({setup_cpu_s * 1000 / max(1, calls):.2f} ms a call of it before anyone spoke), "
                      + (f"whole call {cpu_s * 1000 / max(1, calls):.2f} ms, {info_lines:.2f} INFO lines a call, "
                         if info_lines is not None else "")
                      + f"box {cores.box_busy_share:.0%} busy (the rig {cores.rig_cores:.2f} cores, "
                        f"the daemon's process {cores.daemon_cores:.2f}), load {os.getloadavg()[0]:.2f}",
                      flush=True)
    finally:
        llm.terminate()
        llm.wait(10)
    figures: dict[str, object] = {"switches": args.switches, "calls_per_switch": args.calls_per_switch,
                                  "spread_s": args.spread_s, "rounds": args.rounds,
                                  "playback_speed": args.playback_speed, "whole_calls": args.whole_calls}
    for name in selected:
        figures[name] = {"overhead_p50_ms": round(percentile(samples[name], 50), 2),
                         "overhead_p99_ms": round(percentile(samples[name], 99), 2),
                         "lane_wait_p99_ms": round(percentile(lanes[name], 99), 2),
                         "turns": counts[name][0], "calls": counts[name][1],
                         "daemon_cpu_ms_per_turn": round(cpu[name] * 1000 / max(1, counts[name][0]), 2),
                         "daemon_setup_cpu_ms_per_call": round(setup_cpu[name] * 1000 / max(1, counts[name][1]), 2),
                         **{key: round(statistics.median(u[key] for u in usage[name]), 3) for key in usage[name][0]}}
        if lines[name]:  # --whole-calls: from the first event to the clean-up
            figures[name]["daemon_cpu_ms_per_call"] = round(cpu[name] * 1000 / max(1, counts[name][1]), 2)
            figures[name]["info_lines_per_call"] = round(sum(lines[name]) / len(lines[name]), 2)
    if {"several", "one_same_load"} <= set(selected):
        figures["several_over_same_load_p99"] = round(
            percentile(samples["several"], 99) / percentile(samples["one_same_load"], 99), 2)
    if {"several", "one_same_load"} <= set(selected):
        figures["several_over_same_load_cpu_per_turn"] = round(
            figures["several"]["daemon_cpu_ms_per_turn"] / figures["one_same_load"]["daemon_cpu_ms_per_turn"], 2)
    if {"several", "one"} <= set(selected):
        figures["several_over_one_p99"] = round(percentile(samples["several"], 99) / percentile(samples["one"], 99), 2)
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["load_average_1min"] = round(os.getloadavg()[0], 2)
    figures["host_probe_ms_before"], figures["host_probe_ms_after"] = host_probe_before_ms, host_probe_ms()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
