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


def test_two_turns_with_smollm2_each_ending_in_a_broadcast_of_a_telephony_wav(tmp_path, llama_server):
    with FreeswitchSimulator() as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="openai", LLM_API_URL=llama_server.chat_completions_url,
                                LLM_MODEL="smollm2", LLM_TIMEOUT="60")
        client = RecordingClient(settings.llm_api_url, settings.llm_model, settings.llm_timeout_s)
        turns = []
        with running_daemon(sim, settings, llm=client, on_turn=turns.append):
            call = sim.new_call()
            wavs = []
            for number, text in enumerate(["Hello, what are your opening hours?", "Can I come tomorrow?"], start=1):
                sim.speak(call, text)
                command = sim.wait_for_command(
                    lambda c, n=number: c.line.startswith(f"api uuid_broadcast {call} ") and len(broadcasts(sim, call)) == n, 90)
                wav = command.line.split()[3]
                info = soundfile.info(wav)  # read at once: the file exists when the command is sent
                assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
                assert info.duration > 0.1
                wavs.append(wav)
            wait_until(lambda: len(turns) == 2, 30)
        assert not any(t.used_fallback for t in turns)
        first_reply = turns[0].reply
        assert first_reply.strip()
        # The second request carries the first exchange.
        assert [m["role"] for m in client.sent[1]] == ["system", "user", "assistant", "user"]
        assert client.sent[1][1]["content"] == "Hello, what are your opening hours?"
        assert client.sent[1][2]["content"] == first_reply
        assert client.sent[1][3]["content"] == "Can I come tomorrow?"
        assert len(set(wavs)) == 2
