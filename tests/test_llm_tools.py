"""Tests for tool calling in the LLM clients: OpenAI and Ollama wire formats, whole and streamed, on fake servers."""

from __future__ import annotations

import json

import pytest
import requests
from structlog.testing import capture_logs

from ivr_daemon.llm import (
    CLIENT_CLASSES,
    Llama3Client,
    LlmBadReply,
    LlmError,
    LlmTimeout,
    OllamaClient,
    OpenAiClient,
    ToolCall,
    ToolSpec,
)
from ivr_daemon.llm.base import MAX_TOOL_ARGUMENTS_CHARS, MAX_TOOL_CALLS, check_messages
from llm_fakes import FakeLlmServer, FakeReply, FakeToolCall, split_into_deltas

TOOL_PROVIDERS = ("ollama", "openai")
SYSTEM = {"role": "system", "content": "You are a phone assistant."}
NEW_USER = {"role": "user", "content": "Put me through to sales, please."}
MESSAGES = [SYSTEM, NEW_USER]
TRANSFER = ToolSpec(
    name="transfer_call",
    description="Transfer the caller to a department.",
    parameters={"type": "object", "properties": {"target": {"type": "string", "enum": ["sales", "support"]}},
                "required": ["target"]},
)
END_CALL = ToolSpec(name="end_call", description="Hang up.", parameters={"type": "object", "properties": {}})
TOOLS = (TRANSFER, END_CALL)
WIRE_TOOLS = [
    {"type": "function", "function": {"name": "transfer_call", "description": "Transfer the caller to a department.",
                                      "parameters": TRANSFER.parameters}},
    {"type": "function", "function": {"name": "end_call", "description": "Hang up.",
                                      "parameters": END_CALL.parameters}},
]
SPOKEN = "Let me put you through."
TO_SALES = FakeToolCall("transfer_call", {"target": "sales"}, call_id="call_abc")


def client_for(provider: str, url: str, timeout_s: float = 5.0):
    return CLIENT_CLASSES[provider](url, "llama3", timeout_s)


def split(items: list) -> tuple[list[str], list[ToolCall]]:
    return [item for item in items if isinstance(item, str)], [item for item in items if isinstance(item, ToolCall)]


def expected_id(provider: str, openai_id: str, generated: str = "call_0") -> str:
    """OpenAI's id as the server sent it; Ollama sends none, so the client numbers the calls."""
    return openai_id if provider == "openai" else generated


# --- the request ---------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
@pytest.mark.parametrize("streamed", [False, True])
def test_tools_are_offered_in_the_providers_shape(provider, streamed):
    with FakeLlmServer(provider, replies="Sure.") as server:
        client = client_for(provider, server.url)
        if streamed:
            list(client.stream(MESSAGES, TOOLS))
        else:
            client.respond(MESSAGES, TOOLS)
    request = server.requests[0]
    assert request["tools"] == WIRE_TOOLS
    if provider == "openai":
        # OpenAI's default made explicit: llama_cpp.server calls no tools without it.
        assert request["tool_choice"] == "auto"
    else:
        assert "tool_choice" not in request
    if provider == "ollama":
        assert request["stream"] is streamed
    else:
        assert request.get("stream", False) is streamed


@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_without_tools_the_request_is_as_before(provider):
    with FakeLlmServer(provider, replies="Sure.") as server:
        client = client_for(provider, server.url)
        assert client.respond(MESSAGES) == ("Sure.", [])
        assert list(client.stream(MESSAGES, ())) == ["Sure", "."]
        assert client.complete(MESSAGES) == "Sure."
    for request in server.requests:
        assert "tools" not in request and "tool_choice" not in request
    assert server.requests[0] == server.requests[2]


def test_only_openai_and_ollama_support_tools():
    assert OpenAiClient.supports_tools and OllamaClient.supports_tools
    assert not Llama3Client.supports_tools


@pytest.mark.parametrize("bad_tools", [
    [{"name": "transfer_call"}],  # a dict, not a ToolSpec
    [ToolSpec(name="", description="", parameters={"type": "object"})],
    [ToolSpec(name="x", description="", parameters="{}")],
    [TRANSFER, TRANSFER],  # a name twice
])
def test_malformed_tools_are_a_caller_bug(bad_tools):
    client = OpenAiClient("http://127.0.0.1:9/", "m", 5)
    with pytest.raises(ValueError):
        client.respond(MESSAGES, bad_tools)
    with pytest.raises(ValueError):
        next(client.stream(MESSAGES, bad_tools))


