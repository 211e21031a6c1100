"""The agents' HTTP tools in a call: a real local HTTP endpoint, the LLM through the OpenAI/Ollama fakes.

The endpoint is a gevent WSGI server in the test process: it records each request and can
hold its answer on an event (slow tools without sleeping), fail, answer non-JSON or too much.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import gevent
import gevent.event
import pytest
from gevent.pywsgi import WSGIServer
from structlog.testing import capture_logs

from harness import broadcasts, running_daemon, settings_for, wait_heard, wait_until
from llm_fakes import FakeLlmServer, FakeReply, FakeToolCall
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tools import MAX_RESPONSE_BYTES

SECRET = "crm-secret-7f3a9c"
ORDER = {"status": "shipped", "eta": "Friday"}


class ToolEndpoint:
    """A real HTTP endpoint on 127.0.0.1: ``.requests`` as seen; ``hold`` keeps each answer until ``.release``."""

    def __init__(self, status: int = 200, body: bytes | None = None, content_type: str = "application/json",
                 hold: bool = False, chunked: bool = False):
        self.status = status
        self.body = json.dumps(ORDER).encode() if body is None else body
        self.content_type = content_type
        self.hold = hold
        self.chunked = chunked  # no Content-Length: the client must bound what it reads itself
        self.requests: list[dict] = []
        self.arrived = gevent.event.Event()
        self.release = gevent.event.Event()
        self._server = WSGIServer(("127.0.0.1", 0), self._app, log=None, error_log=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/tools/order-status"

    def _app(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        self.requests.append({
            "method": environ["REQUEST_METHOD"],
            "query": dict(parse_qsl(environ.get("QUERY_STRING", ""))),
            "authorization": environ.get("HTTP_AUTHORIZATION"),
            "json": json.loads(raw) if raw else None,
        })
        self.arrived.set()
        if self.hold:
            self.release.wait()
        headers = [("Content-Type", self.content_type)]
        if self.chunked:
            start_response(f"{self.status} X", headers)
            return (self.body[i:i + 4096] for i in range(0, len(self.body), 4096))
        start_response(f"{self.status} X", headers + [("Content-Length", str(len(self.body)))])
        return [self.body]

    def __enter__(self) -> "ToolEndpoint":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._server.stop(timeout=1)


def agents_toml(url: str, *, method: str = "POST", timeout_s: float = 5, filler_after_s: float = 30,
                max_tool_calls: int = 3) -> str:
    return f'''
[agents.reception]
greeting = ""
silence_timeout_s = 0
tool_filler_phrase = "One moment, please."
tool_filler_after_s = {filler_after_s}
max_tool_calls = {max_tool_calls}

[[agents.reception.tools]]
name = "order_status"
description = "Look up an order by its number."
url = "{url}"
method = "{method}"
timeout_s = {timeout_s}
headers = {{ Authorization = "Bearer ${{CRM_TOKEN}}" }}
parameters = {{ type = "object", properties = {{ order_id = {{ type = "string", pattern = "^[0-9]{{4,12}}$" }} }}, required = ["order_id"], additionalProperties = false }}
'''


@pytest.fixture(autouse=True)
def crm_token(monkeypatch):
    monkeypatch.setenv("CRM_TOKEN", SECRET)


def tool_results(request: dict) -> list[str]:
    return [m["content"] for m in request["messages"] if m["role"] == "tool"]


def answer_from_tool(request: dict) -> FakeReply | str:
    """The fake model: asks for the order, then says what the tool answered (or that it failed)."""
    results = tool_results(request)
    if not results:
        return FakeReply("Let me check.", [FakeToolCall("order_status", {"order_id": "1234"}, call_id="call_1")])
    result = json.loads(results[-1])
    if "error" in result:
        return "Sorry, I cannot look up your order right now."
    return f"Your order is {result['status']} and arrives {result['eta']}."


def start(tmp_path, sim, llm, toml: str, provider: str = "openai", stream: str = "false"):
    path = tmp_path / "agents.toml"
    path.write_text(toml)
    return settings_for(sim, tmp_path / "tts", LLM_PROVIDER=provider, LLM_API_URL=llm.url, AGENTS_FILE=str(path),
                        LLM_STREAM=stream)


def history_of(daemon, call) -> list[dict]:
    return daemon.router.calls[call].handler.history.messages()


@pytest.mark.parametrize("provider, stream", [("openai", "false"), ("openai", "true"), ("ollama", "true")])
def test_a_tool_round_trip_changes_what_the_caller_hears(tmp_path, provider, stream):
    with ToolEndpoint() as endpoint, FakeLlmServer(provider, replies=answer_from_tool) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = start(tmp_path, sim, llm, agents_toml(endpoint.url), provider, stream)
        with capture_logs() as logs, running_daemon(sim, settings) as daemon:
            call = sim.new_call(caller_id_number="5550100", destination_number="ai")
            sim.speak(call, "where is my order 1234")
            wait_until(lambda: len(broadcasts(sim, call)) == 2)
            wait_until(lambda: not daemon.router.calls[call].handler.busy)
            # The endpoint got the arguments and what the call knows, with the secret header.
            (request,) = endpoint.requests
            assert request["method"] == "POST" and request["authorization"] == f"Bearer {SECRET}"
            assert request["json"] == {"arguments": {"order_id": "1234"}, "call_uuid": call, "agent": "reception",
                                       "caller_number": "5550100", "variables": {"destination_number": "ai"}}
            # The LLM was offered the tool beside the built-ins, then got its JSON back.
            offered = {tool["function"]["name"] for tool in llm.requests[0]["tools"]}
            assert offered == {"end_call", "order_status"}
            assert len(llm.requests) == 2 and [json.loads(r) for r in tool_results(llm.requests[1])] == [ORDER]
            assert history_of(daemon, call)[-1] == {"role": "assistant",
                                                    "content": "Your order is shipped and arrives Friday."}
            # "Let me check." and the answer; no filler for a tool that answers at once.
            filler = str(daemon.services.pinned.path_for("One moment, please."))
            assert filler not in " ".join(broadcasts(sim, call))
            assert daemon.flow.counters.http_tool_calls == 1 and daemon.flow.counters.http_tool_failures == 0
            assert llm.violations == []
        assert SECRET not in repr(logs)
        assert any(line["event"] == "tool_call_done" and line["call_uuid"] == call for line in logs)


def test_a_get_tool_sends_the_arguments_and_the_call_as_query_parameters(tmp_path):
    with ToolEndpoint() as endpoint, FakeLlmServer("openai", replies=answer_from_tool) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = start(tmp_path, sim, llm, agents_toml(endpoint.url, method="GET"))
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call(caller_id_number="5550100")
            sim.speak(call, "where is my order 1234")
            wait_until(lambda: len(llm.requests) == 2)
            wait_until(lambda: not daemon.router.calls[call].handler.busy)
            (request,) = endpoint.requests
            assert request["method"] == "GET" and request["json"] is None
            assert request["query"] == {"order_id": "1234", "call_uuid": call, "agent": "reception",
                                        "caller_number": "5550100", "variables": '{"destination_number": "ai"}'}
            assert history_of(daemon, call)[-1]["content"] == "Your order is shipped and arrives Friday."


@pytest.mark.parametrize("arguments", [{"order_id": "12ab"}, {"order_id": "1234", "card_number": "4111"}, {},
                                       '"1234"', '{"order_id": '])
def test_invalid_arguments_never_reach_the_endpoint(tmp_path, arguments):
    replies = [FakeReply("", [FakeToolCall("order_status", arguments, call_id="call_bad")]),
               "Could you tell me the order number again?"]
    with ToolEndpoint() as endpoint, FakeLlmServer("openai", replies=replies) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = start(tmp_path, sim, llm, agents_toml(endpoint.url))
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "where is my order")
            wait_until(lambda: len(broadcasts(sim, call)) == 1)
            wait_until(lambda: not daemon.router.calls[call].handler.busy)
            assert endpoint.requests == []
            (result,) = tool_results(llm.requests[1])
            error = json.loads(result)["error"]
            assert "was not called" in error and ("invalid arguments" in error or "JSON object" in error), error
            assert llm.requests[1]["messages"][-1]["tool_call_id"] == "call_bad"
            assert history_of(daemon, call)[-1]["content"] == "Could you tell me the order number again?"
            assert llm.violations == []


HUGE = json.dumps({"padding": "x" * (100 * 1024)}).encode()


@pytest.mark.parametrize("failure", ["down", "500", "404", "slow", "not_json", "too_large", "too_large_chunked"])
def test_a_failing_tool_is_told_to_the_llm_and_the_caller_hears_its_answer(tmp_path, refusing_url, failure):
    assert len(HUGE) > MAX_RESPONSE_BYTES
    endpoint = {
        "down": ToolEndpoint(), "500": ToolEndpoint(status=500, body=b'{"error": "db down"}'),
        "404": ToolEndpoint(status=404), "slow": ToolEndpoint(hold=True),
        "not_json": ToolEndpoint(body=b"<html>maintenance</html>", content_type="text/html"),
        "too_large": ToolEndpoint(body=HUGE), "too_large_chunked": ToolEndpoint(body=HUGE, chunked=True),
    }[failure]
    with endpoint, FakeLlmServer("openai", replies=answer_from_tool) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        url = refusing_url if failure == "down" else endpoint.url
        # A tiny timeout for the held endpoint: the tool gives up on its own, nobody sleeps.
        settings = start(tmp_path, sim, llm, agents_toml(url, timeout_s=0.3))
        with capture_logs() as logs, running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "where is my order 1234")
            wait_until(lambda: len(broadcasts(sim, call)) == 2)
            wait_until(lambda: not daemon.router.calls[call].handler.busy)
            (result,) = tool_results(llm.requests[1])
            assert "The tool order_status failed" in json.loads(result)["error"]
            assert history_of(daemon, call)[-1]["content"] == "Sorry, I cannot look up your order right now."
            assert daemon.flow.counters.http_tool_failures == 1
            assert len(endpoint.requests) == (0 if failure == "down" else 1)
        reason = {"down": "unreachable", "500": "http_status", "404": "http_status", "slow": "timeout",
                  "not_json": "not_json", "too_large": "too_large", "too_large_chunked": "too_large"}[failure]
        assert [line["reason"] for line in logs if line["event"] == "tool_call_failed"] == [reason]
        assert SECRET not in repr(logs)


def test_the_filler_plays_while_a_slow_tool_works(tmp_path):
    with ToolEndpoint(hold=True) as endpoint, FakeLlmServer("openai", replies=answer_from_tool) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = start(tmp_path, sim, llm, agents_toml(endpoint.url, filler_after_s=0.05))
        with running_daemon(sim, settings) as daemon:
            filler = str(daemon.services.pinned.path_for("One moment, please."))
            call = sim.new_call()
            sim.speak(call, "where is my order 1234")
            # The endpoint holds its answer until the caller has been told to wait.
            wait_until(lambda: any(f" {filler}" in line for line in broadcasts(sim, call)))
            assert endpoint.arrived.is_set() and len(llm.requests) == 1
            endpoint.release.set()
            wait_until(lambda: len(broadcasts(sim, call)) == 3)
            wait_until(lambda: not daemon.router.calls[call].handler.busy)
            spoken = [line.split()[3] for line in broadcasts(sim, call)]
            assert spoken[1] == filler and filler not in (spoken[0], spoken[2])
            assert history_of(daemon, call)[-1]["content"] == "Your order is shipped and arrives Friday."
            assert daemon.flow.counters.tool_fillers == 1


def test_max_tool_calls_bounds_the_rounds_and_the_last_request_offers_no_tools(tmp_path):
    def greedy(request: dict) -> FakeReply | str:
        if "tools" not in request:
            return "Here is what I found."
        n = len(tool_results(request))
        return FakeReply("", [FakeToolCall("order_status", {"order_id": f"{1000 + n}"}, call_id=f"call_{n}")])

    with ToolEndpoint() as endpoint, FakeLlmServer("openai", replies=greedy) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = start(tmp_path, sim, llm, agents_toml(endpoint.url, max_tool_calls=2))
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "check all my orders")
            wait_until(lambda: len(broadcasts(sim, call)) == 1)
            wait_until(lambda: not daemon.router.calls[call].handler.busy)
            assert [r["json"]["arguments"]["order_id"] for r in endpoint.requests] == ["1000", "1001"]
            assert ["tools" in r for r in llm.requests] == [True, True, False]
            assert history_of(daemon, call)[-1]["content"] == "Here is what I found."
            assert llm.violations == []


def test_a_slow_tool_delays_only_its_own_call(tmp_path):
    def model(request: dict) -> FakeReply | str:
        user = [m["content"] for m in request["messages"] if m["role"] == "user"][-1]
        if "order" in user:
            return answer_from_tool(request)
        return "Our shop opens at nine."

    with ToolEndpoint(hold=True) as endpoint, FakeLlmServer("openai", replies=model) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = start(tmp_path, sim, llm, agents_toml(endpoint.url))
        with running_daemon(sim, settings) as daemon:
            slow_call, other_call = sim.new_call(), sim.new_call()
            sim.speak(slow_call, "where is my order 1234")
            endpoint.arrived.wait(10)
            sim.speak(other_call, "when do you open")
            wait_heard(sim, other_call)  # answered and played while the tool is still held
            assert history_of(daemon, other_call)[-1]["content"] == "Our shop opens at nine."
            assert daemon.router.calls[slow_call].handler.busy and len(broadcasts(sim, slow_call)) == 1
            endpoint.release.set()
            wait_until(lambda: len(broadcasts(sim, slow_call)) == 2)
            wait_until(lambda: not daemon.router.calls[slow_call].handler.busy)
            assert history_of(daemon, slow_call)[-1]["content"] == "Your order is shipped and arrives Friday."


def test_a_hangup_while_a_tool_works_ends_the_turn_and_asks_the_llm_nothing_more(tmp_path):
    with ToolEndpoint(hold=True) as endpoint, FakeLlmServer("openai", replies=answer_from_tool) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = start(tmp_path, sim, llm, agents_toml(endpoint.url))
        with running_daemon(sim, settings) as daemon:
            call = sim.new_call()
            sim.speak(call, "where is my order 1234")
            assert endpoint.arrived.wait(10)
            handler = daemon.router.calls[call].handler
            sim.hangup(call)
            wait_until(lambda: call not in daemon.router.calls)
            wait_until(lambda: handler._turn_greenlet is None or handler._turn_greenlet.dead)
            endpoint.release.set()
            assert len(llm.requests) == 1 and len(broadcasts(sim, call)) == 1
            assert not daemon.router.busy_calls()
