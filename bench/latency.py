#!/usr/bin/env python
"""Latency benchmark: daemon overhead under load, streaming vs batch, loop lag, barge-in, greeting.

Runs the real daemon against the FreeSWITCH simulator and a local streaming LLM server of
known timing (first token after --first-token-ms, then --tokens-per-s, a 3-sentence reply).
Prints a table, and as its last line one JSON object:

  overhead_p50_ms, overhead_p99_ms  DETECTED_SPEECH frame written -> first uuid_broadcast read,
                                    minus the LLM's time to its first sentence and minus synthesis
                                    time, with --calls concurrent calls each asking once at a random
                                    moment within --spread-s (null TTS; the daemon runs as
                                    `ivr-daemon run` in its own process, the LLM in another)
  first_audio_stream_ms, first_audio_batch_ms, stream_over_batch
                                    DETECTED_SPEECH -> first broadcast, streaming on and off
  loop_lag_p99_ms                   lag of a 10 ms ticker on the gevent loop while 8 calls
                                    synthesize with Piper at once (in its worker processes)
  barge_in_p99_ms                   partial-speech frame written -> uuid_break read
  cached_phrase_broadcast_p99_ms    a reply the phrase cache holds: DETECTED_SPEECH frame written
                                    -> its uuid_broadcast read, minus the LLM's time to that
                                    sentence, while 8 (--busy-calls) other calls synthesize uncached Piper
                                    sentences (the daemon in its own process, the cache on; --busy-calls 0
                                    measures what the machine adds without them). Each measured
                                    caller speaks CALLER_PAUSE_S after its call is up, as callers do:
                                    the call's set-up (the greeting measurement's business) is not
                                    on the measured path
  overhead_dead_webhook_p50_ms, overhead_dead_webhook_p99_ms
                                    the overhead again with WEBHOOK_URL at a receiver that accepts
                                    connections and never answers (call events must not slow turns)
  greeting_broadcast_p99_ms         CHANNEL_PARK of the IVR leg written -> the greeting's
                                    uuid_broadcast read, --calls calls arriving within --spread-s
  first_clause_ms, piper_whole_sentence_ms, first_clause_over_piper_whole, first_sentence_ms
                                    an instant LLM and Piper, a 12-word one-sentence reply with a
                                    comma after 5 words (FIRST_CLAUSE_REPLY): DETECTED_SPEECH frame
                                    written -> first uuid_broadcast read with FIRST_CHUNK=clause
                                    (and =sentence, a second daemon), and Piper synthesizing the
                                    whole sentence here, in the same run, turn by turn (medians of
                                    --first-clause-runs; the goal is a ratio <= 0.5)

  burst_first_broadcast_p50_ms, burst_first_broadcast_p99_ms, burst_overhead_p50_ms,
  burst_overhead_p99_ms, burst_overhead_vs_llm_server_p50_ms, burst_overhead_vs_llm_server_p99_ms,
  burst_daemon_cpu_ms_per_turn, burst_llm_cpu_ms_per_turn, burst_bench_cpu_ms_per_turn
                                    --burst-calls (200) final transcripts written back to back, an
                                    instant LLM, null TTS through a warm phrase cache: transcript ->
                                    first uuid_broadcast, the same less llm_ms and tts_ms, the same
                                    less the LLM server's own time on the reply instead of llm_ms
                                    (llm_ms includes the daemon's queueing for its loop: see
                                    bench_burst), and the CPU per turn of the daemon, of the
                                    fake LLM and of the simulator (this process), all three on the
                                    box's two cores (--profile-daemon PATH: cProfile of the burst
                                    and its greenlet switches)
  load_overhead_p50_ms, load_overhead_p99_ms, load_barge_in_p50_ms, load_barge_in_p99_ms,
  load_events_per_s, load_daemon_cpu_share, load_fell_behind
                                    --load-calls (1,000) calls sending partials at mod_vosk's rate
                                    (5/s, twice each while parked: 10,000 events/s) while
                                    --load-turns calls ask (as overhead) and are barged in on
  load_average_1min                 the machine's, when the figures were taken: latencies on a
                                    busy box measure its queue for a core more than the daemon
  host_probe_ms_before, host_probe_ms_after
                                    the CPU ms of a fixed piece of Python before and after
                                    (host_probe_ms): ~33 on a quiet host; higher while the VM's
                                    host is busy, which the load average does not show

--baseline PATH (another checkout, e.g. main) measures burst and partials-load of its daemon too,
interleaved with ours round by round (--rounds); its figures are prefixed with baseline_.

Usage: .venv/bin/python bench/latency.py [--calls 200] [--only cached-phrase ...]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the faithful fake LLM server the tests use

from llm_fakes import FakeLlmServer  # noqa: E402

from ivr_daemon.config import load_settings  # noqa: E402
from ivr_daemon.daemon import build_conversation_daemon  # noqa: E402
from ivr_daemon.logs import configure_logging  # noqa: E402
from ivr_daemon.replay.simulator import CommandNotReceived, FreeswitchSimulator  # noqa: E402
from ivr_daemon.tts import make_tts_engine  # noqa: E402

# An instant LLM (fake_llm.py's InstantLlmServer): each reply written at once, each token still
# an SSE event in an HTTP chunk of its own. Before, 1,000,000 tokens/s of the pywsgi fake: it
# paused 1 us between tokens, each pause a timer and a trip round its loop, so that in a burst
# the 200 replies' tokens went out interleaved, and it cost ~1 ms of CPU a reply (0.3-0.5 now)
# on the cores the daemon and the simulators share.
INSTANT_LLM_ARGS = ("--first-token-ms", "0", "--tokens-per-s", "inf")


def fake_llm_cmd(reply: str, first_token_ms: float, tokens_per_s: float, *options: str) -> list[str]:
    """The command that runs bench/fake_llm.py answering ``reply`` at that pace (its ``options`` besides)."""
    return [sys.executable, str(ROOT / "bench" / "fake_llm.py"), "--reply", reply,
            "--first-token-ms", str(first_token_ms), "--tokens-per-s", str(tokens_per_s), *options]


def instant_llm_cmd(reply: str, *options: str) -> list[str]:
    """The command that runs the instant LLM answering ``reply`` (fake_llm.py ``options`` besides)."""
    return [sys.executable, str(ROOT / "bench" / "fake_llm.py"), "--reply", reply, *INSTANT_LLM_ARGS, *options]


REPLY = ("Sure, we open at nine. On Saturdays we open at ten and close at four in the afternoon. "
         "Is there anything else I can help you with today?")
# The cached-phrase measurement: callers asking "cached ..." get CACHED_PHRASE, synthesized
# once beforehand; callers asking "busy <n>" get BUSY_SENTENCES sentences nobody asked before.
CACHED_PHRASE = "Thank you for calling, how can I help you today?"
BUSY_SENTENCES = 12
# A caller's first final transcript comes a second or more after the answer (words, then
# mod_vosk's end-of-speech silence); the cached-phrase callers wait this long after the call
# is up, so what is timed is the turn, not the call's set-up in the same millisecond.
CALLER_PAUSE_S = 0.2
# The first-clause measurement's reply: one sentence of 12 words, a comma after the 5th.
FIRST_CLAUSE_REPLY = "We open at nine tomorrow, and we close at six in the evening."


MEASUREMENTS = ("overhead", "overhead-dead-webhook", "first-audio", "loop-lag", "barge-in", "cached-phrase", "greeting",
                "first-clause", "burst", "partials-load")
# The turn measurements time a call's first broadcast: no greeting before it, no re-prompts.
NO_CALL_FLOW_SPEECH = {"GREETING": "", "SILENCE_TIMEOUT_S": "0"}


def worker_priority(args) -> dict[str, str]:
    """TTS_WORKER_PRIORITY for the daemon when --tts-worker-priority says so (else its default)."""
    priority = getattr(args, "tts_worker_priority", None)  # bench/records.py and multiswitch.py: their own args
    return {"TTS_WORKER_PRIORITY": priority} if priority else {}


def own_collector_off():
    """Stop this process's cyclic garbage collector while it measures a daemon in another process.

    The simulator here timestamps the speech frames it writes and the commands it reads. Its
    history of both grows with every call, and a full collection walked it on this loop for
    0.1-1 s at 1,000 calls (a gc.callbacks probe: 7-9 of them a run): a broadcast read
    meanwhile was timed that much late, the daemon charged with this process's pause. Reference
    counting still frees almost everything; the cycles wait for own_collector_on.
    """
    gc.collect()
    gc.disable()


def own_collector_on():
    gc.enable()
    gc.collect()


HOST_PROBE_SQUARES = 1_000_000


def host_probe_ms() -> float:
    """This process's CPU ms for a fixed piece of pure Python (the median of 5): the speed of the
    machine's cores just now.

    This box is a VM whose host has other tenants, and its kernel reports no steal time: while
    the host is busy the same work takes longer and is charged as this process's CPU, so every
    CPU and latency figure grows with it while the load average stays low. Measured on the quiet
    host ~33 ms; 1.5-2x that in busy spells. Figures taken at different probe readings do not compare.
    """
    samples = []
    for _ in range(5):
        started_s = time.process_time()
        sum(i * i for i in range(HOST_PROBE_SQUARES))
        samples.append((time.process_time() - started_s) * 1000)
    return round(statistics.median(samples), 1)


def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Rig:
    """Simulator + fake LLM + daemon, torn down together."""

    def __init__(self, args, tts_engine="null", tts=None, llm_stream=True, sim_options=None, env=None):
        self.turns = []
        self.llm = FakeLlmServer("openai", replies=REPLY, stream_first_delay_s=args.first_token_ms / 1000,
                                 stream_gap_s=1 / args.tokens_per_s, delay_s=0).start()
        self.sim = FreeswitchSimulator(**(sim_options or {})).start()
        self.tmp = tempfile.TemporaryDirectory(prefix="ivr-bench-")
        values = {"FREESWITCH_PORT": str(self.sim.port), "LLM_PROVIDER": "openai", "LLM_API_URL": self.llm.url,
                  "LLM_MODEL": "bench", "LLM_TIMEOUT": "60", "TTS_ENGINE": tts_engine, "TTS_OUTPUT_DIR": self.tmp.name,
                  "LLM_STREAM": "true" if llm_stream else "false", "LOG_LEVEL": "WARNING", **NO_CALL_FLOW_SPEECH,
                  **worker_priority(args), **(env or {})}
        self.settings = load_settings(environ=values)
        self.daemon = build_conversation_daemon(self.settings, tts=tts, on_turn=self.turns.append)
        self.daemon.start()
        assert self.daemon.esl.wait_connected(10)

    def close(self):
        self.daemon.stop()
        self.sim.stop()
        self.llm.stop()
        self.tmp.cleanup()



class DaemonProcessRig:
    """The daemon as users run it (``ivr-daemon run``, its own process and hub), the fake LLM
    in another process, the simulator here: the daemon's loop carries only its own work."""

    def __init__(self, args, tts_engine="null", llm_stream=True, sim_options=None, cache_mb=0, llm_cmd=None,
                 extra_env=None, checkout=None, profile_path=None, switches=1, llm_url=None, switch_interval_ms=None,
                 gc_probe_path=None, daemon_argv=None):
        """``checkout``: run the daemon of that copy of the project (its directory first on the
        daemon's sys.path, as ``python -m`` from there does) rather than this one's;
        ``profile_path``: under cProfile (see _profiled); ``switches``: simulators the daemon
        serves (``sims``; ``sim`` is the first); ``llm_url``: an LLM server of the caller's
        (shared by several rigs) instead of a fake LLM of its own; ``switch_interval_ms``: the
        daemon's interpreter hands the GIL over at this interval (sys.setswitchinterval, set
        before ``ivr_daemon`` is imported) instead of Python's 5 ms; ``gc_probe_path``: each of the
        daemon's cyclic garbage collections of generation 1 or 2 appended there as a JSON line
        (generation, ms, its thread's CPU ms, objects freed, on the loop's thread or another: a
        collection holds the GIL throughout; the generation-0 ones since, summed); ``daemon_argv``:
        the interpreter arguments that run the daemon instead (bench/loop_slices.py's tracer)."""
        own_collector_off()
        self.turns: dict[str, dict] = {}
        self.tmp = tempfile.TemporaryDirectory(prefix="ivr-bench-")
        self.llm = None
        if llm_url is None:
            llm_cmd = llm_cmd or fake_llm_cmd(REPLY, args.first_token_ms, args.tokens_per_s)
            self.llm = subprocess.Popen(llm_cmd + ([] if llm_stream else ["--batch"]), stdout=subprocess.PIPE, text=True)
            llm_url = self.llm.stdout.readline().strip()
        self.sims = [FreeswitchSimulator(**(sim_options or {})).start() for _ in range(switches)]
        self.sim = self.sims[0]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_", "LOG_", "HTTP_"))}
        # One switch is configured as before FREESWITCH_HOSTS existed: a baseline checkout runs it too.
        env.update({"FREESWITCH_HOSTS": ",".join(f"127.0.0.1:{sim.port}" for sim in self.sims)} if switches > 1
                   else {"FREESWITCH_PORT": str(self.sim.port)})
        env.update({"LLM_PROVIDER": "openai", "LLM_API_URL": llm_url,
                    "LLM_MODEL": "bench", "LLM_TIMEOUT": "60", "TTS_ENGINE": tts_engine, "TTS_OUTPUT_DIR": self.tmp.name,
                    "TTS_CACHE_MAX_MB": str(cache_mb), "LLM_STREAM": "true" if llm_stream else "false",
                    "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "HTTP_PORT": "0", **NO_CALL_FLOW_SPEECH,
                    **worker_priority(args), **null_voice_workers(tts_engine),
                    **(extra_env or {})})
        # Logs to a file, as in production: a pipe the benchmark reads late would stall the
        # daemon's writes to stderr, and with them its whole loop.
        self.log_path = Path(self.tmp.name) / "daemon.log"
        self.log_file = open(self.log_path, "w")
        if checkout is not None:
            env["PYTHONPATH"] = str(checkout)
        interpreter_args = daemon_argv or _profiled(profile_path)
        if switch_interval_ms is not None or gc_probe_path is not None:
            assert profile_path is None, "the profiler or the bootstrap, not both"
            interpreter_args = ["-c", BOOTSTRAP.format(seconds=(switch_interval_ms or 5.0) / 1000,
                                                       gc_probe_path=gc_probe_path and str(gc_probe_path))]
        self.daemon = subprocess.Popen([sys.executable, *interpreter_args, "--env-file", os.devnull, "run"],
                                       env=env, stderr=self.log_file, stdout=subprocess.DEVNULL,
                                       cwd=checkout)
        for sim in self.sims:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=120)
        self._log_offset = 0

    def _read_log(self):
        with open(self.log_path) as log_file:
            log_file.seek(self._log_offset)
            for line in log_file:
                if not line.endswith("\n"):
                    break
                self._log_offset += len(line.encode())
                if '"turn_complete"' in line:
                    record = json.loads(line)
                    self.turns[record["call_uuid"]] = record

    def wait_turn(self, call, timeout_s=180):
        """The turn_complete record of ``call``'s (first) turn."""
        deadline = time.monotonic() + timeout_s
        while call not in self.turns:
            assert time.monotonic() < deadline, f"no turn_complete for {call}"
            self._read_log()
            gevent.sleep(0.05)
        return self.turns[call]

    def cpu_s(self):
        """The daemon process's CPU seconds so far (user + system): its work's cost, whatever else
        the machine is doing."""
        return _cpu_s(self.daemon.pid)

    def wait_turns(self, count, timeout_s=180):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._read_log()
            if len(self.turns) >= count:
                return
            gevent.sleep(0.2)

    def close(self):
        for proc in (self.daemon, self.llm):
            if proc is None:
                continue  # the caller's LLM: theirs to stop
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.log_file.close()
        for sim in self.sims:
            sim.stop()
        self.tmp.cleanup()
        own_collector_on()


