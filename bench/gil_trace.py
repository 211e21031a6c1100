"""How long the daemon's loop thread waits for the GIL: its futex waits, traced by ``perf trace``.

CPython 3.11 hands the GIL over with a condition variable: a thread that wants it and finds it
held waits on that condition (``pthread_cond_timedwait``, timeout ``sys.getswitchinterval()``),
then asks the holder to drop it and waits again. On Linux each such wait is one ``futex``
``WAIT_BITSET`` call with a timeout on the GIL's condition, so the loop thread's timed futex waits
on that one address are its GIL waits (gevent's own waits are in ``epoll_wait``, never a futex).

Used by bench/records.py ``--trace-gil`` (Linux, root or perf_event_paranoid <= 1). ``perf trace
-t`` follows the loop thread only: one thread's lines never interleave, and the other threads'
syscalls are not slowed by the trace.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

# (-t: no "comm/tid " before futex)
# "  1413.947 ( 5.089 ms): python3/19469 futex(uaddr: 0x7fa8e594e6f4, op: WAIT_BITSET|PRIVATE_FLAG,
#  utime: 0x7fa8dfffeae0, val3: MATCH_ANY) = -1 ETIMEDOUT (Connection timed out)"
_LINE = re.compile(r"\(\s*(?P<ms>[\d.]+) ms\): (?:\S+/(?P<tid>\d+) )?futex\(uaddr: (?P<addr>0x[0-9a-f]+), "
                   r"op: (?P<op>[A-Z_|]+)(?P<timed>, utime: 0x[0-9a-f]+)?")


class FutexTrace:
    """``perf trace -e futex`` of one thread, from start() to stop()."""

    def __init__(self, tid: int, path: Path):
        self.tid = tid
        self.path = path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FutexTrace":
        if shutil.which("perf") is None:
            raise SystemExit("--trace-gil needs perf (linux-perf)")
        self.proc = subprocess.Popen(["perf", "trace", "-t", str(self.tid), "-e", "futex", "-o", str(self.path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # perf attaches in well under a second; only the calls' waits matter
        if self.proc.poll() is not None:
            raise SystemExit(f"perf trace failed: {self.proc.stderr.read().decode()[:300]}")
        return self

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)

    def figures(self, calls: int) -> dict:
        """The loop thread's GIL waits (timed waits on the busiest timed address), its waits on the
        GIL's other fields (the hand-over after a drop request: ``handover``) and its other futex
        waits, per call, with the GIL waits' distribution."""
        by_address: dict[str, list[float]] = collections.defaultdict(list)
        untimed: dict[str, list[float]] = collections.defaultdict(list)
        for line in self.path.read_text(errors="replace").splitlines():
            found = _LINE.search(line)
            if found is None or int(found["tid"] or self.tid) != self.tid or "WAIT" not in found["op"]:
                continue
            if found["timed"]:
                by_address[found["addr"]].append(float(found["ms"]))
            else:
                untimed[found["addr"]].append(float(found["ms"]))
        gil_address = max(by_address, key=lambda address: sum(by_address[address]), default=None)
        gil_ms = sorted(by_address.pop(gil_address, []))
        # The GIL's other fields (its mutex; switch_cond, where a thread that dropped the GIL on
        # request waits until the requester has taken it) sit within a few hundred bytes of its cond.
        near = {address for address in untimed
                if gil_address is not None and abs(int(address, 16) - int(gil_address, 16)) < 256}
        handover_ms = [ms for address in near for ms in untimed[address]]
        other_ms = [ms for address, waits in {**untimed, **by_address}.items() if address not in near for ms in waits]

        def share(limit_ms: float) -> float:
            return round(sum(1 for ms in gil_ms if ms > limit_ms) / calls, 3)

        return {"loop_gil_waits_per_call": round(len(gil_ms) / calls, 2),
                "loop_gil_wait_ms_per_call": round(sum(gil_ms) / calls, 3),
                "loop_gil_wait_p99_ms": round(gil_ms[min(len(gil_ms) - 1, int(0.99 * len(gil_ms)))], 3) if gil_ms else 0.0,
                "loop_gil_wait_max_ms": round(gil_ms[-1], 3) if gil_ms else 0.0,
                "loop_gil_waits_over_1ms_per_call": share(1.0),
                "loop_gil_waits_over_4ms_per_call": share(4.0),
                "loop_gil_handover_waits_per_call": round(len(handover_ms) / calls, 2),
                "loop_gil_handover_wait_ms_per_call": round(sum(handover_ms) / calls, 3),
                "loop_other_futex_wait_ms_per_call": round(sum(other_ms) / calls, 3)}
