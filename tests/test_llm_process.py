"""The LLM process (LLM_PROCESS=true): the provider clients' requests served by a child process.

Every test talks to a real fake LLM server over TCP (tests/llm_fakes.py) through a real child
(``python -m ivr_daemon.llm_process``): the results and errors must be the in-process
client's, a stream abandoned must close its connection, and a child that dies must cost only
the requests it had.
"""

from __future__ import annotations

import os
import signal
import time

import gevent
import pytest
from structlog.testing import capture_logs

from ivr_daemon.llm import (
    CLIENT_CLASSES, LlmBadReply, LlmTimeout, LlmUnavailable, ReplicaSet, ToolCall, ToolSpec, make_llm_client,
)
from ivr_daemon.llm.paced import lane_wait_s
from ivr_daemon.llm.remote import LlmProcess, LlmProcessError, RemoteLlmClient
from ivr_daemon.sentences import FIRST_CLAUSE_MIN_WORDS, SentenceSplitter
from harness import TurnLog, broadcasts, running_daemon, settings_for, wait_until
from ivr_daemon.replay.simulator import FreeswitchSimulator
from llm_fakes import FakeLlmServer, FakeReply, FakeToolCall, split_into_deltas

MESSAGES = [{"role": "system", "content": "You are a phone assistant."}, {"role": "user", "content": "Hours?"}]
REPLY = "We open at nine. We close at five, on weekdays."
TRANSFER = ToolSpec("transfer_call", "Put the caller through.",
                    {"type": "object", "properties": {"target": {"type": "string"}}, "required": ["target"]})


@pytest.fixture
def process():
    llm_process = LlmProcess(log_level="WARNING", log_format="console")
    try:
        yield llm_process
    finally:
        llm_process.close()


def remote(process: LlmProcess, provider: str, url: str, timeout_s: float = 5.0) -> RemoteLlmClient:
    return process.client(CLIENT_CLASSES[provider], api_url=url, model="llama3", timeout_s=timeout_s)


def local(provider: str, url: str, timeout_s: float = 5.0):
    return CLIENT_CLASSES[provider](url, "llama3", timeout_s)


@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_a_stream_through_the_process_is_the_in_process_clients_stream(process, provider):
    with FakeLlmServer(provider, replies=[REPLY, REPLY]) as server:
        through_process = list(remote(process, provider, server.url).stream(MESSAGES))
        in_process = list(local(provider, server.url).stream(MESSAGES))
        assert through_process == in_process == split_into_deltas(REPLY)
        assert server.requests[0] == server.requests[1]  # the same request on the wire
        assert server.stream_outcomes == ["complete", "complete"]
    assert process.pid is not None and process.pid != os.getpid()


@pytest.mark.parametrize("provider", ["ollama", "openai", "llama3"])
def test_complete_and_respond_through_the_process(process, provider):
    replies = [REPLY, FakeReply("Let me put you through.", [FakeToolCall("transfer_call", {"target": "sales"})])]
    with FakeLlmServer(provider, replies=replies) as server:
        client = remote(process, provider, server.url)
        assert client.complete(MESSAGES) == REPLY
        if client.supports_tools:
            text, calls = client.respond(MESSAGES, [TRANSFER])
            assert text == "Let me put you through."
            assert [(call.name, call.arguments) for call in calls] == [("transfer_call", {"target": "sales"})]
            assert isinstance(calls[0], ToolCall)


def test_a_streamed_tool_call_crosses_the_pipe_whole(process):
    reply = FakeReply("One moment.", [FakeToolCall("transfer_call", {"target": "sales"}, piece_chars=3)])
    with FakeLlmServer("openai", replies=[reply]) as server:
        deltas = list(remote(process, "openai", server.url).stream(MESSAGES, [TRANSFER]))
    assert "".join(d for d in deltas if isinstance(d, str)) == "One moment."
    calls = [d for d in deltas if isinstance(d, ToolCall)]
    assert [(call.name, call.arguments) for call in calls] == [("transfer_call", {"target": "sales"})]
    assert server.requests[0]["tools"][0]["function"]["name"] == "transfer_call"


def test_errors_are_the_in_process_clients_errors(process):
    with FakeLlmServer("openai", status=503) as server:
        with pytest.raises(LlmUnavailable) as through:
            list(remote(process, "openai", server.url).stream(MESSAGES))
        with pytest.raises(LlmUnavailable) as here:
            list(local("openai", server.url).stream(MESSAGES))
        server.violations.clear()
    assert type(through.value) is type(here.value)
    assert str(through.value) == str(here.value) and through.value.status == here.value.status == 503
    with FakeLlmServer("ollama", body={"no": "message"}) as server:
        with pytest.raises(LlmBadReply):
            remote(process, "ollama", server.url).complete(MESSAGES)
    with FakeLlmServer("ollama", hold_reply=True) as server:
        started_s = time.monotonic()
        with pytest.raises(LlmTimeout):
            remote(process, "ollama", server.url, timeout_s=0.3).complete(MESSAGES)
        assert time.monotonic() - started_s < 5  # the child's own deadline, not the hung-child margin
        server.release_reply.set()