def _profiled(profile_path):
    """The interpreter arguments that run the daemon (``-m ivr_daemon``); with a path, under a
    cProfile that SIGUSR1 starts and SIGUSR2 stops, writing its stats to ``profile_path`` and
    the greenlet switches meanwhile (greenlet.settrace) to ``profile_path``.switches.json."""
    if profile_path is None:
        return ["-m", "ivr_daemon"]
    return ["-c", PROFILER.format(path=str(profile_path))]


# Run as the daemon's process with another GIL switch interval or a probe of its garbage
# collections (DaemonProcessRig's switch_interval_ms, gc_probe_path).
BOOTSTRAP = """
import gc, json, os, runpy, sys, time
from _thread import get_native_id  # bound before gevent's monkey-patching
sys.setswitchinterval({seconds!r})
path, started, young = {gc_probe_path!r}, [0.0, 0.0, ()], [0, 0.0, 0.0]
def probe(phase, info):
    if phase == "start":
        started[:] = time.perf_counter(), time.thread_time(), gc.get_count()
    elif info["generation"] == 0:  # many: summed into the next older collection's line
        cpu_ms = (time.thread_time() - started[1]) * 1000
        young[:] = young[0] + 1, young[1] + cpu_ms, max(young[2], cpu_ms)
    else:
        line = json.dumps({{"generation": info["generation"], "ms": (time.perf_counter() - started[0]) * 1000,
                           "cpu_ms": (time.thread_time() - started[1]) * 1000, "counts": started[2],
                           "collected": info["collected"], "gen0_since": list(young),
                           "loop_thread": get_native_id() == os.getpid(),
                           "at_s": time.monotonic()}})
        young[:] = 0, 0.0, 0.0
        with open(path, "a") as out:
            out.write(line + chr(10))
if path:
    gc.callbacks.append(probe)
runpy.run_module("ivr_daemon", run_name="__main__")
"""

