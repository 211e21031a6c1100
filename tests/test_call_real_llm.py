"""A whole call on the simulator with the real llama.cpp server and SmolLM2."""

import json

import soundfile

from harness import broadcasts, running_daemon, settings_for, wait_until
from ivr_daemon.llm.openai import OpenAiClient
from ivr_daemon.replay.simulator import FreeswitchSimulator


class RecordingClient(OpenAiClient):
    """The real OpenAI-compatible client, keeping a copy of what it sent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = []

    def complete(self, messages):
        self.sent.append(json.loads(json.dumps(messages)))
        return super().complete(messages)

    def stream(self, messages, tools=()):
        self.sent.append(json.loads(json.dumps(messages)))
        return super().stream(messages, tools)


def test_two_turns_with_smollm2_each_ending_in_a_broadcast_of_a_telephony_wav(tmp_path, llama_server):
    with FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="openai", LLM_API_URL=llama_server.chat_completions_url,
                                # llama-cpp-python's server cannot stream a tool call.
                                LLM_MODEL="smollm2", LLM_TIMEOUT="60", LLM_TOOLS="false")
        client = RecordingClient(settings.llm_api_url, settings.llm_model, settings.llm_timeout_s)
        turns = []
        with running_daemon(sim, settings, llm=client, on_turn=turns.append) as daemon:
            call = sim.new_call()
            for number, text in enumerate(["Hello, what are your opening hours?", "Can I come tomorrow?"], start=1):
                sim.speak(call, text)
                wait_until(lambda: len(turns) == number, 90)
                handler = daemon.router.calls[call].handler
                wait_until(lambda: not handler.playing, 60)  # the caller hears the answer out
            infos = [soundfile.info(line.split()[3]) for line in broadcasts(sim, call)]
        assert len(turns) == 2 and not any(t.used_fallback or t.interrupted for t in turns)
        assert all(t.sentences >= 1 for t in turns)
        for info in infos:
            assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16") and info.duration > 0.1
        first_reply = client.sent and handler.history.messages()[2]["content"]
        assert first_reply.strip()
        # The second request carries the first exchange.
        assert [m["role"] for m in client.sent[1]] == ["system", "user", "assistant", "user"]
        assert client.sent[1][1]["content"] == "Hello, what are your opening hours?"
        assert client.sent[1][2]["content"] == first_reply
        assert client.sent[1][3]["content"] == "Can I come tomorrow?"
        assert len(broadcasts(sim, call)) == sum(t.sentences for t in turns)
