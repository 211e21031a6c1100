#!/usr/bin/env python
"""HTTP benchmark: POST /test/transcription hammered by --clients clients, and what it does to calls.

The daemon (built as ``ivr-daemon run`` builds it, with its HTTP server) runs on this process's
gevent loop with the FreeSWITCH simulator, as in bench/latency.py's loop-lag measurement; the
fake LLM (bench/fake_llm.py: first token after --first-token-ms, then --tokens-per-s) and the
HTTP clients (this script with --clients-for URL: --clients keep-alive connections, each
asking again as soon as it is answered, each its own test conversation) run in their own
processes, so the loop measured carries only the daemon's work; the clients' process is niced
(--clients-nice 10), as they stand for machines elsewhere. TTS is the null engine. Logs
go to a file at INFO, as in production (every request and turn logs).

While the clients run, a 10 ms ticker measures the loop's lag (the loop the ESL reader and
writer run on), and a phone call asks a question every --phone-every-s seconds. Prints a table
and, as its last line, one JSON object:

  requests_per_s                   200 answers of /test/transcription per second, all clients
  latency_p50_ms, latency_p99_ms   request sent -> whole WAV read, at the client
  errors                           answers that were not 200, by status (0: no answer at all)
  loop_lag_idle_p99_ms             lag of the ticker before the clients start
  loop_lag_p99_ms, loop_lag_max_ms the same while they hammer (the goal: <= 20 ms p99)
  loop_lag_own_work_p99_ms         per tick, the part of the lag the loop's own work can have caused
                                   (at most the CPU its thread used meanwhile; the rest is the process
                                   waiting for a core, which a busy machine adds)
  daemon_cpu_percent               CPU time of the daemon's process / wall time while they hammer
  phone_overhead_p99_ms            a phone call's DETECTED_SPEECH frame written -> its first
                                   uuid_broadcast read, minus the LLM's time to its first sentence
                                   and minus synthesis, while the clients hammer

Usage: .venv/bin/python bench/http_load.py [--clients 50] [--duration-s 20]
"""

# Not bench/http.py: as the first directory on sys.path of every script in bench/, that name
# would shadow the standard library's http package (http.client, under requests).

import sys

from gevent import monkey  # noqa: E402

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402
from latency import fake_llm_cmd, percentile  # noqa: E402  (one percentile, one fake LLM for every benchmark)

ROOT = Path(__file__).resolve().parent.parent

REPLY = "Sure, we open at nine. We close at five."

def run_clients(url: str, clients: int, duration_s: float) -> int:
    """The client process: hammer ``url`` for ``duration_s``; print [[latency_ms, status], ...]."""
    results: list[tuple[float, int]] = []
    stop_at = time.monotonic() + duration_s

    def client(index: int) -> None:
        session = requests.Session()
        asked = 0
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                answer = session.post(url, json={"call_uuid": f"bench-{index}", "transcription": f"question {asked}"},
                                      timeout=60)
                status = answer.status_code
                _ = answer.content
            except requests.RequestException:
                status = 0
            results.append(((time.monotonic() - started) * 1000, status))
            asked += 1

    gevent.joinall([gevent.spawn(client, i) for i in range(clients)])
    print(json.dumps(results))
    return 0


