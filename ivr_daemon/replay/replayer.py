"""Replay fixtures against the real daemon and compare the commands it sends with the expected ones.

Per fixture: a fresh simulator (no media of its own: the recording holds what the switch
played, and no doubled speech: the recording holds the duplicates it had), the daemon built as
``ivr-daemon run`` builds it from the same settings (the environment over ``--env-file``/.env;
the replay sets the switch, the LLM and TTS_OUTPUT_DIR itself, and TTS_ENGINE defaults to
``null``), an LLM that answers from the fixture (whole or streamed, as LLM_STREAM says), and a
real TTS engine (or ``null``). Frames are written to the socket at their recorded offsets
divided by ``speed`` (0: as fast as possible). When the daemon is idle, the ``api``/``bgapi`` commands it sent are
compared with the fixture's ``@expect`` lines, call by call, in order.
"""

from __future__ import annotations

import dataclasses
import difflib
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator, Mapping, Sequence

import gevent

from ivr_daemon.config import Settings, load_settings
from ivr_daemon.daemon import build_conversation_daemon
from ivr_daemon.esl.protocol import Frame, FrameParser, MalformedEvent, build_plain_event, parse_event, split_plain_event
from ivr_daemon.llm.base import (LlmBadReply, LlmClient, LlmTimeout, LlmUnavailable, Message, ToolCall, ToolSpec,
                                  check_tools)
from ivr_daemon.logs import get_logger
from ivr_daemon.replay.fixture import (
    ExpectedCommand, Fixture, FixtureFrame, LlmReply, call_uuid_of, describe_request, is_call_command, llm_request,
    load_fixture)
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts.base import TtsEngine

log = get_logger(__name__)

IDLE_TIMEOUT_S = 60.0
EXPECT_WAIT_S = 15.0  # how long a replay waits for a command the recording had before going on
SETTLE_S = 0.2
NO_CALL = "(no call)"

# Settings a replay makes itself: the switch is the simulator, the LLM is the fixture, and the
# WAVs go to a temporary directory. Every other setting is the one `run` would use.
REPLAY_OWNED = frozenset({"FREESWITCH_HOST", "FREESWITCH_PORT", "FREESWITCH_PASSWORD", "LLM_PROVIDER", "LLM_API_URL",
                          "LLM_MODEL", "LLM_API_KEY", "TTS_OUTPUT_DIR"})


class FixtureLlm(LlmClient):
    """Answers each turn with the reply the fixture recorded for that transcript (or, in a tool
    round, for those tool results), in order, tool calls included.

    ``stream`` yields the recorded text, then the recorded tool calls, then stops as the
    recording did: a reply that broke off raises its error; one the daemon stopped reading
    (``stopped=abandoned``) stalls until the replay's hangup or barge-in kills the turn, or
    until ``timeout_s`` as a silent server would. It supports tools when the recording's LLM was
    offered some (a ``tools=`` block): a fixture recorded without them replays without them,
    so the call flow decides as it did then (goodbye and operator words, not the LLM).
    """

    provider = "fixture"

    def __init__(self, replies: list[LlmReply], timeout_s: float = 30.0):
        super().__init__("http://fixture.invalid", "fixture", timeout_s)
        self._unused = list(replies)
        self.supports_tools = any(reply.tools for reply in replies)
        self.problems: list[str] = []

    def _take(self, messages: list[Message], tools: Sequence[ToolSpec] = ()) -> LlmReply:
        transcript, results, prior = llm_request(messages)
        reply = next((r for r in self._unused if (r.transcript, r.tool_results) == (transcript, results)), None)
        asked = describe_request(transcript, results)
        if reply is None:
            self.problems.append(f"the LLM was asked about {asked}, which the fixture has no @llm reply for")
            raise LlmUnavailable("fixture: no recorded reply for this request")
        self._unused.remove(reply)
        if reply.history is not None and prior != reply.history:
            self.problems.append(
                f"line {reply.line_no}: the LLM request for {asked} carried {prior} earlier messages,"
                f" the fixture expects history={reply.history}")
        offered = tuple(tool.name for tool in check_tools(tools))
        if offered != reply.tools:
            self.problems.append(
                f"line {reply.line_no}: the LLM request for {asked} offered the tools {', '.join(offered) or 'none'},"
                f" the fixture expects {', '.join(reply.tools) or 'none'}")
        if reply.delay_s:
            gevent.sleep(reply.delay_s)
        if reply.error:
            self._fail(reply.error)
        return reply

    def _fail(self, kind: str) -> None:
        if kind == "timeout":
            raise LlmTimeout("fixture: recorded timeout")
        if kind == "unavailable":
            raise LlmUnavailable("fixture: recorded unavailable")
        if kind == "bad-reply":
            raise LlmBadReply("fixture: recorded malformed reply")
        # ABANDONED: the recording's daemon stopped reading here; this one should too.
        gevent.sleep(self.timeout_s)
        raise LlmTimeout(f"fixture: the recorded reply stopped here, and no hangup or barge-in came"
                         f" within {self.timeout_s:g} s")

    def _tool_calls(self, reply: LlmReply) -> list[ToolCall]:
        # A hand-written @tool line may leave out the id: give it one, as a client does.
        return [call if call.call_id else dataclasses.replace(call, call_id=self.new_call_id())
                for call in reply.tool_calls]

    def complete(self, messages: list[Message]) -> str:
        return self.respond(messages)[0]

    def respond(self, messages: list[Message], tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        reply = self._take(messages, tools)
        if reply.stopped:
            self._fail(reply.stopped)  # a whole reply cannot carry the part that came before
        return reply.reply or "", self._tool_calls(reply)

    def stream(self, messages: list[Message], tools: Sequence[ToolSpec] = ()
               ) -> Generator[str | ToolCall, None, None]:
        reply = self._take(messages, tools)
        if reply.reply:
            yield reply.reply
        yield from self._tool_calls(reply)
        if reply.stopped:
            self._fail(reply.stopped)


@dataclass
class SentCommand:
    line: str
    call_uuid: str
    trigger: str  # the last frame of that call written before the command arrived


@dataclass
class ReplayResult:
    fixture: Path
    ok: bool
    report: str
    duration_s: float
    sent: list[SentCommand] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"fixture": str(self.fixture), "ok": self.ok, "report": self.report, "duration_s": self.duration_s,
                "sent": [vars(command) for command in self.sent]}

    @classmethod
    def from_json(cls, data: dict) -> "ReplayResult":
        return cls(Path(data["fixture"]), data["ok"], data["report"], data["duration_s"],
                   [SentCommand(**command) for command in data["sent"]])


