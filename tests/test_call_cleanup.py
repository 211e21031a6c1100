"""A call's clean-up deletes every WAV of its own, also those whose synthesis ends after the hangup."""

from __future__ import annotations

from gevent.monkey import get_original

from harness import broadcasts, running_daemon, settings_for, wait_until
from llm_fakes import FakeLlmServer
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts.base import TtsEngine
from ivr_daemon.tts.null import NullEngine

SENTENCES = ("First comes one.", "Second comes two.", "Third comes three.")


class PerSentenceGatedEngine(TtsEngine):
    """Null audio; each of SENTENCES waits for its own gate, so the test picks the order they finish in."""

    name = "gated"
    voice_id = "gated:per-sentence"

    def __init__(self):
        native_event = get_original("threading", "Event")
        self.inner = NullEngine()
        self.gates = {text: native_event() for text in SENTENCES}
        self.started: list[str] = []

    def synthesize(self, text):
        gate = self.gates.get(text)
        if gate is not None:
            self.started.append(text)
            gate.wait(30)
        return self.inner.synthesize(text)


def test_three_syntheses_pending_at_hangup_leave_no_wav(tmp_path):
    engine = PerSentenceGatedEngine()
    with FakeLlmServer("ollama", replies=" ".join(SENTENCES)) as llm, FreeswitchSimulator(playback_speed=0.05) as sim:
        settings = settings_for(sim, tmp_path, LLM_PROVIDER="ollama", LLM_API_URL=llm.url, TTS_CACHE_MAX_MB="0")
        with running_daemon(sim, settings, tts=engine, synth_threads=3) as daemon:
            call = sim.new_call()
            sim.speak(call, "count to three")
            wait_until(lambda: len(engine.started) == 3)  # all three synthesizing at once
            handler = daemon.router.calls[call].handler
            sim.hangup(call)
            wait_until(lambda: handler.hung_up)
            # They finish out of order, the middle one last, after the call's clean-up began.
            engine.gates[SENTENCES[0]].set()
            wait_until(lambda: len(handler._pending_syntheses) == 2)
            engine.gates[SENTENCES[2]].set()
            wait_until(lambda: len(handler._pending_syntheses) == 1)
            engine.gates[SENTENCES[1]].set()
            wait_until(lambda: call not in daemon.router.calls and not handler._pending_syntheses)
            wait_until(lambda: not list(tmp_path.glob(f"{call}-*.wav")), 5)
            assert broadcasts(sim, call) == []
            assert not list(tmp_path.glob(f".{call}-*"))  # no temp file either