# For the daemon-process tracers built like PROFILER (bench/burst_hops.py, bench/loop_by_greenlet.py):
# wrap(cls, method, before, after) calls before(self, *args, **kwargs) and after(...) around a method.
WRAP_METHOD = """
def wrap(cls, method, before=None, after=None):
    original = getattr(cls, method)
    def wrapped(self, *args, **kwargs):
        if before:
            before(self, *args, **kwargs)
        try:
            return original(self, *args, **kwargs)
        finally:
            if after:
                after(self, *args, **kwargs)
    setattr(cls, method, wrapped)
"""

# Run as the daemon's process under --profile-daemon (see _profiled).
PROFILER = """
import cProfile, json, runpy, signal, greenlet
import time as _t
profile, switches, on = cProfile.Profile(_t.thread_time), [0], [False]
def trace(event, args):
    if on[0]:
        switches[0] += 1
def start(*_):
    on[0] = True
    greenlet.settrace(trace)
    profile.enable()
def stop(*_):
    profile.disable()
    on[0] = False
    with open({path!r} + ".switches.json", "w") as out:
        json.dump({{"greenlet_switches": switches[0]}}, out)
    profile.dump_stats({path!r})
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
runpy.run_module("ivr_daemon", run_name="__main__")
"""


def _first_broadcast_ms(sim, call, sequence, timeout_s=180, start_index=0):
    """DETECTED_SPEECH frame (by its Event-Sequence) written -> first uuid_broadcast read, in ms.
    ``start_index``: search the simulator's commands from there (its ``commands_received`` before
    the speech), not the whole history."""
    sent = sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_broadcast {call} "), timeout_s,
                                start_index=start_index, consume=False).t_monotonic
    return (sent - sim.written_at(sequence)) * 1000


