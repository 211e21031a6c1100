#!/usr/bin/env python
"""Soak benchmark: thousands of 3-turn calls through the daemon, then what it kept (memory, greenlets, files).

Three processes, so that what is measured is the daemon alone:

  this one      the daemon, in-process (``build_conversation_daemon``, null TTS, phrase cache as
                configured), so its greenlets can be counted from ``gc.get_objects()``, its RSS,
                open files and fds read with psutil, its loop's watchers counted
  --role driver the FreeSWITCH simulator (files play instantly, after --playback-gap-ms; its
                history bounded by --sim-history) and the callers: --concurrency calls at a
                time, each new_call, --turns x (speak, wait until every sentence of the answer
                has played: PLAYBACK_STOP), hangup
  --role llm    the tests' fake OpenAI-compatible server, streaming 1-3 sentence answers fast
                (first token after --llm-first-token-ms, then --llm-tokens-per-s); every other
                answer starts with a sentence naming the call, so the phrase cache both hits
                and misses (and evicts, once it is full)

--warmup calls run first, so one-time allocations (imports, caches, pools) are not counted as
growth; then, with the daemon idle (no calls) and gc.collect() done, "before" is measured;
--calls calls run in --rounds parts, RSS sampled after each (growth that levels off is a
bounded table filling up, growth that does not is a leak); "after" is measured idle again.
The daemon's bounded tables fill only after thousands of calls (ended-call UUIDs: 4096, the
phrase cache: 200 MB), so a 200-call warm-up leaves a few MB of that in the growth; a
--warmup of 5000 leaves none.

Prints a table, then as its last line one JSON object (calls, turns, seconds, calls_per_s,
rss_before_mb, rss_after_mb, rss_growth_mb, greenlets_before/after, open_files_before/after,
fds_before/after, temp_files_left, cache_files, cache_mb, errors, spurious_barge_ins,
rss_trend_mb, the CPU share of each process, goals_met). Goals: RSS growth <= 20 MB, no
greenlet, file or fd left behind, no temp file left in TTS_OUTPUT_DIR or /tmp.

errors: turns whose answer did not fully play within --turn-timeout-s (driver's view) or that
the daemon answered with the fallback phrase or with nothing (its on_turn results), each turn
counted once. spurious_barge_ins: uuid_breaks the daemon sent; these callers speak only after
the whole answer has played, so every one is a mistake.

--tracemalloc FRAMES traces allocations from "before" to "after" (about 5x slower) and prints
the sites that grew. Entries of a bounded table replaced during the trace show up as growth
(their untraced predecessors are not seen leaving): use it after a large --warmup.

Usage: .venv/bin/python bench/soak.py [--calls 10000] [--warmup 200] [--concurrency 50] [--cache-mb 0]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.fileobject  # noqa: E402
import gevent.pool  # noqa: E402
import greenlet  # noqa: E402
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the faithful fake LLM server the tests use

RSS_GROWTH_GOAL_MB = 20.0
MB = 1024 * 1024

# -- the conversation script, shared by the driver (what it asks, how many sentences it must
#    hear back) and the LLM (what it answers) -------------------------------------------------

QUESTION = re.compile(r"question (\d+) of caller (\d+)")
COMMON_SENTENCES = (
    "We open at nine on weekdays.",
    "On Saturdays we open at ten and close at four.",
    "Is there anything else I can help you with?",
    "Your order has shipped and should arrive on Monday.",
    "You can also reach us by email at any time.",
    "Thanks for calling our store today.",
    "The returns desk is next to the main entrance.",
)


def question(call_index: int, turn: int) -> str:
    return f"question {turn} of caller {call_index}"


def reply_for(call_index: int, turn: int) -> str:
    """One to three sentences; every other answer starts with one no other call hears (a cache miss)."""
    count = 1 + (call_index + turn) % 3
    sentences = [COMMON_SENTENCES[(call_index * 3 + turn + k) % len(COMMON_SENTENCES)] for k in range(count)]
    if (call_index + turn) % 2 == 0:
        sentences[0] = f"Ticket {call_index} for question {turn} is open and on its way."
    return " ".join(sentences)


def reply_to_request(request: dict) -> str:
    last_user = next((m["content"] for m in reversed(request["messages"]) if m["role"] == "user"), "")
    match = QUESTION.search(last_user)
    if match is None:
        return "Sorry, I did not catch that."
    return reply_for(int(match.group(2)), int(match.group(1)))


def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def exit_with_parent(parent_pid: int) -> None:
    """Children end when the benchmark does, even if it was killed before it could stop them."""
    while os.getppid() == parent_pid:
        gevent.sleep(1.0)
    os._exit(0)


# -- role llm ---------------------------------------------------------------------------------


def run_llm(args) -> int:
    from llm_fakes import FakeLlmServer

    server = FakeLlmServer("openai", replies=reply_to_request, stream_first_delay_s=args.llm_first_token_ms / 1000,
                           stream_gap_s=1 / args.llm_tokens_per_s, delay_s=0).start()
    print(server.url, flush=True)
    gevent.spawn(exit_with_parent, os.getppid())
    while True:
        # The fake keeps every request for tests to read: over a soak that is only growth.
        gevent.sleep(5.0)
        for kept in (server.requests, server.headers, server.client_ports, server.stream_outcomes):
            kept.clear()


# -- role driver: the simulator and the callers -----------------------------------------------


@dataclass
class _Track:
    """What one call has heard so far."""

    expected_stops: int = 0
    stops: int = 0
    done: gevent.event.Event = field(default_factory=gevent.event.Event)


class Driver:
    """Plays calls against the simulator; follows every PLAYBACK_STOP from one dispatcher greenlet.

    One waiter on the simulator, not one per call: the simulator wakes every waiter on every
    event, and 50 waiters woken for each of ~50 events a call would cost more than the daemon.
    """

    def __init__(self, args):
        from ivr_daemon.replay.simulator import FreeswitchSimulator
        from ivr_daemon.sentences import FIRST_CLAUSE_MIN_WORDS, SentenceSplitter

        def split_sentences(text: str) -> list[str]:
            """The broadcasts of a reply, as the daemon cuts them (FIRST_CHUNK=clause, the default)."""
            splitter = SentenceSplitter(first_clause_min_words=FIRST_CLAUSE_MIN_WORDS)
            return splitter.feed(text) + splitter.flush()

        self.args = args
        self.split_sentences = split_sentences
        self.sim = FreeswitchSimulator(playback_gap_s=args.playback_gap_ms / 1000, playback_speed=0.0,
                                       duplicate_speech_delay_s=0.0, history_limit=args.sim_history).start()
        self.tracks: dict[str, _Track] = {}
        self.stats = collections.Counter()
        self.failed: list[list] = []
        self.turn_ms: list[float] = []
        self._dispatcher = gevent.spawn(self._dispatch)

    def _dispatch(self) -> None:
        position = self.sim.events_emitted
        last_sequence = -1

        def any_event(_event) -> bool:
            return True

        while True:
            event = self.sim.wait_for_event(any_event, None, start_index=position, consume=False)
            position += 1
            if event.sequence <= last_sequence:
                # Event-Sequence only grows: we fell more than --sim-history events behind and
                # positions no longer match. Start again from now; waits may then time out.
                self.stats["dispatcher_lost_events"] += 1
                position = self.sim.events_emitted
                continue
            last_sequence = event.sequence
            if event.name == "API" and event.get("API-Command") == "uuid_break":
                # Callers here speak only once the answer has played: every break is spurious.
                self.stats["uuid_breaks"] += 1
            if event.name != "PLAYBACK_STOP":
                continue
            track = self.tracks.get(event.unique_id)
            if track is not None:
                track.stops += 1
                if track.stops >= track.expected_stops:
                    track.done.set()

    def run(self, first_index: int, count: int, new_phase: bool) -> dict:
        """Play ``count`` calls; figures add up over the rounds of one phase (warm-up, measured run)."""
        self.sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=30)
        if new_phase:
            self.stats.clear()
            self.failed.clear()
            self.turn_ms.clear()
        cpu_started = time.process_time()
        started_s = time.monotonic()
        pool = gevent.pool.Pool(self.args.concurrency)
        for index in range(first_index, first_index + count):
            pool.spawn(self._call, index)
        pool.join()
        # Percentiles, not the samples: a list of every turn's time in the daemon's process
        # would be growth of the benchmark's own, measured as the daemon's.
        return {"calls": count, "seconds": time.monotonic() - started_s, "cpu_s": time.process_time() - cpu_started,
                "stats": dict(self.stats), "failed": self.failed, "failed_count": len(self.failed),
                "turn_p50_ms": percentile(self.turn_ms, 50), "turn_p99_ms": percentile(self.turn_ms, 99)}

    def _call(self, index: int) -> None:
        sim = self.sim
        uuid = sim.new_call(caller_id_number=str(5_550_000 + index))
        track = self.tracks[uuid] = _Track()
        try:
            for turn in range(1, self.args.turns + 1):
                if self.args.think_ms:
                    gevent.sleep(self.args.think_ms / 1000)
                track.expected_stops += len(self.split_sentences(reply_for(index, turn)))
                track.done.clear()
                self.stats["turns"] += 1
                asked_s = time.monotonic()
                sim.speak(uuid, question(index, turn))
                if not track.done.wait(self.args.turn_timeout_s):
                    # What plays later would be counted against the next turn: end the call here.
                    self.stats["turns_unanswered"] += 1
                    self.failed.append([uuid, turn, track.stops, track.expected_stops])
                    break
                self.turn_ms.append((time.monotonic() - asked_s) * 1000)
            if self.args.think_ms:
                gevent.sleep(self.args.think_ms / 1000)
            sim.hangup(uuid)
            self.stats["calls"] += 1
        finally:
            del self.tracks[uuid]


def run_driver(args) -> int:
    from ivr_daemon.logs import configure_logging

    configure_logging("WARNING", "console")
    driver = Driver(args)
    print(json.dumps({"port": driver.sim.port}), flush=True)
    gevent.spawn(exit_with_parent, os.getppid())
    commands = gevent.fileobject.FileObject(sys.stdin.fileno(), "r", close=False)
    for line in commands:
        request = json.loads(line)
        if request.get("quit"):
            break
        print(json.dumps(driver.run(request["first"], request["count"], request["new_phase"])), flush=True)
    driver.sim.stop()
    return 0


# -- role main: the daemon and the measurements -------------------------------------------------


def _libc_malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _fd_kinds() -> dict[str, int]:
    kinds = collections.Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
        kinds[kind] += 1
    return dict(kinds)


def _files_left(tts_dir: Path) -> dict:
    """Per-call and temporary files in TTS_OUTPUT_DIR and /tmp; the phrase cache counted apart."""
    cache_dir = tts_dir / "cache"
    left, fallback, cache_files, cache_bytes = [], [], 0, 0
    for path in tts_dir.rglob("*"):
        if not path.is_file():
            continue
        if path.name.endswith(".part"):
            left.append(str(path))  # a temp file is left over wherever it is
        elif cache_dir in path.parents:
            cache_files += 1
            cache_bytes += path.stat().st_size
        elif path.name.startswith("fallback-"):
            fallback.append(str(path))  # synthesized once at start-up, meant to stay
        else:
            left.append(str(path))
    pid = os.getpid()
    tmp = Path(tempfile.gettempdir())
    if tmp != tts_dir:
        left += [str(p) for p in tmp.glob(f"*-{pid}.wav")] + [str(p) for p in tmp.glob(f".*-{pid}.wav.*.part")]
    return {"left": left, "fallback": fallback, "cache_files": cache_files, "cache_bytes": cache_bytes}


def measure(daemon, tts_dir: Path) -> dict:
    """The daemon process at rest: collected first, so only what is really held counts."""
    for _ in range(3):
        gevent.sleep(0.2)  # let finished greenlets unwind and scheduled callbacks run
        gc.collect()
    process = psutil.Process()
    rss = process.memory_info().rss
    objects = gc.get_objects()
    raw = [o for o in objects if isinstance(o, greenlet.greenlet)]
    live = [g for g in raw if not g.dead]
    live_gevent = [g for g in live if isinstance(g, gevent.Greenlet)]
    types = collections.Counter(type(o).__qualname__ for o in objects)
    loop = gevent.get_hub().loop
    figures = {
        "rss": rss,
        "uss": process.memory_full_info().uss,
        "objects": len(objects),
        "allocated_blocks": sys.getallocatedblocks(),
        "greenlets": len(live),
        "greenlets_gevent": len(live_gevent),
        "greenlet_objects": len(raw),
        "greenlet_names": collections.Counter(_greenlet_name(g) for g in live),
        "open_files": len(process.open_files()),
        "fds": process.num_fds(),
        "fd_kinds": _fd_kinds(),
        "threads": process.num_threads(),
        "loop_active": getattr(loop, "activecnt", None),
        "calls": len(daemon.router.calls),
        "types": types,
        **_files_left(tts_dir),
    }
    del objects, raw, live, live_gevent
    figures["rss_trimmed"] = process.memory_info().rss if _libc_malloc_trim() else None
    return figures


def _greenlet_name(g) -> str:
    """What a greenlet runs, for the listing: its function's qualified name."""
    run = getattr(g, "_run", None) or getattr(g, "run", None)
    run = getattr(run, "__func__", run)
    name = getattr(run, "__qualname__", None) or type(g).__name__
    module = getattr(run, "__module__", "") or ""
    return f"{module}.{name}" if module else name


