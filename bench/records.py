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

What is measured, and what is fair: a caller speaks after the call is up (0.5 s after its
CHANNEL_ANSWER/PARK, as a person does), so its own call set-up is not on its turn's path. Other
calls ringing and hanging up meanwhile are (~20 of each a second): a switch has them, and
latency.py's overhead, whose calls are all up before anyone speaks and never hang up, does not.
The simulator here timestamps the speech frames and the daemon's commands, so this process
must stay light: each caller searches the commands from its own speech on (searching the
whole history from every caller once made the benchmark's own loop lag the tail it measured),
and ``<run>_bench_loop_lag_p99_ms`` says how late this process's loop ran.

Prints a line per run and, last, one JSON object: for each run ``<run>_overhead_p50_ms``,
``<run>_overhead_p99_ms``, ``<run>_daemon_cpu_ms_per_call`` (the daemon process's CPU from the
first call to the last record written, a call: the figure a shared machine cannot blur),
``<run>_bench_loop_lag_p99_ms``, the same CPU split by thread (``<run>_daemon_loop_cpu_ms_per_call``,
``<run>_daemon_other_threads_cpu_ms_per_call``: the synthesis threads, which write the null
voice's WAVs only with BENCH_NULL_VOICE_IN_DAEMON=1 or in a checkout without TTS_WORKERS,
``<run>_daemon_kernel_cpu_ms_per_call``: the system time of all of them),
``<run>_records_process_cpu_ms_per_call`` (the daemon's records process, where the database work
is done since it left the daemon's threads: 0 for a daemon without one),
``<run>_tts_workers_cpu_ms_per_call`` (its TTS worker processes, where the null voice writes
its WAVs as Piper's would: latency.py's null_voice_workers), and for the recorded
ones ``<run>_calls_written``, ``<run>_records_complete``, ``<run>_records_flush_s``,
``<run>_write_transactions_per_call`` (read from the database itself: SQLite's file change
counter, PostgreSQL's transaction ids); ``load_average_1min`` and ``host_probe_ms_before`` and
``_after`` (latency.host_probe_ms: the VM host's speed before and after).
--baseline PATH runs another checkout's daemon (e.g. /work/main) before ours for each variant,
its figures prefixed ``baseline_``.

--writer measures the records writer alone instead, no daemon (each checkout in a process of its
own): the call/turn records recorder.py puts for --calls calls within --spread-s through a
RecordWriter, and per run ``<run>_records_thread_cpu_ms_per_call`` (the Python work of the
records thread, which holds the GIL the loop needs), ``<run>_statements_per_call`` and the
loop's lag meanwhile (``<run>_loop_lag_p99_ms``, ``<run>_loop_lag_max_ms``); for a checkout whose
writer has a records process, ``<run>_records_process_cpu_ms_per_call`` (that process's CPU)
instead of the thread's CPU and the statements.

Is it the GIL? ``--trace-gil`` (Linux, perf, root) traces the daemon's loop thread's futex waits
during the calls (bench/gil_trace.py): per call its waits for the GIL (``<run>_loop_gil_waits_per_call``,
``..._wait_ms_per_call``, p99, max, over 1 / 4 ms) and in the GIL's hand-over after a drop request.
``--gc-probe`` has the daemon's process report its cyclic garbage collections (a collection holds
the GIL throughout, whichever thread runs it): per generation 1 and 2 the count, ms a call, the
longest in wall and CPU ms, objects freed, how many ran off the loop's thread, and ``gc_each``
(each with the generation-0 collections before it). ``--switch-interval-ms X`` (repeatable) runs
each variant under ``sys.setswitchinterval(X)``; ``--rounds N`` repeats the variants, alternated.

Usage: .venv/bin/python bench/records.py [--calls 1000] [--spread-s 50] [--postgres] [--baseline PATH]
                                         [--only no_records|sqlite|postgresql] [--profile-daemon PATH]
                                         [--trace-gil] [--gc-probe] [--switch-interval-ms MS ...] [--rounds N]
"""

import latency  # noqa: F401 -- first: it monkey-patches, and puts tests/ on sys.path

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import psutil  # noqa: E402

from latency import DaemonProcessRig, _cpu_s, _first_broadcast_ms, host_probe_ms, percentile  # noqa: E402
from ivr_daemon.logs import configure_logging  # noqa: E402
from ivr_daemon.records import RecordStore  # noqa: E402

FLUSH_TIMEOUT_S = 120.0
TURNS_TIMEOUT_S = 20.0
TICK_S = 0.01  # the benchmark's own loop-lag ticker
RECORDS_PROCESS = "ivr_daemon.records.db_process"
TTS_WORKER = "ivr_daemon.tts.worker"


def run_once(args, name: str, database_url: str | None, checkout: Path | None = None,
             switch_interval_ms: float | None = None) -> dict:
    env = {"DATABASE_URL": database_url or "off"}
    profile_path = args.profile_daemon and f"{args.profile_daemon}.{name}"
    gc_probe = Path(tempfile.gettempdir()) / f"ivr-bench-gc-{os.getpid()}-{name}.jsonl" if args.gc_probe else None
    rig = DaemonProcessRig(args, sim_options={"playback_speed": 0.0, "duplicate_speech_delay_s": 0.0}, extra_env=env,
                           checkout=checkout, profile_path=profile_path, switch_interval_ms=switch_interval_ms,
                           gc_probe_path=gc_probe)
    try:
        rng = random.Random(7)
        sequences: dict[str, int] = {}
        searched_from: dict[str, int] = {}
        calls: list[str] = []
        lags_ms: list[float] = []
        stop = gevent.event.Event()

        def ticker() -> None:
            # This process's own loop lag: the simulator here timestamps the frames and commands,
            # so a busy benchmark would be measured as the daemon's overhead.
            while not stop.is_set():
                before = time.monotonic()
                gevent.sleep(TICK_S)
                lags_ms.append((time.monotonic() - before - TICK_S) * 1000)

        def lifecycle(index: int) -> None:
            # A caller rings, asks once (after the call is up: its set-up is not the turn's),
            # listens to the answer and hangs up.
            call = rig.sim.new_call()
            calls.append(call)
            gevent.sleep(args.ask_after_s)
            searched_from[call] = 0 if args.search_whole_history else rig.sim.commands_received
            sequences[call] = rig.sim.speak(call, f"question number {index}")
            rig.sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {call} "), 180,
                                     start_index=searched_from[call], consume=False)
            gevent.sleep(args.hang_up_after_s)  # the rest of the answer streams and plays meanwhile
            rig.sim.hangup(call)

        if profile_path:
            Path(profile_path).unlink(missing_ok=True)
            rig.daemon.send_signal(signal.SIGUSR1)  # the profile covers the calls only
        cpu_before_s = rig.cpu_s()  # after start-up: the calls' work only
        threads_before = _threads_cpu_s(rig.daemon.pid)
        records_process_before = _children_cpu_s(rig.daemon.pid, RECORDS_PROCESS)
        tts_workers_before = _children_cpu_s(rig.daemon.pid, TTS_WORKER)
        transactions_before = _write_transactions(database_url) if database_url else 0
        trace = None
        if args.trace_gil:
            from gil_trace import FutexTrace

            trace = FutexTrace(rig.daemon.pid, Path(rig.tmp.name) / "futex.trace").start()
        lag = gevent.spawn(ticker)
        calls_started_s = time.monotonic()
        greenlets = [gevent.spawn_later(rng.uniform(0, args.spread_s), lifecycle, i) for i in range(args.calls)]
        gevent.joinall(greenlets)
        stop.set()
        lag.join()
        if trace is not None:
            trace.stop()
        hung_up_s = time.monotonic()
        failed = [g for g in greenlets if not g.successful()]
        assert not failed, f"{len(failed)} callers failed: {failed[0].exception!r}"
        # The records first: their flush time runs from the last hangup, not from the wait below
        # (on an overloaded box, turns cut by the hangup never log turn_complete: it waits them out).
        written = _check_written(database_url, calls, hung_up_s, name) if database_url else {}
        cpu_ms_per_call = (rig.cpu_s() - cpu_before_s) * 1000 / len(calls)
        threads = _threads_cpu_ms_per_call(threads_before, _threads_cpu_s(rig.daemon.pid), rig.daemon.pid, len(calls))
        threads["records_process_cpu_ms_per_call"] = round(
            (_children_cpu_s(rig.daemon.pid, RECORDS_PROCESS) - records_process_before) * 1000 / len(calls), 2)
        # Where the null voice writes its WAVs (latency.null_voice_workers), as Piper's workers would.
        threads["tts_workers_cpu_ms_per_call"] = round(
            (_children_cpu_s(rig.daemon.pid, TTS_WORKER) - tts_workers_before) * 1000 / len(calls), 2)
        if database_url:
            written[f"{name}_write_transactions_per_call"] = round(
                (_write_transactions(database_url) - transactions_before) / len(calls), 3)
        if profile_path:
            rig.daemon.send_signal(signal.SIGUSR2)
            deadline_s = time.monotonic() + 60
            while not Path(profile_path).exists() and time.monotonic() < deadline_s:
                gevent.sleep(0.05)
        # Every caller has hung up: a turn its hangup cut never logs turn_complete (and is not
        # counted), so this waits only for the last ones still logging, not a whole timeout.
        rig.wait_turns(len(calls), timeout_s=TURNS_TIMEOUT_S)
        overheads = []
        for call in calls:
            turn = rig.turns.get(call)
            if turn is None or turn.get("first_audio_ms") is None:
                continue
            overheads.append(_first_broadcast_ms(rig.sim, call, sequences[call], start_index=searched_from[call])
                             - turn["llm_ms"] - turn["tts_ms"])
        figures = {f"{name}_overhead_p50_ms": round(percentile(overheads, 50), 2),
                   f"{name}_overhead_p99_ms": round(percentile(overheads, 99), 2),
                   f"{name}_answered": len(overheads),
                   f"{name}_daemon_cpu_ms_per_call": round(cpu_ms_per_call, 2),
                   f"{name}_bench_loop_lag_p99_ms": round(percentile(lags_ms, 99), 2)}
        figures.update({f"{name}_{key}": value for key, value in threads.items()})
        if gc_probe is not None:
            collected = _collections(gc_probe, calls_started_s, hung_up_s, len(calls))
            figures.update({f"{name}_{key}": value for key, value in collected.items()})
            print(f"{name}: the daemon's collections {collected}", flush=True)
        if trace is not None:
            gil = trace.figures(len(calls))
            figures.update({f"{name}_{key}": value for key, value in gil.items()})
            print(f"{name}: loop thread's GIL waits {gil}", flush=True)
        figures.update(written)
        print(f"{name}: {len(overheads)} turns answered, overhead p50 {figures[f'{name}_overhead_p50_ms']:.2f} ms, "
              f"p99 {figures[f'{name}_overhead_p99_ms']:.2f} ms; daemon CPU {cpu_ms_per_call:.2f} ms a call; "
              f"benchmark's own loop lag p99 {figures[f'{name}_bench_loop_lag_p99_ms']:.2f} ms; "
              f"daemon threads a call: {threads}"
              + (f"; {figures[f'{name}_calls_written']} calls written, complete: "
                 f"{figures[f'{name}_records_complete']}, flushed {figures[f'{name}_records_flush_s']} s "
                 f"after the last hangup, {figures[f'{name}_write_transactions_per_call']} write transactions "
                 "a call" if database_url else ""), flush=True)
        return figures
    finally:
        rig.close()
        if gc_probe is not None:
            gc_probe.unlink(missing_ok=True)


def _collections(path: Path, from_s: float, to_s: float, calls: int) -> dict:
    """The daemon's generation-1 and -2 collections from ``from_s`` to ``to_s`` (its gc probe)."""
    found = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    found = [gc for gc in found if from_s <= gc["at_s"] <= to_s]
    figures = {}
    for generation in (1, 2):
        these = [gc for gc in found if gc["generation"] == generation]
        elsewhere = [gc["ms"] for gc in these if not gc["loop_thread"]]
        figures.update({f"gc{generation}_count": len(these),
                        f"gc{generation}_ms_per_call": round(sum(gc["ms"] for gc in these) / calls, 3),
                        f"gc{generation}_max_ms": round(max((gc["ms"] for gc in these), default=0.0), 2),
                        f"gc{generation}_max_cpu_ms": round(max((gc.get("cpu_ms", 0.0) for gc in these), default=0.0), 2),
                        f"gc{generation}_collected": sum(gc.get("collected", 0) for gc in these),
                        f"gc{generation}_off_loop_count": len(elsewhere),
                        f"gc{generation}_off_loop_max_ms": round(max(elsewhere, default=0.0), 2)})
    # Each: generation, CPU ms, objects freed, on the loop's thread, gc.get_count() before it, and
    # the generation-0 collections since the previous line (count, CPU ms in all, the longest).
    figures["gc_each"] = [[gc["generation"], round(gc.get("cpu_ms", 0.0), 2), gc.get("collected"), gc["loop_thread"],
                           gc.get("counts"), gc.get("gen0_since")] for gc in found]
    return figures


def writer_cost(url: str, calls: int, rate_per_s: float) -> dict:
    """The records' own cost, without a daemon: ``calls`` calls' records (a call's row at park,
    its turn when sent, played out and at the end, the call's row again at the end: what
    recorder.py puts) through a RecordWriter here at ``rate_per_s`` calls a second. CPU of the
    records thread per call (time.thread_time around each write: the Python work that holds the
    GIL the loop needs), statements per call, and this loop's lag (5 ms ticker) meanwhile."""
    import sqlalchemy

    from ivr_daemon.records import RecordWriter
    from ivr_daemon.records.store import utc_now

    store = RecordStore(url)
    writer = RecordWriter(store)
    counts = {"statements": 0, "thread_cpu_s": 0.0}
    sqlalchemy.event.listen(store.engine, "before_cursor_execute",
                            lambda *_args: counts.__setitem__("statements", counts["statements"] + 1))
    write = store.write

    def timed_write(records):
        started_s = time.thread_time()
        try:
            return write(records)
        finally:
            counts["thread_cpu_s"] += time.thread_time() - started_s

    store.write = timed_write
    writer.start()
    writer.using_store(writer.store.migrate)
    counts.update(statements=0, thread_cpu_s=0.0)
    # A writer whose database work is in a records process (RemoteStore): that process's CPU.
    records_pid = getattr(writer.store, "pid", None)
    process_cpu_before_s = _cpu_s(records_pid) if records_pid else 0.0
    lags_ms: list[float] = []
    stop = gevent.event.Event()

    def ticker() -> None:
        while not stop.is_set():
            before = time.monotonic()
            gevent.sleep(0.005)
            lags_ms.append((time.monotonic() - before - 0.005) * 1000)

    def call(index: int) -> None:
        uuid = f"writer-{index}"
        row = {"uuid": uuid, "agent": "default", "caller_number": "5551234", "variables": {"order_id": "1"},
               "started_at": utc_now(), "answered_at": utc_now(), "ended_at": None, "hangup_cause": None,
               "transferred_to": None}
        writer.put_call(dict(row))
        gevent.sleep(0.7)
        turn = {"call_uuid": uuid, "turn_index": 1, "started_at": utc_now(), "transcript": f"question number {index}",
                "reply": "Sure, we open at nine.", "heard": "", "interrupted": False, "used_fallback": False,
                "llm_ms": 200.0, "tts_ms": 0.1, "first_audio_ms": 201.0, "tool_calls": []}
        writer.put_turn(dict(turn))
        gevent.sleep(1.0)
        writer.put_turn(dict(turn, reply=latency.REPLY, heard="Sure, we open at nine."))
        gevent.sleep(2.5)
        writer.put_turn(dict(turn, reply=latency.REPLY, heard=latency.REPLY))
        writer.put_call(dict(row, ended_at=utc_now(), hangup_cause="NORMAL_CLEARING"))

    lag = gevent.spawn(ticker)
    rng = random.Random(7)
    gevent.joinall([gevent.spawn_later(rng.uniform(0, calls / rate_per_s), call, i) for i in range(calls)])
    assert writer.flush(60), "records not written within 60 s"
    stop.set()
    lag.join()
    if records_pid:
        process_cpu_s = _cpu_s(records_pid) - process_cpu_before_s
        writer.stop(5)
        return {"records_process_cpu_ms_per_call": round(process_cpu_s * 1000 / calls, 3),
                "loop_lag_p99_ms": round(percentile(lags_ms, 99), 2), "loop_lag_max_ms": round(max(lags_ms), 2)}
    writer.stop(5)
    return {"records_thread_cpu_ms_per_call": round(counts["thread_cpu_s"] * 1000 / calls, 3),
            "statements_per_call": round(counts["statements"] / calls, 2),
            "loop_lag_p99_ms": round(percentile(lags_ms, 99), 2), "loop_lag_max_ms": round(max(lags_ms), 2)}


def run_writer(args, name: str, url: str, checkout: Path, switch_interval_ms: float | None = None) -> dict:
    """writer_cost in a process of its own running ``checkout``'s ivr_daemon (--writer)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(checkout)}
    if switch_interval_ms is not None:
        env["BENCH_SWITCH_INTERVAL_MS"] = str(switch_interval_ms)
    out = subprocess.run([sys.executable, __file__, "--writer-child", url, "--calls", str(args.calls),
                          "--spread-s", str(args.spread_s)], env=env, check=True, capture_output=True, text=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{name} records writer: {figures}", flush=True)
    return {f"{name}_{key}": value for key, value in figures.items()}


def _threads_cpu_s(pid: int) -> dict[int, tuple[float, float]]:
    """Each thread's (user, system) CPU seconds so far (Linux /proc): the loop's thread is the
    process's own id; the others are the records thread and the synthesis threads."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        found[int(tid)] = (int(fields[11]) / ticks, int(fields[12]) / ticks)
    return found


def _children_cpu_s(daemon_pid: int, module: str) -> float:
    """CPU seconds so far (user + system, all their threads) of the daemon's child processes
    running ``python -m module`` (its records process, its TTS workers); 0.0 when it has none."""
    total = 0.0
    for child in psutil.Process(daemon_pid).children():
        try:
            if module in child.cmdline():
                total += _cpu_s(child.pid)
        except (psutil.Error, OSError):
            pass  # ended meanwhile
    return total


def _threads_cpu_ms_per_call(before: dict, after: dict, pid: int, calls: int) -> dict:
    """The loop thread's and the other threads' CPU a call, and the kernel's share of all of it
    (a thread that ended before ``after`` is not counted: the daemon's threads live as long as it)."""
    used = {tid: tuple(now - then for now, then in zip(cpu, before.get(tid, (0.0, 0.0)))) for tid, cpu in after.items()}
    loop_user, loop_sys = used.pop(pid, (0.0, 0.0))
    other_user, other_sys = sum(cpu[0] for cpu in used.values()), sum(cpu[1] for cpu in used.values())
    per_call = 1000 / calls
    return {"daemon_loop_cpu_ms_per_call": round((loop_user + loop_sys) * per_call, 2),
            "daemon_other_threads_cpu_ms_per_call": round((other_user + other_sys) * per_call, 2),
            "daemon_kernel_cpu_ms_per_call": round((loop_sys + other_sys) * per_call, 2)}


def _write_transactions(database_url: str) -> int:
    """A counter of the database's write transactions: SQLite's file change counter (header
    bytes 24-27, one a transaction that wrote, in its rollback-journal mode), PostgreSQL's next
    transaction id (one a transaction that wrote; reads take none). Read the same way for both
    checkouts, no help from the daemon's code."""
    import sqlalchemy

    url = sqlalchemy.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        with open(url.database, "rb") as db_file:
            return int.from_bytes(db_file.read(28)[24:28], "big")
    engine = sqlalchemy.create_engine(url.set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as connection:
            return int(connection.execute(sqlalchemy.text("SELECT pg_snapshot_xmax(pg_current_snapshot())")).scalar())
    finally:
        engine.dispose()


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
    parser.add_argument("--only", action="append", choices=("no_records", "sqlite", "postgresql"),
                        help="run only this variant (repeatable)")
    parser.add_argument("--baseline", metavar="PATH", type=Path,
                        help="also run the daemon of this checkout (e.g. main), before ours, for each variant")
    parser.add_argument("--profile-daemon", metavar="PATH",
                        help="run the daemon under cProfile (its loop's thread), stats to PATH.<run>")
    parser.add_argument("--search-whole-history", action="store_true",
                        help="the benchmark's old way: each caller searches every command since the start")
    parser.add_argument("--writer", action="store_true",
                        help="the records writer alone, no daemon: its thread's CPU, statements, loop lag a call")
    parser.add_argument("--writer-child", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--trace-gil", action="store_true",
                        help="perf trace the daemon's loop thread: its GIL waits a call (bench/gil_trace.py)")
    parser.add_argument("--switch-interval-ms", type=float, action="append",
                        help="run each variant's daemon (or --writer's process) with this sys.setswitchinterval "
                             "(repeatable: the variants alternate round by round)")
    parser.add_argument("--gc-probe", action="store_true",
                        help="the daemon's garbage collections and their length (CPU too), on the loop's thread or "
                             "another (which holds the GIL the loop needs meanwhile)")
    parser.add_argument("--rounds", type=int, default=1, help="run the variants this many times, alternating")
    args = parser.parse_args(argv)
    configure_logging("ERROR", "console")
    if args.writer_child:
        os.environ.setdefault("PSYCOPG_WAIT_FUNC", "wait_c")  # as in the daemon (store.py's _psycopg)
        if os.environ.get("BENCH_SWITCH_INTERVAL_MS"):  # run_writer's --switch-interval-ms
            sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL_MS"]) / 1000)
        print(json.dumps(writer_cost(args.writer_child, args.calls, args.calls / args.spread_s)))
        return 0
    started = time.monotonic()
    host_probe_before_ms = host_probe_ms()
    figures: dict = {"calls": args.calls, "spread_s": args.spread_s}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ivr-bench-records-")))
        runs = [("no_records", None), ("sqlite", f"sqlite:///{workdir}/records.db")]
        if args.postgres:
            from pg_server import PostgresServer

            server = stack.enter_context(PostgresServer.started())
            runs.append(("postgresql", server.new_database()))
        if args.only:
            runs = [run for run in runs if run[0] in args.only]
        if args.reverse:
            runs.reverse()  # the same runs, the other way round: does the order matter on this machine?
        if args.switch_interval_ms:
            runs = [(f"{name}_si{ms:g}", url, ms) for name, url in runs for ms in args.switch_interval_ms]
        else:
            runs = [(name, url, None) for name, url in runs]
        runs = [(name if args.rounds == 1 else f"r{round_}_{name}", url, ms)
                for round_ in range(1, args.rounds + 1) for name, url, ms in runs]
        for name, url, interval_ms in runs:
            if url and (args.rounds > 1 or args.switch_interval_ms):
                # Each run's own database: the same work for each.
                url = url.replace("records.db", f"{name}.db") if url.startswith("sqlite") else server.new_database()
            if args.writer:
                if url is None:
                    continue
                if args.baseline:
                    base_url = url.replace(".db", "_baseline.db") if url.startswith("sqlite") else server.new_database()
                    figures.update(run_writer(args, f"baseline_{name}", base_url, args.baseline))
                figures.update(run_writer(args, name, url, latency.ROOT, interval_ms))
                continue
            if args.baseline:
                # Each variant's database afresh for each daemon: the same work for both.
                base_url = url and (url.replace(".db", "_baseline.db") if url.startswith("sqlite")
                                    else server.new_database())
                figures.update(run_once(args, f"baseline_{name}", base_url, checkout=args.baseline))
            figures.update(run_once(args, name, url, checkout=latency.ROOT,  # this checkout's daemon
                                    switch_interval_ms=interval_ms))
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["load_average_1min"] = round(os.getloadavg()[0], 2)
    figures["host_probe_ms_before"], figures["host_probe_ms_after"] = host_probe_before_ms, host_probe_ms()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
