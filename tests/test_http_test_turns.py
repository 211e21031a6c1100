"""POST /test/transcription and DELETE /test/calls/{uuid} on the real daemon, the simulator and a
real HTTP client: the same turn a phone call runs, answered as one WAV."""

from __future__ import annotations

import io
import json
import urllib.parse

import gevent
import numpy as np
import pytest
import requests
import soundfile
from gevent.monkey import get_original

from harness import broadcasts, http_server, running_daemon, settings_for, wait_until
from llm_fakes import FakeLlmServer, FakeReply, FakeToolCall
from ivr_daemon.audio import join_telephony_wavs
from ivr_daemon.http import test_calls
from ivr_daemon.http.test_calls import IDLE_S, TestCalls
from ivr_daemon.http.transcription import MAX_BODY_BYTES, MAX_TRANSCRIPTION_CHARS
from ivr_daemon.replay.simulator import FreeswitchSimulator

DEFAULT_PROMPT = "You are the test prompt."


def post_turn(http, call_uuid: str, transcription: str, **extra) -> requests.Response:
    return requests.post(f"{http.url}/test/transcription",
                         json={"call_uuid": call_uuid, "transcription": transcription, **extra}, timeout=30)


def numbered_replies(request: dict) -> str:
    """Reply n to the n-th request: which answer went where is then plain in the history."""
    numbered_replies.count += 1
    return f"Reply {numbered_replies.count}."


def conversation(request: dict) -> list[tuple[str, str]]:
    """(role, content) of what the LLM was sent, system prompt included."""
    return [(m["role"], m["content"]) for m in request["messages"]]


@pytest.fixture
def sim():
    with FreeswitchSimulator() as simulator:
        yield simulator


def test_the_answer_is_one_8khz_mono_pcm16_wav_whose_duration_is_its_metadata(sim, tmp_path):
    reply = "Our shop opens at nine. It closes at five in the afternoon."
    with FakeLlmServer("ollama", replies=reply) as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                TTS_ENGINE="piper")
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            answer = post_turn(http, "wav-check", "When are you open?")

    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "audio/wav"
    metadata = json.loads(answer.headers["X-File-Metadata"])
    info = soundfile.info(io.BytesIO(answer.content))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 8000, 1)
    assert metadata == {"sample_rate_hz": 8000, "channels": 1, "sample_width_bytes": 2,
                        "duration_s": pytest.approx(info.duration, abs=1e-4), "size_bytes": len(answer.content)}
    # Both sentences, spoken by Piper: seconds of real audio, not silence.
    samples, _ = soundfile.read(io.BytesIO(answer.content), dtype="int16")
    assert metadata["duration_s"] > 2.0 and np.abs(samples).max() > 1000
    assert urllib.parse.unquote(answer.headers["X-LLM-Response"]) == reply
    assert answer.headers["X-Used-Fallback"] == "false"
    assert answer.headers["X-Turn"] == "1"
    assert broadcasts(sim) == []  # nothing of a test turn reaches the switch


def test_history_carries_over_for_one_call_uuid_and_never_across_uuids(sim, tmp_path):
    numbered_replies.count = 0
    with FakeLlmServer("ollama", replies=numbered_replies) as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                SYSTEM_PROMPT=DEFAULT_PROMPT, MAX_CONVERSATION_HISTORY="3")
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            for call_uuid, words in (("alice", "first"), ("alice", "second"), ("bob", "other"), ("alice", "third")):
                answer = post_turn(http, call_uuid, words)
                assert answer.status_code == 200, answer.text

    system = ("system", DEFAULT_PROMPT)
    assert [conversation(request) for request in llm.requests] == [
        [system, ("user", "first")],
        [system, ("user", "first"), ("assistant", "Reply 1."), ("user", "second")],
        [system, ("user", "other")],  # bob never hears of alice
        # MAX_CONVERSATION_HISTORY=3, as for a phone call: the oldest message went.
        [system, ("user", "second"), ("assistant", "Reply 2."), ("user", "third")],
    ]


