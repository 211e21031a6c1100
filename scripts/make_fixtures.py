#!/usr/bin/env python
"""Re-record the fixture library in tests/fixtures/ with `ivr-daemon record` on the simulator.

The events come from the simulator, which builds them from real FreeSWITCH captures; the
LLM is the real SmolLM2 on llama.cpp's server (its replies are stored in the fixtures, so
replays need no LLM). SmolLM2-135M cannot call tools, so the two LLM-transfer fixtures are
recorded against tests/llm_fakes.py's FakeLlmServer (real HTTP, OpenAI's wire format) scripted
to call transfer_call; their comment lines say so. Run from the repository root:
.venv/bin/python scripts/make_fixtures.py [NAME ...] (the names of the fixtures to re-record;
none: all).
"""

from gevent import monkey

monkey.patch_all()

import contextlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from pathlib import Path  # noqa: E402

from ivr_daemon.localllm import LlamaCppServer, find_or_fetch_smollm2, pick_free_port  # noqa: E402
from ivr_daemon.replay.recorder import record_scripted_calls  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CACHE = ROOT / ".cache" / "models"
TRANSFER_AGENTS = FIXTURES / "llm_transfer.agents.toml"  # reception: sales and support

sys.path.insert(0, str(ROOT / "tests"))
from llm_fakes import FakeLlmServer, FakeReply, FakeToolCall  # noqa: E402


def broadcasts(sim, call):
    return [c for c in sim.commands if c.line.startswith(f"api uuid_broadcast {call} ")]


def hear_answer(sim, call, before, quiet_s=1.0, timeout_s=120):
    """Wait for the daemon's first broadcast after ``before``, then until every sentence has played
    and no new one came for ``quiet_s``: a caller who listens to the whole answer."""
    deadline = time.monotonic() + timeout_s
    while len(broadcasts(sim, call)) <= before:
        assert time.monotonic() < deadline, "no answer"
        gevent.sleep(0.02)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s:
        assert time.monotonic() < deadline, "the answer never finished"
        if sim.playing(call) or len(sim.playback_log(call)) < len(broadcasts(sim, call)):
            quiet_since = time.monotonic()
        gevent.sleep(0.02)


def ask(sim, call, text):
    """The caller says ``text`` and listens to the whole answer."""
    before = len(broadcasts(sim, call))
    sim.speak(call, text)
    hear_answer(sim, call, before)


def one_question(sim):
    call = sim.new_call(caller_id_number="5551001")
    ask(sim, call, "what are your opening hours")
    sim.hangup(call)


def three_turns(sim):
    call = sim.new_call(caller_id_number="5551002")
    for text in ("hello I would like to book a table", "for four people tonight", "at eight o'clock please"):
        ask(sim, call, text)
    sim.hangup(call)


def hangup_mid_reply(sim):
    call = sim.new_call(caller_id_number="5551003")
    ask(sim, call, "can you tell me a long story")
    sim.speak(call, "and then what happened")
    gevent.sleep(0.15)  # SmolLM2 takes ~300 ms: hang up while it is still answering
    sim.hangup(call)


def two_calls_interleaved(sim):
    first = sim.new_call(caller_id_number="5551004")
    second = sim.new_call(caller_id_number="5551005")
    sim.speak(first, "do you sell gift cards")
    sim.speak(second, "where are you located")
    for call in (first, second):
        hear_answer(sim, call, 0)
    ask(sim, second, "is there parking")
    ask(sim, first, "how much are they")
    sim.hangup(first)
    sim.hangup(second)


def llm_failure(sim):
    call = sim.new_call(caller_id_number="5551006")
    ask(sim, call, "is anybody there")
    sim.hangup(call)


def _event_frame(inner: bytes) -> bytes:
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(inner) + inner


def barge_in(sim):
    call = sim.new_call(caller_id_number="5551008")
    sim.speak(call, "tell me about all of your services")
    sim.wait_for_event(lambda e: e.name == "PLAYBACK_START" and e.unique_id == call, 60)
    gevent.sleep(0.3)
    sim.speak(call, "wait", final=False)  # the caller talks over the answer: mod_vosk's partial
    sim.wait_for_command(lambda c: c.line == f"api uuid_break {call} all", 10)
    before = len(broadcasts(sim, call))
    sim.speak(call, "wait just tell me the price")
    hear_answer(sim, call, before)
    sim.hangup(call)


def greeting(sim):
    call = sim.new_call(caller_id_number="5551009")
    hear_answer(sim, call, 0)  # the greeting
    ask(sim, call, "what are your opening hours")
    sim.hangup(call)


def silence_goodbye(sim):
    call = sim.new_call(caller_id_number="5551010")
    # The caller says nothing: greeting, two re-prompts, the goodbye, and the daemon hangs up.
    sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_kill {call} "), 60)


def dtmf_transfer(sim):
    call = sim.new_call(caller_id_number="5551011")
    hear_answer(sim, call, 0)  # the greeting
    sim.dtmf(call, "0")
    sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_transfer {call} "), 60)
    hear_answer(sim, call, 1)  # the transfer phrase was heard before the transfer
    sim.hangup(call)


def goodbye_words(sim):
    call = sim.new_call(caller_id_number="5551012")
    hear_answer(sim, call, 0)  # the greeting
    ask(sim, call, "do you deliver")
    sim.speak(call, "goodbye")
    sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_kill {call} "), 60)


def llm_transfer_allowed(sim):
    call = sim.new_call(caller_id_number="5551013", variables={"ivr_agent": "reception"})
    hear_answer(sim, call, 0)  # the greeting
    sim.speak(call, "can I talk to someone in sales")
    sim.wait_for_command(lambda c: c.line.startswith(f"api uuid_transfer {call} "), 60)
    sim.hangup(call)