# --- whole replies ---------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_a_reply_that_only_calls_a_tool(provider):
    with FakeLlmServer(provider, replies=FakeReply(tool_calls=[TO_SALES])) as server:
        text, calls = client_for(provider, server.url).respond(MESSAGES, TOOLS)
    assert text == ""
    call_id = expected_id(provider, "call_abc")
    raw = '{"target": "sales"}'
    assert calls == [ToolCall(name="transfer_call", arguments={"target": "sales"}, raw_arguments=raw, call_id=call_id)]


@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_a_reply_that_speaks_and_calls_a_tool(provider):
    with FakeLlmServer(provider, replies=FakeReply(f"  {SPOKEN}\n", [TO_SALES])) as server:
        text, calls = client_for(provider, server.url).respond(MESSAGES, TOOLS)
    assert text == SPOKEN
    assert [(call.name, call.arguments) for call in calls] == [("transfer_call", {"target": "sales"})]


@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_two_tool_calls_in_one_reply_keep_their_order_and_ids(provider):
    reply = FakeReply(tool_calls=[TO_SALES, FakeToolCall("end_call", {}, call_id="call_def")])
    with FakeLlmServer(provider, replies=reply) as server:
        client = client_for(provider, server.url)
        _, calls = client.respond(MESSAGES, TOOLS)
        _, again = client.respond(MESSAGES, TOOLS)
    assert [(call.name, call.arguments) for call in calls] == [("transfer_call", {"target": "sales"}),
                                                               ("end_call", {})]
    assert [call.call_id for call in calls] == [expected_id(provider, "call_abc", "call_0"),
                                                expected_id(provider, "call_def", "call_1")]
    # Generated ids stay unique across replies, so results are never matched to the wrong call.
    assert len({call.call_id for call in calls + again}) == (4 if provider == "ollama" else 2)