def wait_idle(daemon, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while daemon.router.calls:
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.05)
    return True


class TurnLog:
    """The daemon's on_turn results, counted, not kept: kept, they would be growth themselves."""

    def __init__(self):
        self.reported = 0
        self.interrupted = 0
        self.bad: set[tuple[str, int]] = set()

    def __call__(self, result) -> None:
        self.reported += 1
        self.interrupted += result.interrupted
        if result.used_fallback or not result.sentences:
            self.bad.add((result.call_uuid, result.turn))

    def reset(self):
        self.reported = self.interrupted = 0
        self.bad = set()


def child(role: str, args) -> subprocess.Popen:
    passed = ("concurrency", "turns", "think_ms", "playback_gap_ms", "turn_timeout_s", "sim_history",
              "llm_first_token_ms", "llm_tokens_per_s")
    command = [sys.executable, str(Path(__file__).resolve()), "--role", role]
    for name in passed:
        command += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def driver_run(driver: subprocess.Popen, first: int, count: int, new_phase: bool = True) -> dict:
    driver.stdin.write(json.dumps({"first": first, "count": count, "new_phase": new_phase}) + "\n")
    driver.stdin.flush()
    line = driver.stdout.readline()
    if not line:
        raise RuntimeError("the driver process ended")
    return json.loads(line)