def dead_webhook_receiver():
    """A TCP server that accepts every connection, reads the request and never answers."""
    from gevent.server import StreamServer

    def hold(sock, _address):
        while sock.recv(65536):
            pass

    server = StreamServer(("127.0.0.1", 0), hold)
    server.start()
    return server


def bench_overhead(args, extra_env=None):
    rig = DaemonProcessRig(args, sim_options={"playback_speed": 0.0, "duplicate_speech_delay_s": 0.0},
                           extra_env=extra_env)
    try:
        calls = [rig.sim.new_call() for _ in range(args.calls)]
        gevent.sleep(1.0)
        # Every call is up for the whole run; each caller asks at a random moment within
        # --spread-s (0: all at once, a burst no switch produces).
        rng = random.Random(7)
        sequences = {}

        def ask(call, index):
            sequences[call] = rig.sim.speak(call, f"question number {index}")

        greenlets = [gevent.spawn_later(rng.uniform(0, args.spread_s), ask, call, i) for i, call in enumerate(calls)]
        gevent.joinall(greenlets)
        rig.wait_turns(len(calls))
        overheads = []
        for call in calls:
            turn = rig.turns.get(call)
            if turn is None or turn.get("first_audio_ms") is None:
                continue
            overheads.append(_first_broadcast_ms(rig.sim, call, sequences[call]) - turn["llm_ms"] - turn["tts_ms"])
        return overheads, len(rig.turns)
    finally:
        rig.close()


def bench_burst(args, profile_path=None, checkout=None, warm_calls=1):
    """--burst-calls callers finishing a sentence in the same instant: each call's final transcript
    frame written -> its first uuid_broadcast read, with an instant LLM (its own process) and
    null TTS through the phrase cache (warmed by ``warm_calls`` calls' turns first: every burst
    turn is a cache hit; more than one also leaves that many LLM connections kept alive in the
    pool), the daemon as users run it. Returns (samples in ms, overheads in ms: less llm_ms and
    tts_ms, overheads in ms less the LLM server's own time and tts_ms, CPU ms by process).

    The two overheads differ in what counts as the LLM's time. The daemon's ``llm_ms`` runs from
    its request to its first sentence and so takes in the daemon's own queueing for the loop
    (an answer that came while the loop was busy with other turns, read at once: its wait
    counts as the LLM's; one that waited in the idle lane: as the daemon's). The server's own
    time (bench/fake_llm.py --stamps: from its reading the request to its reply written, all at
    once) leaves all the daemon's waiting in the overhead, and with it the fake server's own
    queue before it reads the request (it shares the two cores: 0.3-0.5 ms of CPU a reply): the
    stricter figure. The daemon's own time lies between the two."""
    stamps = Path(tempfile.mkdtemp(prefix="ivr-burst-")) / "llm-stamps.jsonl"
    rig = DaemonProcessRig(args, llm_cmd=instant_llm_cmd(REPLY, "--stamps", str(stamps)), cache_mb=50,
                           profile_path=profile_path, checkout=checkout,
                           sim_options={"playback_speed": 0.0})
    try:
        warm = [rig.sim.new_call() for _ in range(max(1, warm_calls))]
        for call in warm:
            rig.sim.speak(call, "warm up")
        for call in warm:
            rig.wait_turn(call)
        calls = [rig.sim.new_call() for _ in range(args.burst_calls)]
        gevent.sleep(1.0)  # every call's CHANNEL_ANSWER/PARK handled: only the turns are measured
        if profile_path is not None:
            Path(profile_path).unlink(missing_ok=True)
            rig.daemon.send_signal(signal.SIGUSR1)  # the profile covers the burst only
            gevent.sleep(0.2)
        cpu_before_s = {name: _cpu_s(proc.pid) for name, proc in (("daemon", rig.daemon), ("llm", rig.llm))}
        cpu_before_s["bench"] = _cpu_s(os.getpid())
        # One after another with no yield between: the frames go out back to back.
        sequences = {call: rig.sim.speak(call, f"question number {i}") for i, call in enumerate(calls)}
        samples = []
        for call in calls:
            samples.append(_first_broadcast_ms(rig.sim, call, sequences[call]))
        cpu_ms = {"daemon": _cpu_s(rig.daemon.pid), "llm": _cpu_s(rig.llm.pid), "bench": _cpu_s(os.getpid())}
        cpu_ms = {name: round((cpu_s - cpu_before_s[name]) * 1000) for name, cpu_s in cpu_ms.items()}
        if profile_path is not None:
            rig.daemon.send_signal(signal.SIGUSR2)
            deadline_s = time.monotonic() + 60
            while not Path(profile_path).exists() and time.monotonic() < deadline_s:
                gevent.sleep(0.05)
        turns = [rig.wait_turn(call) for call in calls]
        server_ms = _llm_server_ms(stamps, [f"question number {i}" for i in range(len(calls))])
        overheads = [first_ms - turn["llm_ms"] - turn["tts_ms"] for first_ms, turn in zip(samples, turns)]
        strict = [first_ms - llm_ms - turn["tts_ms"] for first_ms, llm_ms, turn in zip(samples, server_ms, turns)]
        return samples, overheads, strict, cpu_ms
    finally:
        rig.close()
        shutil.rmtree(stamps.parent, ignore_errors=True)


def _llm_server_ms(stamps: Path, questions: list[str]) -> list[float]:
    """Per question, the fake LLM's own time on its reply (fake_llm.py --stamps), in ms."""
    by_question = {}
    for line in stamps.read_text().splitlines():
        stamp = json.loads(line)
        by_question[stamp["user"]] = (stamp["first_s"] - stamp["in_s"]) * 1000
    missing = [question for question in questions if question not in by_question]
    assert not missing, f"the fake LLM stamped no reply for {missing[:3]}"
    return [by_question[question] for question in questions]


# mod_vosk's partial transcripts: one every 200 ms per talking caller, each delivered twice
# while the leg is parked (capture 80_plain). Partials of the load are numbered from here (a
# fixed width keeps each prebuilt frame's Content-Length right), the simulator's own events
# from SIM_FIRST_SEQUENCE: no two events share a dedup key by accident.
PARTIALS_PER_S = 5
LOAD_TURN_TIMEOUT_S = 60  # a daemon that falls behind the partials never answers: given up on
PARTIAL_FIRST_SEQUENCE = 1_000_000_000
SIM_FIRST_SEQUENCE = 10_000_000
PARTIAL_CAPTURE = "41_event_plain_DETECTED_SPEECH_detected-partial-speech.txt"