class Ticker:
    """Lag of a 10 ms sleep on this loop: how late the loop gets back to a greenlet."""

    def __init__(self):
        self.lags_ms: list[float] = []
        # CPU the loop's thread used between two ticks: tells the loop's own work (CPU spent)
        # from the process waiting for a core (wall time passing, no CPU spent).
        self.cpu_ms: list[float] = []
        self._greenlet = gevent.spawn(self._tick)

    def _tick(self) -> None:
        period_s = 0.010
        expected = time.monotonic() + period_s
        cpu_s = time.thread_time()
        while True:
            gevent.sleep(max(0.0, expected - time.monotonic()))
            now, now_cpu_s = time.monotonic(), time.thread_time()
            self.lags_ms.append(max(0.0, (now - expected) * 1000))
            self.cpu_ms.append((now_cpu_s - cpu_s) * 1000)
            expected, cpu_s = now + period_s, now_cpu_s

    def stop(self) -> list[float]:
        self._greenlet.kill()
        return self.lags_ms

    def own_work_ms(self) -> list[float]:
        """Per tick, an upper bound of the lag the loop's own work caused: never more than the
        CPU its thread used in that interval; the rest of the lag was the process waiting for a core."""
        return [min(lag, cpu) for lag, cpu in zip(self.lags_ms, self.cpu_ms)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--first-token-ms", type=float, default=20.0)
    parser.add_argument("--tokens-per-s", type=float, default=400.0)
    parser.add_argument("--phone-every-s", type=float, default=0.5)
    parser.add_argument("--clients-nice", type=int, default=10, help="niceness of the client process (0: none)")
    parser.add_argument("--turn-slots", type=int, default=None, help="test turns at once (default: the daemon's)")
    parser.add_argument("--clients-for", metavar="URL", help=argparse.SUPPRESS)  # the client process
    args = parser.parse_args()
    if args.clients_for:
        return run_clients(args.clients_for, args.clients, args.duration_s)

    from ivr_daemon.config import load_settings
    from ivr_daemon.daemon import build_conversation_daemon
    from ivr_daemon.http import HttpServer
    from ivr_daemon.http.transcription import TEST_TURNS_AT_ONCE, TurnSlots
    from ivr_daemon.logs import configure_logging
    from ivr_daemon.replay.simulator import FreeswitchSimulator

    args.turn_slots = args.turn_slots or TEST_TURNS_AT_ONCE
    tmp = tempfile.TemporaryDirectory(prefix="ivr-bench-http-")
    log_file = open(Path(tmp.name) / "daemon.log", "w")
    configure_logging("INFO", "json", stream=log_file)
    llm = subprocess.Popen(fake_llm_cmd(REPLY, args.first_token_ms, args.tokens_per_s), stdout=subprocess.PIPE, text=True)
    sim = FreeswitchSimulator(playback_speed=0.0, duplicate_speech_delay_s=0.0).start()
    turns: dict[str, object] = {}
    try:
        llm_url = llm.stdout.readline().strip()
        settings = load_settings(environ={
            "FREESWITCH_PORT": str(sim.port), "LLM_PROVIDER": "openai", "LLM_API_URL": llm_url, "LLM_MODEL": "bench",
            "LLM_TIMEOUT": "30", "TTS_ENGINE": "null", "TTS_OUTPUT_DIR": str(Path(tmp.name) / "tts"),
            "GREETING": "", "SILENCE_TIMEOUT_S": "0", "LOG_LEVEL": "INFO"})
        daemon = build_conversation_daemon(settings, on_turn=lambda result: turns.setdefault(result.call_uuid, result))
        daemon.start()
        assert daemon.esl.wait_connected(10)
        http = HttpServer(daemon, settings, port=0, turn_slots=TurnSlots(args.turn_slots))
        http.bind()
        http.start()
        url = f"{http.url}/test/transcription"
        warm = requests.post(url, json={"call_uuid": "warm-up", "transcription": "hello"}, timeout=30)
        assert warm.status_code == 200, warm.text

        idle = Ticker()
        gevent.sleep(2.0)
        idle_lags = idle.stop()

        # The clients stand for machines elsewhere: on this box they run niced, so that what is
        # measured is the daemon's loop, not the two processes fighting over a core.
        clients = subprocess.Popen([sys.executable, __file__, "--clients-for", url, "--clients", str(args.clients),
                                    "--duration-s", str(args.duration_s)], stdout=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: os.nice(args.clients_nice))
        reader = gevent.spawn(clients.stdout.read)  # cooperative: the loop goes on meanwhile
        gevent.sleep(1.0)  # the clients' interpreter starting and connecting
        ticker = Ticker()
        cpu_started_s, wall_started_s = time.process_time(), time.monotonic()
        asked: dict[str, int] = {}
        while clients.poll() is None and not reader.ready():
            call = sim.new_call()
            asked[call] = sim.speak(call, "when do you open")
            gevent.sleep(args.phone_every_s)
        lags = ticker.stop()
        # This process: the daemon's loop (and the simulator's), its synthesis threads (idle: cache hits).
        cpu_percent = 100 * (time.process_time() - cpu_started_s) / (time.monotonic() - wall_started_s)
        results = json.loads(reader.get())
        clients.wait()

        overheads = []
        for call, sequence in asked.items():
            sent = sim.wait_for_command(lambda c, call=call: c.line.startswith(f"api uuid_broadcast {call} "), 30,
                                        consume=False).t_monotonic
            turn = turns[call]
            overheads.append((sent - sim.written_at(sequence)) * 1000 - turn.llm_ms - turn.tts_ms)
        http.stop()
        daemon.stop()
    finally:
        llm.terminate()
        llm.wait(10)
        sim.stop()
        log_file.close()
        tmp.cleanup()

    latencies = [ms for ms, status in results if status == 200]
    errors = collections.Counter(str(status) for _ms, status in results if status != 200)
    figures = {
        "clients": args.clients, "duration_s": args.duration_s, "turn_slots": args.turn_slots,
        "llm_first_token_ms": args.first_token_ms, "llm_tokens_per_s": args.tokens_per_s,
        "requests": len(results), "requests_per_s": round(len(latencies) / args.duration_s, 1),
        "latency_p50_ms": round(percentile(latencies, 50), 1), "latency_p99_ms": round(percentile(latencies, 99), 1),
        "errors": dict(errors),
        "loop_lag_idle_p99_ms": round(percentile(idle_lags, 99), 2),
        "loop_lag_p50_ms": round(percentile(lags, 50), 2), "loop_lag_p99_ms": round(percentile(lags, 99), 2),
        "loop_lag_max_ms": round(max(lags), 2), "ticks": len(lags),
        "loop_lag_own_work_p99_ms": round(percentile(ticker.own_work_ms(), 99), 2),
        "daemon_cpu_percent": round(cpu_percent, 1),
        "phone_turns": len(overheads), "phone_overhead_p50_ms": round(percentile(overheads, 50), 2),
        "phone_overhead_p99_ms": round(percentile(overheads, 99), 2),
    }
    print(f"{args.clients} clients for {args.duration_s:g} s: {figures['requests_per_s']} requests/s, "
          f"p50 {figures['latency_p50_ms']} ms, p99 {figures['latency_p99_ms']} ms, errors {dict(errors) or 'none'}")
    print(f"loop lag: idle p99 {figures['loop_lag_idle_p99_ms']} ms; hammered p50 {figures['loop_lag_p50_ms']} ms, "
          f"p99 {figures['loop_lag_p99_ms']} ms, max {figures['loop_lag_max_ms']} ms ({len(lags)} ticks); "
          f"own work p99 {figures['loop_lag_own_work_p99_ms']} ms; daemon CPU {figures['daemon_cpu_percent']} %")
    print(f"phone turns meanwhile: {len(overheads)}, overhead p50 {figures['phone_overhead_p50_ms']} ms, "
          f"p99 {figures['phone_overhead_p99_ms']} ms")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