def _describe_frame(data: bytes, line_no: int) -> tuple[str | None, str]:
    items = FrameParser().feed(data)
    if len(items) != 1 or not isinstance(items[0], Frame):
        return None, f"line {line_no}: raw bytes"
    try:
        event = parse_event(items[0])
    except MalformedEvent:
        return None, f"line {line_no}: malformed event"
    parts = [event.name, f"Event-Sequence {event.get('Event-Sequence')}"]
    if event.get("Speech-Type"):
        parts.append(f"Speech-Type {event.get('Speech-Type')}")
    if event.body:
        parts.append(f"body {event.body[:60]!r}")
    return event.unique_id, f"line {line_no}: " + ", ".join(parts)


PATH_HEADERS = ("Playback-File-Path", "Application-Data", "variable_current_application_data")


class PlaybackPathMapper:
    """Rewrites the recording's WAV paths in playback events to the ones the daemon broadcast now.

    Paths differ per run (temp dirs, per-call names, another TTS engine's cache keys), but the
    daemon follows playback by path. The n-th distinct path a call's recorded events name is
    the n-th distinct path the daemon has broadcast to that call in this replay.
    """

    def __init__(self, sim: FreeswitchSimulator):
        self.sim = sim
        self.recorded: dict[str, list[str]] = {}

    def rewrite(self, data: bytes) -> bytes:
        items = FrameParser().feed(data)
        if len(items) != 1 or not isinstance(items[0], Frame) or items[0].content_type != "text/event-plain":
            return data
        try:
            event = parse_event(items[0])
        except MalformedEvent:
            return data
        uuid = event.unique_id
        path = event.get("Playback-File-Path") or (event.get("Application-Data") if event.get("Application") == "playback" else None)
        if not uuid or not path or not path.endswith(".wav"):
            return data
        recorded = self.recorded.setdefault(uuid, [])
        if path not in recorded:
            recorded.append(path)
        actual = list(dict.fromkeys(c.line.split()[3] for c in self.sim.commands
                                    if c.line.startswith(f"api uuid_broadcast {uuid} ") and len(c.line.split()) > 3))
        index = recorded.index(path)
        if index >= len(actual) or actual[index] == path:
            return data
        pairs, body = split_plain_event(items[0].body)
        return build_plain_event([(key, actual[index] if key in PATH_HEADERS and value == path else value)
                                  for key, value in pairs], body)