def test_ollama_tool_call_ids_are_used_when_the_server_sends_them():
    body = {"model": "m", "created_at": "2024-05-01T12:00:00Z", "done": True, "done_reason": "stop",
            "message": {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_x1y2", "function": {"index": 0, "name": "end_call", "arguments": {}}}]}}
    with FakeLlmServer("ollama", body=body) as server:
        _, [call] = OllamaClient(server.url, "m", 5).respond(MESSAGES, TOOLS)
    assert call.call_id == "call_x1y2"


@pytest.mark.parametrize("provider, arguments, expected", [
    # Validation is the daemon's job: what the model sent is handed on, parsed only when it is an object.
    ("openai", '{"target": "sales"', None),  # not JSON
    ("openai", '["sales"]', None),  # JSON, not an object
    ("openai", '"sales"', None),
    ("openai", "", {}),  # no arguments at all: the empty object
    ("openai", "  ", {}),
    ("ollama", "sales", None),  # a string where Ollama sends an object
    ("ollama", {"target": 7, "extra": [1]}, {"target": 7, "extra": [1]}),  # not the schema: still handed on
])
def test_arguments_that_are_not_a_json_object_still_give_a_tool_call(provider, arguments, expected):
    reply = FakeReply(tool_calls=[FakeToolCall("transfer_call", arguments, call_id="call_1")])
    with FakeLlmServer(provider, replies=reply) as server:
        _, [call] = client_for(provider, server.url).respond(MESSAGES, TOOLS)
    assert call.name == "transfer_call"
    assert call.arguments == expected
    if isinstance(arguments, str):
        assert call.raw_arguments == arguments  # exactly what the model sent
    else:
        assert json.loads(call.raw_arguments) == arguments


@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_a_call_to_a_tool_that_was_not_offered_is_handed_on(provider):
    reply = FakeReply(tool_calls=[FakeToolCall("launch_rockets", {"count": 3})])
    with FakeLlmServer(provider, replies=reply) as server:
        _, [call] = client_for(provider, server.url).respond(MESSAGES, TOOLS)
    assert (call.name, call.arguments) == ("launch_rockets", {"count": 3})


OPENAI_WHOLE = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1714560000, "model": "m",
                "choices": [{"index": 0, "finish_reason": "tool_calls",
                             "message": {"role": "assistant", "content": None, "tool_calls": []}}]}
OLLAMA_WHOLE = {"model": "m", "created_at": "2024-05-01T12:00:00Z", "done": True, "done_reason": "stop",
                "message": {"role": "assistant", "content": "", "tool_calls": []}}


def whole_reply_with_calls(provider: str, tool_calls) -> dict:
    if provider == "openai":
        choice = OPENAI_WHOLE["choices"][0]
        return {**OPENAI_WHOLE, "choices": [{**choice, "message": {**choice["message"], "tool_calls": tool_calls}}]}
    return {**OLLAMA_WHOLE, "message": {**OLLAMA_WHOLE["message"], "tool_calls": tool_calls}}


@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
@pytest.mark.parametrize("tool_calls", [
    {"function": {"name": "end_call", "arguments": {}}},  # not a list
    "end_call",
    ["end_call"],  # an entry that is not an object
    [{"name": "end_call", "arguments": "{}"}],  # no "function" object
    [{"id": "call_1", "type": "function", "function": {"arguments": "{}"}}],  # no name
    [{"id": "call_1", "type": "function", "function": {"name": "", "arguments": "{}"}}],
    [{"id": "call_1", "type": "function", "function": {"name": ["end_call"], "arguments": "{}"}}],
])
def test_tool_calls_of_the_wrong_shape_are_a_bad_reply(provider, tool_calls):
    with FakeLlmServer(provider, body=whole_reply_with_calls(provider, tool_calls)) as server:
        with pytest.raises(LlmBadReply, match="tool_calls"):
            client_for(provider, server.url).respond(MESSAGES, TOOLS)


@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_a_reply_with_neither_text_nor_tool_calls_is_a_bad_reply(provider):
    with FakeLlmServer(provider, replies=FakeReply("  ")) as server:
        with pytest.raises(LlmBadReply):
            client_for(provider, server.url).respond(MESSAGES, TOOLS)


@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_huge_arguments_are_a_bad_reply(provider):
    huge = {"note": "x" * MAX_TOOL_ARGUMENTS_CHARS}
    with FakeLlmServer(provider, replies=FakeReply(tool_calls=[FakeToolCall("end_call", huge)])) as server:
        with pytest.raises(LlmBadReply, match="arguments"):
            client_for(provider, server.url).respond(MESSAGES, TOOLS)


@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_too_many_tool_calls_are_a_bad_reply(provider):
    calls = [FakeToolCall("end_call", {}, call_id=f"call_{n}") for n in range(MAX_TOOL_CALLS + 1)]
    with FakeLlmServer(provider, replies=FakeReply(tool_calls=calls)) as server:
        client = client_for(provider, server.url)
        with pytest.raises(LlmBadReply, match="tool calls"):
            client.respond(MESSAGES, TOOLS)
        with pytest.raises(LlmBadReply, match="tool calls"):
            list(client.stream(MESSAGES, TOOLS))


def test_complete_still_returns_only_text():
    with FakeLlmServer("openai", replies=FakeReply(SPOKEN, [TO_SALES])) as server:
        assert OpenAiClient(server.url, "m", 5).complete(MESSAGES) == SPOKEN


# --- streamed replies ------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_a_streamed_reply_speaks_first_then_calls_the_tool(provider):
    with FakeLlmServer(provider, replies=FakeReply(SPOKEN, [TO_SALES])) as server:
        items = list(client_for(provider, server.url).stream(MESSAGES, TOOLS))
    deltas = split_into_deltas(SPOKEN)
    assert items[:len(deltas)] == deltas
    assert items[len(deltas):] == [ToolCall("transfer_call", {"target": "sales"}, '{"target": "sales"}',
                                            expected_id(provider, "call_abc"))]
    assert server.stream_outcomes == ["complete"]


@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_the_spoken_part_arrives_before_the_server_sends_the_tool_call(provider):
    # The server stops after the text until the test says so: the caller can start speaking
    # "Let me put you through." while the call is still being generated.
    deltas = split_into_deltas(SPOKEN)
    with FakeLlmServer(provider, replies=FakeReply(SPOKEN, [TO_SALES]), stream_hold_after=len(deltas)) as server:
        stream = client_for(provider, server.url).stream(MESSAGES, TOOLS)
        spoken = [next(stream) for _ in deltas]
        assert spoken == deltas
        assert server.stream_outcomes == []  # still streaming: the tool call does not exist yet
        server.release_stream.set()
        [call] = list(stream)
    assert call.name == "transfer_call"


def ollama_line(content: str, done: bool = False, **message) -> str:
    return json.dumps({"model": "m", "created_at": "2024-05-01T12:00:00Z", "done": done,
                       "message": {"role": "assistant", "content": content, **message}}) + "\n"


def test_an_ollama_tool_call_is_yielded_as_soon_as_its_line_arrives():
    # Ollama sends each call whole: no need to wait for the "done" line, which the server
    # here holds back until the test has the call.
    calls = [{"function": {"index": 0, "name": "transfer_call", "arguments": {"target": "sales"}}}]
    body = [ollama_line("One moment."), ollama_line("", tool_calls=calls), ollama_line("", done=True)]
    with FakeLlmServer("ollama", stream_body=body, stream_hold_after=2) as server:
        stream = OllamaClient(server.url, "m", 5).stream(MESSAGES, TOOLS)
        assert next(stream) == "One moment."
        call = next(stream)
        assert (call.name, call.arguments) == ("transfer_call", {"target": "sales"})
        assert server.stream_outcomes == []  # the done line is not sent yet
        server.release_stream.set()
        assert list(stream) == []
    assert server.stream_outcomes == ["complete"]


@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_a_streamed_reply_that_only_calls_tools(provider):
    reply = FakeReply(tool_calls=[TO_SALES, FakeToolCall("end_call", {}, call_id="call_def")])
    with FakeLlmServer(provider, replies=reply) as server:
        items = list(client_for(provider, server.url).stream(MESSAGES, TOOLS))
    assert [(item.name, item.arguments, item.call_id) for item in items] == [
        ("transfer_call", {"target": "sales"}, expected_id(provider, "call_abc", "call_0")),
        ("end_call", {}, expected_id(provider, "call_def", "call_1")),
    ]


def test_openai_arguments_split_across_many_chunks_are_reassembled():
    arguments = {"target": "sales", "note": "Grüße — ça va? \"quoted\" \\ back\nslash"}
    call = FakeToolCall("transfer_call", arguments, call_id="call_abc", piece_chars=1)
    with FakeLlmServer("openai", replies=FakeReply(tool_calls=[call])) as server:
        [received] = list(OpenAiClient(server.url, "m", 5).stream(MESSAGES, TOOLS))
    assert received.arguments == arguments
    assert received.raw_arguments == json.dumps(arguments)
    assert server.deltas_sent == 1 + len(json.dumps(arguments))  # one chunk per character


def test_streamed_arguments_that_are_not_json_still_give_a_tool_call():
    call = FakeToolCall("transfer_call", '{"target": sal', call_id="call_abc")
    with FakeLlmServer("openai", replies=FakeReply(tool_calls=[call])) as server:
        [received] = list(OpenAiClient(server.url, "m", 5).stream(MESSAGES, TOOLS))
    assert (received.arguments, received.raw_arguments) == (None, '{"target": sal')


def test_streamed_arguments_past_the_bound_are_a_bad_reply():
    call = FakeToolCall("end_call", {"note": "x" * MAX_TOOL_ARGUMENTS_CHARS}, piece_chars=4096)
    with FakeLlmServer("openai", replies=FakeReply(tool_calls=[call])) as server:
        with pytest.raises(LlmBadReply, match="arguments"):
            list(OpenAiClient(server.url, "m", 5).stream(MESSAGES, TOOLS))


def test_a_tool_call_is_one_delta_for_the_time_bound():
    # Argument pieces give the caller nothing to act on, so they do not reset the per-delta
    # bound: 40 pieces 50 ms apart cannot all arrive within 0.5 s of the last text delta.
    call = FakeToolCall("end_call", {"note": "x" * 28}, call_id="call_1", piece_chars=1)
    with FakeLlmServer("openai", replies=FakeReply("Goodbye.", [call]), stream_gap_s=0.05) as server:
        stream = OpenAiClient(server.url, "m", 0.5).stream(MESSAGES, TOOLS)
        assert [next(stream), next(stream)] == ["Goodbye", "."]
        with pytest.raises(LlmTimeout, match="stalled for 0.5 s after 8 chars"):
            next(stream)


def chunk(delta: dict, finish_reason: str | None = None) -> str:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1714560000, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(body)}\n\n"