def test_a_reply_that_is_not_ascii_is_percent_encoded_in_its_header(sim, tmp_path):
    reply = "Grüße aus Köln – 100% sicher, 東京も."
    with FakeLlmServer("ollama", replies=reply) as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            answer = post_turn(http, "unicode", "Say hello in German.")
    header = answer.headers["X-LLM-Response"]
    assert header.isascii() and "%25" in header  # "%" itself is escaped: unquote is exact
    assert header.startswith("Gr%C3%BC%C3%9Fe aus K%C3%B6ln %E2%80%93 100%25 sicher")
    assert urllib.parse.unquote(header) == reply


BAD_REQUESTS = [
    # (what, requests.post keyword arguments, status)
    ("plain text", {"data": "hello", "headers": {"Content-Type": "text/plain"}}, 415),
    ("no content type", {"data": json.dumps({"call_uuid": "a", "transcription": "hi"})}, 415),
    ("form", {"data": {"call_uuid": "a", "transcription": "hi"}}, 415),
    ("broken JSON", {"data": "{nope", "headers": {"Content-Type": "application/json"}}, 400),
    ("not UTF-8", {"data": b'{"call_uuid": "\xff"}', "headers": {"Content-Type": "application/json"}}, 400),
    ("a JSON list", {"json": ["a", "hi"]}, 400),
    ("no call_uuid", {"json": {"transcription": "hi"}}, 400),
    ("no transcription", {"json": {"call_uuid": "a"}}, 400),
    ("empty call_uuid", {"json": {"call_uuid": "", "transcription": "hi"}}, 400),
    ("blank transcription", {"json": {"call_uuid": "a", "transcription": " \n\t"}}, 400),
    ("call_uuid a number", {"json": {"call_uuid": 7, "transcription": "hi"}}, 400),
    ("transcription a list", {"json": {"call_uuid": "a", "transcription": ["hi"]}}, 400),
    ("call_uuid with a slash", {"json": {"call_uuid": "a/../b", "transcription": "hi"}}, 400),
    ("call_uuid with a space", {"json": {"call_uuid": "a b", "transcription": "hi"}}, 400),
    ("call_uuid not ASCII", {"json": {"call_uuid": "caf\u00e9", "transcription": "hi"}}, 400),
    ("call_uuid with a newline", {"json": {"call_uuid": "a\nb", "transcription": "hi"}}, 400),
    ("call_uuid too long", {"json": {"call_uuid": "a" * 129, "transcription": "hi"}}, 400),
    ("unknown field", {"json": {"call_uuid": "a", "transcript": "hi"}}, 400),
    ("agent a number", {"json": {"call_uuid": "a", "transcription": "hi", "agent": 3}}, 400),
    ("transcription too long", {"json": {"call_uuid": "a", "transcription": "w" * (MAX_TRANSCRIPTION_CHARS + 1)}}, 413),
    ("body over 64 KiB", {"json": {"call_uuid": "a", "transcription": "hi", "agent": "x" * MAX_BODY_BYTES}}, 413),
    ("unknown agent", {"json": {"call_uuid": "a", "transcription": "hi", "agent": "nobody"}}, 404),
]


def test_every_bad_request_gets_its_json_error_and_the_llm_is_never_asked(sim, tmp_path):
    with FakeLlmServer("ollama", replies="Fine.") as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            got = {}
            for what, kwargs, _status in BAD_REQUESTS:
                answer = requests.post(f"{http.url}/test/transcription", timeout=10, **kwargs)
                assert answer.headers["Content-Type"] == "application/json", what
                assert answer.json()["title"].startswith(str(answer.status_code)), what
                got[what] = answer.status_code
            assert got == {what: status for what, _kwargs, status in BAD_REQUESTS}
            assert llm.requests == [] and len(http.test_calls) == 0
            # The longest allowed fields are fine, and the server is none the worse.
            answer = post_turn(http, "a" * 128, "w" * MAX_TRANSCRIPTION_CHARS)
            assert answer.status_code == 200 and len(llm.requests) == 1


