#!/usr/bin/env python
"""Records benchmark: the turn overhead while every call is recorded, against the same run without.

bench/latency.py's overhead measurement (the daemon as `ivr-daemon run` in its own process,
the fake LLM in another, the simulator here; null TTS), run side by side on the same machine:

  DATABASE_URL=off      no records: the baseline
  sqlite                the default, an SQLite file beside TTS_OUTPUT_DIR
  postgresql            a throwaway PostgreSQL 15 server (tests/pg_server.py), with --postgres

Each run: --calls calls (default 1,000) arriving at random within --spread-s (default 50 s:
20 turns a second, the rate of latency.py's 200 calls in 10 s); each caller asks once
--ask-after-s after the answer and hangs up --hang-up-after-s after the first audio of the
reply (~70 calls up at once). Then the database is read: every call must be there, ended,
with its turn (``records_complete``), and how long the writes took to land after the last
hangup (``records_flush_s``).

Prints a line per run and, last, one JSON object: for each run ``<run>_overhead_p50_ms``,
``<run>_overhead_p99_ms``, and for the recorded ones ``<run>_calls_written``,
``<run>_records_complete``, ``<run>_records_flush_s``.

Usage: .venv/bin/python bench/records.py [--calls 1000] [--spread-s 50] [--postgres]
"""

import latency  # noqa: F401 -- first: it monkey-patches, and puts tests/ on sys.path

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

from latency import DaemonProcessRig, _first_broadcast_ms, percentile  # noqa: E402
from ivr_daemon.logs import configure_logging  # noqa: E402
from ivr_daemon.records import RecordStore  # noqa: E402

FLUSH_TIMEOUT_S = 120.0


def run_once(args, name: str, database_url: str | None) -> dict:
    env = {"DATABASE_URL": database_url or "off"}
    rig = DaemonProcessRig(args, sim_options={"playback_speed": 0.0, "duplicate_speech_delay_s": 0.0}, extra_env=env)
    try:
        rng = random.Random(7)
        sequences: dict[str, int] = {}
        calls: list[str] = []

        def lifecycle(index: int) -> None:
            # A caller rings, asks once, listens to the answer and hangs up.
            call = rig.sim.new_call()
            calls.append(call)
            gevent.sleep(args.ask_after_s)
            sequences[call] = rig.sim.speak(call, f"question number {index}")
            rig.sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {call} "), 180, consume=False)
            gevent.sleep(args.hang_up_after_s)  # the rest of the answer streams and plays meanwhile
            rig.sim.hangup(call)

        greenlets = [gevent.spawn_later(rng.uniform(0, args.spread_s), lifecycle, i) for i in range(args.calls)]
        gevent.joinall(greenlets)
        hung_up_s = time.monotonic()
        failed = [g for g in greenlets if not g.successful()]
        assert not failed, f"{len(failed)} callers failed: {failed[0].exception!r}"
        # The records first: their flush time runs from the last hangup, not from the wait below
        # (on an overloaded box, turns cut by the hangup never log turn_complete: it waits them out).
        written = _check_written(database_url, calls, hung_up_s, name) if database_url else {}
        rig.wait_turns(len(calls))
        overheads = []
        for call in calls:
            turn = rig.turns.get(call)
            if turn is None or turn.get("first_audio_ms") is None:
                continue
            overheads.append(_first_broadcast_ms(rig.sim, call, sequences[call]) - turn["llm_ms"] - turn["tts_ms"])
        figures = {f"{name}_overhead_p50_ms": round(percentile(overheads, 50), 2),
                   f"{name}_overhead_p99_ms": round(percentile(overheads, 99), 2),
                   f"{name}_answered": len(overheads)}
        figures.update(written)
        print(f"{name}: {len(overheads)} turns answered, overhead p50 {figures[f'{name}_overhead_p50_ms']:.2f} ms, "
              f"p99 {figures[f'{name}_overhead_p99_ms']:.2f} ms"
              + (f"; {figures[f'{name}_calls_written']} calls written, complete: "
                 f"{figures[f'{name}_records_complete']}, flushed {figures[f'{name}_records_flush_s']} s "
                 "after the last hangup" if database_url else ""), flush=True)
        return figures
    finally:
        rig.close()


def _check_written(database_url: str, calls: list[str], hung_up_s: float, name: str) -> dict:
    """Poll the database (read-only, from here) until every call is recorded as ended with its turn."""
    store = RecordStore(database_url)
    wanted = set(calls)
    try:
        deadline = hung_up_s + FLUSH_TIMEOUT_S
        while True:
            rows = {row["uuid"]: row for row in store.list_calls(limit=None)}
            done = [uuid for uuid in wanted if uuid in rows and rows[uuid]["ended_at"] is not None
                    and rows[uuid]["turns"] == 1]
            if len(done) == len(wanted) or time.monotonic() > deadline:
                break
            gevent.sleep(0.2)
        flush_s = round(time.monotonic() - hung_up_s, 2)
        return {f"{name}_calls_written": len(done), f"{name}_records_complete": len(done) == len(wanted),
                f"{name}_records_flush_s": flush_s}
    finally:
        store.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--spread-s", type=float, default=50.0, help="callers ask within this window")
    parser.add_argument("--first-token-ms", type=float, default=200.0)
    parser.add_argument("--tokens-per-s", type=float, default=30.0)
    parser.add_argument("--ask-after-s", type=float, default=0.5, help="a caller asks this long after answer")
    parser.add_argument("--hang-up-after-s", type=float, default=3.0,
                        help="a caller hangs up this long after the first audio of the answer")
    parser.add_argument("--reverse", action="store_true", help="run the variants in the opposite order")
    parser.add_argument("--postgres", action="store_true", help="also a run on a throwaway PostgreSQL server")
    args = parser.parse_args(argv)
    configure_logging("ERROR", "console")
    started = time.monotonic()
    figures: dict = {"calls": args.calls, "spread_s": args.spread_s}
    with contextlib.ExitStack() as stack:
        import tempfile

        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ivr-bench-records-")))
        runs = [("no_records", None), ("sqlite", f"sqlite:///{workdir}/records.db")]
        if args.postgres:
            from pg_server import PostgresServer

            server = stack.enter_context(PostgresServer.started())
            runs.append(("postgresql", server.new_database()))
        if args.reverse:
            runs.reverse()  # the same runs, the other way round: does the order matter on this machine?
        for name, url in runs:
            figures.update(run_once(args, name, url))
    figures["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