def main_role(args) -> int:
    from ivr_daemon.config import load_settings
    from ivr_daemon.daemon import build_conversation_daemon
    from ivr_daemon.logs import configure_logging

    work_dir = Path(tempfile.mkdtemp(prefix="ivr-soak-"))
    tts_dir = work_dir / "tts"
    log_file = open(work_dir / "daemon.log", "w")
    configure_logging(args.log_level, "json", stream=log_file)
    llm = child("llm", args)
    driver = child("driver", args)
    daemon = None
    try:
        llm_url = llm.stdout.readline().strip()
        sim_port = json.loads(driver.stdout.readline())["port"]
        values = {"FREESWITCH_PORT": str(sim_port), "LLM_PROVIDER": "openai", "LLM_API_URL": llm_url,
                  "LLM_MODEL": "soak", "LLM_TIMEOUT": "10", "TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(tts_dir),
                  "LOG_LEVEL": args.log_level, "LOG_FORMAT": "json"}
        if args.cache_mb is not None:
            values["TTS_CACHE_MAX_MB"] = str(args.cache_mb)
        settings = load_settings(environ=values)
        turns = TurnLog()
        daemon = build_conversation_daemon(settings, on_turn=turns)
        daemon.start()
        if not daemon.esl.wait_connected(10):
            raise RuntimeError("the daemon did not connect to the simulator")
        print(f"soak: {args.calls} calls of {args.turns} turns, {args.concurrency} at a time, after {args.warmup} "
              f"warm-up calls; phrase cache {settings.tts_cache_max_mb} MB; work dir {work_dir}", flush=True)

        if args.warmup:
            warm = driver_run(driver, 0, args.warmup)
            print(f"warm-up: {args.warmup} calls in {warm['seconds']:.1f} s", flush=True)
        if not wait_idle(daemon):
            raise RuntimeError(f"{len(daemon.router.calls)} calls still up after the warm-up")
        turns.reset()
        if args.tracemalloc:
            tracemalloc.start(args.tracemalloc)
        before = measure(daemon, tts_dir)
        snapshot_before = tracemalloc.take_snapshot() if args.tracemalloc else None
        processes = {"daemon": psutil.Process(), "sim": psutil.Process(driver.pid), "llm": psutil.Process(llm.pid)}
        cpu_before = {name: cpu_s(p) for name, p in processes.items()}

        run = {"calls": 0, "seconds": 0.0}
        trend = []
        first, idle, sampling_cpu_s = args.warmup, True, 0.0
        for round_index in range(args.rounds):
            count = args.calls * (round_index + 1) // args.rounds - (first - args.warmup)
            part = driver_run(driver, first, count, new_phase=round_index == 0)
            first += count
            for key in ("calls", "seconds"):
                run[key] += part[key]
            for key in ("stats", "failed", "failed_count", "turn_p50_ms", "turn_p99_ms"):
                run[key] = part[key]  # the driver's figures add up over the phase
            idle = wait_idle(daemon) and idle
            if round_index < args.rounds - 1:
                sampling_started_s = time.process_time()
                trend.append(sample(first - args.warmup))
                sampling_cpu_s += time.process_time() - sampling_started_s
                print(f"  after {trend[-1]['calls']:6d} calls: RSS {trend[-1]['rss_mb']:.1f} MB, "
                      f"{trend[-1]['objects']} objects, {trend[-1]['allocated_blocks']} blocks", flush=True)
        cpu = {name: cpu_s(p) - cpu_before[name] for name, p in processes.items()}
        cpu["daemon"] -= sampling_cpu_s  # the benchmark's own gc.collect() is not the daemon's work
        snapshot_after = tracemalloc.take_snapshot() if args.tracemalloc else None
        after = measure(daemon, tts_dir)
        trend.append(sample(args.calls, after))
        report(args, run, idle, turns, before, after, trend, cpu, snapshot_before, snapshot_after, work_dir)
        return 0
    finally:
        if daemon is not None:
            daemon.stop(timeout_s=5)
        try:
            driver.stdin.write(json.dumps({"quit": True}) + "\n")
            driver.stdin.flush()
        except OSError:
            pass
        for proc in (driver, llm):
            try:
                proc.wait(3 if proc is driver else 0.01)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(5)
        log_file.close()
        if not args.keep_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


