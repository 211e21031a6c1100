"""Tests for streamed LLM replies: fake Ollama (NDJSON) and OpenAI (SSE) servers on real sockets, and llama.cpp."""

from __future__ import annotations

import json
import time

import gevent
import gevent.event
import pytest
from structlog.testing import capture_logs

from ivr_daemon.llm import (
    CLIENT_CLASSES,
    Llama3Client,
    LlmBadReply,
    LlmTimeout,
    LlmUnavailable,
    OllamaClient,
    OpenAiClient,
)
from ivr_daemon.sentences import SentenceSplitter
from llm_fakes import FakeLlmServer, split_into_deltas

STREAMING = ("ollama", "openai")
SYSTEM = {"role": "system", "content": "You are a phone assistant."}
NEW_USER = {"role": "user", "content": "And on Sundays?"}
MESSAGES = [SYSTEM, {"role": "user", "content": "Hours?"}, {"role": "assistant", "content": "Nine to five."}, NEW_USER]
REPLY = "We are closed on Sundays. On Monday we open at nine, and we close at five."
LONG_REPLY = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen."


def client_for(provider: str, url: str, timeout_s: float = 5.0):
    return CLIENT_CLASSES[provider](url, "llama3", timeout_s)


def ollama_line(content: str, done: bool = False) -> str:
    return json.dumps({"model": "llama3", "created_at": "2024-05-01T12:00:00Z",
                       "message": {"role": "assistant", "content": content}, "done": done}, ensure_ascii=False) + "\n"


def openai_event(content: str | None, finish_reason: str | None = None, newline: str = "\n") -> str:
    delta = {} if content is None else {"content": content}
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1714560000, "model": "llama3",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(chunk)}{newline}{newline}"


def drain(stream) -> list[str]:
    return list(stream)


def test_the_fake_splits_a_reply_into_token_sized_deltas():
    assert split_into_deltas("Hi there, Dr. Who's 3.5!\n") == ["Hi", " there", ",", " Dr", ".", " Who's", " 3", ".",
                                                              "5", "!", "\n"]
    assert "".join(split_into_deltas(REPLY)) == REPLY


@pytest.mark.parametrize("provider", STREAMING)
def test_stream_yields_the_reply_in_deltas_and_asks_for_a_stream(provider):
    with FakeLlmServer(provider, replies=REPLY) as server:
        with client_for(provider, server.url) as client:
            deltas = drain(client.stream(MESSAGES))
    assert deltas == split_into_deltas(REPLY)
    assert server.requests == [{"model": "llama3", "messages": MESSAGES, "stream": True}]
    assert server.stream_outcomes == ["complete"]


@pytest.mark.parametrize("provider", STREAMING)
def test_stream_asks_for_the_streaming_content_type(provider):
    with FakeLlmServer(provider, replies=REPLY) as server:
        drain(client_for(provider, server.url).stream(MESSAGES))
    expected = "application/x-ndjson" if provider == "ollama" else "text/event-stream"
    assert server.headers[0]["accept"] == expected
    assert server.headers[0]["content-type"] == "application/json"


@pytest.mark.parametrize("provider", STREAMING)
def test_joined_deltas_are_what_complete_returns(provider):
    reply = "  \n Hello there.  How can I help?\n\n"
    with FakeLlmServer(provider, replies=reply) as server:
        client = client_for(provider, server.url)
        deltas = drain(client.stream(MESSAGES))
        whole = client.complete(MESSAGES)
    assert deltas[0] == "Hello"  # the leading whitespace is dropped, as complete() strips it
    assert "".join(deltas).strip() == whole == reply.strip()


@pytest.mark.parametrize("provider", STREAMING)
def test_the_first_delta_arrives_before_the_server_sends_the_second(provider):
    # The server stops after one delta until the test says so: a client that buffered the
    # reply could not hand out the first delta at all.
    with FakeLlmServer(provider, replies=REPLY, stream_hold_after=1) as server:
        stream = client_for(provider, server.url).stream(MESSAGES)
        first = next(stream)
        assert first == "We"
        assert server.deltas_sent == 1
        assert server.stream_outcomes == []  # still streaming
        server.release_stream.set()
        rest = drain(stream)
    assert [first, *rest] == split_into_deltas(REPLY)
    assert server.stream_outcomes == ["complete"]


