#!/usr/bin/env python
"""A local LLM server of known timing, in its own process, for the benchmarks.

OpenAI-compatible (SSE when asked to stream): the first token after --first-token-ms, then
--tokens-per-s. A non-streamed request answers after the whole reply's generation time, as a
real server would. Prints its chat-completions URL on stdout, then serves until killed.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' faithful fake

from llm_fakes import FakeLlmServer, split_into_deltas  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reply", required=True)
    parser.add_argument("--first-token-ms", type=float, default=200.0)
    parser.add_argument("--tokens-per-s", type=float, default=30.0)
    parser.add_argument("--batch", action="store_true", help="answer non-streamed requests after the full generation time")
    args = parser.parse_args()
    first_s, gap_s = args.first_token_ms / 1000, 1 / args.tokens_per_s
    whole_s = first_s + len(split_into_deltas(args.reply)) * gap_s
    server = FakeLlmServer("openai", replies=args.reply, stream_first_delay_s=first_s, stream_gap_s=gap_s,
                           delay_s=whole_s if args.batch else 0.0).start()
    print(server.url, flush=True)
    gevent.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
