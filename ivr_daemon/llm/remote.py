"""The daemon's LLM clients with their HTTP work in the LLM process (``LLM_PROCESS=true``).

An LLM turn on the daemon's gevent loop cost it ~0.6 ms of CPU for the POST (requests',
urllib3's and http.client's Python work, a new connection) and ~85 us for every token read as
it landed: most of the loop's CPU a turn, and in a burst of turns the last request went out
only after all the others' (docs/performance.md, "A burst turn, hop by hop").
``ivr_daemon/llm_process.py`` does that work in a child process with a core and a GIL of its
own; here a request is one pickled frame down a pipe, and the replies of every stream in flight
come back together, a frame holding whatever deltas arrived meanwhile.

:class:`LlmProcess` is the child, shared by every client of the daemon; :meth:`LlmProcess.client`
gives a :class:`RemoteLlmClient`, an :class:`LlmClient` with the same results and the same
errors as the provider client it stands for (the child runs exactly that client). Replicas
(``LLM_API_URL`` with several URLs) stay the daemon's: a :class:`ReplicaSet` of remote clients,
one per URL, so ``/health`` and ``/metrics`` see their state as before.

Time: a turn's ``llm_ms`` is the LLM's, as the child measured it (from its request's start to
the first delta, less any wait in its own idle lane); what a request and its first answer spent
in the pipes and waiting in either process is the daemon's queueing, counted with the idle
lane's wait (``ivr_daemon.llm.paced.add_lane_wait_s``) so that no overhead figure hides it.

A child that dies (a segfault, the OOM killer, an operator's kill) is logged
(``llm_process_died``) and restarted at once; the requests it had fail with
:class:`LlmProcessError` (an LlmUnavailable: the turn says its fallback phrase). The child
dies with the daemon: :meth:`LlmProcess.close` ends it, and a daemon that dies however it dies
closes its stdin.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from multiprocessing.reduction import ForkingPickler
from typing import Generator, Sequence

import gevent
import gevent.lock
import gevent.queue
import gevent.subprocess
import urllib3.exceptions

from ivr_daemon.child_exit import how_it_ended
from ivr_daemon.child_pipes import CooperativeConnection, start_child
from ivr_daemon.llm.base import LlmClient, LlmUnavailable, Message, ToolCall, ToolSpec
from ivr_daemon.llm.paced import add_lane_wait_s
from ivr_daemon.logs import get_logger

log = get_logger(__name__)

# Importing requests, urllib3 and the clients: well under a second idle; a loaded box may take several.
START_TIMEOUT_S = 60.0
CLOSE_S = 1.0
REAP_S = 2.0
# The child bounds every request by the client's own timeout_s (to the first delta, and between
# two); this side waits that long and this much more, only to catch a child that hangs alive.
HUNG_MARGIN_S = 5.0


class LlmProcessError(LlmUnavailable):
    """The LLM process could not start, died with the request, or failed it (a bug there)."""


class _Child:
    """One LLM process, its two pipes and the greenlet reading its replies."""

    def __init__(self, proc, requests: CooperativeConnection, replies: CooperativeConnection):
        self.proc = proc
        self.pid = proc.pid
        self.requests = requests
        self.replies = replies
        self.reader: gevent.Greenlet | None = None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def reap(self, timeout_s: float = REAP_S) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except gevent.subprocess.TimeoutExpired:
            return None

    def close_pipes(self) -> None:
        for connection in (self.requests, self.replies):
            with contextlib.suppress(OSError):
                connection.close()


class LlmProcess:
    """The daemon's LLM process: started by :meth:`start` (or the first request), restarted when it dies."""

    def __init__(self, *, log_level: str = "INFO", log_format: str = "json"):
        self._spec = {"log_level": log_level, "log_format": log_format}
        self._client_specs: list[dict] = []  # by client number: sent to every child at its start
        self._child: _Child | None = None
        self._starting = gevent.lock.Semaphore(1)
        self._sending = gevent.lock.Semaphore(1)  # one frame at a time down the pipe
        self._waiting: dict[int, gevent.queue.Queue] = {}  # request id -> its news
        self._request_ids = itertools.count(1)
        self._closed = False
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The LLM process's pid (None: none running now)."""
        return None if self._child is None else self._child.pid

    def client(self, client_class: type[LlmClient], *, api_url: str, model: str, timeout_s: float,
               api_key: str = "", max_tokens: int | None = None,
               sentence_chunks: tuple[int, float] | None = None) -> "RemoteLlmClient":
        """A client of ``client_class`` (one URL) whose requests this process serves.

        ``sentence_chunks`` (first_clause_min_words, batch_s): its streams' deltas end where a
        :class:`~ivr_daemon.sentences.SentenceSplitter` with that setting cuts a chunk, and the
        rest of a reply after its first chunk is read in batches of ``batch_s`` (LLM_STREAM_BATCH_MS)
        in the LLM process: a turn's loop then wakes once a chunk, not once a token.
        """
        spec = {"provider": client_class.provider, "api_url": api_url, "model": model,
                "timeout_s": float(timeout_s), "api_key": api_key, "max_tokens": max_tokens,
                "sentence_chunks": sentence_chunks}
        number = len(self._client_specs)
        client = RemoteLlmClient(self, number, client_class, api_url=api_url, model=model, timeout_s=timeout_s,
                                 api_key=api_key, max_tokens=max_tokens)
        client.sentence_deltas = sentence_chunks is not None
        self._client_specs.append(spec)
        if self._child is not None:
            self._send(("client", number, spec))
        return client

    def start(self) -> None:
        """Start the child now (not at the first turn). LlmProcessError when it cannot start."""
        if self._child is None:
            self._start()

    # -- requests ---------------------------------------------------------------------------

    def request(self, kind: str, client_number: int, messages: list[Message],
                tools: Sequence[ToolSpec]) -> tuple[int, gevent.queue.Queue]:
        """Send one request; (its id, the queue its news arrives on). ValueError when it cannot be pickled."""
        request_id = next(self._request_ids)
        news: gevent.queue.Queue = gevent.queue.Queue()
        self._waiting[request_id] = news
        try:
            self._send((kind, request_id, client_number, messages, tuple(tools)))
        except BaseException:
            self._waiting.pop(request_id, None)
            raise
        return request_id, news

    def cancel(self, request_id: int) -> None:
        """The caller gave up on ``request_id``: the child closes its stream (and connection)."""
        if self._waiting.pop(request_id, None) is not None and self._child is not None:
            with contextlib.suppress(LlmProcessError):
                self._send(("cancel", request_id))

    def done(self, request_id: int) -> None:
        self._waiting.pop(request_id, None)

    def _send(self, message: tuple) -> None:
        # Pickled before the pipe is touched: a value that cannot cross it fails its request alone.
        try:
            payload = bytes(ForkingPickler.dumps(message))
        except Exception as exc:
            raise ValueError(f"cannot be sent to the LLM process: {type(exc).__name__}: {str(exc)[:200]}") from None
        child = self._child or self._start()
        try:
            with self._sending:
                child.requests.send_bytes(payload)
        except OSError as exc:
            raise LlmProcessError(f"the LLM process {child.pid} is gone: {exc}") from None

    # -- the child --------------------------------------------------------------------------

    def _start(self) -> _Child:
        with self._starting:
            if self._child is not None:
                return self._child
            if self._closed:
                raise LlmProcessError("the LLM process is stopped")
            started_s = time.monotonic()
            try:
                proc, requests, replies = start_child("ivr_daemon.llm_process")
            except OSError as exc:
                raise LlmProcessError(f"the LLM process could not start: {exc}") from None
            child = _Child(proc, requests, replies)
            try:
                with gevent.Timeout(START_TIMEOUT_S):
                    requests.send(self._spec)
                    for number, spec in enumerate(self._client_specs):
                        requests.send(("client", number, spec))
                    hello = replies.recv()
                if not (isinstance(hello, tuple) and hello[0] == "ready"):
                    raise EOFError(f"said {hello!r:.100} instead of ready")
            except (gevent.Timeout, EOFError, OSError) as exc:
                child.kill()
                code = child.reap()
                child.close_pipes()
                how = "did not start in time" if isinstance(exc, gevent.Timeout) else _ended(child.pid, code)
                log.error("llm_process_start_failed", pid=child.pid, error=how)
                raise LlmProcessError(f"the LLM process {how}") from None
            self._child = child
            self.starts += 1
            child.reader = gevent.spawn(self._read_replies, child)
            log.info("llm_process_started", pid=child.pid, clients=len(self._client_specs),
                     seconds=round(time.monotonic() - started_s, 2))
            return child

    def _read_replies(self, child: _Child) -> None:
        """Hand every reply to its request's queue, a frame at a time; a child gone is replaced."""
        try:
            while True:
                frame = child.replies.recv()
                arrived_s = time.monotonic()
                waiting = self._waiting
                for request_id, kind, value in frame:
                    news = waiting.get(request_id)
                    if news is not None:  # else: cancelled; what was under way when it was is dropped
                        news.put_nowait((kind, value, arrived_s))
        except (EOFError, OSError):
            how = None
        except Exception as exc:  # a frame that does not unpickle: this child cannot be trusted
            how = f"sent a reply that cannot be read: {type(exc).__name__}: {str(exc)[:200]}"
        self._lost(child, how)

    def _lost(self, child: _Child, how: str | None) -> None:
        if self._child is not child:
            return
        self._child = None
        failed, self._waiting = self._waiting, {}
        child.kill()
        code = child.reap()
        child.close_pipes()
        how = how or _ended(child.pid, code)
        for news in failed.values():
            news.put_nowait(("died", f"the LLM process died with the request: {how}", time.monotonic()))
        if self._closed:
            return
        log.error("llm_process_died", pid=child.pid, error=how, requests_failed=len(failed))
        try:
            self._start()  # before the next turn needs it
        except LlmProcessError:
            pass  # logged; the next request tries again

    def close(self, timeout_s: float = CLOSE_S) -> None:
        """End the child (its stdin closed; killed if it lingers); requests still waiting fail. Idempotent."""
        self._closed = True
        child, self._child = self._child, None
        failed, self._waiting = self._waiting, {}
        for news in failed.values():
            news.put_nowait(("died", "the LLM process was stopped", time.monotonic()))
        if child is None:
            return
        if child.reader is not None:
            child.reader.kill(block=False)
        child.close_pipes()  # its stdin's end: it exits
        if child.reap(timeout_s) is None:
            child.kill()
            child.reap(REAP_S)
        log.info("llm_process_stopped", pid=child.pid)


