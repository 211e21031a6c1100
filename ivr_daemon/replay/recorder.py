"""Record a live call flow into a fixture: frames as they came off the socket, LLM replies, commands.

``ivr-daemon record --out FILE`` runs the daemon for real (as ``run`` does) with three taps:
every frame the reader cuts (kept byte for byte with its time offset), every LLM exchange,
streamed or not as LLM_STREAM says (the transcript, or the tool results of a tool round; how
much history the request carried and which tools it offered; the reply, its tool calls, or how
it failed, and for a stream where it stopped) and every
``api`` command sent. Only the IVR's own calls are kept, those that fired DETECTED_SPEECH, unless
``all_calls`` is set. WAV paths vary per run, so they are written as ``{wav}``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Generator, Sequence

import gevent
import gevent.event

from ivr_daemon.esl.commands import EslCommand
from ivr_daemon.esl.protocol import Frame, FrameParser, MalformedEvent, parse_event
from ivr_daemon.llm.base import LlmClient, LlmError, LlmTimeout, LlmUnavailable, Message, ToolCall, ToolSpec
from ivr_daemon.logs import get_logger
from ivr_daemon.replay.fixture import (ABANDONED, ExpectedCommand, FixtureFrame, LlmReply, call_uuid_of, is_call_command,
                                       llm_request, render_fixture)

log = get_logger(__name__)

_WAV_RE = re.compile(r"\S+\.wav\b")


def _error_kind(exc: LlmError) -> str:
    if isinstance(exc, LlmTimeout):
        return "timeout"
    if isinstance(exc, LlmUnavailable):
        return "unavailable"
    return "bad-reply"


def _exchange(messages: list[Message], tools: Sequence[ToolSpec]) -> Callable[..., LlmReply]:
    """A maker of the LlmReply that records an answer to this request (what it asked, its history, its tools)."""
    transcript, results, history = llm_request(messages)
    offered = tuple(tool.name for tool in tools)

    def reply(text: str | None, error: str | None = None, stopped: str | None = None, delay_s: float = 0.0,
              calls: Sequence[ToolCall] = ()) -> LlmReply:
        return LlmReply(transcript, text, error, history, delay_s, 0, stopped, offered, tuple(calls), results)

    return reply


class RecordingLlm(LlmClient):
    """Passes every request to the real client, the way the daemon makes it, and notes the exchange.

    ``complete`` and ``respond`` (LLM_STREAM=false, without and with tools) and ``stream``
    (LLM_STREAM=true) go to the real client's own method, so a recording asks the LLM what a
    real run asks it, tools included when the real client supports them.
    """

    def __init__(self, inner: LlmClient, recorder: "Recorder"):
        self.inner, self.recorder = inner, recorder
        self.provider = inner.provider
        # As the real client: the call flow offers tools only to a model that can call them.
        self.supports_tools = inner.supports_tools

    def complete(self, messages: list[Message]) -> str:
        return self._whole(messages, (), lambda: (self.inner.complete(messages), []))[0]

    def respond(self, messages: list[Message], tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        return self._whole(messages, tools, lambda: self.inner.respond(messages, tools))

    def _whole(self, messages: list[Message], tools: Sequence[ToolSpec], ask) -> tuple[str, list[ToolCall]]:
        exchange = _exchange(messages, tools)
        started_s = time.monotonic()
        try:
            text, calls = ask()
        except LlmError as exc:
            self.recorder.note_llm(exchange(None, error=_error_kind(exc)))
            raise
        except gevent.GreenletExit:
            # The call ended while the LLM was thinking: a replay must be as slow to answer.
            waited_s = time.monotonic() - started_s
            self.recorder.note_llm(exchange("(the call ended before this reply arrived)",
                                            delay_s=round(max(1.0, 2 * waited_s), 3)))
            raise
        self.recorder.note_llm(exchange(text, calls=calls))
        return text, calls

    def stream(self, messages: list[Message], tools: Sequence[ToolSpec] = ()
               ) -> Generator[str | ToolCall, None, None]:
        """The real client's stream, delta by delta; the text and tool calls the daemon read are
        noted when it ends.

        A stream that fails after some text, or that the daemon stops reading (a hangup or
        barge-in kills the turn, or it closes the generator), is noted with the text so far
        and how it stopped, so that a replay stops at the same place.
        """
        exchange = _exchange(messages, tools)
        started_s = time.monotonic()
        parts: list[str] = []
        calls: list[ToolCall] = []

        def note(text: str | None, error: str | None = None, stopped: str | None = None) -> None:
            self.recorder.note_llm(exchange(text, error, stopped, calls=calls), at_s=started_s)

        inner = self.inner.stream(messages, tools) if tools else self.inner.stream(messages)
        try:
            for delta in inner:
                if isinstance(delta, ToolCall):
                    calls.append(delta)
                else:
                    parts.append(delta)
                yield delta
        except LlmError as exc:
            if parts or calls:
                note("".join(parts), stopped=_error_kind(exc))
            else:
                note(None, error=_error_kind(exc))
            raise
        except (gevent.GreenletExit, GeneratorExit):
            note("".join(parts), stopped=ABANDONED)
            raise
        finally:
            inner.close()
        note("".join(parts).strip())

    def close(self) -> None:
        self.inner.close()


class Recorder:
    """Collects what one recording session saw; ``render()`` makes the fixture."""

    def __init__(self, all_calls: bool = False, stop_after_calls: int | None = None):
        self.all_calls = all_calls
        self.stop_after_calls = stop_after_calls
        # The timeline as it happened: (monotonic time, item, call uuid or None).
        self.timeline: list[tuple[float, object, str | None]] = []
        self.ivr_calls: set[str] = set()
        self.ended_calls: set[str] = set()
        self.enough_calls = gevent.event.Event()
        self._started_s: float | None = None

    def on_frame(self, raw: bytes, malformed: bool) -> None:
        uuid = None
        if not malformed:
            items = FrameParser().feed(raw)
            frame = items[0] if items else None
            if not isinstance(frame, Frame) or not frame.content_type.startswith("text/event-"):
                return  # auth/request, replies, notices: the simulator makes its own on replay
            try:
                event = parse_event(frame)
            except MalformedEvent:
                malformed = True
            else:
                uuid = event.unique_id
                # An IVR call: it spoke to mod_vosk, or it parked with speech detection on (the
                # daemon greets it; a caller who never speaks still gets the call flow).
                if uuid and (event.name == "DETECTED_SPEECH" or (
                        event.name == "CHANNEL_PARK" and event.get("variable_fire_asr_events") == "true")):
                    self.ivr_calls.add(uuid)
                if event.name == "CHANNEL_HANGUP_COMPLETE" and uuid and (self.all_calls or uuid in self.ivr_calls):
                    self.ended_calls.add(uuid)
                    if self.stop_after_calls and len(self.ended_calls) >= self.stop_after_calls:
                        self.enough_calls.set()
        now = time.monotonic()
        if self._started_s is None:
            self._started_s = now
        self.timeline.append((now, FixtureFrame(round(now - self._started_s, 3), raw, 0, raw=malformed), uuid))

    def note_llm(self, reply: LlmReply, at_s: float | None = None) -> None:
        """``at_s``: where in the timeline it goes (monotonic; default now): a stream's at its request."""
        self.timeline.append((time.monotonic() if at_s is None else at_s, reply, None))

    def on_command(self, command: EslCommand) -> None:
        # Stamped as it is sent, before FreeSWITCH's reply or any event it causes.
        if is_call_command(command.line):
            self.timeline.append((time.monotonic(), ExpectedCommand(_WAV_RE.sub("{wav}", command.line), 0),
                                  call_uuid_of(command.line)))

    @property
    def frames(self) -> list[FixtureFrame]:
        return [item for _, item, _ in self.timeline if isinstance(item, FixtureFrame)]

    @property
    def llm(self) -> list[LlmReply]:
        return [item for _, item, _ in self.timeline if isinstance(item, LlmReply)]

    @property
    def commands(self) -> list[ExpectedCommand]:
        return [item for _, item, _ in self.timeline if isinstance(item, ExpectedCommand)]

    def render(self, comments: list[str] = (), env: dict[str, str] | None = None) -> bytes:
        def kept(item, uuid) -> bool:
            if isinstance(item, LlmReply) or self.all_calls:
                return True
            if isinstance(item, FixtureFrame) and item.raw:
                return True
            return uuid is not None and uuid in self.ivr_calls

        ordered = sorted(self.timeline, key=lambda entry: entry[0])
        return render_fixture([item for _, item, uuid in ordered if kept(item, uuid)], comments, env)

    def write(self, path: Path, comments: list[str] = (), env: dict[str, str] | None = None) -> int:
        """``env``: the settings the recording ran with that shape its commands (@env lines)."""
        data = self.render(comments, env)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return len(data)


