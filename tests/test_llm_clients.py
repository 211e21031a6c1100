"""Tests for the LLM clients against fake Ollama, OpenAI and llama3 servers on real sockets."""

from __future__ import annotations


import gevent
import pytest
from structlog.testing import capture_logs
from gevent.server import StreamServer

from ivr_daemon.config import load_settings
from ivr_daemon.llm import (
    CLIENT_CLASSES,
    Llama3Client,
    LlmBadReply,
    LlmTimeout,
    LlmUnavailable,
    OllamaClient,
    OpenAiClient,
    make_llm_client,
)
from harness import wait_until
from llm_fakes import FakeLlmServer

PROVIDERS = ("ollama", "openai", "llama3")
SYSTEM = {"role": "system", "content": "You are a phone assistant."}
HISTORY = [
    {"role": "user", "content": "What are your opening hours?"},
    {"role": "assistant", "content": "We open at nine."},
]
NEW_USER = {"role": "user", "content": "And on Sundays?"}
MESSAGES = [SYSTEM, *HISTORY, NEW_USER]

# A valid reply of each provider's shape, but for another provider: the wrong shape.
OLLAMA_REPLY = {"model": "m", "created_at": "2024-05-01T12:00:00Z",
                "message": {"role": "assistant", "content": "Hi."}, "done": True}
OPENAI_REPLY = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1714560000, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "stop"}]}
LLAMA3_REPLY = {"response": "Hi."}
WRONG_SHAPE = {"ollama": OPENAI_REPLY, "openai": OLLAMA_REPLY, "llama3": OLLAMA_REPLY}


def empty_reply(provider: str, content) -> dict:
    if provider == "ollama":
        return {**OLLAMA_REPLY, "message": {"role": "assistant", "content": content}}
    if provider == "openai":
        choice = {**OPENAI_REPLY["choices"][0], "message": {"role": "assistant", "content": content}}
        return {**OPENAI_REPLY, "choices": [choice]}
    return {"response": content}


def client_for(provider: str, url: str, timeout_s: float = 5.0, api_key: str = ""):
    return CLIENT_CLASSES[provider](url, "llama3", timeout_s, api_key=api_key)


@pytest.fixture
def hang_up_url():
    """A server that accepts, reads the request, and closes without answering."""

    def hang_up(conn, _address):
        conn.recv(65536)
        conn.close()

    server = StreamServer(("127.0.0.1", 0), hang_up)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/api/chat"
    finally:
        server.stop(timeout=1)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_complete_returns_the_assistant_text_stripped(provider):
    with FakeLlmServer(provider, replies="  We are closed on Sundays.\n") as server:
        with client_for(provider, server.url) as client:
            assert client.complete(MESSAGES) == "We are closed on Sundays."
    assert len(server.requests) == 1


def test_ollama_sends_model_full_history_in_order_and_stream_false():
    with FakeLlmServer("ollama") as server:
        OllamaClient(server.url, "llama3:8b", 5).complete(MESSAGES)
    assert server.requests == [{"model": "llama3:8b", "messages": MESSAGES, "stream": False}]
    assert server.headers[0]["content-type"] == "application/json"


def test_openai_sends_model_and_full_history_in_order():
    with FakeLlmServer("openai") as server:
        OpenAiClient(server.url, "gpt-4o-mini", 5).complete(MESSAGES)
    assert server.requests == [{"model": "gpt-4o-mini", "messages": MESSAGES}]


def test_llama3_splits_system_history_and_new_message():
    with FakeLlmServer("llama3") as server:
        Llama3Client(server.url, "llama3", 5).complete(MESSAGES)
    assert server.requests == [{
        "system_prompt": SYSTEM["content"],
        "conversation_history": HISTORY,
        "user_message": NEW_USER["content"],
    }]