def sample(calls: int, measured: dict | None = None) -> dict:
    """RSS and Python's own counts at one point of the run: the trend tells growth that levels off from a leak."""
    if measured is None:
        gevent.sleep(0.2)
        gc.collect()
        rss, objects, blocks = psutil.Process().memory_info().rss, len(gc.get_objects()), sys.getallocatedblocks()
    else:
        rss, objects, blocks = measured["rss"], measured["objects"], measured["allocated_blocks"]
    return {"calls": calls, "rss_mb": round(rss / MB, 1), "objects": objects, "allocated_blocks": blocks}


def report(args, run, idle, turns, before, after, trend, cpu, snapshot_before, snapshot_after, work_dir) -> None:
    stats = run["stats"]
    # A turn both unanswered (driver) and answered with the fallback (daemon) is one error.
    errors = run["failed_count"] + len(turns.bad - {(uuid, turn) for uuid, turn, *_ in run["failed"]})
    total_cpu = sum(cpu.values()) or 1.0
    rows = [
        ("RSS (MB)", before["rss"] / MB, after["rss"] / MB),
        ("RSS after malloc_trim (MB)", (before["rss_trimmed"] or 0) / MB, (after["rss_trimmed"] or 0) / MB),
        ("USS (MB)", before["uss"] / MB, after["uss"] / MB),
        ("Python objects", before["objects"], after["objects"]),
        ("allocated blocks", before["allocated_blocks"], after["allocated_blocks"]),
        ("live greenlets", before["greenlets"], after["greenlets"]),
        ("  of which gevent.Greenlet", before["greenlets_gevent"], after["greenlets_gevent"]),
        ("greenlet objects (dead too)", before["greenlet_objects"], after["greenlet_objects"]),
        ("open files", before["open_files"], after["open_files"]),
        ("fds", before["fds"], after["fds"]),
        ("threads", before["threads"], after["threads"]),
        ("loop active watchers", before["loop_active"], after["loop_active"]),
        ("calls up in the daemon", before["calls"], after["calls"]),
        ("temp files left", len(before["left"]), len(after["left"])),
        ("phrase cache files", before["cache_files"], after["cache_files"]),
        ("phrase cache MB", before["cache_bytes"] / MB, after["cache_bytes"] / MB),
    ]
    print(f"\n{'':30} {'before':>14} {'after':>14} {'growth':>12}")
    for name, b, a in rows:
        if isinstance(b, float) or isinstance(a, float):
            print(f"{name:30} {b:14.1f} {a:14.1f} {a - b:+12.1f}")
        else:
            growth = "" if a is None or b is None else f"{a - b:+12d}"
            print(f"{name:30} {b!s:>14} {a!s:>14} {growth:>12}")
    print(f"\nfd kinds before {before['fd_kinds']}, after {after['fd_kinds']}")
    print(f"live greenlets after: {dict(after['greenlet_names'].most_common(12))}")
    grew = (after["greenlet_names"] - before["greenlet_names"])
    if grew:
        print(f"greenlets that grew: {dict(grew)}")
    growth = [(name, after["types"][name] - before["types"].get(name, 0)) for name in after["types"]]
    growth = sorted((g for g in growth if g[1] > 0), key=lambda g: -g[1])[:15]
    print("object types that grew: " + ", ".join(f"{name} +{count}" for name, count in growth))
    if after["left"]:
        print(f"temp files left (first 10 of {len(after['left'])}): {after['left'][:10]}")
    if stats.get("dispatcher_lost_events"):
        print(f"WARNING: the driver fell behind the simulator's history {stats['dispatcher_lost_events']} times: "
              f"raise --sim-history")
    if run["failed"]:
        print(f"unanswered turns (first 10 of {run['failed_count']}; uuid, turn, stops heard, expected): "
              f"{run['failed'][:10]}")
    print(f"\n{run['calls']} calls, {stats.get('turns', 0)} turns in {run['seconds']:.1f} s: "
          f"{run['calls'] / run['seconds']:.1f} calls/s; turn (speak -> last PLAYBACK_STOP) p50 "
          f"{run['turn_p50_ms']:.1f} ms, p99 {run['turn_p99_ms']:.1f} ms")
    if len(trend) > 1:
        print("RSS MB by calls done: " + ", ".join(f"{t['calls']}: {t['rss_mb']}" for t in trend))
    print(f"daemon on_turn: {turns.reported} reported ({stats.get('turns', 0) - turns.reported} cut short, e.g. by "
          f"the hangup or a barge-in), {turns.interrupted} marked interrupted, {len(turns.bad)} fallback/empty; "
          f"driver: {stats.get('turns_unanswered', 0)} unanswered within {args.turn_timeout_s:g} s, "
          f"{stats.get('uuid_breaks', 0)} uuid_break received (barge-ins: all spurious, callers here never talk over "
          f"the answer)")
    print("CPU s: " + ", ".join(f"{name} {seconds:.1f} ({seconds / total_cpu:.0%})" for name, seconds in cpu.items())
          + f"; {total_cpu / run['seconds']:.2f} cores busy on average")
    if not idle:
        print(f"WARNING: {after['calls']} calls were still up in the daemon when 'after' was measured")
    if snapshot_before is not None:
        print(f"\ntracemalloc, top growth by allocation site ({args.tracemalloc} frames):")
        for stat in snapshot_after.compare_to(snapshot_before, "traceback")[:12]:
            print(f"  {stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks")
            for line in stat.traceback.format()[-2 * min(args.tracemalloc, 4):]:
                print(f"      {line}")
    if args.keep_dir:
        print(f"work dir kept: {work_dir}")

    rss_growth_mb = (after["rss"] - before["rss"]) / MB
    figures = {
        "calls": run["calls"],
        "turns": stats.get("turns", 0),
        "seconds": round(run["seconds"], 1),
        "calls_per_s": round(run["calls"] / run["seconds"], 2),
        "rss_before_mb": round(before["rss"] / MB, 1),
        "rss_after_mb": round(after["rss"] / MB, 1),
        "rss_growth_mb": round(rss_growth_mb, 1),
        "greenlets_before": before["greenlets"],
        "greenlets_after": after["greenlets"],
        "open_files_before": before["open_files"],
        "open_files_after": after["open_files"],
        "fds_before": before["fds"],
        "fds_after": after["fds"],
        "temp_files_left": len(after["left"]),
        "cache_files": after["cache_files"],
        "cache_mb": round(after["cache_bytes"] / MB, 1),
        "errors": errors,
        "spurious_barge_ins": stats.get("uuid_breaks", 0),
        "rss_trend_mb": [t["rss_mb"] for t in trend],
        "daemon_cpu_share": round(cpu["daemon"] / total_cpu, 3),
        "sim_cpu_share": round(cpu["sim"] / total_cpu, 3),
        "llm_cpu_share": round(cpu["llm"] / total_cpu, 3),
        "goals_met": (rss_growth_mb <= RSS_GROWTH_GOAL_MB and after["greenlets"] <= before["greenlets"]
                      and after["open_files"] <= before["open_files"] and after["fds"] <= before["fds"]
                      and not after["left"]),
    }
    print(json.dumps(figures))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("main", "driver", "llm"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=200, help="calls before 'before' is measured")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measure RSS after each of this many equal parts of --calls (the trend)")
    parser.add_argument("--concurrency", type=int, default=50, help="calls up at once")
    parser.add_argument("--turns", type=int, default=3, help="questions per call")
    parser.add_argument("--think-ms", type=float, default=0.0,
                        help="caller's pause before each question and before hanging up")
    parser.add_argument("--playback-gap-ms", type=float, default=0.0,
                        help="uuid_broadcast to PLAYBACK_START (FreeSWITCH: ~100); files then play instantly")
    parser.add_argument("--turn-timeout-s", type=float, default=15.0, help="an answer not heard by then is an error")
    parser.add_argument("--cache-mb", type=int, default=None, help="TTS_CACHE_MAX_MB (default: the daemon's, 200; "
                        "0 turns the cache off, so every sentence is a per-call WAV deleted at hangup)")
    parser.add_argument("--llm-first-token-ms", type=float, default=2.0)
    parser.add_argument("--llm-tokens-per-s", type=float, default=5000.0)
    parser.add_argument("--sim-history", type=int, default=5000,
                        help="commands/events/ended calls the simulator keeps (bounded: it is not the daemon)")
    parser.add_argument("--log-level", default="WARNING", help="the daemon's LOG_LEVEL (its log goes to the work dir)")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                        help="trace allocations from 'before' to 'after' (slow) and print the top growth; "
                        "use a large --warmup")
    parser.add_argument("--keep-dir", action="store_true", help="keep the work dir (TTS output, daemon log)")
    args = parser.parse_args(argv)
    if args.role == "llm":
        return run_llm(args)
    if args.role == "driver":
        return run_driver(args)
    return main_role(args)


if __name__ == "__main__":
    sys.exit(main())