def partial_frames(call_uuids, core_uuid):
    """Per call, a real captured partial-speech frame with a placeholder Event-Sequence."""
    from harness import captured_event  # tests/ is on sys.path

    return [captured_event(PARTIAL_CAPTURE, body="hello i would like to know", Unique_ID=call, Channel_Call_UUID=call,
                           Caller_Unique_ID=call, Core_UUID=core_uuid, Event_Sequence=str(PARTIAL_FIRST_SEQUENCE))
            for call in call_uuids]


def send_partials(sim, frames, stop, sent):
    """Every call's partial 5 times a second, each twice (parked), spread over 20 ms slices,
    until ``stop`` is set; ``sent[0]`` counts the events written."""
    placeholder = b"Event-Sequence: %d\n" % PARTIAL_FIRST_SEQUENCE
    sequence = itertools.count(PARTIAL_FIRST_SEQUENCE + 1)
    slice_s = 0.020
    per_slice = max(1, round(len(frames) * PARTIALS_PER_S * slice_s))
    next_s, index = time.monotonic(), 0
    while not stop.is_set():
        batch = []
        for _ in range(per_slice):
            frame = frames[index % len(frames)].replace(placeholder, b"Event-Sequence: %d\n" % next(sequence))
            batch += [frame, frame]
            index += 1
        sim.inject_raw(b"".join(batch))
        sent[0] += len(batch)
        next_s += slice_s
        gevent.sleep(max(0.0, next_s - time.monotonic()))


def bench_partials_load(args, checkout=None):
    """--load-calls calls talking (partials at mod_vosk's rate) while other calls' turns are timed:
    overhead (as bench_overhead: transcript -> first broadcast less llm_ms and tts_ms) and barge-in
    (a partial while the answer plays -> uuid_break). Returns (overheads, barge-ins, events/s sent,
    daemon CPU share)."""
    import gevent.event

    rig = DaemonProcessRig(args, checkout=checkout, sim_options={
        "playback_speed": 1.0, "duplicate_speech_delay_s": 0.0, "first_event_sequence": SIM_FIRST_SEQUENCE,
        "history_limit": 5_000})
    stop = gevent.event.Event()
    try:
        talking = [rig.sim.new_call() for _ in range(args.load_calls)]
        frames = partial_frames(talking, rig.sim.core_uuid)
        gevent.sleep(2.0)  # every call's CHANNEL_ANSWER/PARK handled before the load starts
        sent = [0]
        load = gevent.spawn(send_partials, rig.sim, frames, stop, sent)
        load_started_s = time.monotonic()
        gevent.sleep(2.0)  # the load is steady
        cpu_before_s, started_s = _cpu_s(rig.daemon.pid), time.monotonic()
        overheads, barge_ins = [], []
        for index in range(args.load_turns):
            call = rig.sim.new_call()
            gevent.sleep(0.05)
            sequence = rig.sim.speak(call, f"question number {index}")
            try:
                first_ms = _first_broadcast_ms(rig.sim, call, sequence, timeout_s=LOAD_TURN_TIMEOUT_S)
            except CommandNotReceived:
                # The daemon fell behind the partials: its socket buffer holds the transcript.
                print(f"{checkout or 'ours'}: no answer within {LOAD_TURN_TIMEOUT_S} s under the load", file=sys.stderr)
                overheads.append(float("inf"))
                break
            turn = rig.wait_turn(call)
            overheads.append(first_ms - turn["llm_ms"] - turn["tts_ms"])
            # Its answer plays (real time): the caller cuts in.
            rig.sim.wait_for_event(lambda e, call=call: e.name == "PLAYBACK_START" and e.unique_id == call, 30,
                                   consume=False)
            gevent.sleep(0.05)
            sequence = rig.sim.speak(call, "wait", final=False)
            command = rig.sim.wait_for_command(f"api uuid_break {call} all", 30)
            barge_ins.append((command.t_monotonic - rig.sim.written_at(sequence)) * 1000)
            rig.sim.hangup(call)
        elapsed_s = time.monotonic() - started_s
        cpu_share = (_cpu_s(rig.daemon.pid) - cpu_before_s) / elapsed_s
        stop.set()
        load.join()
        return overheads, barge_ins, sent[0] / (time.monotonic() - load_started_s), cpu_share
    finally:
        stop.set()
        rig.close()


def null_voice_workers(tts_engine: str) -> dict[str, str]:
    """The null voice in worker processes, one per core, as Piper's voice runs (TTS_WORKERS).

    Piper and Coqui always synthesize in worker processes; the null voice, left to its default,
    writes its silent WAVs in the daemon's own threads, whose Python work then held the daemon's
    GIL (~3 ms of thread CPU a call at 20 turns/s that no real voice costs), and the loop never
    paid the workers' round trips that a real voice costs it (docs/performance.md, "The null
    voice where real voices run").
    BENCH_NULL_VOICE_IN_DAEMON=1 measures the old way. A checkout without TTS_WORKERS ignores it.
    """
    if tts_engine != "null" or os.environ.get("BENCH_NULL_VOICE_IN_DAEMON"):
        return {}
    return {"TTS_WORKERS": str(max(1, os.cpu_count() or 1))}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def box_cpu_s() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, every core summed (Linux /proc/stat):
    what every process on it used, the daemon's children and the rig included. Between two
    readings, busy / all is the share of the box's cores that were busy."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait; guest time is already in user and nice
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK"), (busy + idle) / os.sysconf("SC_CLK_TCK")


def bench_first_audio(args):
    results = {}
    for streaming in (True, False):
        rig = DaemonProcessRig(args, tts_engine="piper", llm_stream=streaming, sim_options={"playback_speed": 0.0})
        try:
            samples = []
            for i in range(args.first_audio_runs):
                call = rig.sim.new_call()
                sequence = rig.sim.speak(call, f"when do you open {i}")
                samples.append(_first_broadcast_ms(rig.sim, call, sequence))
                rig.wait_turns(i + 1)
                rig.sim.hangup(call)
            results[streaming] = statistics.median(samples)
        finally:
            rig.close()
    return results[True], results[False]


