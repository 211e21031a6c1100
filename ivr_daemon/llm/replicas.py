"""Several replicas of one model behind one client: ``LLM_API_URL=http://gpu1:8080,http://gpu2:8080``.

Each replica is an ordinary provider client of its own (its own keep-alive connections, and
the proxy, ``~/.netrc`` and CA settings read for its own URL). :class:`ReplicaSet` is an
:class:`LlmClient` that hands each request to one of them:

* **Least busy first.** A new request goes to the replica with the fewest requests in flight;
  among equals, round robin. Replicas that serve one model at a time (llama.cpp slots, vLLM's
  batch) answer fastest with the load spread this way.
* **Back-off.** A replica that fails before it gave any of its answer (connection refused or
  reset, connect timeout, HTTP 5xx or 429) or that timed out is skipped for a while: 1 s after
  the first failure in a row, doubling up to 30 s. The first success clears it. When every
  replica is backing off, the one whose back-off ends first gets the request rather than none.
* **One retry, only before the answer.** A request that failed that way (not a timeout: the
  caller's ``LLM_TIMEOUT`` is spent by then, unless the connect timeout is what ran out) is
  sent once more, to another replica, as it was. Never once any text or tool call has been
  handed to the caller: a reply that breaks off mid-stream stays broken (the caller hears what
  was said and no second answer), as with one URL. A wrong request (HTTP 4xx) is not retried:
  every replica would refuse it.

Logs and metrics name a replica by ``host:port`` (its :attr:`Replica.label`), never by the
URL, which may carry credentials; its errors name its URL without them. One URL needs none of this: ``make_llm_client`` builds the
plain provider client then.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from contextlib import closing
from typing import Callable, Generator, Iterator, Sequence, TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3.exceptions

from ivr_daemon.llm.base import (
    LlmClient, LlmError, LlmTimeout, LlmUnavailable, Message, ToolCall, ToolSpec, caused_by,
)
from ivr_daemon.logs import get_logger

log = get_logger(__name__)

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
RETRY_STATUSES = frozenset({429})  # and every 5xx: the server's trouble, another replica may be fine

T = TypeVar("T")


def split_urls(raw: str) -> list[str]:
    """The URLs of ``LLM_API_URL``: comma-separated, blanks around them dropped (an empty entry too)."""
    return [part.strip() for part in raw.split(",") if part.strip()]


def replica_label(url: str) -> str:
    """``host:port`` of ``url`` (the scheme's default port when none is given): what logs and metrics show."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port or (443 if parts.scheme == 'https' else 80)}"


def without_credentials(url: str) -> str:
    """``url`` without its ``user:password@`` part, for a message that may be logged."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def redacted(exc: LlmError, url: str) -> LlmError:
    """``exc`` with ``url`` in its message shown without credentials (the error messages of the
    provider clients name the URL they posted to); the same exception, changed in place."""
    clean = without_credentials(url)
    if clean != url and exc.args and isinstance(exc.args[0], str):
        exc.args = (exc.args[0].replace(url, clean), *exc.args[1:])
    return exc


@dataclasses.dataclass
class Replica:
    """One URL of the set, its client and its state (changed only on the gevent loop)."""

    index: int
    label: str  # host:port
    client: LlmClient
    in_flight: int = 0
    failures_in_row: int = 0
    down_until_s: float = 0.0  # clock time before which it is skipped; 0: never failed
    last_error: str | None = None
    requests: int = 0  # attempts sent to it
    failures: int = 0  # attempts that failed, whatever the error
    retries: int = 0  # requests that failed here and were sent on to another replica

    def backing_off(self, now_s: float) -> bool:
        return now_s < self.down_until_s


def retryable(exc: LlmError) -> bool:
    """True when ``exc`` says the replica gave no answer at all and another may well give one."""
    if isinstance(exc, LlmUnavailable):
        return exc.status is None or exc.status >= 500 or exc.status in RETRY_STATUSES
    if isinstance(exc, LlmTimeout):
        return _connect_timed_out(exc)
    return False


def puts_in_backoff(exc: LlmError) -> bool:
    """True for a failure of the replica itself: unreachable, 5xx/429, or no answer in time."""
    return retryable(exc) or isinstance(exc, LlmTimeout)


def _connect_timed_out(exc: BaseException) -> bool:
    return caused_by(exc, (requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError))


class ReplicaSet(LlmClient):
    """One model on several servers; the :class:`LlmClient` interface, each request on one replica (see the module)."""

    def __init__(
        self,
        clients: Sequence[LlmClient],
        *,
        backoff_first_s: float = BACKOFF_FIRST_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        # No session of its own (LlmClient.__init__ not called): each replica's client has one.
        if not clients:
            raise ValueError("a ReplicaSet needs at least one client")
        first = clients[0]
        self.replicas = [Replica(index, replica_label(client.api_url), client) for index, client in enumerate(clients)]
        self.provider = first.provider
        self.supports_tools = first.supports_tools
        self.model = first.model
        self.timeout_s = first.timeout_s
        self.max_tokens = first.max_tokens
        self.api_key = first.api_key
        self.api_url = ",".join(replica.label for replica in self.replicas)  # for messages: no credentials
        self._backoff_first_s = backoff_first_s
        self._backoff_max_s = backoff_max_s
        self._clock = clock
        self._turn = itertools.count()  # round robin among equally busy replicas

    # -- choosing -----------------------------------------------------------------------------

    def pick(self, exclude: Sequence[Replica] = ()) -> Replica | None:
        """The replica for the next request: not backing off, fewest in flight, round robin among
        equals; when all are backing off, the one that is back first. None when all are excluded."""
        candidates = [replica for replica in self.replicas if replica not in exclude]
        if not candidates:
            return None
        now_s = self._clock()
        healthy = [replica for replica in candidates if not replica.backing_off(now_s)]
        if not healthy:
            return min(candidates, key=lambda replica: replica.down_until_s)
        fewest = min(replica.in_flight for replica in healthy)
        tied = [replica for replica in healthy if replica.in_flight == fewest]
        return tied[next(self._turn) % len(tied)]

    def status(self) -> list[dict]:
        """Each replica's state, for ``/health``: label, up (not backing off), in flight, last error."""
        now_s = self._clock()
        return [
            {"replica": replica.label, "up": not replica.backing_off(now_s), "in_flight": replica.in_flight,
             "failures_in_row": replica.failures_in_row,
             "back_in_s": round(max(0.0, replica.down_until_s - now_s), 3), "last_error": replica.last_error}
            for replica in self.replicas
        ]

    # -- bookkeeping --------------------------------------------------------------------------

    def _succeeded(self, replica: Replica) -> None:
        if replica.failures_in_row:
            log.info("llm_replica_back", replica=replica.label, failures_in_row=replica.failures_in_row)
        replica.failures_in_row = 0
        replica.down_until_s = 0.0

    def _failed(self, replica: Replica, exc: LlmError, answered: bool) -> None:
        replica.failures += 1
        replica.last_error = str(exc)
        if answered or not puts_in_backoff(exc):
            # A reply that broke off, a bad reply, a refused request: the replica is up.
            log.warning("llm_replica_failed", replica=replica.label, error=str(exc),
                        error_type=type(exc).__name__, answered=answered)
            return
        if replica.backing_off(self._clock()):
            # The same outage, seen by another request that was already in flight (or one sent
            # while every replica backed off): it does not lengthen the back-off.
            log.debug("llm_replica_still_down", replica=replica.label, error_type=type(exc).__name__)
            return
        replica.failures_in_row += 1
        backoff_s = min(self._backoff_max_s, self._backoff_first_s * 2 ** (replica.failures_in_row - 1))
        replica.down_until_s = self._clock() + backoff_s
        log.warning("llm_replica_down", replica=replica.label, error=str(exc), error_type=type(exc).__name__,
                    failures_in_row=replica.failures_in_row, backoff_s=backoff_s)

    def _next_after_failure(self, replica: Replica, exc: LlmError, tried: list[Replica]) -> Replica | None:
        """Where a request that failed on ``replica`` before any answer goes next; None: nowhere."""
        if len(tried) > 1 or not retryable(exc):
            return None
        other = self.pick(exclude=tried)
        if other is not None:
            replica.retries += 1
            log.info("llm_retry_on_replica", failed=replica.label, retry=other.label, error_type=type(exc).__name__)
        return other

    # -- the LlmClient interface --------------------------------------------------------------

    def _attempts(self) -> Iterator[_Attempt]:
        """The attempts of one request, each to be run as ``with attempt:``: on :meth:`pick`'s
        replica, then, after a failure the attempt swallowed (see :class:`_Attempt`), on the
        replica it chose for the retry."""
        tried: list[Replica] = []
        replica = self.pick()
        while replica is not None:
            tried.append(replica)
            attempt = _Attempt(self, replica, tried)
            yield attempt
            replica = attempt.retry_on

    def _whole(self, ask: Callable[[LlmClient], T]) -> T:
        for attempt in self._attempts():
            with attempt:  # a failure retried elsewhere ends here; the next attempt is the retry
                result = ask(attempt.replica.client)
                attempt.answered()
                return result
        raise AssertionError("unreachable: an attempt that is not retried raises its error")

    def complete(self, messages: list[Message]) -> str:
        return self._whole(lambda client: client.complete(messages))

    def respond(self, messages: list[Message], tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        return self._whole(lambda client: client.respond(messages, tools))

    def stream(
        self, messages: list[Message], tools: Sequence[ToolSpec] = ()
    ) -> Generator[str | ToolCall, None, None]:
        for attempt in self._attempts():
            client = attempt.replica.client
            # closing(): the replica's stream is closed (its connection let go) before the attempt
            # ends, however it ends: done, failed, or abandoned by our caller's close().
            with attempt, closing(client.stream(messages, tools) if tools else client.stream(messages)) as deltas:
                for delta in deltas:
                    attempt.answered()  # it answers: up, whatever happens next
                    yield delta
                return
        raise AssertionError("unreachable: an attempt that is not retried raises its error")

    def close(self) -> None:
        for replica in self.replicas:
            replica.client.close()


class _Attempt:
    """One try of one request on one replica, run as ``with attempt:``; the bookkeeping of both
    :meth:`ReplicaSet._whole` and :meth:`ReplicaSet.stream`.

    While it runs it counts as one request to the replica and one in flight. :meth:`answered`
    (the whole answer, or a stream's first delta) is the replica's success: its back-off is
    cleared. An :class:`LlmError` out of it is the replica's failure (redacted, counted, a
    back-off unless it had answered); when the request goes on to another replica
    (:meth:`ReplicaSet._next_after_failure`: never once it answered) the error is swallowed
    and :attr:`retry_on` names that replica, else the error goes on to the caller. Anything
    else (a caller's ``close()`` of a stream, a timeout of the caller's own) only ends it.
    """

    __slots__ = ("_owner", "replica", "_tried", "_answered", "retry_on")

    def __init__(self, owner: ReplicaSet, replica: Replica, tried: list[Replica]):
        self._owner = owner
        self.replica = replica
        self._tried = tried  # every replica of this request so far, this one included
        self._answered = False
        self.retry_on: Replica | None = None

    def __enter__(self) -> _Attempt:
        self.replica.requests += 1
        self.replica.in_flight += 1
        return self

    def answered(self) -> None:
        if not self._answered:
            self._answered = True
            self._owner._succeeded(self.replica)

    def __exit__(self, exc_type, exc, traceback) -> bool:
        try:
            if not isinstance(exc, LlmError):
                return False
            redacted(exc, self.replica.client.api_url)
            self._owner._failed(self.replica, exc, answered=self._answered)
            if not self._answered:
                self.retry_on = self._owner._next_after_failure(self.replica, exc, self._tried)
            return self.retry_on is not None
        finally:
            self.replica.in_flight -= 1


__all__ = ["BACKOFF_FIRST_S", "BACKOFF_MAX_S", "Replica", "ReplicaSet", "redacted", "replica_label", "retryable",
           "split_urls", "without_credentials"]
