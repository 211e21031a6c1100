#!/usr/bin/env python
"""What one Piper synthesis costs: a fixed part F and a part c per second of speech.

The first-clause goal (bench/latency.py --only first-clause) compares first audio for a clause
with Piper's time for the whole sentence: ratio = (F + c * clause_s) / (F + c * whole_s), so
every fixed per-synthesis cost pushes it up. This measures PiperEngine.synthesize_to_wav (as a
worker process runs it: phonemize, onnxruntime, float -> 8 kHz WAV, fsync, rename) on texts of
1 to 20 words, round after round with the texts interleaved, and fits total = F + c * audio_s by
least squares over every synthesis, on the wall clock and on this thread's CPU time (which other
jobs on the box move less). The parts, per synthesis (medians): ``phonemize_ms`` (espeak-ng),
``run_ms`` (onnxruntime's session.run), ``write_ms`` (resampling, WAV, fsync, rename) and the
rest; the onnxruntime part is fitted apart (``run_cpu_fixed_ms``).

``--cold N``: N fresh processes each, alternating, that load the voice and synthesize the same
few sentences, without and with PiperEngine.warm_up first: CPU time and minor page faults of
the first real sentences (``cold_first_*``, ``warm_first_*``: medians over the processes).

Prints a table, and as its last line one JSON object. Run from a checkout (PYTHONPATH picks it):
  PYTHONPATH=$PWD .venv/bin/python bench/piper_cost.py [--rounds 15] [--cold 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy

TEXTS = {
    1: "Hello.",
    3: "We open tomorrow.",
    5: "We open at nine tomorrow,",
    8: "We open at nine tomorrow, and we close.",
    12: "We open at nine tomorrow, and we close at six in the evening.",
    20: "We open at nine tomorrow, and we close at six in the evening, except on Sundays when we close at four.",
}
COLD_TEXTS = [TEXTS[5], TEXTS[12], "Thank you for calling, goodbye.", TEXTS[12]]


class TimedSession:
    """Piper's onnxruntime session, timing each run on the wall clock and in CPU."""

    def __init__(self, session):
        self._session = session
        self.last_wall_ms = self.last_cpu_ms = 0.0

    def run(self, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self.last_wall_ms = (time.perf_counter() - wall) * 1000
            self.last_cpu_ms = (time.thread_time() - cpu) * 1000


def fit(audio_s: list[float], ms: list[float]) -> tuple[float, float]:
    """(F ms, c ms per second of speech): least squares over every synthesis."""
    c, fixed = numpy.polyfit(numpy.asarray(audio_s), numpy.asarray(ms), 1)
    return float(fixed), float(c)


def measure(rounds: int) -> dict:
    import soundfile

    from ivr_daemon import audio
    from ivr_daemon.tts.piper import PiperEngine

    engine = PiperEngine()
    with tempfile.TemporaryDirectory(prefix="ivr-bench-piper-cost-") as tmp:
        for text in TEXTS.values():  # a fresh session's first runs are slow: not measured
            engine.synthesize_to_wav(text, Path(tmp) / "out.wav")
    voice = engine._voice
    session = voice.session = TimedSession(voice.session)
    phonemize = voice.phonemize
    timing = {"phonemize_ms": 0.0}

    def timed_phonemize(text):
        started = time.perf_counter()
        try:
            return phonemize(text)
        finally:
            timing["phonemize_ms"] = (time.perf_counter() - started) * 1000

    voice.phonemize = timed_phonemize
    write = audio.write_telephony_wav

    def timed_write(samples, rate_hz, path, **options):
        started = time.perf_counter()
        try:
            return write(samples, rate_hz, path, **options)
        finally:
            timing["write_ms"] = (time.perf_counter() - started) * 1000

    engine.write_wav = timed_write
    rows: dict[int, dict[str, list[float]]] = {n: {} for n in TEXTS}
    with tempfile.TemporaryDirectory(prefix="ivr-bench-piper-cost-") as tmp:
        wav = Path(tmp) / "out.wav"
        for _ in range(rounds):
            for words, text in TEXTS.items():
                wall, cpu = time.perf_counter(), time.thread_time()
                engine.synthesize_to_wav(text, wav)
                sample = {"total_ms": (time.perf_counter() - wall) * 1000,
                          "total_cpu_ms": (time.thread_time() - cpu) * 1000,
                          "run_ms": session.last_wall_ms, "run_cpu_ms": session.last_cpu_ms,
                          "audio_s": soundfile.info(str(wav)).duration, **timing}
                sample["rest_ms"] = sample["total_ms"] - sample["run_ms"] - sample["phonemize_ms"] - sample["write_ms"]
                for key, value in sample.items():
                    rows[words].setdefault(key, []).append(value)
    every = {key: [v for row in rows.values() for v in row[key]] for key in rows[1]}
    figures = {}
    for key, name in (("total_ms", "wall"), ("total_cpu_ms", "cpu"), ("run_cpu_ms", "run_cpu")):
        fixed, per_s = fit(every["audio_s"], every[key])
        figures[f"{name}_fixed_ms"] = round(fixed, 1)
        figures[f"{name}_ms_per_audio_s"] = round(per_s, 1)
    per_text = {words: {key: round(statistics.median(values), 3 if key == "audio_s" else 2)
                        for key, values in row.items()} for words, row in rows.items()}
    clause, whole = per_text[5], per_text[12]
    figures.update(clause_over_whole_wall=round(clause["total_ms"] / whole["total_ms"], 3),
                   clause_over_whole_cpu=round(clause["total_cpu_ms"] / whole["total_cpu_ms"], 3),
                   clause_over_whole_audio=round(clause["audio_s"] / whole["audio_s"], 3),
                   **{f"{part[:-len('_ms')]}_median_ms": round(statistics.median(every[part]), 2)
                      for part in ("phonemize_ms", "write_ms", "rest_ms")})
    return {"per_text": per_text, "figures": figures}


def cold_probe(warm: bool) -> dict:
    """In a fresh process: the voice loaded (and warmed up), then COLD_TEXTS: CPU ms and faults each."""
    from ivr_daemon.tts.piper import PiperEngine

    engine = PiperEngine()
    if warm:
        engine.warm_up()  # a checkout without it fails here: --cold 0 there
    out = []
    with tempfile.TemporaryDirectory(prefix="ivr-bench-piper-cold-") as tmp:
        for text in COLD_TEXTS:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu = time.process_time()
            engine.synthesize_to_wav(text, Path(tmp) / "out.wav")
            out.append({"cpu_ms": (time.process_time() - cpu) * 1000,
                        "minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults})
    return {"sentences": out}


def cold(processes: int) -> dict:
    samples: dict[str, list[dict]] = {"cold": [], "warm": []}
    for _ in range(processes):
        for variant in ("cold", "warm"):  # alternating: the box's load hits both
            probe = subprocess.run([sys.executable, __file__, "--probe", variant], check=True,
                                   capture_output=True, text=True, env=os.environ)
            samples[variant].append(json.loads(probe.stdout.strip().splitlines()[-1]))
    figures = {}
    for variant, runs in samples.items():
        for index, label in ((0, "clause"), (1, "sentence"), (3, "sentence_again")):
            figures[f"{variant}_first_{label}_cpu_ms"] = round(
                statistics.median(r["sentences"][index]["cpu_ms"] for r in runs), 1)
            figures[f"{variant}_first_{label}_minflt"] = int(
                statistics.median(r["sentences"][index]["minflt"] for r in runs))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="syntheses of each text (interleaved)")
    parser.add_argument("--cold", type=int, default=3, help="fresh processes each, without and with warm-up")
    parser.add_argument("--probe", choices=("cold", "warm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(cold_probe(args.probe == "warm")))
        return 0
    result = measure(args.rounds)
    print(f"{'words':>5} {'audio_s':>7} {'total_ms':>9} {'cpu_ms':>7} {'run_ms':>7} {'phon_ms':>7} {'write_ms':>8}")
    for words, row in result["per_text"].items():
        print(f"{words:>5} {row['audio_s']:>7} {row['total_ms']:>9} {row['total_cpu_ms']:>7} {row['run_ms']:>7} "
              f"{row['phonemize_ms']:>7} {row['write_ms']:>8}")
    figures = result["figures"]
    if args.cold:
        figures.update(cold(args.cold))
    figures["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
