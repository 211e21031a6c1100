#!/usr/bin/env python
"""A local LLM server of known timing, in its own process, for the benchmarks.

OpenAI-compatible (SSE when asked to stream): the first token after --first-token-ms, then
--tokens-per-s. A non-streamed request answers after the whole reply's generation time, as a
real server would. Prints its chat-completions URL on stdout, then serves until killed.

``--first-token-ms 0 --tokens-per-s inf`` is an instant LLM (:class:`InstantLlmServer`): each
streamed reply's events, the same as the others', written at once.

--stamps PATH (the instant LLM only): for each reply, one JSON line there: the caller's last
words (``user``), and on the clock every process of the machine shares (time.monotonic) when
this server had read the request (``in_s``) and when it had written the reply (``first_s``:
its first chunk went with the rest). Their difference is the LLM's own time, which a
benchmark can take off the time a turn waited instead of what the daemon counts as the LLM's
(from its request to its first sentence read, the daemon's own queueing for its loop included).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.server  # noqa: E402
import h11  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' faithful fake

from llm_fakes import PROVIDER_PATHS, FakeLlmServer, FakeReply, stream_chunks, split_into_deltas  # noqa: E402


class InstantLlmServer:
    """An instant OpenAI-compatible LLM: each streamed reply written at once, in one send.

    FakeLlmServer (pywsgi) costs ~1 ms of CPU a streamed reply: the WSGI environ, the JSON of
    every event, a send and a trip round its loop for each of the reply's ~35 events. In a
    burst of 200 turns on this 2-core box that made the fake LLM, not the daemon, what the last
    callers waited for: 200 ms of CPU before its last reply, on a core the daemon and the
    simulators share. Here the request goes through h11 (as a server would read it), and the
    reply is what FakeLlmServer sends, event for event, each SSE event an HTTP chunk of its own,
    the JSON of the events rendered once per model (one completion id for all). Streamed
    requests only; anything else gets a 400. Kept-alive connections, as HTTP/1.1 has them.
    """

    def __init__(self, reply: str, stamps=None):
        self._reply = FakeReply(reply)
        self._stamps = stamps
        self._events: dict[str, list[bytes]] = {}  # per model
        self._server = gevent.server.StreamServer(("127.0.0.1", 0), self._serve, backlog=2048)

    def start(self) -> "InstantLlmServer":
        self._server.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{PROVIDER_PATHS['openai']}"

    def _serve(self, sock, _address) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as FakeLlmServer and real servers do
        connection = h11.Connection(h11.SERVER)
        request, body = None, b""
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError:
                return  # not HTTP: the connection closes
            if event is h11.NEED_DATA:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return  # reset: a client that abandoned a reply (a barge-in) closes so
                connection.receive_data(data)
                if not data:
                    return
            elif isinstance(event, h11.Request):
                request, body, in_s = event, b"", time.monotonic()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                answer, user = self._answer(connection, request, body)
                try:
                    sock.sendall(answer)
                except OSError:
                    return
                if self._stamps is not None and user is not None:
                    # Written at once: the first chunk went when the rest did.
                    self._stamps.write(json.dumps({"user": user, "in_s": in_s, "first_s": time.monotonic()}) + "\n")
                    self._stamps.flush()
                if connection.our_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
            else:  # ConnectionClosed
                return

    def _answer(self, connection: h11.Connection, request: h11.Request, body: bytes) -> tuple[bytes, str | None]:
        """The bytes of the answer to ``request`` and the caller's last words (None: refused)."""
        try:
            payload = json.loads(body)
            model, messages = payload["model"], payload["messages"]
            user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
            if payload.get("stream") is not True or request.target != PROVIDER_PATHS["openai"].encode():
                raise ValueError("not a streamed chat completion")
        except (ValueError, KeyError, TypeError, AttributeError):
            error = json.dumps({"error": {"message": "a streamed chat completion only"}}).encode()
            return (connection.send(h11.Response(status_code=400, headers=[("Content-Type", "application/json"),
                                                                           ("Content-Length", str(len(error)))]))
                    + connection.send(h11.Data(data=error)) + connection.send(h11.EndOfMessage())), None
        events = self._events.get(model)
        if events is None:
            events = self._events[model] = [chunk for chunk, _ in stream_chunks("openai", payload, self._reply, 0)]
        out = [connection.send(h11.Response(status_code=200, headers=[
            ("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
            ("Transfer-Encoding", "chunked")]))]
        out += [connection.send(h11.Data(data=event)) for event in events]
        out.append(connection.send(h11.EndOfMessage()))
        return b"".join(out), user


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reply", required=True)
    parser.add_argument("--first-token-ms", type=float, default=200.0)
    parser.add_argument("--tokens-per-s", type=float, default=30.0)
    parser.add_argument("--batch", action="store_true", help="answer non-streamed requests after the full generation time")
    parser.add_argument("--stamps", help="the instant LLM: write when it read each request and wrote its reply there (JSON lines)")
    args = parser.parse_args()
    instant = args.first_token_ms == 0 and args.tokens_per_s == math.inf and not args.batch
    if args.stamps and not instant:
        parser.error("--stamps is for the instant LLM (--first-token-ms 0 --tokens-per-s inf) only")
    if instant:
        server = InstantLlmServer(args.reply, open(args.stamps, "a") if args.stamps else None).start()
    else:
        first_s, gap_s = args.first_token_ms / 1000, 1 / args.tokens_per_s
        whole_s = first_s + len(split_into_deltas(args.reply)) * gap_s
        server = FakeLlmServer("openai", replies=args.reply, stream_first_delay_s=first_s, stream_gap_s=gap_s,
                               delay_s=whole_s if args.batch else 0.0).start()
    print(server.url, flush=True)
    gevent.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
