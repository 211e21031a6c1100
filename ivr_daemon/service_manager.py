"""systemd's ``Type=notify`` protocol: READY, STATUS, the watchdog and STOPPING.

The datagrams go through the ``sdnotify`` package (systemd's sd_notify protocol in pure Python:
no libsystemd to build against). What is ours is *when* to send them:

- ``READY=1`` once the daemon serves: the event socket connected and subscribed, the HTTP API
  listening (``ivr-daemon run``), or the WebSocket listening (``ivr-daemon asr-server``);
- ``WATCHDOG=1`` from a greenlet on the gevent loop, every half of ``WATCHDOG_USEC`` (as
  sd_watchdog_enabled(3) advises), so a loop that hangs (a CPU-bound call on it, a deadlock)
  stops feeding it and systemd restarts the service; only when ``WATCHDOG_PID`` is unset or
  names this process;
- ``STOPPING=1`` when SIGTERM starts the clean shutdown.

Without ``NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every call does nothing.
"""

from __future__ import annotations

import os
from typing import Mapping

import gevent
import sdnotify

from ivr_daemon.logs import get_logger

log = get_logger(__name__)


class ServiceNotifier:
    """Tells systemd how the service is doing, when it runs under ``Type=notify``."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.socket_path = environ.get("NOTIFY_SOCKET", "")
        self.watchdog_interval_s = _watchdog_interval_s(environ)
        self._notifier = None
        self._watchdog: gevent.Greenlet | None = None
        self.ready_sent = False
        if self.socket_path:
            try:
                # debug=True: raise instead of sdnotify's silence, so a bad NOTIFY_SOCKET is logged once here.
                self._notifier = sdnotify.SystemdNotifier(debug=True)
            except OSError as exc:
                log.warning("systemd_notify_unavailable", notify_socket=self.socket_path, error=str(exc))

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False when not under systemd or it failed."""
        if self._notifier is None:
            return False
        try:
            self._notifier.notify("\n".join(assignments))
        except OSError as exc:  # systemd gone or restarting: the service itself goes on
            log.warning("systemd_notify_failed", state=assignments[0], error=str(exc))
            return False
        return True

    def ready(self, status: str) -> None:
        self.ready_sent = self.notify("READY=1", f"STATUS={status}") or self.ready_sent
        if self.enabled:
            log.info("systemd_ready", status=status, watchdog_interval_s=self.watchdog_interval_s)

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")
        self.stop_watchdog()

    def start_watchdog(self) -> gevent.Greenlet | None:
        """Feed systemd's watchdog from the gevent loop (None when WatchdogSec is not set for us)."""
        if not self.enabled or self.watchdog_interval_s is None or self._watchdog is not None:
            return self._watchdog
        self._watchdog = gevent.spawn(self._feed_watchdog, self.watchdog_interval_s)
        return self._watchdog

    def stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.kill(block=False)

    def _feed_watchdog(self, interval_s: float) -> None:
        # On the loop on purpose: a ping proves the loop still turns, which a thread could not.
        while True:
            self.notify("WATCHDOG=1")
            gevent.sleep(interval_s)


def _watchdog_interval_s(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC when the watchdog is meant for this process; None otherwise."""
    raw_usec = environ.get("WATCHDOG_USEC", "")
    raw_pid = environ.get("WATCHDOG_PID", "")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
        if raw_pid and int(raw_pid) != os.getpid():
            return None  # systemd set it for the parent (a wrapper script): not ours to feed
    except ValueError:
        log.warning("systemd_watchdog_setting_unreadable", watchdog_usec=raw_usec[:32], watchdog_pid=raw_pid[:32])
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / 2