def bench_first_clause(args):
    """Final transcript -> first broadcast of FIRST_CLAUSE_REPLY with FIRST_CHUNK=clause and
    =sentence (two daemons as users run them, an instant LLM, Piper, no phrase cache: every turn
    synthesizes), and Piper synthesizing the whole sentence in this process, one after the other
    on an otherwise idle machine, round after round. Returns the samples of each, in ms."""
    instant_llm = instant_llm_cmd(FIRST_CLAUSE_REPLY)
    piper = make_tts_engine(load_settings(environ={"TTS_ENGINE": "piper"}))
    samples = {"clause": [], "sentence": [], "piper_whole": [], "clause_tts": []}
    rigs = {}
    try:
        for mode in ("clause", "sentence"):
            rigs[mode] = DaemonProcessRig(args, tts_engine="piper", llm_cmd=instant_llm,
                                          extra_env={"FIRST_CHUNK": mode}, sim_options={"playback_speed": 0.0})
        with tempfile.TemporaryDirectory(prefix="ivr-bench-piper-") as tmp:
            wav = Path(tmp) / "whole.wav"

            def one_round(record: bool) -> None:
                for mode, rig in rigs.items():
                    call = rig.sim.new_call()
                    sequence = rig.sim.speak(call, "when are you open")
                    first_ms = _first_broadcast_ms(rig.sim, call, sequence)
                    turn = rig.wait_turn(call)
                    rig.sim.hangup(call)
                    if record:
                        samples[mode].append(first_ms)
                        if mode == "clause":
                            samples["clause_tts"].append(turn["tts_ms"])
                started_s = time.perf_counter()
                # As the daemon writes a call's WAV: 8 kHz out, not fsynced.
                piper.synthesize_to_wav(FIRST_CLAUSE_REPLY, wav, durable=False)
                if record:
                    samples["piper_whole"].append((time.perf_counter() - started_s) * 1000)

            one_round(record=False)  # every onnxruntime session's first runs are slow: not measured
            for _ in range(args.first_clause_runs):
                one_round(record=True)
        return samples
    finally:
        for rig in rigs.values():
            rig.close()


def bench_loop_lag(args):
    # The voice as the daemon runs it: Piper in worker processes.
    rig = Rig(args, tts_engine="piper", sim_options={"playback_speed": 0.0}, env={"TTS_CACHE_MAX_MB": "0"})
    lags, stop = [], False

    def ticker():
        period_s = 0.010
        expected = time.monotonic() + period_s
        while not stop:
            gevent.sleep(max(0.0, expected - time.monotonic()))
            now = time.monotonic()
            lags.append(max(0.0, (now - expected) * 1000))
            expected = now + period_s

    try:
        calls = [rig.sim.new_call() for _ in range(8)]
        gevent.sleep(0.3)
        tick = gevent.spawn(ticker)
        for i, call in enumerate(calls):
            rig.sim.speak(call, f"tell me everything about your store number {i}")
        deadline = time.monotonic() + 120
        while len(rig.turns) < 8 and time.monotonic() < deadline:
            gevent.sleep(0.05)
        stop = True
        tick.join()
        return lags
    finally:
        rig.close()


def bench_barge_in(args):
    rig = Rig(args, sim_options={"playback_speed": 1.0, "duplicate_speech_delay_s": 0.0})
    samples = []
    try:
        for i in range(args.barge_in_runs):
            call = rig.sim.new_call()
            rig.sim.speak(call, f"what are your hours {i}")
            rig.sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 30)
            gevent.sleep(0.05)
            sequence = rig.sim.speak(call, "wait", final=False)
            command = rig.sim.wait_for_command(f"api uuid_break {call} all", 10)
            samples.append((command.t_monotonic - rig.sim.written_at(sequence)) * 1000)
            rig.sim.hangup(call)
        return samples
    finally:
        rig.close()


def bench_greeting(args):
    """CHANNEL_PARK of the IVR leg written -> the greeting's uuid_broadcast read, for --calls calls
    arriving at random within --spread-s (the daemon in its own process, as users run it)."""
    rig = DaemonProcessRig(args, sim_options={"playback_speed": 0.0}, extra_env={"GREETING": "Hello, how can I help?"})
    try:
        rng = random.Random(11)
        calls: list[str] = []
        greenlets = [gevent.spawn_later(rng.uniform(0, args.spread_s), lambda: calls.append(rig.sim.new_call()))
                     for _ in range(args.calls)]
        gevent.joinall(greenlets)
        samples = []
        for call in calls:
            park = next(e for e in rig.sim.emitted_events if e.name == "CHANNEL_PARK" and e.unique_id == call)
            sent = rig.sim.wait_for_command(lambda c, call=call: c.line.startswith(f"api uuid_broadcast {call} "), 60,
                                            consume=False).t_monotonic
            samples.append((sent - rig.sim.written_at(park.sequence)) * 1000)
        return samples
    finally:
        rig.close()


def busy_reply(question: str) -> str:
    """BUSY_SENTENCES sentences unique to ``question`` (e.g. "busy 3"): never in the cache."""
    caller = question.split()[-1]
    return " ".join(f"Caller {caller}, note {k}: the store on Main Street opens at nine, closes at six on weekdays, "
                    f"and the branch on Oak Avenue keeps the same hours except on holidays."
                    for k in range(1, BUSY_SENTENCES + 1))


def said(turn: dict) -> str:
    """What a turn_complete line says the reply was: its text, or (LOG_TRANSCRIPTS off) its hash."""
    if "reply" in turn:
        return hashlib.sha256(turn["reply"].encode("utf-8")).hexdigest()[:12]
    return turn["reply_sha256"]


def serve_llm(args) -> int:
    """The fake LLM of the cached-phrase measurement, in its own process: prints its URL, serves until killed."""
    def reply(request):
        question = request["messages"][-1]["content"]
        return CACHED_PHRASE if question.startswith("cached") else busy_reply(question)

    server = FakeLlmServer("openai", replies=reply, stream_first_delay_s=args.first_token_ms / 1000,
                           stream_gap_s=1 / args.tokens_per_s, delay_s=0).start()
    print(server.url, flush=True)
    gevent.wait()
    return 0