def test_a_second_turn_for_a_call_uuid_in_flight_is_refused_at_once_with_409(sim, tmp_path):
    with FakeLlmServer("ollama", replies="At last.", hold_reply=True) as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                LLM_TIMEOUT="30")
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            first = gevent.spawn(post_turn, http, "busy", "one")
            wait_until(lambda: len(llm.requests) == 1)  # its turn is in flight, the LLM holds
            second = post_turn(http, "busy", "two")
            assert second.status_code == 409 and "in flight" in second.json()["description"]
            assert len(llm.requests) == 1
            llm.release_reply.set()
            assert first.get(timeout=10).status_code == 200
            third = post_turn(http, "busy", "three")  # one at a time, not one ever
            assert third.status_code == 200
    assert [conversation(r)[-1] for r in llm.requests] == [("user", "one"), ("user", "three")]


def test_delete_forgets_a_test_conversation(sim, tmp_path):
    with FakeLlmServer("ollama", replies="Noted.") as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                SYSTEM_PROMPT=DEFAULT_PROMPT)
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            assert post_turn(http, "forget-me", "remember this").status_code == 200
            assert requests.delete(f"{http.url}/test/calls/forget-me", timeout=10).status_code == 204
            assert post_turn(http, "forget-me", "what did I say").status_code == 200
            missing = requests.delete(f"{http.url}/test/calls/never-was", timeout=10)
    assert missing.status_code == 404 and missing.json()["title"] == "404 Not Found"
    assert conversation(llm.requests[1]) == [("system", DEFAULT_PROMPT), ("user", "what did I say")]


class Clock:
    def __init__(self):
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_test_conversations_idle_for_30_minutes_are_forgotten_by_the_sweep(sim, tmp_path):
    clock = Clock()
    with FakeLlmServer("ollama", replies="Noted.") as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                SYSTEM_PROMPT=DEFAULT_PROMPT)
        with running_daemon(sim, settings) as daemon:
            test_calls = TestCalls(daemon.flow, now_s=clock)
            with http_server(daemon, test_calls=test_calls) as http:
                assert post_turn(http, "idle", "hello").status_code == 200
                assert post_turn(http, "busy-ish", "hello").status_code == 200
                clock.now_s += IDLE_S - 1
                assert post_turn(http, "busy-ish", "still here").status_code == 200
                assert test_calls.sweep() == 0 and len(test_calls) == 2  # 29:59 idle: kept
                clock.now_s += 1
                assert test_calls.sweep() == 1  # 30:00 idle: forgotten; the other one was used since
                assert "idle" not in test_calls and "busy-ish" in test_calls
                assert post_turn(http, "idle", "again").status_code == 200
    assert conversation(llm.requests[-1]) == [("system", DEFAULT_PROMPT), ("user", "again")]


def test_past_the_limit_the_longest_idle_test_conversation_makes_room(sim, tmp_path):
    with FakeLlmServer("ollama", replies="Noted.") as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon:
            test_calls = TestCalls(daemon.flow, max_calls=2)
            with http_server(daemon, test_calls=test_calls) as http:
                for call_uuid in ("one", "two", "one", "three"):
                    assert post_turn(http, call_uuid, "hi").status_code == 200
                assert len(test_calls) == 2 and "two" not in test_calls  # "one" was used after "two"


def test_no_per_call_wav_is_left_behind_and_the_phrase_cache_keeps_its_files(sim, tmp_path):
    with FakeLlmServer("ollama", replies="First sentence here. And a second one.") as llm:
        for cache_mb in ("0", "200"):
            tts_dir = tmp_path / f"tts-{cache_mb}"
            settings = settings_for(sim, tts_dir, LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                    TTS_CACHE_MAX_MB=cache_mb)
            with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
                answer = post_turn(http, "files", "hello")
                assert answer.status_code == 200
                assert json.loads(answer.headers["X-File-Metadata"])["duration_s"] > 1.0  # both sentences
                assert [p.name for p in tts_dir.iterdir() if p.is_file()] == []
                cached = list((tts_dir / "cache").glob("*.wav"))
                assert len(cached) == (2 if cache_mb != "0" else 0)