def record_scripted_calls(out_path: Path, scenario, env: dict[str, str], calls: int, timeout_s: float = 300.0,
                          playback_speed: float = 1.0, comments: Sequence[str] = ()) -> str:
    """Record a fixture without a switch: ``ivr-daemon record`` (a real subprocess) on the simulator.

    ``scenario(sim)`` plays the callers (``sim.new_call()``, ``sim.speak()``, ``sim.hangup()``);
    recording stops when ``calls`` calls have ended; ``playback_speed`` scales how long the
    simulator takes to play each WAV; ``comments`` go at the top of the fixture. Returns what
    the recorder printed.
    """
    import os
    import subprocess
    import sys

    from ivr_daemon.replay.simulator import FreeswitchSimulator

    with FreeswitchSimulator(playback_speed=playback_speed) as sim:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("FREESWITCH_", "LLM_", "TTS_"))}
        child_env.update(env)
        child_env.update({"FREESWITCH_HOST": "127.0.0.1", "FREESWITCH_PORT": str(sim.port),
                          "FREESWITCH_PASSWORD": sim.password})
        command = [sys.executable, "-m", "ivr_daemon", "--env-file", os.devnull, "record",
                   "--out", str(out_path), "--calls", str(calls), *(f"--comment={c}" for c in comments)]
        proc = subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            sim.wait_for_subscription("DETECTED_SPEECH", timeout_s=60)
            scenario(sim)
            output, _ = proc.communicate(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = output.decode("utf-8", "replace")
        if proc.returncode != 0:
            raise RuntimeError(f"ivr-daemon record exited {proc.returncode}:\n{text[-2000:]}")
        return text
