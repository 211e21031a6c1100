"""How a child process of the daemon ended (a TTS worker, the records process), in words for a log line."""

from __future__ import annotations

import signal


def how_it_ended(what: str, pid: int, code: int | None) -> str:
    """``what`` (e.g. "TTS worker") and ``pid`` ended with exit status ``code`` (None: not reaped in time)."""
    if code is None:
        return f"{what} {pid} stopped answering"
    if code < 0:
        try:
            how = signal.Signals(-code).name
        except ValueError:
            how = f"signal {-code}"
        return f"{what} {pid} was killed by {how}"
    return f"{what} {pid} exited with code {code}"