def test_openai_sdk_style_nulls_in_tool_call_deltas_are_understood():
    # The shape of a recorded gpt-4.1-nano stream: absent fields sent as null.
    nulls = {"content": None, "function_call": None, "refusal": None, "role": None}
    body = [
        chunk({**nulls, "role": "assistant", "tool_calls": None}),
        chunk({**nulls, "tool_calls": [{"index": 0, "id": "call_Pieq", "type": "function",
                                        "function": {"arguments": "", "name": "transfer_call"}}]}),
        *[chunk({**nulls, "tool_calls": [{"index": 0, "id": None, "type": None,
                                          "function": {"arguments": piece, "name": None}}]})
          for piece in ['{"ta', 'rget', '": "sa', 'les"}']],
        chunk({**nulls, "tool_calls": None}, "tool_calls"),
        "data: [DONE]\n\n",
    ]
    with FakeLlmServer("openai", stream_body=body) as server:
        assert list(OpenAiClient(server.url, "m", 5).stream(MESSAGES, TOOLS)) == [
            ToolCall("transfer_call", {"target": "sales"}, '{"target": "sales"}', "call_Pieq")]


def test_an_id_repeated_on_every_chunk_is_one_call_and_a_new_id_at_the_same_index_is_another():
    # llama_cpp.server repeats the id on each chunk of a call; Ollama's /v1 endpoint numbers
    # parallel calls all index 0 and tells them apart by id only.
    body = [
        chunk({"role": "assistant", "content": None}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "transfer_call", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"arguments": '{"target": '}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"arguments": '"sales"}'}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_b", "type": "function",
                               "function": {"name": "end_call", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
    ]
    with FakeLlmServer("openai", stream_body=body) as server:
        calls = list(OpenAiClient(server.url, "m", 5).stream(MESSAGES, TOOLS))
    assert [(call.call_id, call.name, call.arguments) for call in calls] == [
        ("call_a", "transfer_call", {"target": "sales"}), ("call_b", "end_call", {})]