@pytest.mark.parametrize("provider", STREAMING)
def test_a_completed_stream_leaves_its_connection_for_the_next_request(provider):
    with FakeLlmServer(provider, replies=["First reply.", "Second reply."]) as server:
        client = client_for(provider, server.url)
        assert "".join(client.stream(MESSAGES)) == "First reply."
        assert "".join(client.stream(MESSAGES)) == "Second reply."
    assert server.client_ports[0] == server.client_ports[1]


@pytest.mark.parametrize("provider", STREAMING)
def test_closing_the_stream_early_closes_the_connection_and_the_client_stays_usable(provider):
    with FakeLlmServer(provider, replies=[LONG_REPLY, "Next turn."], stream_hold_after=1) as server:
        client = client_for(provider, server.url)
        stream = client.stream(MESSAGES)
        assert next(stream) == "One"
        # The rest is held by the server until released below: a close() that read it first
        # would never return.
        with gevent.Timeout(10, AssertionError("close() waited for the rest of the reply")):
            stream.close()  # barge-in
        server.release_stream.set()
        # The server's next writes fail: it saw the client go away.
        assert server.client_disconnected.wait(timeout=5)
        assert server.stream_outcomes == ["client_closed"]
        assert server.deltas_sent < len(split_into_deltas(LONG_REPLY))
        assert drain(client.stream(MESSAGES)) == ["Next", " turn", "."]
    assert server.client_ports[1] != server.client_ports[0]  # a new connection, not the half-read one


@pytest.mark.parametrize("provider", STREAMING)
def test_a_killed_reader_closes_the_connection_and_the_client_stays_usable(provider):
    with FakeLlmServer(provider, replies=[LONG_REPLY, "Next turn."], stream_hold_after=1) as server:
        client = client_for(provider, server.url)
        first_delta = gevent.event.Event()

        def read_all():
            for _ in client.stream(MESSAGES):
                first_delta.set()

        reader = gevent.spawn(read_all)
        assert first_delta.wait(timeout=5)
        reader.kill(block=True, timeout=1)  # hangup while the reader waits for the next delta
        assert reader.dead
        server.release_stream.set()
        assert server.client_disconnected.wait(timeout=5)
        assert "".join(client.stream(MESSAGES)) == "Next turn."


@pytest.mark.parametrize("provider", STREAMING)
def test_no_first_delta_within_the_timeout_is_a_timeout(provider):
    # The server holds everything, headers included, until the test lets it go: only the
    # client's own bound can end the wait, and the error names that bound.
    with FakeLlmServer(provider, hold_reply=True) as server:
        client = client_for(provider, server.url, timeout_s=0.5)
        with gevent.Timeout(10, AssertionError("the client waited for the held reply")):
            with pytest.raises(LlmTimeout, match="no reply from .* within 0.5 s"):
                drain(client.stream(MESSAGES))
        assert len(server.requests) == 1 and server.deltas_sent == 0
        server.release_reply.set()


@pytest.mark.parametrize("provider", STREAMING)
def test_a_stream_that_stalls_after_some_text_times_out(provider):
    with FakeLlmServer(provider, replies=REPLY, stream_hold_after=2) as server:
        stream = client_for(provider, server.url, timeout_s=0.5).stream(MESSAGES)
        assert [next(stream), next(stream)] == ["We", " are"]
        # The server holds the rest until released, which never happens here.
        with gevent.Timeout(10, AssertionError("the client waited for the held rest of the stream")):
            with pytest.raises(LlmTimeout, match=r"stalled for 0.5 s after 6 chars"):
                next(stream)
        assert server.deltas_sent == 2 and server.stream_outcomes == []


@pytest.mark.parametrize("provider", STREAMING)
def test_a_trickling_stream_that_never_completes_a_delta_times_out(provider):
    # Each byte comes well inside the socket read timeout; only the per-delta deadline stops it.
    # The first chunk alone takes over 5 s to trickle: the client gave up before it was whole.
    with FakeLlmServer(provider, replies=REPLY, trickle_s=0.05) as server:
        client = client_for(provider, server.url, timeout_s=0.6)
        with pytest.raises(LlmTimeout, match="0.6 s"):
            drain(client.stream(MESSAGES))
        assert server.deltas_sent == 0


@pytest.mark.parametrize("provider", STREAMING)
def test_the_timeout_bounds_each_gap_not_the_whole_stream(provider):
    # 13 gaps of 0.1 s: the stream outlasts the 1 s timeout, each gap stays far inside it.
    reply = "One two three four five six seven eight nine ten eleven twelve."
    with FakeLlmServer(provider, replies=reply, stream_gap_s=0.1) as server:
        client = client_for(provider, server.url, timeout_s=1.0)
        started_s = time.monotonic()
        assert "".join(client.stream(MESSAGES)) == reply
        assert time.monotonic() - started_s > 1.0  # the test's premise: longer than the timeout


