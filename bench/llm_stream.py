#!/usr/bin/env python
"""The daemon's CPU per streamed token: its LLM client reading replies from bench/fake_llm.py.

Each token of a streamed reply arrives in its own packet when the model writes it (30 tokens/s
and slower), and each packet wakes the reading greenlet: what that costs the daemon's loop is
the CPU of this process per delta. Measured with the daemon's own client (``OpenAiClient.stream``,
--streams concurrent streams, --rounds times), and beside it the floor: the same replies read off
a bare gevent socket (one recv per wake-up, no HTTP parsing, no JSON), the cost of gevent waking
a greenlet per packet, which no client can go under.

Per request besides: the loop thread's CPU from the POST to the reply's first delta
(``next()`` on a new ``stream()``: building and writing the request, reading the status line
and headers, the first event), --streams requests at once, --repeats times, on a kept-alive
connection (``pooled``: each reply read to its end) and on a new one (``new``: each stream
abandoned after its first delta, which closes its connection). In a burst of turns every request goes out before any
reply is read (the idle lane), so the last one waits for all the others' share of this.

Every variant runs in a process of its own, one after the other, round after round (noise hits
all alike); --baseline PATH adds the client of another checkout (e.g. main).

Prints a line per run and, last, one JSON object: ``cpu_us_per_delta`` (median of the rounds),
``floor_cpu_us_per_packet``, ``request_cpu_us_pooled`` and ``request_cpu_us_new`` (the
requesting greenlets' own CPU) and ``request_thread_cpu_us_pooled`` / ``_new`` (the loop
thread's, waking up included: see client_cpu_us_per_request), the ``baseline_`` ones with
--baseline, ``cpu_us_per_delta_batched`` with --batch-ms, and ``load_average_1min``.

With --batch-ms, also this checkout's client read as a turn reads it (LLM_STREAM_BATCH_MS):
after the first delta, a read that waited is followed by that pause: ``cpu_us_per_delta_batched``.

Usage: .venv/bin/python bench/llm_stream.py [--tokens-per-s 200] [--streams 20] [--rounds 5]
                                            [--only delta|request] [--batch-ms 200]
                                            [--baseline /path/to/main]
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


def client_cpu_us_per_request(url: str, connection: str, streams: int, repeats: int) -> tuple[float, float]:
    """CPU from a stream's request to its first delta, per request: (the requesting greenlets'
    own, the loop thread's in all). ``streams`` requests at once, ``repeats`` times, after a
    warm-up; the rest of each reply is read outside the measurement. ``connection`` "pooled":
    every reply read to its end, so each request finds a kept-alive connection; "new": each
    stream abandoned after its first delta, which closes its connection, so the next batch
    connects anew.

    The greenlets' own CPU (summed between the switches into and out of them) is the client's
    work alone; the thread's adds the hub's, mostly waking up from an idle wait for the server,
    which on this VM costs ~0.1 ms of CPU each time (a gevent.sleep of 5 ms: 0.12-0.16 ms), in
    a burst never: the loop is not idle then."""
    import greenlet

    from ivr_daemon.llm.openai import OpenAiClient
    from ivr_daemon.logs import configure_logging

    configure_logging("WARNING", "console")
    try:
        from ivr_daemon import resolver
    except ImportError:  # a checkout from before it
        pass
    else:
        resolver.install()  # as the daemon does: a new connection to an IP address looks nothing up
    client = OpenAiClient(url, "bench", timeout_s=30)
    measured: set = set()
    own_cpu_s = [0.0, 0.0]  # summed, entered at

    def on_switch(event: str, args: tuple) -> None:
        if event in ("switch", "throw"):
            origin, target = args
            now_s = time.thread_time()
            if origin in measured:
                own_cpu_s[0] += now_s - own_cpu_s[1]
            if target in measured:
                own_cpu_s[1] = now_s

    greenlet.settrace(on_switch)
    thread_cpu_s, requests = 0.0, 0
    for repeat in range(-1, repeats):
        streams_now = [client.stream(MESSAGES) for _ in range(streams)]
        jobs = [gevent.Greenlet(next, stream) for stream in streams_now]
        if repeat >= 0:  # the first batch (-1) fills the pool and does every import
            measured.update(jobs)
        started_cpu_s = time.thread_time()
        for job in jobs:
            job.start()
        gevent.joinall(jobs, raise_error=True)
        if repeat >= 0:
            thread_cpu_s += time.thread_time() - started_cpu_s
            requests += streams
        measured.clear()
        if connection == "new" and repeat >= 0:
            for stream in streams_now:
                stream.close()
        else:
            gevent.joinall([gevent.spawn(lambda stream=stream: sum(1 for _ in stream)) for stream in streams_now],
                           raise_error=True)
    greenlet.settrace(None)
    return own_cpu_s[0] / requests * 1e6, thread_cpu_s / requests * 1e6


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


def run_child(variant: str, checkout: Path, url: str, args) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--url", url,
               "--streams", str(args.streams), "--repeats", str(args.repeats), "--batch-ms", str(args.batch_ms)]
    out = subprocess.run(command, env=env, cwd=checkout, check=True, capture_output=True, text=True).stdout
    return [float(figure) for figure in out.strip().splitlines()[-1].split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens-per-s", type=float, default=200.0, help="of the fake LLM: each token its own packet")
    parser.add_argument("--streams", type=int, default=20, help="concurrent streams")
    parser.add_argument("--repeats", type=int, default=8, help="batches of --streams per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=("delta", "request"), help="only the per-delta or the per-request figures")
    parser.add_argument("--baseline", type=Path, metavar="PATH", help="another checkout's client too")
    parser.add_argument("--batch-ms", type=float, default=0.0,
                        help="also this checkout's client reading in batches after the first delta, as turns do "
                             "with LLM_STREAM_BATCH_MS (cpu_us_per_delta_batched)")
    parser.add_argument("--child", choices=("client", "client_batched", "floor", "pooled", "new"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("pooled", "new"):
        print(*(round(figure, 2) for figure in client_cpu_us_per_request(args.url, args.child, args.streams,
                                                                          args.repeats)))
        return 0
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
        # (the figures' names, the child, the checkout)
        variants: list[tuple[tuple[str, ...], str, Path]] = []
        checkouts = [("", ROOT)] + ([("baseline_", args.baseline.resolve())] if args.baseline else [])
        if args.only != "request":
            variants += [((f"{prefix}cpu_us_per_delta",), "client", checkout) for prefix, checkout in checkouts]
            if args.batch_ms:
                variants.append((("cpu_us_per_delta_batched",), "client_batched", ROOT))
            variants.append((("floor_cpu_us_per_packet",), "floor", ROOT))
        if args.only != "delta":
            variants += [((f"{prefix}request_cpu_us_{connection}", f"{prefix}request_thread_cpu_us_{connection}"),
                          connection, checkout)
                         for connection in ("pooled", "new") for prefix, checkout in checkouts]
        samples: dict[str, list[float]] = {name: [] for names, _, _ in variants for name in names}
        for round_number in range(1, args.rounds + 1):
            line = []
            for names, variant, checkout in variants:
                for name, figure in zip(names, run_child(variant, checkout, url, args), strict=True):
                    samples[name].append(figure)
                    line.append(f"{name} {figure}")
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