def replay_fixture(fixture: Fixture, *, speed: float = 0.0, tts: TtsEngine | None = None,
                   base_env: dict[str, str] | None = None) -> ReplayResult:
    """Replay one fixture; the result says whether the daemon sent what was expected.

    ``base_env``: the settings' environment (:func:`replay_environment`; default: none, so
    every setting has its default); ConfigError for a bad value in it.
    """
    started_s = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ivr-replay-") as tts_dir, \
            FreeswitchSimulator(duplicate_speech_while_parked=False, simulate_media=False, auth_timeout_s=None) as sim:
        # The settings the recording ran with (@env), under what the caller sets on purpose
        # (the environment, --env-file): a replay under other settings shows what would change.
        env = {"TTS_ENGINE": "null", **{k: v for k, v in fixture.settings_env().items() if k not in REPLAY_OWNED},
               **{k: v for k, v in (base_env or {}).items() if k not in REPLAY_OWNED}}
        env.update({"FREESWITCH_PORT": str(sim.port), "FREESWITCH_HOST": "127.0.0.1", "TTS_OUTPUT_DIR": tts_dir,
                    "FREESWITCH_PASSWORD": sim.password})
        settings: Settings = load_settings(environ=env)
        llm = FixtureLlm(fixture.llm_replies, timeout_s=settings.llm_timeout_s)
        daemon = build_conversation_daemon(settings, llm=llm, tts=tts)
        daemon.start()
        try:
            if not daemon.esl.wait_connected(10):
                return ReplayResult(fixture.path, False, "the daemon did not connect to the simulator", 0.0)
            written: dict[str, list[tuple[float, str]]] = {}  # call -> (when written, frame description)
            paths = PlaybackPathMapper(sim)
            expected_so_far: dict[str, int] = {}
            replay_started_s = time.monotonic()
            for item in fixture.timeline:
                if isinstance(item, ExpectedCommand):
                    # The recording went on only after this command: so does the replay.
                    uuid = item.call_uuid or NO_CALL
                    expected_so_far[uuid] = expected_so_far.get(uuid, 0) + 1
                    _wait_for_commands(sim, uuid, expected_so_far[uuid])
                    continue
                if not isinstance(item, FixtureFrame):
                    continue
                if speed > 0:
                    gevent.sleep(max(0.0, replay_started_s + item.offset_s / speed - time.monotonic()))
                else:
                    gevent.sleep(0)
                uuid, description = _describe_frame(item.data, item.line_no)
                if uuid:
                    written.setdefault(uuid, []).append((time.monotonic(), description))
                sim.replay_frame(item.data if item.raw else paths.rewrite(item.data))
            wait_until_idle(daemon)
        finally:
            daemon.stop()
    sent = []
    for command in sim.commands:
        if is_call_command(command.line):
            uuid = call_uuid_of(command.line) or NO_CALL
            before = [d for t, d in written.get(uuid, []) if t <= command.t_monotonic]
            sent.append(SentCommand(command.line, uuid, before[-1] if before else "none of this call yet"))
    ok, report = compare(fixture, sent, llm.problems)
    return ReplayResult(fixture.path, ok, report, time.monotonic() - started_s, sent)


def _sent_for(sim: FreeswitchSimulator, uuid: str) -> int:
    return sum(1 for c in sim.commands if is_call_command(c.line) and (call_uuid_of(c.line) or NO_CALL) == uuid)