def test_an_unreachable_server_and_a_bad_request(process):
    with FakeLlmServer("ollama") as server:
        url = server.url
    with pytest.raises(LlmUnavailable, match="cannot reach"):
        remote(process, "ollama", url).complete(MESSAGES)
    with pytest.raises(ValueError, match="message 0"):
        list(remote(process, "ollama", url).stream([{"role": "caller", "content": "hi"}]))
    with pytest.raises(ValueError, match="cannot be sent"):
        remote(process, "ollama", url).complete([{"role": "user", "content": "hi", "note": lambda: None}])


def test_closing_a_stream_closes_its_connection_in_the_process(process):
    with FakeLlmServer("openai", replies=[REPLY, "Still here."], stream_hold_after=2) as server:
        client = remote(process, "openai", server.url)
        stream = client.stream(MESSAGES)
        assert [next(stream), next(stream)] == split_into_deltas(REPLY)[:2]
        with gevent.Timeout(10, AssertionError("close() waited for the rest of the reply")):
            stream.close()  # barge-in
        # The child takes its requests in order: once this one is answered, the cancel was taken.
        assert client.complete(MESSAGES) == "Still here."
        server.release_stream.set()
        # The server's next writes fail: the LLM process closed the connection.
        assert server.client_disconnected.wait(5), "the LLM process kept the connection"
    assert server.stream_outcomes[0] == "client_closed"
    assert server.deltas_sent < len(split_into_deltas(REPLY))


def test_many_streams_at_once_each_get_their_own_reply(process):
    replies = [f"Reply number {n}. It ends here." for n in range(40)]
    with FakeLlmServer("openai", replies=replies) as server:
        client = remote(process, "openai", server.url)
        streams = [gevent.spawn(lambda: "".join(client.stream(MESSAGES))) for _ in replies]
        gevent.joinall(streams, timeout=30, raise_error=True)
    assert sorted(stream.value for stream in streams) == sorted(replies)


def test_the_llms_time_is_the_childs_and_the_pipes_are_the_daemons_queueing(process):
    with FakeLlmServer("openai", replies=[REPLY], stream_first_delay_s=0.3) as server:
        client = remote(process, "openai", server.url)
        before = lane_wait_s()
        started_s = time.monotonic()
        first = next(iter(client.stream(MESSAGES)))
        elapsed_s = time.monotonic() - started_s
    queued_s = lane_wait_s() - before
    assert first == "We"
    # The LLM thought 0.3 s: that is not the daemon's queueing; the rest of the wait is.
    assert elapsed_s >= 0.3
    assert 0 <= queued_s < elapsed_s - 0.29


def test_a_child_killed_mid_stream_fails_that_request_and_is_replaced(process):
    with FakeLlmServer("openai", replies=[REPLY, "Back again."], stream_hold_after=1) as server:
        client = remote(process, "openai", server.url)
        stream = client.stream(MESSAGES)
        assert next(stream) == "We"
        first_pid = process.pid
        with capture_logs() as logs:
            os.kill(first_pid, signal.SIGKILL)
            with pytest.raises(LlmProcessError, match="died with the request"):
                next(stream)
        server.release_stream.set()
        assert client.complete(MESSAGES) == "Back again."
    assert process.pid not in (None, first_pid)
    died = [entry for entry in logs if entry["event"] == "llm_process_died"]
    assert died and "SIGKILL" in died[0]["error"] and died[0]["requests_failed"] == 1


def test_the_child_ends_when_the_daemons_pipe_closes():
    llm_process = LlmProcess(log_level="WARNING", log_format="console")
    llm_process.start()
    child = llm_process._child
    child.reader.kill()
    child.close_pipes()  # what the kernel does for a daemon that dies however it dies
    assert child.reap(10) == 0


def test_replicas_over_the_process_retry_an_unreachable_one(process):
    with FakeLlmServer("openai") as gone:
        gone_url = gone.url
    with FakeLlmServer("openai", replies=[REPLY]) as server:
        settings = type("S", (), dict(llm_provider="openai", llm_api_url=f"{gone_url},{server.url}",
                                      llm_model="llama3", llm_timeout_s=5.0, llm_api_key="", llm_max_tokens=50))
        replicas = make_llm_client(settings, process=process)
        assert isinstance(replicas, ReplicaSet)
        assert all(isinstance(replica.client, RemoteLlmClient) for replica in replicas.replicas)
        for _ in range(2):  # whichever replica is picked first, the answer comes from the live one
            server._replies = [REPLY]
            assert "".join(replicas.stream(MESSAGES)) == REPLY
        statuses = {status["replica"]: status["up"] for status in replicas.status()}
    assert list(statuses.values()).count(False) == 1


