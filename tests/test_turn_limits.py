"""Bounded turns: LLM_MAX_TOKENS on the wire, MAX_REPLY_SENTENCES spoken, one fallback per turn."""

from __future__ import annotations

import uuid as uuid_lib

import pytest
from structlog.testing import capture_logs

from harness import broadcasts, captured_event, running_daemon, settings_for, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.config import load_settings
from ivr_daemon.llm import OpenAiClient, make_llm_client
from ivr_daemon.replay.simulator import FreeswitchSimulator

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
LOOPING_REPLY = " ".join(f"Item {n} is here." for n in range(1, 21))


@pytest.mark.parametrize("provider", ["ollama", "openai"])
@pytest.mark.parametrize("stream", [False, True])
def test_llm_max_tokens_is_sent_to_the_server(provider, stream):
    with FakeLlmServer(provider, replies="Fine.") as llm:
        settings = load_settings(environ={"LLM_PROVIDER": provider, "LLM_API_URL": llm.url, "LLM_MAX_TOKENS": "42"})
        client = make_llm_client(settings)
        reply = "".join(client.stream(MESSAGES)) if stream else client.complete(MESSAGES)
        assert reply == "Fine."
        sent = llm.requests[0]
        assert (sent["options"]["num_predict"] if provider == "ollama" else sent["max_tokens"]) == 42
        assert llm.violations == []


def test_a_real_llama_cpp_server_stops_at_max_tokens(llama_server):
    client = OpenAiClient(llama_server.chat_completions_url, "smollm2", timeout_s=60, max_tokens=3)
    reply = client.complete([{"role": "system", "content": "You are a storyteller."},
                             {"role": "user", "content": "Tell me a very long story about a dragon."}])
    # Three tokens are three words at the most (a token never holds two).
    assert reply and len(reply.split()) <= 3, reply


@pytest.mark.parametrize("stream", ["true", "false"])
def test_a_looping_model_is_cut_after_max_reply_sentences(tmp_path, stream):
    with FakeLlmServer("ollama", replies=LOOPING_REPLY, stream_hold_after=30) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url,
                                MAX_REPLY_SENTENCES="3", LLM_STREAM=stream)
        if stream == "false":
            llm.release_stream.set()  # batch: no stream to hold
        turns = []
        with running_daemon(sim, settings, on_turn=turns.append) as daemon:
            call = sim.new_call()
            with capture_logs() as logs:
                sim.speak(call, "list everything")
                wait_until(lambda: turns)
            said = "Item 1 is here. Item 2 is here. Item 3 is here."
            if stream == "true":
                # Cut while the model was still writing: the stream was closed, not read on.
                llm.release_stream.set()
                assert llm.client_disconnected.wait(5)
                assert len(broadcasts(sim, call)) == 3
            else:
                assert len(broadcasts(sim, call)) == 1  # a batch reply is one WAV
            assert turns[0].reply == said
            history = daemon.router.calls[call].handler.history.messages()
            assert history[-1] == {"role": "assistant", "content": said}
            assert any(line["event"] == "reply_cut" and line["max_reply_sentences"] == 3 for line in logs)


def test_a_rejected_fallback_is_tried_once_per_turn_not_on_every_pass(tmp_path):
    # Words with no sentence end, slowly: past LLM_TIMEOUT + 0.5 s no sentence exists yet, while
    # the stream itself never stalls long enough for the client to give up.
    slow_words = " ".join(["word"] * 60) + "."
    with FakeLlmServer("ollama", replies=slow_words, stream_gap_s=0.05) as llm, \
            FreeswitchSimulator(playback_speed=0.02) as sim:
        # Whole sentences only: a first clause (FIRST_CHUNK=clause cuts after 12 words) would be
        # a chunk before the deadline, and this is about a turn with nothing to say in time.
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, LLM_TIMEOUT="0.5",
                                FIRST_CHUNK="sentence")
        turns = []
        with running_daemon(sim, settings, on_turn=turns.append):
            # A channel FreeSWITCH no longer has: every broadcast to it is answered -ERR.
            gone = str(uuid_lib.uuid4())
            with capture_logs() as logs:
                sim.send_event_frame(captured_event(
                    "40_event_plain_DETECTED_SPEECH_detected-speech.txt", "hello", Unique_ID=gone,
                    Channel_Call_UUID=gone, Caller_Unique_ID=gone, Event_Sequence="70001"))
                wait_until(lambda: turns, 15)
            assert turns[0].used_fallback is False  # nothing was heard
            assert len(broadcasts(sim, gone)) == 1
            assert [line["event"] for line in logs].count("broadcast_rejected") == 1
            assert [line["event"] for line in logs].count("no_answer_in_time") == 1
