#!/usr/bin/env python
"""The loop's CPU per playback report (PLAYBACK_STOP) of a call that has learnt all it learns
from its events and waits: the reader's route() and whatever the call's greenlet then does.

The daemon (build_conversation_daemon: the call flow, call records on SQLite unless
--no-records) on the simulator, one call up (CHANNEL_ANSWER, CHANNEL_PARK handled); then
--events copies of a real captured PLAYBACK_STOP (tests/captures/playback/X03, this call's
Unique-ID, each its own Event-Sequence) handed to the router one by one, each followed by
gevent.sleep(0) so that a call greenlet woken for it runs (both checkouts alike; the floor, a
bare sleep(0), is printed too). A call receives 10 such reports (PLAYBACK_START/STOP,
CHANNEL_EXECUTE_COMPLETE) for a 3-sentence answer.

Each round runs every checkout (this one, --baseline PATH's: e.g. main) in its own process,
one after the other; figures are medians of --rounds rounds of process CPU time.
Prints a line per round and, last, one JSON object (µs per event, baseline minus this).

Usage: .venv/bin/python bench/playback_events.py [--rounds 5] [--events 20000] [--baseline ../main]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(events: int, records: bool, tests_dir: Path) -> dict[str, float]:
    from gevent import monkey

    monkey.patch_all()
    import tempfile
    import uuid as uuid_lib

    import gevent

    sys.path.insert(0, str(tests_dir))
    from harness import captured_event, running_daemon, settings_for, wait_until  # noqa: E402

    from ivr_daemon.esl.protocol import EslEvent, FrameParser, parse_event
    from ivr_daemon.logs import configure_logging
    from ivr_daemon.records import RecordStore, RecordWriter
    from ivr_daemon.replay.simulator import FreeswitchSimulator

    configure_logging("INFO", "json", stream=open(os.devnull, "w"))
    with tempfile.TemporaryDirectory(prefix="ivr-bench-playback-") as tmp, \
            FreeswitchSimulator(playback_speed=0.0) as sim:
        url = f"sqlite:///{tmp}/records.db"
        kwargs = {"records": RecordWriter(RecordStore(url, connect_timeout_s=2))} if records else {}
        # No turn is ever asked for: the LLM's URL is never used.
        settings = settings_for(sim, Path(tmp) / "tts", LLM_PROVIDER="ollama", LLM_API_URL="http://127.0.0.1:9/api/chat",
                                **({"DATABASE_URL": url} if records else {}))
        with running_daemon(sim, settings, **kwargs) as daemon:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=10)
            call = sim.new_call(variables={"ivr_agent": "default"})
            wait_until(lambda: call in daemon.router.calls and daemon.router.calls[call].queue.empty()
                       and getattr(daemon.router.calls[call], "waiting", True), 10)
            gevent.sleep(0.5)
            frame = FrameParser().feed(captured_event("playback/X03_S1_event_plain_PLAYBACK_STOP_a_wav_done.txt",
                                                      Unique_ID=call))[0]
            headers = dict(parse_event(frame).headers)
            # The call learnt its caller's name as the simulator's events gave it (none).
            headers.update({"Core-UUID": str(uuid_lib.uuid4()), "Caller-Caller-ID-Name": ""})
            warm_up = min(2000, events)
            stream = [EslEvent(headers={**headers, "Event-Sequence": str(10_000 + i)}) for i in range(events + warm_up)]
            route = daemon.router.route
            for event in stream[:warm_up]:
                route(event)
                gevent.sleep(0)
            started_s = time.process_time()
            for event in stream[warm_up:]:
                route(event)
                gevent.sleep(0)  # a call greenlet woken for it runs now
            per_event_us = (time.process_time() - started_s) / events * 1e6
            started_s = time.process_time()
            for _ in range(events):
                gevent.sleep(0)
            floor_us = (time.process_time() - started_s) / events * 1e6
            return {"us_per_event": per_event_us, "floor_us": floor_us,
                    "settled": getattr(daemon.router, "events_settled", 0) / (events + warm_up)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-records", action="store_true", help="DATABASE_URL off")
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. main), measured in the same rounds")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.events, not args.no_records, ROOT / "tests")))
        return 0
    checkouts = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    samples: dict[str, list[dict]] = {name: [] for name in checkouts}
    for round_no in range(args.rounds):
        for name, checkout in checkouts.items():
            command = [sys.executable, str(Path(__file__).resolve()), "--child", "--events", str(args.events),
                       *(["--no-records"] if args.no_records else [])]
            out = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(checkout)}, cwd=checkout,
                                 check=True, capture_output=True, text=True).stdout
            figures = json.loads(out.strip().splitlines()[-1])
            samples[name].append(figures)
            print(f"round {round_no + 1} {name}: {figures['us_per_event']:.1f} µs an event (floor "
                  f"{figures['floor_us']:.1f}), settled {figures['settled']:.2f}, load {os.getloadavg()[0]:.2f}",
                  flush=True)
    result: dict[str, object] = {"events": args.events, "rounds": args.rounds, "records": not args.no_records}
    for name in checkouts:
        result[name] = {key: round(statistics.median(s[key] for s in samples[name]), 2)
                        for key in ("us_per_event", "floor_us", "settled")}
    if args.baseline:
        result["baseline_minus_this_us_per_event"] = round(
            result["baseline"]["us_per_event"] - result["this"]["us_per_event"], 2)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