def test_time_the_caller_spends_between_deltas_does_not_count():
    # Synthesizing sentence 1 may take longer than timeout_s while the rest waits in the socket.
    with FakeLlmServer("ollama", replies=REPLY) as server:
        stream = OllamaClient(server.url, "m", timeout_s=0.3).stream(MESSAGES)
        deltas = [next(stream)]
        gevent.sleep(0.6)
        deltas += drain(stream)
    assert "".join(deltas) == REPLY


@pytest.mark.parametrize("provider", STREAMING)
def test_a_stream_that_breaks_off_is_unavailable_after_its_first_deltas(provider):
    with FakeLlmServer(provider, replies=REPLY, stream_break_after=3) as server:
        received = []
        with pytest.raises(LlmUnavailable, match="broke off after 13 chars"):
            for delta in client_for(provider, server.url).stream(MESSAGES):
                received.append(delta)
    assert received == ["We", " are", " closed"]
    assert server.stream_outcomes == ["broken"]


@pytest.mark.parametrize("provider", STREAMING)
def test_a_stream_that_breaks_off_before_any_text_is_unavailable(provider):
    # Ollama's first chunk is text, so there the connection drops before the headers.
    with FakeLlmServer(provider, replies=REPLY, stream_break_after=0) as server:
        with pytest.raises(LlmUnavailable, match="broke off after 0 chars" if provider == "openai" else "cannot reach"):
            drain(client_for(provider, server.url).stream(MESSAGES))


@pytest.mark.parametrize("provider", STREAMING)
@pytest.mark.parametrize("reply", ["", "  \n "])
def test_a_stream_without_text_is_a_bad_reply(provider, reply):
    with FakeLlmServer(provider, replies=reply) as server:
        with pytest.raises(LlmBadReply, match="carried no text"):
            drain(client_for(provider, server.url).stream(MESSAGES))


@pytest.mark.parametrize("provider, body", [
    ("ollama", [ollama_line("We are")]),
    ("openai", [openai_event("We are")]),
])
def test_a_stream_that_ends_without_its_end_marker_is_a_bad_reply(provider, body):
    with FakeLlmServer(provider, stream_body=body) as server:
        received = []
        with pytest.raises(LlmBadReply, match="ended without its end marker after 6 chars"):
            for delta in client_for(provider, server.url).stream(MESSAGES):
                received.append(delta)
    assert received == ["We are"]


@pytest.mark.parametrize("provider, body", [
    # Ollama reports a failure after the stream started as a line of its own.
    ("ollama", [ollama_line("We"), '{"error":"an error was encountered while running the model"}\n']),
    ("openai", [openai_event("We"), 'data: {"error": {"message": "an error was encountered while running the model",'
                                    ' "type": "server_error"}}\n\n']),
])
def test_an_error_in_the_stream_is_a_bad_reply_with_the_servers_message(provider, body):
    with FakeLlmServer(provider, stream_body=body) as server:
        stream = client_for(provider, server.url).stream(MESSAGES)
        assert next(stream) == "We"
        with pytest.raises(LlmBadReply, match="server error in the stream: an error was encountered"):
            next(stream)


@pytest.mark.parametrize("provider, body", [
    ("ollama", [ollama_line("We"), '{"message": {"content": "cut\n']),
    ("openai", [openai_event("We"), "data: {not json}\n\n"]),
    ("ollama", [ollama_line("We"), '{"model": "llama3", "response": "the generate API shape", "done": false}\n']),
    ("openai", [openai_event("We"), 'data: {"choices": [{"index": 0, "delta": {"content": 42}}]}\n\n']),
    ("openai", [openai_event("We"), 'data: {"object": "chat.completion.chunk"}\n\n']),
    ("ollama", [ollama_line("We"), "[1, 2]\n"]),
])
def test_a_malformed_event_is_a_bad_reply(provider, body):
    with FakeLlmServer(provider, stream_body=body) as server:
        stream = client_for(provider, server.url).stream(MESSAGES)
        assert next(stream) == "We"
        with pytest.raises(LlmBadReply):
            next(stream)


