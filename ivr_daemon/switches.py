"""One switch of the daemon: its ESL client (the one writer to that socket), its calls, its resync.

A daemon keeps one :class:`Switch` per FreeSWITCH (``FREESWITCH_HOSTS``; one for
``FREESWITCH_HOST``). Nothing is shared between switches but the call handlers' services: each
has its own connection, reconnect backoff, call table (a call is its switch and its UUID, so
the same UUID on two switches is two calls), duplicate filter (FreeSWITCH's Event-Sequence is
per switch), BACKGROUND_JOB waiters and resync. A switch that goes away stalls and resyncs
only its own calls; the handlers of its calls were given its ``send``, so every command of a
call goes to the switch the call is on.

Arrows point down: this module knows the ESL layer and the call router; the ESL layer knows
nothing of it.
"""

from __future__ import annotations

from typing import Callable

import gevent
import gevent.pool

from ivr_daemon.calls import CallRouter, HandlerFactory
from ivr_daemon.config import SwitchAddress
from ivr_daemon.esl import commands
from ivr_daemon.esl.connection import EslClient, EslError
from ivr_daemon.esl.protocol import EslEvent
from ivr_daemon.logs import get_logger
from ivr_daemon.metrics import DaemonMetrics
from ivr_daemon.outbound import JobWaiters

log = get_logger(__name__)

RESYNC_CONCURRENCY = 16  # uuid_exists questions in flight at once during a resync


class Switch:
    """One FreeSWITCH: an :class:`EslClient` kept alive, its events routed to its own calls.

    ``handlers_for`` gets this switch's ESL client and returns the factory of its calls'
    handlers. ``log_context`` is bound to every line about the switch's calls (``switch`` when
    the daemon has several).
    """

    def __init__(
        self,
        address: SwitchAddress,
        handlers_for: Callable[[EslClient], HandlerFactory],
        subscribed_events: tuple[str, ...],
        metrics: DaemonMetrics,
        *,
        owns: Callable[[str], bool] | None = None,
        log_speech_text: bool = True,
        log_context: dict[str, str] | None = None,
        on_callless_event: Callable[[EslEvent], None] | None = None,
        **esl_options,
    ):
        self.address = address
        self.name = address.name
        self.log = log.bind(switch=self.name)
        self.metrics = metrics
        self.jobs = JobWaiters()  # BACKGROUND_JOB results by Job-UUID: a bgapi's answer comes on its own socket
        self._on_callless = on_callless_event
        self.connects = 0  # connections made (and subscribed) so far
        self.esl = EslClient(address.host, address.port, address.password, subscribed_events, self._route,
                             on_connected=self._on_connected, **esl_options)
        calls_total = metrics.calls_total.labels(switch=self.name)
        self.router = CallRouter(handlers_for(self.esl), on_callless_event=self._on_callless_event, owns=owns,
                                 log_speech_text=log_speech_text, log_context=log_context,
                                 on_call_started=lambda _uuid: calls_total.inc())
        metrics.watch_switch(self.name, calls_active=lambda: len(self.router.calls),
                             connected=lambda: self.esl.connected)

    @property
    def connected(self) -> bool:
        return self.esl.connected

    def _route(self, event: EslEvent) -> None:
        self.router.route(event)  # looked up per event: tests wrap the router's route

    def _on_callless_event(self, event: EslEvent) -> None:
        if self.jobs.on_event(event):
            return  # a bgapi's result (POST /calls): handed to whoever waits on it
        if self._on_callless is not None:
            self._on_callless(event)
        else:
            self.log.debug("esl_event", event_name=event.name, event_sequence=event.sequence)

    def _on_connected(self) -> None:
        # Counted here, not in the ESL layer, which knows nothing of metrics.
        self.connects += 1
        if self.connects > 1:
            self.metrics.esl_reconnects_total.labels(switch=self.name).inc()
        self.resync()

    def resync(self, after_reconnect: bool = True) -> None:
        """After a (re)connect, and every minute: end the calls this switch no longer has.

        Events of the outage are lost (FreeSWITCH does not keep them for an ESL client), so a
        hangup then is learnt here. Each tracked call is asked about with ``uuid_exists``
        (captures 53 and 64), which looks the session up in the switch's own table. Not
        ``show channels``: that reads the core database, filled asynchronously, so a channel
        created a moment ago can be missing from it (and a live call would be ended); and its
        reply grows ~875 bytes a channel, past the 8 MiB frame cap near 9,600 channels.
        """
        if after_reconnect:
            # Purely local, so first: whatever the switch says next, playback state is stale.
            for call in list(self.router.calls.values()):
                call.handler.after_reconnect()
        tracked = list(self.router.calls)
        if not tracked:
            return
        answers: dict[str, bool | None] = {}
        pool = gevent.pool.Pool(RESYNC_CONCURRENCY)
        for uuid in tracked:
            pool.spawn(self._ask_exists, uuid, answers)
        pool.join()
        gone = [uuid for uuid, exists in answers.items() if exists is False]
        for uuid in gone:
            self.router.end_call(uuid, "GONE_AFTER_RECONNECT")
        unknown = sum(exists is None for exists in answers.values())
        self.log.info("esl_resynced", calls_checked=len(tracked), calls_ended=len(gone), calls_unknown=unknown)

    def _ask_exists(self, uuid: str, answers: dict[str, bool | None]) -> None:
        """True/False as FreeSWITCH says; None when it cannot tell (then the call is kept)."""
        try:
            text = self.esl.send(commands.uuid_exists(uuid)).text.strip()
        except (EslError, commands.UnsafeCommandArgument) as exc:
            self.log.warning("esl_resync_check_failed", call_uuid=uuid, error=str(exc))
            answers[uuid] = None
            return
        if text not in ("true", "false"):
            self.log.warning("esl_resync_unexpected_reply", call_uuid=uuid, reply=text[:80])
        answers[uuid] = {"true": True, "false": False}.get(text)


__all__ = ["RESYNC_CONCURRENCY", "Switch"]
