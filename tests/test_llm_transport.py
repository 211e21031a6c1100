"""The LLM clients' POST straight into urllib3's pool (ivr_daemon/llm/transport.py), on real sockets.

The request on the wire and every failure's LlmError (type, status, message) are what they were
when requests sent it: these tests passed against the requests-based client too (the message
shapes are the wrapped urllib3 errors' own text either way).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import socket
import struct
from urllib.parse import urlsplit

import gevent
import gevent.event
import pytest
import requests.utils
import urllib3
import urllib3.exceptions
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

from ivr_daemon.llm import LlmTimeout, LlmUnavailable, OllamaClient, OpenAiClient
from ivr_daemon.llm.replicas import retryable
from llm_fakes import TLS_CERT_PATH, FakeLlmServer

MESSAGES = [{"role": "system", "content": "You answer the phone."}, {"role": "user", "content": "When are you open?"}]
REPLY = "We open at nine."


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    """No proxy, no CA bundle, an empty netrc: what each test sets is all the client finds."""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                 "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """One whole HTTP request off a raw socket: (its head, its Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += conn.recv(65536)
    return head, body


def sse(content: str) -> bytes:
    event = f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': content}}]})}\n\n".encode()
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


# --- the request on the wire, and its connection ---


def test_whole_replies_and_streams_share_one_kept_alive_connection(clean_environment):
    with FakeLlmServer("openai", replies=REPLY) as server:
        client = OpenAiClient(server.url, "llama3", 5.0)
        assert client.complete(MESSAGES) == REPLY
        assert "".join(client.stream(MESSAGES)) == REPLY
        assert "".join(client.stream(MESSAGES)) == REPLY
        assert client.complete(MESSAGES) == REPLY
    assert len(server.client_ports) == 4 and len(set(server.client_ports)) == 1


def test_the_headers_are_requests_own(clean_environment):
    with FakeLlmServer("openai", replies=REPLY, api_key="sk-test") as server:
        client = OpenAiClient(server.url, "llama3", 5.0, api_key="sk-test")
        client.complete(MESSAGES)
        "".join(client.stream(MESSAGES))
    whole, streamed = server.headers
    for headers in server.headers:
        assert headers["user-agent"] == requests.utils.default_user_agent()
        assert headers["authorization"] == "Bearer sk-test"
        assert headers["content-type"] == "application/json" and headers["connection"] == "keep-alive"
    assert whole["accept"] == "application/json"
    assert whole["accept-encoding"] == requests.utils.DEFAULT_ACCEPT_ENCODING
    assert streamed["accept"] == "text/event-stream" and streamed["accept-encoding"] == "identity"
    assert server.requests[1]["stream"] is True and server.requests[1]["messages"] == MESSAGES


def test_a_closed_client_connects_anew_when_used_again(clean_environment):
    with FakeLlmServer("ollama", replies=REPLY) as server:
        client = OllamaClient(server.url, "llama3", 5.0)
        assert client.complete(MESSAGES) == REPLY
        client.close()
        assert "".join(client.stream(MESSAGES)) == REPLY
    assert server.client_ports[0] != server.client_ports[1]


def test_a_gzipped_whole_reply_is_read(clean_environment):
    body = gzip.compress(json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY}}]}).encode())
    seen = []

    def handle(conn, _address):
        seen.append(read_request(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        assert OpenAiClient(f"http://127.0.0.1:{server.server_port}/v1", "m", 5.0).complete(MESSAGES) == REPLY
    finally:
        server.stop()
    [(head, sent)] = seen
    assert b"accept-encoding: gzip" in head.lower()
    # requests' json= body: json.dumps as it is (ensure_ascii, ", " and ": "), with its length.
    assert json.dumps(json.loads(sent)).encode() == sent
    assert b"content-length: %d" % len(sent) in head.lower()


# --- the settled environment: https, netrc and URL credentials, redirects ---


def test_https_with_the_ca_bundle_of_the_environment(clean_environment, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(TLS_CERT_PATH))
    with FakeLlmServer("openai", replies=REPLY, tls=True) as server:
        assert server.url.startswith("https://")
        client = OpenAiClient(server.url, "llama3", 5.0)
        assert client.complete(MESSAGES) == REPLY
        assert "".join(client.stream(MESSAGES)) == REPLY
    assert len(set(server.client_ports)) == 1


def test_https_with_a_certificate_nobody_vouches_for_is_unavailable(clean_environment):
    with FakeLlmServer("openai", replies=REPLY, tls=True) as server:
        client = OpenAiClient(server.url, "llama3", 5.0)
        for call in (lambda: client.complete(MESSAGES), lambda: "".join(client.stream(MESSAGES))):
            with pytest.raises(LlmUnavailable) as caught:
                call()
            assert str(caught.value).startswith(f"openai: cannot reach {server.url}: ")
            assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value) and caught.value.status is None
            assert retryable(caught.value)
        assert server.requests == []


def authorization_sent(provider: str, client_for) -> list[str]:
    """The Authorization header of a whole and a streamed request by ``client_for(url)``."""
    with FakeLlmServer(provider, replies=REPLY) as server:
        client = client_for(server.url)
        client.complete(MESSAGES)
        "".join(client.stream(MESSAGES))
    return [headers["authorization"] for headers in server.headers]


def test_netrc_credentials_are_sent_as_basic_auth(clean_environment):
    clean_environment.write_text("machine 127.0.0.1 login alice password s3cret\n")
    expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert authorization_sent("ollama", lambda url: OllamaClient(url, "llama3", 5.0)) == [expected, expected]


def test_credentials_in_the_url_are_sent_as_basic_auth(clean_environment):
    expected = "Basic " + base64.b64encode(b"bob:pw").decode()
    client_for = lambda url: OpenAiClient(url.replace("http://", "http://bob:pw@"), "llama3", 5.0)  # noqa: E731
    assert authorization_sent("openai", client_for) == [expected, expected]


def test_a_redirect_is_followed_as_requests_follows_it(clean_environment):
    with FakeLlmServer("openai", replies=REPLY) as target:
        def moved(environ, start_response):
            environ["wsgi.input"].read()
            start_response("307 Temporary Redirect", [("Location", target.url), ("Content-Length", "0")])
            return [b""]

        redirecting = WSGIServer(("127.0.0.1", 0), moved, log=None, error_log=None)
        redirecting.start()
        try:
            client = OpenAiClient(f"http://127.0.0.1:{redirecting.server_port}/v1", "llama3", 5.0)
            assert client.complete(MESSAGES) == REPLY
            assert "".join(client.stream(MESSAGES)) == REPLY
        finally:
            redirecting.stop()
    assert [request["messages"] for request in target.requests] == [MESSAGES, MESSAGES]


# --- failures: the same LlmError, status and message as before ---


@pytest.mark.parametrize("status, error", [(404, "model 'llama3' not found"), (503, "overloaded")])
def test_an_http_error_with_a_json_body_is_unavailable_and_the_connection_kept(clean_environment, status, error):
    with FakeLlmServer("openai", replies=REPLY, status=status, body={"error": {"message": error}}) as server:
        client = OpenAiClient(server.url, "llama3", 5.0)
        for call in (lambda: client.complete(MESSAGES), lambda: "".join(client.stream(MESSAGES))):
            with pytest.raises(LlmUnavailable) as caught:
                call()
            assert str(caught.value) == f"openai: HTTP {status} from {server.url}: {error}"
            assert caught.value.status == status
            assert retryable(caught.value) is (status == 503)
    assert len(server.client_ports) == 2 and len(set(server.client_ports)) == 1  # the error body read to its end


def test_connection_refused_says_so(clean_environment, refusing_url):
    client = OpenAiClient(refusing_url, "llama3", 5.0)
    url = urlsplit(client.api_url)
    for call in (lambda: client.complete(MESSAGES), lambda: next(client.stream(MESSAGES))):
        with pytest.raises(LlmUnavailable) as caught:
            call()
        message = str(caught.value)
        assert message.startswith(f"openai: cannot reach {client.api_url}: _LanePacedPool(host='127.0.0.1',"
                                  f" port={url.port}): Max retries exceeded with url: {url.path}")
        assert "NewConnectionError" in message and caught.value.status is None and retryable(caught.value)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


@contextlib.contextmanager
def first_words_then(after):
    """A raw server that answers each request with the stream head and "We open", then does
    ``after(conn)``; yields the /v1 URL to give a client."""
    def handle(conn, _address):
        read_request(conn)
        conn.sendall(STREAM_HEAD + sse("We open"))
        after(conn)

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.stop()


def test_a_connection_reset_mid_stream_is_unavailable_after_its_text(clean_environment):
    got_first = gevent.event.Event()

    def reset(conn):
        got_first.wait(5)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: a RST
        conn.close()

    with first_words_then(reset) as url:
        client = OpenAiClient(url, "llama3", 5.0)
        stream = client.stream(MESSAGES)
        assert next(stream) == "We open"
        got_first.set()
        with pytest.raises(LlmUnavailable) as caught:
            next(stream)
    assert str(caught.value).startswith(f"openai: stream from {client.api_url} broke off after 7 chars: ")
    assert "reset" in str(caught.value).lower() and caught.value.status is None


def test_a_stall_after_the_headers_is_a_timeout(clean_environment):
    release = gevent.event.Event()
    try:
        with first_words_then(lambda _conn: release.wait(10)) as url:
            client = OpenAiClient(url, "llama3", 0.3)
            stream = client.stream(MESSAGES)
            assert next(stream) == "We open"
            with pytest.raises(LlmTimeout) as caught:
                next(stream)
            whole = OpenAiClient(url, "llama3", 0.3)
            with pytest.raises(LlmTimeout) as whole_caught:
                whole.complete(MESSAGES)
            release.set()  # before the server stops: its handlers end
    finally:
        release.set()
    assert str(caught.value) == f"openai: stream from {client.api_url} stalled for 0.3 s after 7 chars"
    assert str(whole_caught.value) == f"openai: no reply from {client.api_url} within 0.3 s"
    assert not retryable(whole_caught.value)


def test_a_connect_timeout_is_told_from_a_refused_connection(refusing_url):
    """transport.connect_timed_out on urllib3's real errors, raised as the client's pool raises them."""
    from ivr_daemon.llm.transport import connect_timed_out

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # one connection queued, never accepted: the next one's SYN goes unanswered
    queued = socket.create_connection(listener.getsockname())
    try:
        pool = urllib3.HTTPConnectionPool(*listener.getsockname(), retries=urllib3.Retry(0, read=False))
        with pytest.raises(urllib3.exceptions.MaxRetryError) as timed_out:
            pool.urlopen("POST", "/", body=b"{}", timeout=urllib3.Timeout(connect=0.2, read=0.2))
        refused_port = urlsplit(refusing_url).port
        with pytest.raises(urllib3.exceptions.MaxRetryError) as refused:
            urllib3.HTTPConnectionPool("127.0.0.1", refused_port, retries=urllib3.Retry(0, read=False)).urlopen(
                "POST", "/", body=b"{}", timeout=1.0)
    finally:
        queued.close()
        listener.close()
    assert connect_timed_out(timed_out.value) and not connect_timed_out(refused.value)