def test_sse_comments_crlf_lines_and_multi_line_data_are_understood():
    # llama_cpp.server sends ": ping" comments; sse-starlette may end lines with CRLF; an
    # event's data may span several "data:" lines, joined with a newline (here inside JSON).
    body = [
        ": ping - 2024-05-01 12:00:00\r\n\r\n",
        openai_event("Hello", newline="\r\n"),
        'data: {"choices": [{"index": 0,\r\ndata: "delta": {"content": " there."}, "finish_reason": null}]}\r\n\r\n',
        "event: message\nid: 7\nretry: 1000\n" + openai_event(None, "stop"),
        "data: [DONE]\n\n",
    ]
    with FakeLlmServer("openai", stream_body=body) as server:
        assert drain(OpenAiClient(server.url, "m", 5).stream(MESSAGES)) == ["Hello", " there."]


def test_a_finish_reason_without_done_ends_the_openai_stream():
    # Older llama.cpp servers end the body after the finish_reason chunk, with no [DONE].
    body = [openai_event("Hello."), openai_event(None, "stop")]
    with FakeLlmServer("openai", stream_body=body) as server:
        assert drain(OpenAiClient(server.url, "m", 5).stream(MESSAGES)) == ["Hello."]


def test_an_openai_usage_chunk_with_no_choices_is_skipped():
    usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
             "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    body = [openai_event("Hi."), f"data: {json.dumps(usage)}\n\n", openai_event(None, "stop"), "data: [DONE]\n\n"]
    with FakeLlmServer("openai", stream_body=body) as server:
        assert drain(OpenAiClient(server.url, "m", 5).stream(MESSAGES)) == ["Hi."]


def test_an_ollama_done_line_may_carry_the_last_text():
    body = [ollama_line("We are"), ollama_line(" closed.", done=True)]
    with FakeLlmServer("ollama", stream_body=body) as server:
        assert drain(OllamaClient(server.url, "m", 5).stream(MESSAGES)) == ["We are", " closed."]


def test_deltas_split_inside_a_multibyte_character_and_line_are_reassembled():
    line = ollama_line("Grüße, ça va? ") + ollama_line("Très bien.", done=True)
    raw = line.encode()
    cut = raw.index("ü".encode()) + 1  # inside the two bytes of ü
    with FakeLlmServer("ollama", stream_body=[raw[:cut], raw[cut:]]) as server:
        assert drain(OllamaClient(server.url, "m", 5).stream(MESSAGES)) == ["Grüße, ça va? ", "Très bien."]


def test_an_openai_server_ignoring_stream_true_still_gives_the_reply():
    whole = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1714560000, "model": "m",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": " Hi there. "},
                          "finish_reason": "stop"}]}
    with FakeLlmServer("openai", body=whole) as server:
        assert drain(OpenAiClient(server.url, "m", 5).stream(MESSAGES)) == ["Hi there."]


def test_an_error_object_instead_of_a_stream_is_a_bad_reply_with_its_message():
    with FakeLlmServer("openai", body={"error": {"message": "model is loading", "type": "server_error"}}) as server:
        with pytest.raises(LlmBadReply, match="model is loading"):
            drain(OpenAiClient(server.url, "m", 5).stream(MESSAGES))


@pytest.mark.parametrize("provider", STREAMING)
def test_http_error_before_the_stream_is_unavailable_with_status(provider):
    with FakeLlmServer(provider, status=503) as server:
        with pytest.raises(LlmUnavailable, match="HTTP 503.*fake failure") as caught:
            drain(client_for(provider, server.url).stream(MESSAGES))
    assert caught.value.status == 503


@pytest.mark.parametrize("provider", ("ollama", "openai", "llama3"))
def test_connection_refused_is_unavailable(provider, refusing_url):
    with pytest.raises(LlmUnavailable, match="cannot reach"):
        drain(client_for(provider, refusing_url).stream(MESSAGES))


def test_a_callers_own_gevent_timeout_is_not_swallowed():
    with FakeLlmServer("ollama", stream_first_delay_s=5) as server:
        client = OllamaClient(server.url, "m", timeout_s=10)
        outer = gevent.Timeout(0.3)
        with pytest.raises(gevent.Timeout) as caught:
            with outer:
                drain(client.stream(MESSAGES))
        assert caught.value is outer


def test_llama3_streams_its_whole_reply_as_one_delta():
    with FakeLlmServer("llama3", replies="  We are closed on Sundays. See you Monday.\n") as server:
        deltas = drain(Llama3Client(server.url, "llama3", 5).stream(MESSAGES))
    assert deltas == ["We are closed on Sundays. See you Monday."]
    assert server.requests == [{
        "system_prompt": SYSTEM["content"],
        "conversation_history": MESSAGES[1:-1],
        "user_message": NEW_USER["content"],
    }]


