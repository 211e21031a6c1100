#!/usr/bin/env python
"""The CPU cost of one log line through the daemon's pipeline (ivr_daemon/logs.py), per format.

structlog -> stdlib logging -> ProcessorFormatter -> JSONRenderer (LOG_FORMAT=json) or
ConsoleRenderer (console), native OS locks, gevent monkey-patched as the daemon is, each line
written and flushed to a file as the daemon's stderr is. Three lines a call really writes:

  turn_complete   a turn's line: call_uuid and turn bound, 13 fields (conversation.py)
  call_hangup     a short one: call_uuid bound, 4 fields
  foreign         a stdlib logger's line (urllib3's "Connection pool is full" warning, with
                  %-arguments) through the same renderer

Each round runs every checkout (this one, and --baseline PATH's: e.g. main) in its own process,
one after the other, so the machine's load hits both alike; the figure is the process's CPU time
per line (time.process_time), median of --rounds rounds.

Prints a line per round and, last, one JSON object: per checkout and format, µs per line of each
kind, and baseline_over_this per format and kind (> 1: this checkout is cheaper).

Usage: .venv/bin/python bench/log_lines.py [--lines 20000] [--rounds 5] [--baseline /path/to/main]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("json", "console")
KINDS = ("turn_complete", "call_hangup", "foreign")
CALL_UUID = "03362ffb-115a-4a3d-9eb6-770e2089d43f"


def child(fmt: str, lines: int) -> dict[str, float]:
    """In the measured process: µs of CPU per line of each kind."""
    from gevent import monkey

    monkey.patch_all()
    import logging

    from ivr_daemon.logs import configure_logging, get_logger

    with tempfile.TemporaryDirectory(prefix="ivr-bench-log-") as tmp, open(Path(tmp) / "daemon.log", "w") as stream:
        configure_logging("INFO", fmt, stream=stream)
        call_log = get_logger("ivr_daemon.calls").bind(call_uuid=CALL_UUID)
        turn_log = call_log.bind(turn=1)
        foreign = logging.getLogger("urllib3.connectionpool")

        def turn_complete() -> None:
            turn_log.info("turn_complete", transcript="when do you open", reply="We open at nine. See you soon.",
                          used_fallback=False, sentences=2, wav_path=f"/var/lib/ivr/tts/{CALL_UUID}-0001-01-4242.wav",
                          broadcast="+OK Message queued", llm_ms=412.3, tts_ms=35.1, total_ms=1890.4,
                          first_audio_ms=455.2, queued_ms=0.41, received_s=81234.125, tool_calls=None)

        def call_hangup() -> None:
            call_log.info("call_hangup", hangup_cause="NORMAL_CLEARING", turns=1, wavs_deleted=2,
                          syntheses_still_running=0)

        def foreign_line() -> None:
            foreign.warning("Connection pool is full, discarding connection: %s. Connection pool size: %s",
                            "127.0.0.1", 1024)

        figures = {}
        for kind, line in zip(KINDS, (turn_complete, call_hangup, foreign_line)):
            for _ in range(min(1000, lines)):  # warm-up: caches, the file's first blocks
                line()
            started_s = time.process_time()
            for _ in range(lines):
                line()
            figures[kind] = (time.process_time() - started_s) / lines * 1e6
        return figures


def run_child(checkout: Path, fmt: str, lines: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", fmt, "--lines", str(lines)],
                         env=env, cwd=checkout, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20_000, help="lines of each kind per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. main), measured in the same rounds")
    parser.add_argument("--child", choices=FORMATS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.lines)))
        return 0
    checkouts = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    samples = {name: {fmt: {kind: [] for kind in KINDS} for fmt in FORMATS} for name in checkouts}
    for round_no in range(args.rounds):
        for fmt in FORMATS:
            for name, checkout in checkouts.items():
                figures = run_child(checkout, fmt, args.lines)
                for kind in KINDS:
                    samples[name][fmt][kind].append(figures[kind])
                print(f"round {round_no + 1} {name} {fmt}: "
                      + ", ".join(f"{kind} {figures[kind]:.1f} µs" for kind in KINDS)
                      + f", load {os.getloadavg()[0]:.2f}", flush=True)
    result: dict[str, object] = {"lines": args.lines, "rounds": args.rounds}
    for name in checkouts:
        result[name] = {fmt: {f"{kind}_us_per_line": round(statistics.median(samples[name][fmt][kind]), 1)
                              for kind in KINDS} for fmt in FORMATS}
    if args.baseline:
        result["baseline_over_this"] = {
            fmt: {kind: round(statistics.median(samples["baseline"][fmt][kind])
                              / statistics.median(samples["this"][fmt][kind]), 2) for kind in KINDS}
            for fmt in FORMATS}
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
