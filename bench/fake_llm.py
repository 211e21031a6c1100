#!/usr/bin/env python
"""A local LLM server of known timing, in its own process, for the benchmarks.

OpenAI-compatible (SSE when asked to stream): the first token after --first-token-ms, then
--tokens-per-s (``inf``: all at once, each token still an event of its own: an instant LLM).
A non-streamed request answers after the whole reply's generation time, as a
real server would. Prints its chat-completions URL on stdout, then serves until killed.

--stamps PATH (a streamed reply): for each request, one JSON line there: the caller's last words
(``user``), and on the clock every process of the machine shares (time.monotonic) when this
server began on it (``in_s``) and when it had written the delta after which the daemon's
sentence splitter (FIRST_CHUNK=clause, its default) has the reply's first chunk (``first_s``).
Their difference is the LLM's own time to the first chunk, which a benchmark can take off the
time a turn waited instead of what the daemon counts as the LLM's (from its request to its
first sentence read, the daemon's own queueing for its loop included).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' faithful fake
sys.path.insert(0, str(ROOT))

from llm_fakes import FakeLlmServer, split_into_deltas  # noqa: E402

from ivr_daemon.sentences import FIRST_CLAUSE_MIN_WORDS, SentenceSplitter  # noqa: E402


class StampingLlmServer(FakeLlmServer):
    """The fake LLM, writing when it began each reply and had written its first chunk (see --stamps)."""

    def __init__(self, *args, stamps, **kwargs):
        super().__init__(*args, **kwargs)
        self._stamps = stamps
        splitter = SentenceSplitter(first_clause_min_words=FIRST_CLAUSE_MIN_WORDS)
        deltas = split_into_deltas(kwargs["replies"])
        # The stream's pieces: a role-only event, then one per delta (tests/llm_fakes.py).
        self._first_piece = 1 + next(index for index, delta in enumerate(deltas) if splitter.feed(delta))

    def _app(self, environ, start_response):
        in_s = time.monotonic()
        body = super()._app(environ, start_response)
        request = self.requests[-1] if self.requests else None
        messages = request.get("messages") if isinstance(request, dict) else None
        user = next((m.get("content") for m in reversed(messages or []) if m.get("role") == "user"), None)
        return self._stamped(body, user, in_s)

    def _stamped(self, body, user, in_s):
        # pywsgi asks for the next piece once it has written the last: the piece is on the wire.
        for index, piece in enumerate(body):
            yield piece
            if index == self._first_piece:
                self._stamps.write(json.dumps({"user": user, "in_s": in_s, "first_s": time.monotonic()}) + "\n")
                self._stamps.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reply", required=True)
    parser.add_argument("--first-token-ms", type=float, default=200.0)
    parser.add_argument("--tokens-per-s", type=float, default=30.0)
    parser.add_argument("--batch", action="store_true", help="answer non-streamed requests after the full generation time")
    parser.add_argument("--stamps", help="write when each reply began and had its first chunk written there (JSON lines)")
    args = parser.parse_args()
    first_s, gap_s = args.first_token_ms / 1000, 1 / args.tokens_per_s
    whole_s = first_s + len(split_into_deltas(args.reply)) * gap_s
    options = dict(replies=args.reply, stream_first_delay_s=first_s, stream_gap_s=gap_s,
                   delay_s=whole_s if args.batch else 0.0)
    if args.stamps:
        server = StampingLlmServer("openai", stamps=open(args.stamps, "a"), **options).start()
    else:
        server = FakeLlmServer("openai", **options).start()
    print(server.url, flush=True)
    gevent.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
