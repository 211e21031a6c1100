"""Call-event webhooks: signed JSON POSTs to WEBHOOK_URL, never in a call's way.

``send()`` only appends to a bounded queue and returns: a slow or dead receiver delays no call.
When the queue is full the *oldest* waiting event is dropped (and counted): the newest say
most about calls still going on.

Calls are sharded onto ``concurrency`` worker greenlets by a hash of the call UUID, so at most
that many deliveries are in flight and one call's events go out one after another, in order
(a retried event holds back later events of the calls on its shard, never their calls).
A delivery is retried with exponential backoff on a 5xx answer, a connection error or a
timeout, up to ``max_attempts`` attempts; a 4xx is the receiver's "no", not retried.

Each POST carries ``X-IVR-Timestamp`` (unix seconds) and
``X-IVR-Signature: sha256=<hex HMAC-SHA256 of "{timestamp}.{body}" with WEBHOOK_SECRET>``.
The secret is never logged.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import time
import uuid as uuid_module
import zlib
from dataclasses import dataclass

import gevent
import gevent.event
import requests

from ivr_daemon.logs import get_logger
from ivr_daemon.metrics import DaemonMetrics

log = get_logger(__name__)

EVENT_TYPES = ("call.started", "turn.completed", "call.transferred", "call.ended")
DEFAULT_CONCURRENCY = 4
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_BACKOFF_BASE_S = 0.5  # 0.5, 1, 2, 4 s between the five attempts
MAX_BACKOFF_S = 30.0
USER_AGENT = "ivr-daemon-webhooks/1"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-IVR-Signature value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


@dataclass
class _Event:
    url: str
    call_uuid: str
    event_id: str
    event_type: str
    body: bytes
    shard: int


class WebhookSender:
    """Owned by the daemon: ``start()``, ``send()`` from any greenlet, ``stop()`` at shutdown."""

    def __init__(self, secret: str, metrics: DaemonMetrics, *, queue_max: int = 1000, timeout_s: float = 5.0,
                 concurrency: int = DEFAULT_CONCURRENCY, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 backoff_base_s: float = DEFAULT_BACKOFF_BASE_S):
        self._secret = secret
        self.metrics = metrics
        self.queue_max = max(1, queue_max)
        self.timeout_s = timeout_s
        self.max_attempts = max(1, max_attempts)
        self.backoff_base_s = backoff_base_s
        # Every event waiting, oldest first (what overflow drops); each also sits in its shard's deque.
        self._waiting: collections.OrderedDict[str, _Event] = collections.OrderedDict()
        self._shards = [collections.deque() for _ in range(max(1, concurrency))]
        self._wakeups = [gevent.event.Event() for _ in self._shards]
        self._in_flight: list[_Event | None] = [None for _ in self._shards]  # each worker's delivery
        self._idle = gevent.event.Event()
        self._idle.set()
        self._workers: list[gevent.Greenlet] = []
        self._session = requests.Session()
        self._stopping = False

    @property
    def pending(self) -> int:
        """Events queued or being delivered."""
        return len(self._waiting) + sum(event is not None for event in self._in_flight)

    def start(self) -> None:
        if not self._workers:
            self._workers = [gevent.spawn(self._work, index) for index in range(len(self._shards))]

    def send(self, event_type: str, call_uuid: str, data: dict, *, url: str) -> str | None:
        """Queue one event for ``url``; returns its id (None when not queued). Never blocks."""
        if not url or self._stopping:
            return None
        event_id = str(uuid_module.uuid4())
        payload = {"id": event_id, "type": event_type, "timestamp": round(time.time(), 3), "call_uuid": call_uuid,
                   "data": data}
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str).encode()
        shard = zlib.crc32(call_uuid.encode()) % len(self._shards)
        event = _Event(url, call_uuid, event_id, event_type, body, shard)
        while len(self._waiting) >= self.queue_max:
            _, oldest = self._waiting.popitem(last=False)
            # Out of its shard's deque too, so that a stuck worker's deque stays bounded: the
            # oldest waiting event is the first of its shard (a worker takes events off both at once).
            waiting = self._shards[oldest.shard]
            if waiting and waiting[0] is oldest:
                waiting.popleft()
            else:
                waiting.remove(oldest)
            self.metrics.webhooks_dropped_total.inc()
            log.warning("webhook_dropped", call_uuid=oldest.call_uuid, event_type=oldest.event_type,
                        event_id=oldest.event_id, queue_max=self.queue_max)
        self._waiting[event_id] = event
        self._shards[shard].append(event)
        self._idle.clear()
        self._wakeups[shard].set()
        return event_id

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued is delivered (or given up), at most ``timeout_s``."""
        return self._idle.wait(timeout_s) and self.pending == 0

    def stop(self, timeout_s: float = 1.0) -> None:
        """Deliver what can be within ``timeout_s`` (events still queued meanwhile, the last calls'
        clean-ups, are taken too), then take no more and log what is abandoned, event by event."""
        if self.pending:
            self.flush(timeout_s)
        self._stopping = True
        in_flight = [event for event in self._in_flight if event is not None]
        queued = list(self._waiting.values())
        if in_flight or queued:
            # The receiver is down or slow: these never reached it. Said loudly, with the calls.
            left = in_flight + queued
            log.warning("webhooks_abandoned_at_shutdown", count=len(left), in_flight=len(in_flight),
                        queued=len(queued), calls=sorted({event.call_uuid for event in left})[:20],
                        events=[f"{event.event_type} {event.event_id}" for event in left][:20])
            self._waiting.clear()
            for shard in self._shards:
                shard.clear()
        # Not waited for: a loop this busy may take a while to run them, and the shutdown has a
        # budget (a killall with a timeout raises when it runs out, in the middle of the shutdown).
        gevent.killall(self._workers, block=False)
        self._workers = []
        self._session.close()

    # -- the workers --------------------------------------------------------------------------

    def _work(self, index: int) -> None:
        shard, wakeup = self._shards[index], self._wakeups[index]
        while True:
            if not shard:
                wakeup.clear()
                self._note_idle()
                wakeup.wait()
                continue
            event = shard.popleft()
            del self._waiting[event.event_id]
            self._in_flight[index] = event
            try:
                self._deliver(event)
            except Exception:  # a bug here must not end the worker: the next events still go
                log.exception("webhook_worker_failed", call_uuid=event.call_uuid, event_id=event.event_id)
            finally:
                self._in_flight[index] = None

    def _note_idle(self) -> None:
        if not self._waiting and all(event is None for event in self._in_flight):
            self._idle.set()

    def _deliver(self, event: _Event) -> None:
        event_log = log.bind(call_uuid=event.call_uuid, event_type=event.event_type, event_id=event.event_id)
        for attempt in range(1, self.max_attempts + 1):
            timestamp = str(int(time.time()))
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                       "X-IVR-Timestamp": timestamp, "X-IVR-Event": event.event_type,
                       "X-IVR-Signature": sign(self._secret, timestamp, event.body)}
            started_s = time.monotonic()
            try:
                with gevent.Timeout(self.timeout_s * 2, requests.Timeout):  # a trickling answer too
                    response = self._session.post(event.url, data=event.body, headers=headers,
                                                  timeout=(self.timeout_s, self.timeout_s), allow_redirects=False)
                    response.close()
                status, why = response.status_code, f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                status, why = None, type(exc).__name__
            elapsed_ms = round((time.monotonic() - started_s) * 1000, 1)
            if status is not None and 200 <= status < 300:
                self.metrics.webhooks_delivered_total.inc()
                event_log.debug("webhook_delivered", status=status, attempt=attempt, elapsed_ms=elapsed_ms)
                return
            if status is not None and status < 500:
                self.metrics.webhooks_failed_total.inc()
                event_log.warning("webhook_refused", status=status, attempt=attempt)  # 4xx (3xx): no retry
                return
            if attempt == self.max_attempts:
                break
            backoff_s = min(MAX_BACKOFF_S, self.backoff_base_s * 2 ** (attempt - 1))
            event_log.info("webhook_retry", error=why, attempt=attempt, retry_in_s=backoff_s, elapsed_ms=elapsed_ms)
            gevent.sleep(backoff_s)
        self.metrics.webhooks_failed_total.inc()
        event_log.warning("webhook_failed", error=why, attempts=self.max_attempts)


__all__ = ["EVENT_TYPES", "WebhookSender", "sign"]