CHUNKED_REPLY = "Yes, we are open on Sundays from ten. We close at four on Sundays. Bring your ticket!"


def test_sentence_chunks_end_where_the_daemons_splitter_cuts(process):
    with FakeLlmServer("openai", replies=[CHUNKED_REPLY]) as server:
        client = process.client(CLIENT_CLASSES["openai"], api_url=server.url, model="llama3", timeout_s=5,
                                sentence_chunks=(FIRST_CLAUSE_MIN_WORDS, 0.05))
        assert client.sentence_deltas
        deltas = list(client.stream(MESSAGES))
    assert "".join(deltas) == CHUNKED_REPLY
    # Fed to the conversation's splitter, each delta but the last completes a chunk at once,
    # and the chunks are those of the token-by-token stream.
    splitter = SentenceSplitter(first_clause_min_words=FIRST_CLAUSE_MIN_WORDS)
    chunks_per_delta = [splitter.feed(delta) for delta in deltas]
    assert all(chunks_per_delta[:-1]), chunks_per_delta
    by_tokens = SentenceSplitter(first_clause_min_words=FIRST_CLAUSE_MIN_WORDS)
    expected = [chunk for token in split_into_deltas(CHUNKED_REPLY) for chunk in by_tokens.feed(token)]
    assert [c for chunks in chunks_per_delta for c in chunks] + splitter.flush() == expected + by_tokens.flush()
    assert expected[0] == "Yes, we are open on Sundays from ten." or expected[0].startswith("Yes,")
    assert len(deltas) == 3  # the first clause's sentence, the second, and the rest at the end


def test_sentence_chunks_hand_on_the_words_before_a_tool_call_first(process):
    reply = FakeReply("One moment please", [FakeToolCall("transfer_call", {"target": "sales"})])
    with FakeLlmServer("openai", replies=[reply]) as server:
        client = process.client(CLIENT_CLASSES["openai"], api_url=server.url, model="llama3", timeout_s=5,
                                sentence_chunks=(0, 0.05))
        deltas = list(client.stream(MESSAGES, [TRANSFER]))
    assert deltas[0] == "One moment please"  # no sentence end: held until the call, then handed on
    assert isinstance(deltas[1], ToolCall) and deltas[1].arguments == {"target": "sales"}
    assert len(deltas) == 2


def test_a_daemon_answers_its_calls_through_its_llm_process_and_stops_it(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("openai", replies=[REPLY], stream_first_delay_s=0.2) as llm, \
            FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="openai", LLM_API_URL=llm.url)
        assert settings.llm_process  # the default
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            child = daemon.llm_process._child
            assert child is not None and child.proc.poll() is None  # started with the daemon
            assert isinstance(daemon.services.llm, RemoteLlmClient) and daemon.services.llm.sentence_deltas
            call = sim.new_call()
            sim.speak(call, "when do you open")
            [turn] = turns.wait(1, call)
            wait_until(lambda: len(broadcasts(sim, call)) == 2)
        assert child.proc.poll() is not None  # stopped with the daemon
    assert turn.reply == REPLY and not turn.used_fallback
    assert 200 <= turn.llm_ms < 2000  # the LLM's 0.2 s before its first token counts as the LLM's


def test_without_llm_process_the_daemon_posts_itself(tmp_path):
    with FakeLlmServer("openai", replies=[REPLY]) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="openai", LLM_API_URL=llm.url, LLM_PROCESS="false")
        with running_daemon(sim, settings) as daemon:
            assert daemon.llm_process is None
            assert not isinstance(daemon.services.llm, RemoteLlmClient)
            call = sim.new_call()
            sim.speak(call, "when do you open")
            wait_until(lambda: len(broadcasts(sim, call)) == 2)


def test_an_llm_process_killed_mid_turn_costs_that_turn_its_answer_not_the_next(tmp_path):
    turns = TurnLog()
    with FakeLlmServer("openai", replies=[REPLY, "Still here."], stream_hold_after=1) as llm, \
            FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="openai", LLM_API_URL=llm.url)
        with running_daemon(sim, settings, on_turn=turns) as daemon:
            call = sim.new_call()
            sim.speak(call, "when do you open")
            wait_until(lambda: llm.deltas_sent == 1)
            first_pid = daemon.llm_process.pid
            os.kill(first_pid, signal.SIGKILL)
            [turn] = turns.wait(1, call)
            assert turn.used_fallback
            assert broadcasts(sim, call)[-1].split()[3] == str(daemon.services.fallback_wav)
            llm.release_stream.set()
            wait_until(lambda: daemon.llm_process.pid not in (None, first_pid))
            sim.speak(call, "are you still there")
            second = turns.wait(2, call)[1]
            assert second.reply == "Still here." and not second.used_fallback
