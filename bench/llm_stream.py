#!/usr/bin/env python
"""The daemon's CPU per streamed token: its LLM client reading replies from bench/fake_llm.py.

Each token of a streamed reply arrives in its own packet when the model writes it (30 tokens/s
and slower), and each packet wakes the reading greenlet: what that costs the daemon's loop is
the CPU of this process per delta. Measured with the daemon's own client (``OpenAiClient.stream``,
--streams concurrent streams, --rounds times), and beside it the floor: the same replies read off
a bare gevent socket (one recv per wake-up, no HTTP parsing, no JSON), the cost of gevent waking
a greenlet per packet, which no client can go under.

Every variant runs in a process of its own, one after the other, round after round (noise hits
all alike); --baseline PATH adds the client of another checkout (e.g. main).

Prints a line per run and, last, one JSON object: ``cpu_us_per_delta`` (median of the rounds),
``floor_cpu_us_per_packet``, ``baseline_cpu_us_per_delta`` with --baseline,
``cpu_us_per_delta_batched`` with --batch-ms, and
``load_average_1min``.

With --batch-ms, also the client read as a turn reads it (LLM_STREAM_BATCH_MS): after the
first delta, a read that waited is followed by that pause: ``cpu_us_per_delta_batched``.

Usage: .venv/bin/python bench/llm_stream.py [--tokens-per-s 200] [--streams 20] [--rounds 5]
                                            [--baseline /path/to/main] [--batch-ms 200]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPLY = " ".join(["Our opening hours are nine to five, Monday to Friday, and ten to two on Saturdays."] * 3)
MESSAGES = [{"role": "system", "content": "You answer the phone."}, {"role": "user", "content": "When are you open?"}]


def client_cpu_us_per_delta(url: str, streams: int, repeats: int, batch_ms: float = 0.0) -> float:
    """``batch_ms``: read as the daemon's turns do (LLM_STREAM_BATCH_MS): in batches after the first delta."""
    from ivr_daemon.llm.openai import OpenAiClient
    from ivr_daemon.logs import configure_logging

    configure_logging("WARNING", "console")
    client = OpenAiClient(url, "bench", timeout_s=30)

    def one() -> int:
        if not batch_ms:
            return sum(1 for _ in client.stream(MESSAGES))
        from ivr_daemon.llm.paced import BatchedReads

        reads, count = BatchedReads(client.stream(MESSAGES), batch_ms / 1000), 0
        for _ in reads:
            count += 1
            reads.batch_from_now()
        return count

    return cpu_us_per_item(one, streams, repeats)


def floor_cpu_us_per_packet(url: str, streams: int, repeats: int) -> float:
    parts = urlsplit(url)
    body = json.dumps({"model": "bench", "stream": True, "messages": MESSAGES}).encode()
    request = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
               f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    def one() -> int:
        with socket.create_connection((parts.hostname, parts.port)) as sock:
            sock.sendall(request)
            packets = 0
            while True:
                data = sock.recv(65536)
                if not data:
                    return packets
                packets += 1
                if b"[DONE]" in data:
                    return packets

    return cpu_us_per_item(one, streams, repeats)


def cpu_us_per_item(one, streams: int, repeats: int) -> float:
    """This process's CPU per item (delta, packet) that ``one()`` reads and counts, ``streams`` at
    once, ``repeats`` times, after one warm-up (a kept-alive connection, every import done)."""
    one()
    started_cpu_s, items = time.process_time(), 0
    for _ in range(repeats):
        jobs = [gevent.spawn(one) for _ in range(streams)]
        gevent.joinall(jobs, raise_error=True)
        items += sum(job.value for job in jobs)
    return (time.process_time() - started_cpu_s) / items * 1e6


def run_child(variant: str, checkout: Path, url: str, args) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--url", url,
               "--streams", str(args.streams), "--repeats", str(args.repeats), "--batch-ms", str(args.batch_ms)]
    out = subprocess.run(command, env=env, cwd=checkout, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens-per-s", type=float, default=200.0, help="of the fake LLM: each token its own packet")
    parser.add_argument("--streams", type=int, default=20, help="concurrent streams")
    parser.add_argument("--repeats", type=int, default=8, help="batches of --streams per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, metavar="PATH", help="another checkout's client too")
    parser.add_argument("--batch-ms", type=float, default=0.0,
                        help="also this checkout's client reading in batches after the first delta, as turns do "
                             "with LLM_STREAM_BATCH_MS (cpu_us_per_delta_batched)")
    parser.add_argument("--child", choices=("client", "client_batched", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "floor":
            cpu_us = floor_cpu_us_per_packet(args.url, args.streams, args.repeats)
        else:
            batch_ms = args.batch_ms if args.child == "client_batched" else 0.0
            cpu_us = client_cpu_us_per_delta(args.url, args.streams, args.repeats, batch_ms)
        print(round(cpu_us, 2))
        return 0
    llm = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_llm.py"), "--reply", REPLY,
                            "--first-token-ms", "5", "--tokens-per-s", str(args.tokens_per_s)],
                           stdout=subprocess.PIPE, text=True)
    try:
        url = llm.stdout.readline().strip()
        variants = [("cpu_us_per_delta", "client", ROOT), ("floor_cpu_us_per_packet", "floor", ROOT)]
        if args.baseline:
            variants.insert(1, ("baseline_cpu_us_per_delta", "client", args.baseline.resolve()))
        if args.batch_ms:
            variants.insert(1, ("cpu_us_per_delta_batched", "client_batched", ROOT))
        samples: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        for round_number in range(1, args.rounds + 1):
            line = []
            for name, variant, checkout in variants:
                samples[name].append(run_child(variant, checkout, url, args))
                line.append(f"{name} {samples[name][-1]}")
            print(f"round {round_number}: " + ", ".join(line), flush=True)
    finally:
        llm.kill()
    figures = {name: round(statistics.median(values), 1) for name, values in samples.items()}
    figures.update(tokens_per_s=args.tokens_per_s, streams=args.streams, rounds=args.rounds,
                   load_average_1min=round(os.getloadavg()[0], 2))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