def test_when_the_llm_fails_the_answer_is_the_fallback_phrase(sim, tmp_path):
    fallback = "Sorry, the test line is down."
    with FakeLlmServer("ollama", status=500) as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                FALLBACK_PHRASE=fallback)
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            answer = post_turn(http, "down", "hello?")
            health = requests.get(f"{http.url}/health", timeout=10).json()
    assert health["last_llm_error"]["kind"] == "http"  # what went wrong, for the administrator
    assert answer.status_code == 200
    assert answer.headers["X-Used-Fallback"] == "true"
    assert urllib.parse.unquote(answer.headers["X-LLM-Response"]) == fallback
    assert json.loads(answer.headers["X-File-Metadata"])["duration_s"] > 0.5
    assert len(llm.requests) == 1


AGENTS_TOML = """
default_agent = "reception"

[agents.reception]
system_prompt = "You are reception."

[agents.sales]
system_prompt = "You are sales."
goodbye_phrase = "Thanks from sales. Goodbye."

[agents.sales.transfer_targets]
order_desk = "2100 XML default"
"""


def test_the_agent_field_picks_the_agents_prompt_tools_and_phrases(sim, tmp_path):
    agents_file = tmp_path / "agents.toml"
    agents_file.write_text(AGENTS_TOML)
    replies = [FakeReply("Putting you through.", [FakeToolCall("transfer_call", {"target": "order_desk"})]),
               "Hello from reception.",
               FakeReply("Bye now.", [FakeToolCall("end_call")])]
    with FakeLlmServer("ollama", replies=replies) as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                AGENTS_FILE=str(agents_file))
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            sales = post_turn(http, "shopper", "I want to order", agent="sales")
            reception = post_turn(http, "visitor", "hello")
            other_agent = post_turn(http, "shopper", "hello again", agent="reception")
            bye = post_turn(http, "shopper", "that is all")  # no agent: the call's own
    assert [r.status_code for r in (sales, reception, other_agent, bye)] == [200, 200, 409, 200]
    assert conversation(llm.requests[0])[0] == ("system", "You are sales.")
    assert [tool["function"]["name"] for tool in llm.requests[0]["tools"]] == ["transfer_call", "end_call"]
    assert conversation(llm.requests[1])[0] == ("system", "You are reception.")
    # What a phone call would have done is said and reported, never sent.
    assert sales.headers["X-Call-Action"] == "transfer:order_desk"
    assert urllib.parse.unquote(sales.headers["X-LLM-Response"]) == "Putting you through. Transferring you now."
    assert bye.headers["X-Call-Action"] == "end_call"
    assert urllib.parse.unquote(bye.headers["X-LLM-Response"]) == "Bye now. Thanks from sales. Goodbye."
    assert "X-Call-Action" not in reception.headers
    assert [c.line for c in sim.commands if c.line.startswith(("api uuid_", "bgapi uuid_"))] == []
    assert len(llm.requests) == 3


def test_the_reply_wavs_are_joined_off_the_loop_into_the_same_bytes(sim, tmp_path, monkeypatch):
    # Reading and joining a reply's sentence WAVs is CPU and file work: the loop, which ESL
    # events need, must not do it. The real join runs, on whatever thread the daemon picks.
    native_ident = get_original("_thread", "get_ident")
    loop_thread = native_ident()
    joins = []

    def recording_join(paths):
        paths = list(paths)
        inputs = [path.read_bytes() for path in paths]  # the per-call WAVs are deleted after the turn
        result = join_telephony_wavs(paths)
        joins.append((native_ident(), inputs, result))
        return result

    monkeypatch.setattr(test_calls, "join_telephony_wavs", recording_join)
    with FakeLlmServer("ollama", replies="First sentence here. And a second one.") as llm:
        settings = settings_for(sim, tmp_path / "tts", LLM_PROVIDER="ollama", LLM_API_URL=llm.url)
        with running_daemon(sim, settings) as daemon, http_server(daemon) as http:
            answer = post_turn(http, "joined", "hello")

    assert answer.status_code == 200, answer.text
    [(thread, inputs, (wav, frames))] = joins
    assert thread != loop_thread
    assert answer.content == wav
    # Byte for byte what joining the same sentence WAVs on the loop gives.
    copies = []
    for index, data in enumerate(inputs):
        copies.append(tmp_path / f"sentence-{index}.wav")
        copies[-1].write_bytes(data)
    assert len(copies) == 2
    assert join_telephony_wavs(copies) == (answer.content, frames)