def test_llama3_stream_failures_are_llm_errors():
    with FakeLlmServer("llama3", status=500) as server:
        with pytest.raises(LlmUnavailable):
            drain(Llama3Client(server.url, "llama3", 5).stream(MESSAGES))


@pytest.mark.parametrize("provider", ("ollama", "openai", "llama3"))
def test_nothing_is_sent_before_the_first_next_and_bad_messages_are_a_caller_bug(provider):
    with FakeLlmServer(provider) as server:
        stream = client_for(provider, server.url).stream([])
        assert server.requests == []
        with pytest.raises(ValueError):
            next(stream)
    assert server.requests == []


def test_each_stream_is_logged_at_debug_without_the_conversation():
    with FakeLlmServer("openai", replies="Secret answer.") as server:
        with capture_logs() as logs:
            drain(OpenAiClient(server.url, "m", 5).stream(MESSAGES))
    with FakeLlmServer("openai", replies=LONG_REPLY) as server:
        with capture_logs() as closed_logs:
            stream = OpenAiClient(server.url, "m", 5).stream(MESSAGES)
            next(stream)
            stream.close()
    [ok] = [entry for entry in logs if entry["event"] == "llm_stream"]
    assert ok["log_level"] == "debug"
    assert (ok["provider"], ok["outcome"], ok["status"], ok["chars"]) == ("openai", "ok", 200, len("Secret answer."))
    assert 0 <= ok["first_delta_ms"] <= ok["elapsed_ms"]
    assert "Secret" not in repr(logs) and "Sundays" not in repr(logs)
    [closed] = [entry for entry in closed_logs if entry["event"] == "llm_stream"]
    assert closed["outcome"] == "abandoned"


def test_sentences_can_be_spoken_while_the_reply_is_still_streaming():
    # The point of streaming: sentence 1 is ready while the server has not sent sentence 2.
    reply = "We are closed on Sundays. On Monday we open at nine."
    hold_after = len(split_into_deltas("We are closed on Sundays. On"))
    with FakeLlmServer("ollama", replies=reply, stream_hold_after=hold_after) as server:
        splitter = SentenceSplitter()
        stream = OllamaClient(server.url, "m", 5).stream(MESSAGES)
        first_sentences = []
        while not first_sentences:
            first_sentences = splitter.feed(next(stream))
        assert first_sentences == ["We are closed on Sundays."]
        server.release_stream.set()
        rest = []
        for delta in stream:
            rest += splitter.feed(delta)
        rest += splitter.flush()
    assert rest == ["On Monday we open at nine."]


def test_llama_cpp_server_streams_sse_deltas(llama_server):
    client = OpenAiClient(llama_server.chat_completions_url, "smollm2", timeout_s=60)
    messages = [
        {"role": "system", "content": "You are a friendly phone assistant. Answer in two short sentences."},
        {"role": "user", "content": "Hello, what are your opening hours?"},
    ]
    deltas = drain(client.stream(messages))
    assert len(deltas) > 1
    text = "".join(deltas)
    assert text.strip() and text == text.lstrip()
    assert "<|im_" not in text

    # Barge-in after the first sentence, then the next turn on the same client.
    splitter = SentenceSplitter()
    stream = client.stream(messages)
    first_sentences = []
    for delta in stream:
        first_sentences = splitter.feed(delta)
        if first_sentences:
            break
    stream.close()
    assert first_sentences or splitter.flush()
    assert "".join(client.stream(messages)).strip()


@pytest.mark.parametrize("provider, body", [
    ("ollama", [ollama_line("We are")]),
    ("openai", [openai_event("We are")]),
])
def test_after_a_stream_that_ended_without_its_end_marker_the_next_request_gets_a_new_connection(provider, body):
    # The body ended cleanly at the HTTP level, so urllib3 pools the connection; but a server
    # that broke its reply (llama_cpp.server failing a streamed tool call does this) may close
    # it a moment later, and the next turn would be sent into a reset connection.
    with FakeLlmServer(provider, stream_body=body) as server:
        client = client_for(provider, server.url)
        with pytest.raises(LlmBadReply, match="ended without its end marker"):
            drain(client.stream(MESSAGES))
        with pytest.raises(LlmBadReply, match="ended without its end marker"):
            drain(client.stream(MESSAGES))
    assert server.client_ports[0] != server.client_ports[1]