def test_a_tool_call_with_no_id_gets_one():
    body = [chunk({"tool_calls": [{"index": 0, "function": {"name": "end_call", "arguments": "{}"}}]}),
            chunk({}, "tool_calls")]
    with FakeLlmServer("openai", stream_body=body) as server:
        [call] = list(OpenAiClient(server.url, "m", 5).stream(MESSAGES, TOOLS))
    assert call.call_id == "call_0" and call.name == "end_call"


@pytest.mark.parametrize("bad_delta", [
    {"tool_calls": {"index": 0, "function": {"name": "end_call"}}},  # not a list
    {"tool_calls": ["end_call"]},
    {"tool_calls": [{"index": "zero", "function": {"name": "end_call"}}]},
    {"tool_calls": [{"index": 0, "function": "end_call"}]},
    {"tool_calls": [{"index": 0, "function": {"name": "end_call", "arguments": 42}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},  # never named
])
def test_streamed_tool_call_deltas_of_the_wrong_shape_are_a_bad_reply(bad_delta):
    body = [chunk({"content": "One moment."}), chunk(bad_delta), chunk({}, "tool_calls"), "data: [DONE]\n\n"]
    with FakeLlmServer("openai", stream_body=body) as server:
        stream = OpenAiClient(server.url, "m", 5).stream(MESSAGES, TOOLS)
        assert next(stream) == "One moment."
        with pytest.raises(LlmBadReply, match="tool_calls"):
            list(stream)


def test_a_stream_cut_inside_the_arguments_yields_no_tool_call():
    call = FakeToolCall("transfer_call", {"target": "sales"}, call_id="call_abc", piece_chars=2)
    with FakeLlmServer("openai", replies=FakeReply(SPOKEN, [call]),
                       stream_break_after=len(split_into_deltas(SPOKEN)) + 3) as server:
        items = []
        with pytest.raises(LlmError):
            for item in OpenAiClient(server.url, "m", 5).stream(MESSAGES, TOOLS):
                items.append(item)
    assert "".join(items) == SPOKEN  # the text came through; a half-sent call never does


@pytest.mark.parametrize("bad_calls", ["end_call", [{"function": {"name": 7}}]])
def test_ollama_streamed_tool_calls_of_the_wrong_shape_are_a_bad_reply(bad_calls):
    body = [ollama_line("", tool_calls=bad_calls), ollama_line("", done=True)]
    with FakeLlmServer("ollama", stream_body=body) as server:
        with pytest.raises(LlmBadReply, match="tool_calls"):
            list(OllamaClient(server.url, "m", 5).stream(MESSAGES, TOOLS))


def test_an_openai_server_ignoring_stream_true_still_gives_the_tool_calls():
    whole = whole_reply_with_calls("openai", [{"id": "call_abc", "type": "function",
                                               "function": {"name": "end_call", "arguments": "{}"}}])
    whole["choices"][0]["message"]["content"] = "Goodbye."
    with FakeLlmServer("openai", body=whole) as server:
        assert list(OpenAiClient(server.url, "m", 5).stream(MESSAGES, TOOLS)) == [
            "Goodbye.", ToolCall("end_call", {}, "{}", "call_abc")]


@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
def test_a_streamed_reply_with_neither_text_nor_tool_calls_is_a_bad_reply(provider):
    with FakeLlmServer(provider, replies=FakeReply("")) as server:
        with pytest.raises(LlmBadReply, match="carried no text"):
            list(client_for(provider, server.url).stream(MESSAGES, TOOLS))


# --- a tool round: the call and its result go back to the model -----------------------------------

@pytest.mark.parametrize("provider", TOOL_PROVIDERS)
@pytest.mark.parametrize("streamed", [False, True])
def test_a_tool_round_trip_sends_the_call_and_its_result_in_the_providers_shape(provider, streamed):
    replies = [FakeReply(SPOKEN, [TO_SALES]), "You are now connected."]
    with FakeLlmServer(provider, replies=replies) as server:
        client = client_for(provider, server.url)
        if streamed:
            items = list(client.stream(MESSAGES, TOOLS))
            text, calls = "".join(split(items)[0]), split(items)[1]
        else:
            text, calls = client.respond(MESSAGES, TOOLS)
        [call] = calls
        history = [
            *MESSAGES,
            {"role": "assistant", "content": text, "tool_calls": calls},
            {"role": "tool", "tool_call_id": call.call_id, "name": call.name, "content": '{"ok": true}'},
        ]
        assert client.respond(history, TOOLS) == ("You are now connected.", [])
    sent = server.requests[1]["messages"]
    assert sent[:2] == MESSAGES
    if provider == "openai":
        assert sent[2:] == [
            {"role": "assistant", "content": SPOKEN, "tool_calls": [
                {"id": "call_abc", "type": "function",
                 "function": {"name": "transfer_call", "arguments": '{"target": "sales"}'}}]},
            {"role": "tool", "tool_call_id": "call_abc", "content": '{"ok": true}'},
        ]
    else:
        assert sent[2:] == [
            {"role": "assistant", "content": SPOKEN, "tool_calls": [
                {"type": "function", "id": "call_0",
                 "function": {"index": 0, "name": "transfer_call", "arguments": {"target": "sales"}}}]},
            {"role": "tool", "tool_call_id": "call_0", "tool_name": "transfer_call", "content": '{"ok": true}'},
        ]


def test_openai_round_trip_of_two_calls_and_arguments_that_were_not_json():
    # The fake enforces OpenAI's rule: each call of the assistant message answered, in a tool message.
    reply = FakeReply(tool_calls=[FakeToolCall("transfer_call", '{"target": sal', call_id="call_1"),
                                  FakeToolCall("end_call", "", call_id="call_2")])
    with FakeLlmServer("openai", replies=[reply, "Sorry, which department?"]) as server:
        client = OpenAiClient(server.url, "m", 5)
        text, calls = client.respond(MESSAGES, TOOLS)
        history = [*MESSAGES, {"role": "assistant", "content": text, "tool_calls": calls}] + [
            {"role": "tool", "tool_call_id": call.call_id, "name": call.name, "content": "error: bad arguments"}
            for call in calls]
        assert client.respond(history, TOOLS) == ("Sorry, which department?", [])
    sent_calls = server.requests[1]["messages"][2]["tool_calls"]
    # What the model sent goes back as it was; an empty string becomes the empty object.
    assert [c["function"]["arguments"] for c in sent_calls] == ['{"target": sal', "{}"]


def test_ollama_gets_an_empty_object_for_arguments_that_were_not_one():
    reply = FakeReply(tool_calls=[FakeToolCall("transfer_call", "sales")])
    with FakeLlmServer("ollama", replies=[reply, "Which department?"]) as server:
        client = OllamaClient(server.url, "m", 5)
        _, [call] = client.respond(MESSAGES, TOOLS)
        client.respond([*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": call.call_id, "name": call.name, "content": "error"}], TOOLS)
    assert server.requests[1]["messages"][2]["tool_calls"][0]["function"]["arguments"] == {}


def test_the_fake_refuses_tool_messages_the_real_servers_would_refuse():
    # Proof that the round-trip tests above check something: the fake answers 400 to these.
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "end_call", "arguments": "{}"}}]}
    cases = {
        "openai": [
            [*MESSAGES, assistant],  # the call never answered
            [*MESSAGES, {"role": "tool", "tool_call_id": "call_9", "content": "ok"}],  # answers nothing
            [*MESSAGES, {**assistant, "tool_calls": [{"id": "call_1", "type": "function",
                                                      "function": {"name": "end_call", "arguments": {}}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "ok"}],  # arguments not a string
        ],
        "ollama": [
            [*MESSAGES, {"role": "tool", "content": "ok"}],  # no tool_name
            [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "end_call", "arguments": "{}"}}]}],  # arguments not an object
        ],
    }
    for provider, bodies in cases.items():
        with FakeLlmServer(provider) as server:
            for messages in bodies:
                body = {"model": "m", "messages": messages, "stream": False}
                assert requests.post(server.url, json=body, timeout=5).status_code == 400
            assert len(server.violations) == len(bodies)
            server.violations.clear()