def llm_transfer_refused(sim):
    call = sim.new_call(caller_id_number="5551014", variables={"ivr_agent": "reception"})
    hear_answer(sim, call, 0)  # the greeting
    ask(sim, call, "put me through to billing please")
    # The greeting, "One moment.", then the two sentences of the LLM's answer to the refusal.
    assert len(broadcasts(sim, call)) == 4, broadcasts(sim, call)
    assert not [c for c in sim.commands if c.line.startswith(f"api uuid_transfer {call} ")]
    sim.hangup(call)


def scripted_transfer_llm(target: str, first_words: str):
    """The fake model's script: ``first_words`` + transfer_call(target); told it is refused, an apology."""
    def reply(request: dict) -> FakeReply:
        if request["messages"][-1]["role"] == "tool":
            return FakeReply("Sorry, I cannot put you through to billing. I can transfer you to sales or support.")
        return FakeReply(first_words, [FakeToolCall("transfer_call", {"target": target})])

    return FakeLlmServer("openai", replies=reply)


SCRIPTED_LLM_COMMENTS = [
    "The LLM here is tests/llm_fakes.py's FakeLlmServer (real HTTP, OpenAI's streamed wire format),",
    "scripted to call transfer_call: SmolLM2-135M cannot call tools reliably. Everything else is the",
    "real daemon on the simulator, recorded by scripts/make_fixtures.py.",
]


MALFORMED = [
    b"Content-Length: 12x\nContent-Type: text/event-plain\n\n",          # a length that is not a number
    b"Content-Length: 5\n\nhello",                                        # no Content-Type
    _event_frame(b"Event-Name: X\nno colon here\n\n"),                   # broken inner headers
    _event_frame(b"Event-Name: DETECTED_SPEECH\nX: \xff\xfe\n\n"),       # headers not UTF-8
    _event_frame(b"Event-Name: DETECTED_SPEECH\nContent-Length: 50\n\nshort"),  # body shorter than said
]


def malformed_frames(sim):
    call = sim.new_call(caller_id_number="5551007")
    ask(sim, call, "good morning")
    for junk in MALFORMED:
        sim.inject_raw(junk)
    ask(sim, call, "are you still there")
    sim.hangup(call)


def main() -> int:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    # SmolLM2 on llama.cpp's server calls no tools (and the older fixtures were recorded without
    # them: goodbye_words is about the words, not end_call): it is offered none.
    base = {"TTS_ENGINE": "null", "LLM_PROVIDER": "openai", "LLM_MODEL": "smollm2", "LLM_TIMEOUT": "60",
            "LLM_TOOLS": "false"}
    # Recorded before the call flow existed (their @env says so); re-recorded, they would greet.
    no_call_flow = {"GREETING": "", "SILENCE_TIMEOUT_S": "0"}
    call_flow = {"SILENCE_TIMEOUT_S": "0", "OPERATOR_DESTINATION": "1000 XML default"}
    transfers = {"SILENCE_TIMEOUT_S": "0", "AGENTS_FILE": str(TRANSFER_AGENTS)}
    # name, callers, settings, calls, the LLM: "smollm2", "down" or a FakeLlmServer's maker.
    scenarios = [
        ("greeting", greeting, call_flow, 1, "smollm2"),
        ("silence_goodbye", silence_goodbye, {"SILENCE_TIMEOUT_S": "1", "MAX_REPROMPTS": "2"}, 1, "smollm2"),
        ("dtmf_transfer", dtmf_transfer, call_flow, 1, "smollm2"),
        ("goodbye_words", goodbye_words, call_flow, 1, "smollm2"),
        ("one_question", one_question, no_call_flow, 1, "smollm2"),
        ("three_turns_history", three_turns, no_call_flow, 1, "smollm2"),
        ("hangup_mid_reply", hangup_mid_reply, no_call_flow, 1, "smollm2"),
        ("two_calls_interleaved", two_calls_interleaved, no_call_flow, 2, "smollm2"),
        ("llm_failure_fallback", llm_failure, no_call_flow, 1, "down"),
        ("malformed_frames", malformed_frames, no_call_flow, 1, "smollm2"),
        ("barge_in", barge_in, no_call_flow, 1, "smollm2"),
        ("llm_transfer_allowed", llm_transfer_allowed, transfers, 1,
         lambda: scripted_transfer_llm("sales", "Let me put you through to sales.")),
        ("llm_transfer_refused", llm_transfer_refused, transfers, 1,
         lambda: scripted_transfer_llm("billing", "One moment.")),
    ]
    only = set(sys.argv[1:])  # names to re-record; none: all
    with contextlib.ExitStack() as stack:
        smollm2_url = None
        for name, scenario, settings, calls, llm in scenarios:
            if only and name not in only:
                continue
            comments = []
            if llm == "smollm2":
                if smollm2_url is None:  # started on first use: the scripted-LLM scenarios need no model
                    smollm2_url = stack.enter_context(LlamaCppServer(find_or_fetch_smollm2(CACHE))).chat_completions_url
                env = {**base, "LLM_API_URL": smollm2_url}
            elif llm == "down":
                env = {**base, "LLM_API_URL": f"http://127.0.0.1:{pick_free_port()}/v1/chat/completions",
                       "LLM_TIMEOUT": "2"}
            else:
                fake = stack.enter_context(llm())
                env = {**base, "LLM_API_URL": fake.url, "LLM_MODEL": "scripted-fake", "LLM_TOOLS": "true"}
                comments = SCRIPTED_LLM_COMMENTS
            out = FIXTURES / f"{name}.esl"
            # WAVs play 5x faster than real time: the flow is the same, the recording shorter.
            print(record_scripted_calls(out, scenario, {**env, **settings}, calls, playback_speed=0.2,
                                        comments=comments).strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