class RemoteLlmClient(LlmClient):
    """A provider client served by the LLM process: same requests, same results, same errors."""

    def __init__(self, process: LlmProcess, number: int, client_class: type[LlmClient], *, api_url: str,
                 model: str, timeout_s: float, api_key: str = "", max_tokens: int | None = None):
        # LlmClient.__init__ not called: the connections are the LLM process's.
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self._process = process
        self._number = number
        self.provider = client_class.provider
        self.supports_tools = client_class.supports_tools
        self.api_url = client_class.endpoint_url(api_url.strip())
        self.model = model
        self.timeout_s = float(timeout_s)
        self.api_key = api_key
        self.max_tokens = max_tokens

    def complete(self, messages: list[Message]) -> str:
        return self._whole("complete", messages, ())

    def respond(self, messages: list[Message], tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        return self._whole("respond", messages, tools)

    def stream(
        self, messages: list[Message], tools: Sequence[ToolSpec] = ()
    ) -> Generator[str | ToolCall, None, None]:
        """As the provider client's: a generator, the request sent at the first ``next()``;
        ``close()`` abandons the reply and the LLM process closes its connection."""
        sent_s = time.monotonic()
        request_id, news = self._process.request("stream", self._number, messages, tools)
        over = False
        try:
            while True:
                kind, value, arrived_s = self._next(news)
                if kind == "delta":
                    yield value
                elif kind == "first":
                    delta, llm_s = value
                    add_lane_wait_s(max(0.0, arrived_s - sent_s - llm_s))
                    yield delta
                else:
                    over = True
                    if kind == "end":
                        return
                    _raise(kind, value)
        finally:
            if over:
                self._process.done(request_id)
            else:
                self._process.cancel(request_id)

    def _whole(self, kind: str, messages: list[Message], tools: Sequence[ToolSpec]):
        sent_s = time.monotonic()
        request_id, news = self._process.request(kind, self._number, messages, tools)
        try:
            kind, value, arrived_s = self._next(news)
        except BaseException:
            self._process.cancel(request_id)
            raise
        self._process.done(request_id)
        if kind != "result":
            _raise(kind, value)
        result, llm_s = value
        add_lane_wait_s(max(0.0, arrived_s - sent_s - llm_s))
        return result

    def _next(self, news: gevent.queue.Queue) -> tuple:
        try:
            return news.get(timeout=self.timeout_s + HUNG_MARGIN_S)
        except gevent.queue.Empty:
            raise LlmProcessError(
                f"{self.provider}: the LLM process gave no news of the reply from {self.api_url}"
                f" within {self.timeout_s + HUNG_MARGIN_S:g} s"
            ) from None

    def close(self) -> None:
        """Nothing of its own to close: the LLM process is its owner's (the daemon's) to stop."""


def _raise(kind: str, value) -> None:
    if kind == "error":
        exc, timed_out_connecting = value
        if timed_out_connecting:
            # What the replicas' retry rule looks for in the cause, which did not cross the pipe.
            raise exc from urllib3.exceptions.ConnectTimeoutError("connect timed out (in the LLM process)")
        raise exc
    if kind == "bad_request":
        raise ValueError(value)
    if kind == "died":
        raise LlmProcessError(value)
    raise LlmProcessError(f"the LLM process failed the request: {value}")


def _ended(pid: int, code: int | None) -> str:
    return how_it_ended("LLM process", pid, code)


__all__ = ["LlmProcess", "LlmProcessError", "RemoteLlmClient"]
