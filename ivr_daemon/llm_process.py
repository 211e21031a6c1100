"""The LLM process: the daemon's LLM requests and streamed replies, served in a child process.

Started by :class:`ivr_daemon.llm.remote.LlmProcess` as ``python -m ivr_daemon.llm_process``
(``LLM_PROCESS=true``, the default). On the daemon's gevent loop an LLM turn cost ~0.6 ms of CPU
for its POST (requests' and urllib3's Python work, the connection) and ~85 us for every token
read as it landed (a wake-up, urllib3's chunk read, the SSE framing, the JSON): most of the
loop's CPU a turn (docs/performance.md, "A burst turn, hop by hop" and "Where a call's CPU
goes"). Here that work has a core and a GIL of its own, and the daemon's loop reads whole
batches of deltas, many streams' at once, from one pipe.

It lives beside the ``llm`` package, not in it: running ``-m ivr_daemon.llm.process`` would
import the package (requests, urllib3, ssl) before this module could monkey-patch them.

The protocol is pickled, length-prefixed frames (``ivr_daemon.child_pipes``). stdin: first
``{"log_level", "log_format"}``, then requests:

* ``("client", number, spec)``: build client ``number`` (``spec``: provider, api_url, model,
  timeout_s, api_key, max_tokens: one URL, a plain provider client, replicas are the daemon's;
  and sentence_chunks: None, or (first_clause_min_words, batch_s): its streams' deltas are then
  sentence-sized, see ``_Server._stream``);
* ``("stream" | "respond" | "complete", request_id, client_number, messages, tools)``;
* ``("cancel", request_id)``: the caller abandoned it (barge-in, a hangup): its stream is closed.

The replies go to the file descriptor stdout had at start (stdout itself is pointed at stderr,
so a library's stray print cannot corrupt them): first ``("ready", pid)``, then frames that are
each a *list* of ``(request_id, kind, value)``, every request's news since the last frame:
``("first", (delta, llm_s))`` the first text delta or tool call, with the LLM's time to it
(from the request's start here, less any wait in this process's idle lane); ``("delta",
delta)``; ``("end", None)``; ``("result", (result, llm_s))`` for respond/complete; ``("error",
(LlmError, connect_timed_out))``; ``("bad_request", message)`` (the caller's ValueError);
``("failed", "Type: message")`` (a bug here; its traceback is logged).

The process ends when stdin closes: the daemon closed it, or died however it died. SIGINT and
SIGTERM are ignored: systemd's stop and a terminal's Ctrl-C reach the whole process group, and
the daemon, which lets the turns in flight finish first, decides when this process goes.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from ivr_daemon.child_pipes import CooperativeConnection  # noqa: E402
from ivr_daemon.idle_lane import idle_lane  # noqa: E402
from ivr_daemon.llm import CLIENT_CLASSES, LlmError, ToolCall  # noqa: E402
from ivr_daemon.llm.paced import BatchedReads, lane_wait_s  # noqa: E402
from ivr_daemon.llm.replicas import timed_out_connecting  # noqa: E402
from ivr_daemon.logs import configure_logging, get_logger  # noqa: E402
from ivr_daemon.sentences import SentenceSplitter  # noqa: E402


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.set_blocking(0, False)
    replies_fd = os.dup(1)
    os.dup2(2, 1)
    os.set_blocking(replies_fd, False)
    requests = CooperativeConnection(0, writable=False)
    replies = CooperativeConnection(replies_fd, readable=False)
    try:
        spec = requests.recv()
    except (EOFError, OSError):
        return 0
    if not isinstance(spec, dict):
        return 2  # not started by the daemon

    configure_logging(spec["log_level"], spec["log_format"])
    server = _Server(replies)
    replies.send(("ready", os.getpid()))
    try:
        while True:
            server.take(requests.recv())
    except (EOFError, OSError):
        pass
    # The daemon closed the pipe or is gone: nobody is left to read an answer.
    return 0


class _Server:
    """The clients, the requests in flight (a greenlet each), and the one writer of the replies."""

    def __init__(self, replies):
        self._replies = replies
        self._clients: dict = {}
        self._running: dict[int, gevent.Greenlet] = {}
        self._outbox: list[tuple] = []
        self._news = gevent.event.Event()
        self.log = get_logger("ivr_daemon.llm_process").bind(llm_process_pid=os.getpid())
        gevent.spawn(self._write_replies)

    def take(self, request) -> None:
        try:
            kind = request[0]
            if kind == "client":
                self._add_client(*request[1:])
            elif kind in ("stream", "respond", "complete"):
                request_id = request[1]
                self._running[request_id] = gevent.spawn(self._serve, kind, *request[1:])
            elif kind == "cancel":
                running = self._running.pop(request[1], None)
                if running is not None:
                    running.kill(block=False)  # the stream's own finally closes its response
            else:
                raise ValueError(f"unknown request {kind!r}")
        except Exception:
            self.log.exception("llm_process_bad_request", request=repr(request)[:200])

    def _add_client(self, number: int, spec: dict) -> None:
        old = self._clients.pop(number, None)
        if old is not None:
            old[0].close()
        client = CLIENT_CLASSES[spec["provider"]](
            api_url=spec["api_url"], model=spec["model"], timeout_s=spec["timeout_s"],
            api_key=spec["api_key"], max_tokens=spec["max_tokens"])
        self._clients[number] = (client, spec["sentence_chunks"])

    def _put(self, request_id: int, kind: str, value) -> None:
        self._outbox.append((request_id, kind, value))
        self._news.set()

    def _write_replies(self) -> None:
        """Whatever news there is, in one frame: while a frame is written, the next one gathers."""
        while True:
            self._news.wait()
            self._news.clear()
            frame, self._outbox = self._outbox, []
            try:
                self._replies.send(frame)
            except (EOFError, OSError):
                os._exit(0)  # the daemon is gone
            except Exception:
                # A value that does not pickle (a bug): its requests hear of it, the rest goes on.
                self.log.exception("llm_process_reply_failed")
                for request_id, _, _ in frame:
                    self._put(request_id, "failed", "a reply could not be sent to the daemon")

    def _serve(self, kind: str, request_id: int, client_number: int, messages, tools=()) -> None:
        started_s = time.monotonic()
        try:
            client, chunking = self._clients[client_number]
            if kind == "stream":
                self._stream(request_id, client, messages, tools, chunking, started_s)
            else:
                result = client.respond(messages, tools) if kind == "respond" else client.complete(messages)
                self._put(request_id, "result", (result, time.monotonic() - started_s - lane_wait_s()))
        except LlmError as exc:
            # Its cause does not cross the pipe: whether a connect timed out (a replica set
            # retries that) is said beside it.
            self._put(request_id, "error", (exc, timed_out_connecting(exc)))
        except ValueError as exc:
            self._put(request_id, "bad_request", str(exc))
        except Exception as exc:
            self.log.exception("llm_process_request_failed", request=kind)
            self._put(request_id, "failed", f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            self._running.pop(request_id, None)

    def _stream(self, request_id: int, client, messages, tools, chunking, started_s: float) -> None:
        """The reply's deltas; with ``chunking`` (first_clause_min_words, batch_s) as sentence-sized
        deltas, each ending where the daemon's SentenceSplitter cuts a chunk, and after the first
        one read in batches from this process's idle lane, as the daemon read it itself."""
        deltas = client.stream(messages, tools) if tools else client.stream(messages)
        first = True

        def send(delta) -> None:
            nonlocal first
            if first:
                first = False
                self._put(request_id, "first", (delta, time.monotonic() - started_s - lane_wait_s()))
            else:
                self._put(request_id, "delta", delta)

        try:
            if chunking is None:
                for delta in deltas:
                    send(delta)
            else:
                first_clause_min_words, batch_s = chunking
                # The daemon's splitter, fed the same text, cuts at the same places: what it
                # decides depends on the text so far, not on how it came in deltas.
                splitter = SentenceSplitter(first_clause_min_words=first_clause_min_words)
                reads = BatchedReads(deltas, batch_s)
                held: list[str] = []
                for delta in reads:
                    if isinstance(delta, ToolCall):
                        if held:
                            send("".join(held))
                            held.clear()
                        send(delta)
                        continue
                    held.append(delta)
                    if splitter.feed(delta):
                        send("".join(held))
                        held.clear()
                        # The rest is needed once this chunk has played: read after every other
                        # request's and first chunk's work, and in batches.
                        reads.batch_from_now()
                        idle_lane().wait()
                if held:
                    send("".join(held))
        finally:
            deltas.close()
        self._put(request_id, "end", None)


if __name__ == "__main__":
    sys.exit(main())