@pytest.mark.parametrize("message", [
    {"role": "tool", "content": "ok", "name": "end_call"},  # no tool_call_id
    {"role": "tool", "tool_call_id": "call_1", "content": "ok"},  # no name
    {"role": "tool", "tool_call_id": "call_1", "name": "end_call", "content": {"ok": True}},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "end_call"}]},  # not ToolCalls
    {"role": "assistant", "content": "", "tool_calls": ToolCall("end_call", {}, "{}", "call_1")},
    {"role": "user", "content": "hi", "tool_calls": [ToolCall("end_call", {}, "{}", "call_1")]},
    {"role": "function", "content": "ok"},
])
def test_malformed_tool_messages_are_a_caller_bug(message):
    with pytest.raises(ValueError):
        check_messages([SYSTEM, NEW_USER, message])


# --- llama3: no tools ------------------------------------------------------------------------------

def test_llama3_ignores_tools_and_drops_tool_messages():
    call = ToolCall("transfer_call", {"target": "sales"}, '{"target": "sales"}', "call_0")
    history = [
        SYSTEM, NEW_USER,
        {"role": "assistant", "content": SPOKEN, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "name": "transfer_call", "content": '{"ok": true}'},
        {"role": "assistant", "content": "", "tool_calls": [call]},  # nothing left to show once the call goes
        {"role": "user", "content": "Thanks."},
    ]
    with FakeLlmServer("llama3", replies="You're welcome.") as server:
        client = Llama3Client(server.url, "m", 5)
        with capture_logs() as logs:
            assert client.respond(history, TOOLS) == ("You're welcome.", [])
            assert list(client.stream(history, TOOLS)) == ["You're welcome."]
    for request in server.requests:
        assert "tools" not in request
        assert request["conversation_history"] == [NEW_USER, {"role": "assistant", "content": SPOKEN}]
        assert request["user_message"] == "Thanks."
    assert [entry["log_level"] for entry in logs if entry["event"] == "llm_tools_ignored"] == ["debug", "debug"]