# -- how the body is framed: HTTP chunks of any size, a Content-Length, or up to the close ------

class RawHttpServer:
    """Answers each request on a connection with the next of ``responses`` (exact bytes, its
    head included), then closes; ``ports`` records the client's source port per request."""

    def __init__(self, responses: list[bytes]):
        from gevent.server import StreamServer

        self.responses = list(responses)
        self.ports: list[int] = []
        self._server = StreamServer(("127.0.0.1", 0), self._serve)

    def __enter__(self) -> "RawHttpServer":
        self._server.start()
        self.url = f"http://127.0.0.1:{self._server.server_port}/v1/chat/completions"
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.stop(timeout=1)

    def _serve(self, conn, address) -> None:
        received = b""
        while self.responses:
            while b"\r\n\r\n" not in received:
                data = conn.recv(65536)
                if not data:
                    return
                received += data
            head, _, received = received.partition(b"\r\n\r\n")
            length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), b"0"))
            while len(received) < length:
                received += conn.recv(65536)
            received = received[length:]
            self.ports.append(address[1])
            conn.sendall(self.responses.pop(0))
        conn.close()


def sse_reply(*deltas: str) -> bytes:
    return "".join([*(openai_event(delta) for delta in deltas), openai_event(None, "stop"), "data: [DONE]\n\n"]).encode()


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


def test_a_stream_with_a_content_length_is_read_and_its_connection_kept():
    # A proxy that buffers the reply sends it with a length, not in chunks.
    body = sse_reply("Nine", " to five.")
    reply = SSE_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
    with RawHttpServer([reply, reply]) as server:
        client = OpenAiClient(server.url, "m", 5)
        assert drain(client.stream(MESSAGES)) == ["Nine", " to five."]
        assert drain(client.stream(MESSAGES)) == ["Nine", " to five."]
    assert server.ports[0] == server.ports[1]


def test_a_stream_that_ends_with_the_connection_is_read():
    body = sse_reply("Closed", " on Sundays.")
    with RawHttpServer([SSE_HEAD + b"Connection: close\r\n\r\n" + body]) as server:
        assert drain(OpenAiClient(server.url, "m", 5).stream(MESSAGES)) == ["Closed", " on Sundays."]


def test_events_in_chunks_of_any_size_are_read_and_the_connection_kept():
    # One HTTP chunk larger than a read, carrying several events and a comment line longer than
    # a read; then events cut across chunks inside a line and inside its CRLF.
    first = (b": " + b"p" * 20_000 + b"\r\n\r\n" + openai_event("We").encode() + openai_event(" open").encode())
    rest = (openai_event(" at nine.", newline="\r\n") + openai_event(None, "stop") + "data: [DONE]\n\n").encode()
    cut_in_line, cut_in_crlf = 10, rest.index(b"\r\n") + 1
    chunks = [first, rest[:cut_in_line], rest[cut_in_line:cut_in_crlf], rest[cut_in_crlf:]]
    reply = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(map(http_chunk, chunks)) + b"0\r\n\r\n"
    with RawHttpServer([reply, reply]) as server:
        client = OpenAiClient(server.url, "m", 5)
        assert drain(client.stream(MESSAGES)) == ["We", " open", " at nine."]
        assert drain(client.stream(MESSAGES)) == ["We", " open", " at nine."]
    assert server.ports[0] == server.ports[1]


def test_a_chunk_announcing_more_than_any_line_may_hold_is_refused_without_reading_it_all():
    # A hostile or broken server: a 2 GB chunk that is one endless line. The client reads a
    # bounded piece at a time and gives up at the longest line it accepts.
    endless = b"data: " + b"a" * (2 << 20)
    reply = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"7fffffff\r\n" + endless
    with RawHttpServer([reply]) as server:
        with pytest.raises(LlmBadReply, match="stream line longer than"):
            drain(OpenAiClient(server.url, "m", 5).stream(MESSAGES))


def test_a_broken_chunk_size_is_an_unavailable_server_not_a_crash():
    reply = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + http_chunk(openai_event("We").encode()) + b"zz\r\n"
    with RawHttpServer([reply]) as server:
        stream = OpenAiClient(server.url, "m", 5).stream(MESSAGES)
        assert next(stream) == "We"
        with pytest.raises(LlmUnavailable, match="broke off after 2 chars"):
            next(stream)