def test_llama3_first_turn_has_empty_history():
    with FakeLlmServer("llama3") as server:
        Llama3Client(server.url, "llama3", 5).complete([SYSTEM, NEW_USER])
    assert server.requests[0]["conversation_history"] == []
    assert server.requests[0]["user_message"] == NEW_USER["content"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_messages_are_sent_as_plain_role_content_dicts(provider):
    annotated = [{**message, "spoken_at_ms": 1234} for message in MESSAGES]
    with FakeLlmServer(provider) as server:
        client_for(provider, server.url).complete(annotated)
    request = server.requests[0]
    sent = request["conversation_history"] if provider == "llama3" else request["messages"]
    assert all(set(message) == {"role", "content"} for message in sent)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_turns_get_scripted_replies_in_order_over_one_kept_alive_connection(provider):
    with FakeLlmServer(provider, replies=["First.", "Second."]) as server:
        client = client_for(provider, server.url)
        assert client.complete(MESSAGES) == "First."
        assert client.complete([*MESSAGES, {"role": "assistant", "content": "First."}, NEW_USER]) == "Second."
    assert len(server.requests) == 2
    assert server.client_ports[0] == server.client_ports[1]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_slow_server_times_out_within_the_bound(provider):
    # The server holds its reply until the test lets it go: only the client's own bound can end
    # the wait, and the error names that bound.
    with FakeLlmServer(provider, hold_reply=True) as server:
        client = client_for(provider, server.url, timeout_s=0.5)
        with gevent.Timeout(10, AssertionError("the client waited for the held reply")):
            with pytest.raises(LlmTimeout, match="within 0.5 s"):
                client.complete(MESSAGES)
        assert len(server.requests) == 1 and server.bodies_completed == 0
        server.release_reply.set()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_trickling_reply_is_cut_at_the_wall_clock_bound(provider):
    # Each byte arrives well inside the socket read timeout; only the overall bound stops it.
    # The whole body takes over 20 s to trickle: the client gave up before its last byte.
    with FakeLlmServer(provider, replies="Hello there. " * 40, trickle_s=0.05) as server:
        client = client_for(provider, server.url, timeout_s=0.6)
        with pytest.raises(LlmTimeout, match="within 0.6 s"):
            client.complete(MESSAGES)
        assert len(server.requests) == 1 and server.bodies_completed == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_connection_refused_is_unavailable(provider, refusing_url):
    # Refused is final at once: no retrying until the (long) timeout runs out.
    with gevent.Timeout(10, AssertionError("a refused connection waited for the 60 s timeout")):
        with pytest.raises(LlmUnavailable, match="cannot reach") as caught:
            client_for(provider, refusing_url, timeout_s=60).complete(MESSAGES)
    assert caught.value.status is None


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_server_hanging_up_without_reply_is_unavailable(provider, hang_up_url):
    with pytest.raises(LlmUnavailable, match="cannot reach"):
        client_for(provider, hang_up_url).complete(MESSAGES)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_http_500_is_unavailable_with_status_and_server_message(provider):
    with FakeLlmServer(provider, status=500) as server:
        with pytest.raises(LlmUnavailable) as caught:
            client_for(provider, server.url).complete(MESSAGES)
    assert caught.value.status == 500
    assert "HTTP 500" in str(caught.value)
    assert "fake failure" in str(caught.value)


def test_error_messages_are_one_line():
    body = {"error": "model 'llama3' not found,\ntry pulling it first"}
    with FakeLlmServer("ollama", status=404, body=body) as server:
        with pytest.raises(LlmUnavailable) as caught:
            OllamaClient(server.url, "llama3", 5).complete(MESSAGES)
    assert str(caught.value) == (
        f"ollama: HTTP 404 from {server.url}: model 'llama3' not found, try pulling it first"
    )


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_body_that_is_not_json_is_a_bad_reply(provider):
    with FakeLlmServer(provider, body=b'{"message": {"content": "We are clo') as server:
        with pytest.raises(LlmBadReply, match="not JSON"):
            client_for(provider, server.url).complete(MESSAGES)


def test_an_html_error_page_with_status_200_is_a_bad_reply():
    with FakeLlmServer("openai", body="<html><body>502 Bad Gateway</body></html>") as server:
        with pytest.raises(LlmBadReply, match="Bad Gateway"):
            OpenAiClient(server.url, "m", 5).complete(MESSAGES)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_json_of_the_wrong_shape_is_a_bad_reply(provider):
    with FakeLlmServer(provider, body=WRONG_SHAPE[provider]) as server:
        with pytest.raises(LlmBadReply, match="reply has no"):
            client_for(provider, server.url).complete(MESSAGES)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("content", ["", "  \n ", None, 42])
def test_empty_or_non_text_content_is_a_bad_reply(provider, content):
    with FakeLlmServer(provider, body=empty_reply(provider, content)) as server:
        with pytest.raises(LlmBadReply):
            client_for(provider, server.url).complete(MESSAGES)


def test_a_json_array_reply_is_a_bad_reply():
    with FakeLlmServer("llama3", body=[{"response": "Hi."}]) as server:
        with pytest.raises(LlmBadReply):
            Llama3Client(server.url, "m", 5).complete(MESSAGES)


def test_an_error_object_with_status_200_is_reported():
    with FakeLlmServer("ollama", body={"error": "out of memory"}) as server:
        with pytest.raises(LlmBadReply, match="out of memory"):
            OllamaClient(server.url, "m", 5).complete(MESSAGES)


def test_openai_sends_the_bearer_token_when_a_key_is_set():
    with FakeLlmServer("openai", api_key="sk-test-123") as server:
        assert OpenAiClient(server.url, "m", 5, api_key="sk-test-123").complete(MESSAGES)
    assert server.headers[0]["authorization"] == "Bearer sk-test-123"


def test_openai_sends_no_authorization_header_without_a_key():
    with FakeLlmServer("openai") as server:
        OpenAiClient(server.url, "m", 5, api_key="").complete(MESSAGES)
    assert "authorization" not in server.headers[0]


def test_openai_wrong_key_is_unavailable_with_401():
    with FakeLlmServer("openai", api_key="sk-right") as server:
        with pytest.raises(LlmUnavailable, match="HTTP 401.*Incorrect API key") as caught:
            OpenAiClient(server.url, "m", 5, api_key="sk-wrong").complete(MESSAGES)
    assert caught.value.status == 401


@pytest.mark.parametrize("configured, expected", [
    ("http://127.0.0.1:8080/v1/chat/completions", "http://127.0.0.1:8080/v1/chat/completions"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1/chat/completions"),
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/chat/completions"),
    ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1/chat/completions"),
    ("https://proxy.example/openai/v1/", "https://proxy.example/openai/v1/chat/completions"),
    ("https://proxy.example/deploy/chat?api-version=2", "https://proxy.example/deploy/chat?api-version=2"),
    ("http://h:1?api-version=2", "http://h:1/v1/chat/completions?api-version=2"),
])
def test_openai_url_rule(configured, expected):
    assert OpenAiClient(configured, "m", 5).api_url == expected


@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/"])
def test_openai_base_urls_reach_the_chat_completions_path(suffix):
    with FakeLlmServer("openai") as server:
        assert OpenAiClient(server.base_url + suffix, "m", 5).complete(MESSAGES)
    assert len(server.requests) == 1


def test_ollama_bare_host_url_gets_the_chat_path():
    with FakeLlmServer("ollama") as server:
        client = OllamaClient(server.base_url, "m", 5)
        assert client.api_url == server.url
        assert client.complete(MESSAGES)


@pytest.mark.parametrize("provider, expected_class", [
    ("ollama", OllamaClient), ("openai", OpenAiClient), ("llama3", Llama3Client),
])
def test_make_llm_client_picks_the_provider_from_settings(provider, expected_class):
    with FakeLlmServer(provider, replies="Configured.", api_key="sk-cfg" if provider == "openai" else None) as server:
        settings = load_settings(environ={
            "LLM_PROVIDER": provider,
            "LLM_API_URL": server.url,
            "LLM_MODEL": "tiny",
            "LLM_TIMEOUT": "2.5",
            "LLM_API_KEY": "sk-cfg",
        })
        client = make_llm_client(settings)
        assert type(client) is expected_class
        assert (client.provider, client.api_url, client.model, client.timeout_s) == (provider, server.url, "tiny", 2.5)
        assert client.complete(MESSAGES) == "Configured."
    if provider == "openai":
        assert server.headers[0]["authorization"] == "Bearer sk-cfg"


def test_make_llm_client_defaults_to_ollama_on_localhost():
    client = make_llm_client(load_settings(environ={}))
    assert type(client) is OllamaClient
    assert client.api_url == "http://localhost:11434/api/chat"
    assert client.timeout_s == 30.0


def test_calls_from_greenlets_run_concurrently():
    # The server answers nobody until all four requests are in: calls that waited for each
    # other (one connection, a lock) could never all arrive.
    with FakeLlmServer("ollama", hold_reply=True) as server:
        client = OllamaClient(server.url, "m", 5)
        calls = [gevent.spawn(client.complete, MESSAGES) for _ in range(4)]
        wait_until(lambda: len(server.requests) == 4, 5)
        assert len(set(server.client_ports)) == 4  # four connections at once
        server.release_reply.set()
        gevent.joinall(calls, raise_error=True)
    assert [call.value for call in calls] == ["Hello from the fake LLM."] * 4


def test_a_callers_own_gevent_timeout_is_not_swallowed():
    with FakeLlmServer("ollama", hold_reply=True) as server:
        client = OllamaClient(server.url, "m", timeout_s=10)
        outer = gevent.Timeout(0.3)
        with pytest.raises(gevent.Timeout) as caught:
            with outer:
                client.complete(MESSAGES)
        assert caught.value is outer


def test_a_killed_call_leaves_the_client_usable():
    # Barge-in and hangup kill the call's greenlet mid-request.
    with FakeLlmServer("ollama", replies=lambda request: request["messages"][-1]["content"], hold_reply=True) as server:
        client = OllamaClient(server.url, "m", 5)
        call = gevent.spawn(client.complete, MESSAGES)
        wait_until(lambda: len(server.requests) == 1, 5)  # mid-request: sent, its reply held
        call.kill(block=True, timeout=1)
        assert call.dead and isinstance(call.value, gevent.GreenletExit)
        server.release_reply.set()
        assert client.complete(MESSAGES) == NEW_USER["content"]
    assert server.client_ports[1] != server.client_ports[0]  # not the half-read connection


@pytest.mark.parametrize("provider", PROVIDERS)
def test_no_messages_is_a_caller_bug(provider):
    with pytest.raises(ValueError):
        client_for(provider, "http://127.0.0.1:9/").complete([])


def test_llama3_needs_a_system_prompt_and_a_user_message():
    with pytest.raises(ValueError):
        Llama3Client("http://127.0.0.1:9/", "m", 5).complete([NEW_USER])


def test_timeout_must_be_positive():
    with pytest.raises(ValueError):
        OllamaClient("http://127.0.0.1:9/", "m", 0)


def test_each_request_is_logged_at_debug_without_the_conversation():
    with FakeLlmServer("openai", replies="Secret answer.") as server:
        with capture_logs() as logs:
            OpenAiClient(server.url, "m", 5).complete(MESSAGES)
    with FakeLlmServer("openai", status=503) as server:
        with capture_logs() as failure_logs:
            with pytest.raises(LlmUnavailable):
                OpenAiClient(server.url, "m", 5).complete(MESSAGES)
    [ok] = [entry for entry in logs if entry["event"] == "llm_request"]
    assert ok["log_level"] == "debug"
    assert ok["provider"] == "openai" and ok["outcome"] == "ok" and ok["status"] == 200
    assert isinstance(ok["elapsed_ms"], int) and ok["elapsed_ms"] >= 0
    logged = repr(logs)
    assert "Secret answer" not in logged and "Sundays" not in logged
    [failed] = [entry for entry in failure_logs if entry["event"] == "llm_request"]
    assert failed["outcome"] == "LlmUnavailable" and failed["status"] == 503


# The environment (HTTP_PROXY, NO_PROXY...) is read once, when the client is made, not per
# request: these prove it is still obeyed.
def _without_proxies(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                 "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_the_http_proxy_of_the_environment_carries_the_requests(monkeypatch):
    target = "http://llm.invalid:9/v1/chat/completions"  # never resolved: only the proxy can answer
    _without_proxies(monkeypatch)
    with FakeLlmServer("openai", replies="Through the proxy.", path=target) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.base_url)
        client = OpenAiClient(target, "llama3", 5.0)
        assert client.complete(MESSAGES) == "Through the proxy."
        assert "".join(client.stream(MESSAGES)) == "Through the proxy."
        assert len(proxy.requests) == 2 and not proxy.violations


def test_no_proxy_sends_the_requests_straight_to_the_server(monkeypatch, refusing_url):
    _without_proxies(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", refusing_url)  # a proxy that is not there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with FakeLlmServer("openai", replies="Straight.") as server:
        client = OpenAiClient(server.url, "llama3", 5.0)
        assert client.complete(MESSAGES) == "Straight."
        assert len(server.requests) == 1