def _wait_for_commands(sim: FreeswitchSimulator, uuid: str, count: int, timeout_s: float = EXPECT_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while _sent_for(sim, uuid) < count and time.monotonic() < deadline:
        gevent.sleep(0.005)


def wait_until_idle(daemon, timeout_s: float = IDLE_TIMEOUT_S) -> None:
    """Until no call has queued events or a turn in flight, twice in a row SETTLE_S apart."""
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        busy = bool(daemon.router.busy_calls())
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE_S:
            return
        gevent.sleep(0.02)
    log.warning("replay_idle_timeout", timeout_s=timeout_s)


def compare(fixture: Fixture, sent: list[SentCommand], llm_problems: list[str]) -> tuple[bool, str]:
    """Expected vs sent, per call, in order: (ok, a readable report)."""
    expected_by_call: dict[str, list] = {}
    for expected in fixture.expected:
        expected_by_call.setdefault(expected.call_uuid or NO_CALL, []).append(expected)
    sent_by_call: dict[str, list[SentCommand]] = {}
    for command in sent:
        sent_by_call.setdefault(command.call_uuid, []).append(command)

    sections = []
    for uuid in list(dict.fromkeys([*expected_by_call, *sent_by_call])):
        want, got = expected_by_call.get(uuid, []), sent_by_call.get(uuid, [])
        mismatch = next((i for i in range(max(len(want), len(got)))
                         if i >= len(want) or i >= len(got) or not want[i].matches(got[i].line)), None)
        if mismatch is None:
            continue
        lines = [f"call {uuid}: command {mismatch + 1} differs"]
        if mismatch < len(want):
            lines.append(f"  expected (fixture line {want[mismatch].line_no}): {want[mismatch].text}")
        else:
            lines.append("  expected: nothing more")
        if mismatch < len(got):
            lines.append(f"  got:      {got[mismatch].line}")
            lines.append(f"  after frame {got[mismatch].trigger}")
        else:
            lines.append("  got:      nothing")
        diff = difflib.unified_diff([w.text for w in want], [g.line for g in got], "expected", "got", lineterm="", n=2)
        lines.extend("  " + d for d in diff)
        sections.append("\n".join(lines))
    sections.extend(llm_problems)
    if not sections:
        return True, f"{fixture.name}: {len(sent)} commands as expected"
    return False, f"{fixture.name}: FAILED\n" + "\n".join(sections)


def write_junit(results: list[ReplayResult], path: Path, errors: dict[str, str] | None = None) -> None:
    """A JUnit XML report (one testcase per fixture) that CI systems show."""
    errors = errors or {}
    failures = sum(not r.ok for r in results)
    suite = ElementTree.Element("testsuite", name="ivr_daemon.replay", tests=str(len(results) + len(errors)),
                                failures=str(failures), errors=str(len(errors)),
                                time=f"{sum(r.duration_s for r in results):.3f}")
    for result in results:
        case = ElementTree.SubElement(suite, "testcase", classname="replay", name=result.fixture.name,
                                      file=str(result.fixture), time=f"{result.duration_s:.3f}")
        if not result.ok:
            failure = ElementTree.SubElement(case, "failure", message=result.report.splitlines()[1] if "\n" in result.report else result.report)
            failure.text = result.report
    for name, message in errors.items():
        case = ElementTree.SubElement(suite, "testcase", classname="replay", name=Path(name).stem, file=name)
        ElementTree.SubElement(case, "error", message=message).text = message
    path.parent.mkdir(parents=True, exist_ok=True)
    ElementTree.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def replay_files(paths: list[str], *, speed: float = 0.0, tts: TtsEngine | None = None, junit_xml: Path | None = None,
                 json_out: Path | None = None, base_env: dict[str, str] | None = None, out=None) -> int:
    """The CLI's job: 0 when every fixture matches, 1 when one differs, 2 when one cannot be read.

    ``json_out``: also write ``{"results": [ReplayResult.to_json(), ...], "errors": {path: message}}``
    (the pytest plugin reads it back from its child process).
    """
    import json
    import sys

    from ivr_daemon.replay.fixture import FixtureError

    out = out or sys.stdout
    if tts is None:
        from ivr_daemon.tts import make_tts_engine

        # Loaded once for every fixture: a real model takes seconds to load.
        tts = make_tts_engine(load_settings(environ={"TTS_ENGINE": "null", **(base_env or {})}))
    results, errors = [], {}
    for path in paths:
        try:
            fixture = load_fixture(path)
        except FixtureError as exc:
            errors[path] = str(exc)
            print(f"ERROR {exc}", file=out)
            continue
        result = replay_fixture(fixture, speed=speed, tts=tts, base_env=base_env)
        results.append(result)
        print(("ok    " if result.ok else "FAIL  ") + result.report, file=out, flush=True)
    if junit_xml is not None:
        write_junit(results, junit_xml, errors)
    if json_out is not None:
        json_out.write_text(json.dumps({"results": [r.to_json() for r in results], "errors": errors}))
    print(f"{sum(r.ok for r in results)} passed, {sum(not r.ok for r in results)} failed"
          + (f", {len(errors)} unreadable" if errors else ""), file=out)
    if errors:
        return 2
    return 0 if all(r.ok for r in results) else 1


def replay_environment(env_file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a replay's settings come from: ``environ`` (default ``os.environ``) over ``env_file``.

    The same merge as :func:`ivr_daemon.config.load_settings` makes for ``run`` and ``record``
    (real environment variables win; a missing file is no error), minus :data:`REPLAY_OWNED`.
    """
    import os

    from dotenv import dotenv_values

    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    return {k: v for k, v in merged.items() if k not in REPLAY_OWNED}