def bench_cached_phrase(args):
    """A cached reply's broadcast, less the LLM's time, while --busy-calls calls synthesize with Piper."""
    llm_cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-llm",
               "--first-token-ms", str(args.first_token_ms), "--tokens-per-s", str(args.tokens_per_s)]
    rig = DaemonProcessRig(args, tts_engine="piper", cache_mb=200, llm_cmd=llm_cmd,
                           extra_env={"MAX_REPLY_SENTENCES": str(BUSY_SENTENCES)},
                           sim_options={"playback_speed": 0.0, "duplicate_speech_delay_s": 0.0})
    try:
        warm = rig.sim.new_call()
        rig.sim.speak(warm, "cached warm-up")  # puts CACHED_PHRASE in the cache
        rig.wait_turn(warm)
        busy: set[str] = set()
        asked = itertools.count()

        def start_busy_call():
            call = rig.sim.new_call()
            rig.sim.speak(call, f"busy {next(asked)}")
            busy.add(call)
            return call

        for call in [start_busy_call() for _ in range(args.busy_calls)]:
            # Its first sentence is out: the rest of its reply (BUSY_SENTENCES - 1 long sentences)
            # is being synthesized or waits for a worker thread.
            rig.sim.wait_for_command(lambda c, call=call: c.line.startswith(f"api uuid_broadcast {call} "), 300,
                                     consume=False)
        samples, replaced = [], 0
        for index in range(args.cached_runs):
            # A busy call whose reply is all out makes way for a new one: the load never stops.
            rig._read_log()
            for call in [c for c in busy if c in rig.turns]:
                busy.discard(call)
                rig.sim.hangup(call)
                start_busy_call()
                replaced += 1
            call = rig.sim.new_call()
            gevent.sleep(CALLER_PAUSE_S)
            sequence = rig.sim.speak(call, f"cached {index}")
            turn = rig.wait_turn(call)
            assert said(turn) == said({"reply": CACHED_PHRASE}), turn
            samples.append(_first_broadcast_ms(rig.sim, call, sequence) - turn["llm_ms"])
            rig.sim.hangup(call)
        return samples, replaced
    finally:
        rig.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--spread-s", type=float, default=10.0, help="callers ask within this window")
    parser.add_argument("--first-token-ms", type=float, default=200.0)
    parser.add_argument("--tokens-per-s", type=float, default=30.0)
    parser.add_argument("--first-audio-runs", type=int, default=5)
    parser.add_argument("--barge-in-runs", type=int, default=50)
    parser.add_argument("--first-clause-runs", type=int, default=10)
    parser.add_argument("--cached-runs", type=int, default=100, help="cached-phrase samples")
    parser.add_argument("--busy-calls", type=int, default=8, help="calls synthesizing during the cached-phrase samples")
    parser.add_argument("--burst-calls", type=int, default=200, help="same-instant turns of the burst measurement")
    parser.add_argument("--profile-daemon", metavar="PATH",
                        help="burst: run the daemon under cProfile, its stats written to PATH")
    parser.add_argument("--load-calls", type=int, default=1000, help="partials-load: calls sending partials")
    parser.add_argument("--load-turns", type=int, default=50, help="partials-load: turns (and barge-ins) timed")
    parser.add_argument("--baseline", metavar="PATH",
                        help="burst, partials-load: also measure the daemon of this checkout, interleaved")
    parser.add_argument("--rounds", type=int, default=1, help="burst, partials-load: rounds (each: baseline, ours)")
    parser.add_argument("--tts-worker-priority", help="TTS_WORKER_PRIORITY of the daemon (idle or 0-19)")
    parser.add_argument("--only", action="append", choices=MEASUREMENTS,
                        help="run only this measurement (repeatable); default: all")
    parser.add_argument("--serve-llm", action="store_true", help=argparse.SUPPRESS)  # the cached-phrase LLM
    args = parser.parse_args(argv)
    if args.serve_llm:
        return serve_llm(args)
    configure_logging(os.environ.get("LOG_LEVEL", "ERROR"), "console")
    started = time.monotonic()
    selected = set(args.only or MEASUREMENTS)
    figures = {"host_probe_ms_before": host_probe_ms()}

    if "overhead" in selected:
        overheads, answered = bench_overhead(args)
        print(f"overhead with {args.calls} concurrent calls asking within {args.spread_s:g} s ({answered} answered): "
              f"p50 {percentile(overheads, 50):.2f} ms, p99 {percentile(overheads, 99):.2f} ms")
        figures.update(overhead_p50_ms=round(percentile(overheads, 50), 2),
                       overhead_p99_ms=round(percentile(overheads, 99), 2), calls=args.calls)

    if "overhead-dead-webhook" in selected:
        receiver = dead_webhook_receiver()
        try:
            overheads, answered = bench_overhead(args, {
                "WEBHOOK_URL": f"http://127.0.0.1:{receiver.server_port}/hooks",
                "WEBHOOK_SECRET": "bench-secret-0123456789"})
        finally:
            receiver.stop(timeout=1)
        print(f"overhead with a webhook receiver that never answers ({answered} answered): "
              f"p50 {percentile(overheads, 50):.2f} ms, p99 {percentile(overheads, 99):.2f} ms")
        figures.update(overhead_dead_webhook_p50_ms=round(percentile(overheads, 50), 2),
                       overhead_dead_webhook_p99_ms=round(percentile(overheads, 99), 2))

    if "first-audio" in selected:
        stream_ms, batch_ms = bench_first_audio(args)
        print(f"first audio (Piper): streaming {stream_ms:.0f} ms, batch {batch_ms:.0f} ms, "
              f"ratio {stream_ms / batch_ms:.2f}")
        figures.update(first_audio_stream_ms=round(stream_ms, 1), first_audio_batch_ms=round(batch_ms, 1),
                       stream_over_batch=round(stream_ms / batch_ms, 3))

    if "loop-lag" in selected:
        lags = bench_loop_lag(args)
        print(f"gevent loop lag while 8 calls synthesize with Piper: p50 {percentile(lags, 50):.2f} ms, "
              f"p99 {percentile(lags, 99):.2f} ms, max {max(lags):.2f} ms ({len(lags)} ticks)")
        figures.update(loop_lag_p99_ms=round(percentile(lags, 99), 2))

    if "barge-in" in selected:
        barge = bench_barge_in(args)
        print(f"barge-in (partial frame -> uuid_break): p50 {percentile(barge, 50):.2f} ms, "
              f"p99 {percentile(barge, 99):.2f} ms")
        figures.update(barge_in_p99_ms=round(percentile(barge, 99), 2))

    if "cached-phrase" in selected:
        cached, replaced = bench_cached_phrase(args)
        print(f"cached phrase -> uuid_broadcast while {args.busy_calls} calls synthesize with Piper: "
              f"p50 {percentile(cached, 50):.2f} ms, p99 {percentile(cached, 99):.2f} ms, max {max(cached):.2f} ms "
              f"({len(cached)} samples; {replaced} busy calls done and replaced meanwhile)")
        figures.update(cached_phrase_broadcast_p50_ms=round(percentile(cached, 50), 2),
                       cached_phrase_broadcast_p99_ms=round(percentile(cached, 99), 2),
                       cached_phrase_broadcast_max_ms=round(max(cached), 2))

    if "greeting" in selected:
        greet = bench_greeting(args)
        print(f"greeting (CHANNEL_PARK -> uuid_broadcast) for {args.calls} calls arriving within {args.spread_s:g} s: "
              f"p50 {percentile(greet, 50):.2f} ms, p99 {percentile(greet, 99):.2f} ms")
        figures.update(greeting_broadcast_p99_ms=round(percentile(greet, 99), 2))

    if "first-clause" in selected:
        clause = bench_first_clause(args)
        clause_ms, whole_ms = statistics.median(clause["clause"]), statistics.median(clause["piper_whole"])
        sentence_ms = statistics.median(clause["sentence"])
        ratios = [c / w for c, w in zip(clause["clause"], clause["piper_whole"])]
        print(f"first clause (instant LLM, Piper, 12-word sentence): transcript -> first broadcast "
              f"{clause_ms:.0f} ms with FIRST_CHUNK=clause, {sentence_ms:.0f} ms with =sentence; Piper on the whole "
              f"sentence {whole_ms:.0f} ms; ratio {clause_ms / whole_ms:.2f} (goal <= 0.5; per round "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")
        figures.update(first_clause_ms=round(clause_ms, 1), piper_whole_sentence_ms=round(whole_ms, 1),
                       first_clause_over_piper_whole=round(clause_ms / whole_ms, 3),
                       first_sentence_ms=round(sentence_ms, 1),
                       first_clause_tts_ms=round(statistics.median(clause["clause_tts"]), 1),
                       first_clause_ratio_max=round(max(ratios), 3))

    variants = [("baseline_", args.baseline), ("", None)] if args.baseline else [("", None)]
    if "burst" in selected:
        samples = {prefix: {"firsts": [], "overheads": [], "strict": [], "cpu_per_turn": [], "llm_cpu_per_turn": [],
                            "bench_cpu_per_turn": []}
                   for prefix, _ in variants}
        for _ in range(args.rounds):
            for prefix, checkout in variants:
                firsts, overheads, strict, cpu_ms = bench_burst(args, args.profile_daemon if not prefix else None, checkout)
                samples[prefix]["firsts"].extend(firsts)
                samples[prefix]["overheads"].extend(overheads)
                samples[prefix]["strict"].extend(strict)
                samples[prefix]["cpu_per_turn"].append(cpu_ms["daemon"] / args.burst_calls)
                samples[prefix]["llm_cpu_per_turn"].append(cpu_ms["llm"] / args.burst_calls)
                samples[prefix]["bench_cpu_per_turn"].append(cpu_ms["bench"] / args.burst_calls)
        for prefix, variant in samples.items():
            firsts, overheads, strict = variant["firsts"], variant["overheads"], variant["strict"]
            cpu_per_turn, llm_cpu_per_turn = variant["cpu_per_turn"], variant["llm_cpu_per_turn"]
            bench_cpu_per_turn = variant["bench_cpu_per_turn"]
            print(f"{prefix or 'ours: '}burst of {args.burst_calls} same-instant turns (instant LLM, cached TTS): "
                  f"transcript -> first broadcast p50 {percentile(firsts, 50):.2f} ms, p99 {percentile(firsts, 99):.2f} ms; "
                  f"overhead p50 {percentile(overheads, 50):.2f} ms, p99 {percentile(overheads, 99):.2f} ms; "
                  f"less the LLM server's own time: p50 {percentile(strict, 50):.2f} ms, p99 {percentile(strict, 99):.2f} ms; "
                  f"daemon CPU {statistics.median(cpu_per_turn):.2f} ms per turn "
                  f"(the fake LLM's {statistics.median(llm_cpu_per_turn):.2f}, "
                  f"the simulator's -- this process -- {statistics.median(bench_cpu_per_turn):.2f})")
            figures.update({f"{prefix}burst_first_broadcast_p50_ms": round(percentile(firsts, 50), 2),
                            f"{prefix}burst_first_broadcast_p99_ms": round(percentile(firsts, 99), 2),
                            f"{prefix}burst_overhead_p50_ms": round(percentile(overheads, 50), 2),
                            f"{prefix}burst_overhead_p99_ms": round(percentile(overheads, 99), 2),
                            f"{prefix}burst_overhead_vs_llm_server_p50_ms": round(percentile(strict, 50), 2),
                            f"{prefix}burst_overhead_vs_llm_server_p99_ms": round(percentile(strict, 99), 2),
                            f"{prefix}burst_daemon_cpu_ms_per_turn": round(statistics.median(cpu_per_turn), 2),
                            f"{prefix}burst_llm_cpu_ms_per_turn": round(statistics.median(llm_cpu_per_turn), 2),
                            f"{prefix}burst_bench_cpu_ms_per_turn": round(statistics.median(bench_cpu_per_turn), 2)})
        figures.update(burst_calls=args.burst_calls)

    if "partials-load" in selected:
        results = {prefix: ([], [], [], []) for prefix, _ in variants}
        for _ in range(args.rounds):
            for prefix, checkout in variants:
                for bucket, value in zip(results[prefix], bench_partials_load(args, checkout)):
                    bucket.extend(value if isinstance(value, list) else [value])
        for prefix, (overheads, barge, rates, cpu) in results.items():
            print(f"{prefix or 'ours: '}{args.load_calls} calls sending partials ({statistics.median(rates):.0f} events/s, "
                  f"daemon CPU {statistics.median(cpu) * 100:.0f} %): overhead p50 {percentile(overheads, 50):.2f} ms, "
                  f"p99 {percentile(overheads, 99):.2f} ms; barge-in p50 {percentile(barge, 50):.2f} ms, "
                  f"p99 {percentile(barge, 99):.2f} ms ({len(overheads)} turns)")
            finite = lambda value: round(value, 2) if math.isfinite(value) else None  # noqa: E731
            figures.update({f"{prefix}load_overhead_p50_ms": finite(percentile(overheads, 50)),
                            f"{prefix}load_overhead_p99_ms": finite(percentile(overheads, 99)),
                            f"{prefix}load_barge_in_p50_ms": finite(percentile(barge, 50)),
                            f"{prefix}load_barge_in_p99_ms": finite(percentile(barge, 99)),
                            f"{prefix}load_fell_behind": not all(map(math.isfinite, overheads)),
                            f"{prefix}load_events_per_s": round(statistics.median(rates)),
                            f"{prefix}load_daemon_cpu_share": round(statistics.median(cpu), 3)})
        figures.update(load_calls=args.load_calls)
    figures["load_average_1min"] = round(os.getloadavg()[0], 1)
    figures["host_probe_ms_after"] = host_probe_ms()

    figures["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
