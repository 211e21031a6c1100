"""What the simulator saw and did (commands received, events emitted, when each was written), optionally bounded, and the waits tests block on."""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import gevent.event

from ivr_daemon.replay.simulator.connection import ConnectionInfo
from ivr_daemon.replay.simulator.errors import CommandNotReceived, EventNotEmitted, SubscriptionNotMade

if TYPE_CHECKING:
    from ivr_daemon.replay.simulator.channels import CallState


@dataclass(frozen=True)
class ReceivedCommand:
    """One command as the simulator read it: its first line, extra header lines and body."""

    line: str
    connection_id: int
    t_monotonic: float  # when it reached the host (the kernel's stamp where there is one), time.monotonic()'s clock
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class EmittedEvent:
    """An event the simulator fired (whether or not anyone was subscribed to it)."""

    name: str
    sequence: int
    unique_id: str | None
    headers: tuple[tuple[str, str], ...]
    body: str | None
    t_monotonic: float

    def get(self, key: str, default: str | None = None) -> str | None:
        for name, value in self.headers:
            if name == key:
                return value
        return default


class HistoryMixin:
    """FreeswitchSimulator's record of commands and events, and the waits on them.

    ``history_limit``: None keeps everything; a number keeps only about that many of the newest
    (between it and twice it) of each kind, and of the ended calls in ``self._calls``.
    The host provides ``self._calls`` and ``self.connections``.
    """

    def _init_history(self, history_limit: int | None) -> None:
        if history_limit is not None and history_limit < 1:
            raise ValueError(f"history_limit must be None or >= 1, got {history_limit}")
        self._commands: list[ReceivedCommand] = []
        self._consumed_commands: set[int] = set()
        self._consumed_events: set[int] = set()
        self._emitted: list[EmittedEvent] = []
        self._written_at: dict[int, float] = {}
        self._history_limit = history_limit
        # Absolute positions of _commands[0] and _emitted[0]: the count trimmed off so far.
        self._commands_base = 0
        self._emitted_base = 0
        self._ended_calls: collections.deque[str] = collections.deque()
        self._waiters: list[gevent.event.Event] = []

    # -- what the peers did ------------------------------------------------------------------

    @property
    def commands(self) -> list[ReceivedCommand]:
        return list(self._commands)

    def commands_for(self, connection_id: int) -> list[ReceivedCommand]:
        return [c for c in self._commands if c.connection_id == connection_id]

    @property
    def emitted_events(self) -> list[EmittedEvent]:
        return list(self._emitted)

    @property
    def commands_received(self) -> int:
        """Commands received since start: the ``start_index`` of a wait for the next one."""
        return self._commands_base + len(self._commands)

    @property
    def events_emitted(self) -> int:
        """Events emitted since start: the ``start_index`` of a wait for the next one."""
        return self._emitted_base + len(self._emitted)

    def wait_for_command(
        self,
        predicate_or_prefix: Callable[[ReceivedCommand], bool] | str,
        timeout_s: float | None = 5.0,
        *,
        start_index: int = 0,
        consume: bool = True,
    ) -> ReceivedCommand:
        """The next matching command not yet returned by a wait, waiting for it if need be.

        Commands are searched in arrival order from position ``start_index`` (0: the first
        command ever received; :attr:`commands_received`: the next one to come),
        skipping those an earlier consuming wait returned, so two waits for "a uuid_broadcast"
        get the first and then the second one; ``consume=False`` neither skips nor marks (a
        plain search of the history). A ``str`` matches as a prefix.
        Raises :class:`CommandNotReceived` after ``timeout_s`` (None: wait forever).
        """
        if callable(predicate_or_prefix):
            matches = predicate_or_prefix
        else:
            prefix = predicate_or_prefix
            matches = lambda command: command.line.startswith(prefix)  # noqa: E731
        index = start_index

        def probe() -> ReceivedCommand | None:
            nonlocal index
            index = max(index, self._commands_base)  # what history_limit dropped is gone
            while index - self._commands_base < len(self._commands):
                position, command = index, self._commands[index - self._commands_base]
                index += 1
                if (not consume or position not in self._consumed_commands) and matches(command):
                    if consume:
                        self._consumed_commands.add(position)
                    return command
            return None

        found = self._wait_until(probe, timeout_s)
        if found is None:
            raise CommandNotReceived(f"no command matching {predicate_or_prefix!r} within {timeout_s} s")
        return found

    def wait_for_event(
        self,
        predicate_or_name: Callable[[EmittedEvent], bool] | str,
        timeout_s: float | None = 5.0,
        *,
        start_index: int = 0,
        consume: bool = True,
    ) -> EmittedEvent:
        """The next matching emitted event, with :meth:`wait_for_command`'s rules; a str is an Event-Name."""
        if callable(predicate_or_name):
            matches = predicate_or_name
        else:
            wanted = predicate_or_name
            matches = lambda event: event.name == wanted  # noqa: E731
        index = start_index

        def probe() -> EmittedEvent | None:
            nonlocal index
            index = max(index, self._emitted_base)
            while index - self._emitted_base < len(self._emitted):
                position, event = index, self._emitted[index - self._emitted_base]
                index += 1
                if (not consume or position not in self._consumed_events) and matches(event):
                    if consume:
                        self._consumed_events.add(position)
                    return event
            return None

        found = self._wait_until(probe, timeout_s)
        if found is None:
            raise EventNotEmitted(f"no event matching {predicate_or_name!r} within {timeout_s} s")
        return found

    def wait_for_subscription(self, event_name: str | None = None, timeout_s: float | None = 5.0) -> ConnectionInfo:
        """A connection whose subscription takes ``event_name`` (any subscription if None)."""

        def probe() -> ConnectionInfo | None:
            for info in self.connections:
                if info.subscription is not None and (event_name is None or info.subscription.matches(event_name)):
                    return info
            return None

        found = self._wait_until(probe, timeout_s)
        if found is None:
            raise SubscriptionNotMade(f"no connection subscribed to {event_name or 'events'} within {timeout_s} s")
        return found

    def _note_written(self, sequence: int) -> None:
        self._written_at.setdefault(sequence, time.monotonic())
        limit = self._history_limit
        if limit is not None and len(self._written_at) >= 2 * limit:
            # Oldest first: a dict keeps insertion order, and that is write order.
            for old in list(itertools.islice(self._written_at, len(self._written_at) - limit)):
                del self._written_at[old]

    # -- bounded history (history_limit) -----------------------------------------------------

    def _trim_commands(self) -> None:
        limit = self._history_limit
        if limit is None or len(self._commands) < 2 * limit:
            return
        # Trimming in halves keeps appends amortized O(1).
        drop = len(self._commands) - limit
        del self._commands[:drop]
        self._commands_base += drop
        self._consumed_commands = {p for p in self._consumed_commands if p >= self._commands_base}

    def _trim_events(self) -> None:
        limit = self._history_limit
        if limit is None or len(self._emitted) < 2 * limit:
            return
        drop = len(self._emitted) - limit
        del self._emitted[:drop]
        self._emitted_base += drop
        self._consumed_events = {p for p in self._consumed_events if p >= self._emitted_base}

    def _call_ended(self, call: CallState) -> None:
        if self._history_limit is None:
            return
        self._ended_calls.append(call.uuid)
        while len(self._ended_calls) > self._history_limit:
            uuid = self._ended_calls.popleft()
            old = self._calls.get(uuid)
            if old is not None and not old.live:  # a uuid reused by a live call stays
                del self._calls[uuid]

    def written_at(self, sequence: int) -> float | None:
        """When the event with this Event-Sequence was first written to a socket (monotonic s)."""
        return self._written_at.get(sequence)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.set()

    def _wait_until(self, probe: Callable[[], object], timeout_s: float | None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            found = probe()
            if found is not None:
                return found
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            waiter = gevent.event.Event()
            self._waiters.append(waiter)
            waiter.wait(remaining)
