"""The ESL fixture format: recorded frames, the LLM's replies, the commands the daemon must send.

A fixture is a text file a person can read and diff (see tests/fixtures/README.md)::

    @fixture v1
    # Free comment lines start with '#' between blocks.
    @env GREETING=Hello there.                <- a setting the recording ran with; the replay runs
    @env SILENCE_TIMEOUT_S=0                     with it too (call-flow behaviour, not the switch)
    @frame +0.000
    Content-Length: 1937                      <- one ESL frame, byte for byte as it came off
    Content-Type: text/event-plain               the socket, delimited by its own headers and
                                                 Content-Length (paste a capture as it is)
    Event-Name: DETECTED_SPEECH
    ...
    hello world
    @raw +0.500 12                            <- exactly 12 bytes, for frames too broken to
    garbage\\nbytes                              delimit themselves
    @llm history=0 delay=0.0                  <- the LLM's reply to the turn whose transcript
    > hello world                                follows '> '; history= is how many earlier
    We open at nine.                             messages the request must carry
    @end
    @llm-error timeout                        <- the LLM failed on this turn
    > are you there
    @llm history=2 stopped=unavailable        <- a streamed reply that stopped after this text:
    > and on saturday                            it broke off (timeout, unavailable, bad-reply),
    We open at                                   or the daemon stopped reading (abandoned: a
    @end                                         hangup or barge-in came first)
    @expect api uuid_broadcast 03362ffb-115a-4a3d-9eb6-770e2089d43f {wav} aleg
    @llm history=1 tools=transfer_call,end_call
    > billing please                          <- tools=: what the request offered, by name
    One moment.                               <- the reply's text, then one @tool line per
    @tool transfer_call id=call_7 {"target": "billing"}
    @end                                         call: its name, the server's id, the arguments
    @llm history=3 tools=transfer_call,end_call
    < transfer_call {"error": "Transfer refused: ..."}
    Sorry, I cannot transfer you to billing.  <- a tool round: the request ends with what the
    @end                                         daemon told the model about its calls, one
                                                 '< ' line each (tool name, content), not '> '

Every block's bytes are followed by one newline. In ``@expect`` lines ``{wav}`` matches any
path ending in ``.wav``, ``{uuid}`` any UUID and ``{any}`` any word; everything else is literal.

A replay answers a request with the block of its ``> `` transcript, or in a tool round of its
``< `` lines, and checks ``history=`` and ``tools=``. A request offered no tools unless its
block says ``tools=``; a replay offers tools (the LLM ``supports_tools``) only when some block
of the fixture does, so fixtures recorded without tools replay exactly as before. ``@tool``
lines follow the reply's text, in the order the calls came (a replay gives them after the
text: the daemon acts on them only once the reply's words are broadcast). A name or id that
is not a plain word is written as a JSON string; arguments (and a tool result's content) are
written verbatim unless they are empty, span lines, have leading or trailing blanks, or start
with ``raw=`` or ``id=``: then as ``raw=`` and a JSON string.

File settings (``AGENTS_FILE``) in ``@env`` are relative to the fixture's directory.

The file is a timeline: an ``@expect`` stands where the command was sent, and a replay writes
the frames after it only once the daemon has sent it (or a wait has run out), so a hangup that
came after an answer still comes after it when the replay runs as fast as it can.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ivr_daemon.esl.protocol import parse_header_lines, MalformedEvent
from ivr_daemon.llm.base import Message, ToolCall, parse_tool_arguments

FORMAT_VERSION = "v1"
LLM_ERROR_KINDS = ("timeout", "unavailable", "bad-reply")
ABANDONED = "abandoned"  # the daemon stopped reading a streamed reply (the call ended, the caller barged in)
STOPPED_KINDS = (*LLM_ERROR_KINDS, ABANDONED)
PLACEHOLDERS = {
    "{wav}": r"\S+\.wav",
    "{uuid}": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "{any}": r"\S+",
}
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))
_UUID_RE = re.compile(PLACEHOLDERS["{uuid}"])
_OFFSET_RE = re.compile(r"^\+(\d+(?:\.\d+)?)$")
_ENV_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
# The settings that change which commands the daemon sends: a recording notes them (@env).
BEHAVIOUR_SETTINGS = (
    "LLM_STREAM", "BARGE_IN", "BARGE_IN_MIN_WORDS", "MAX_REPLY_SENTENCES", "MAX_CONVERSATION_HISTORY",
    "GREETING", "SILENCE_TIMEOUT_S", "MAX_REPROMPTS", "REPROMPT_PHRASE", "GOODBYE_PHRASE", "TRANSFER_PHRASE",
    "GOODBYE_WORDS", "OPERATOR_DESTINATION", "OPERATOR_WORDS", "LLM_TOOLS", "FALLBACK_PHRASE", "AGENTS_FILE",
    "FIRST_CHUNK",
)
# Behaviour settings added after fixtures were recorded without them: a fixture that does not
# name one replays with the behaviour it was recorded under, not today's default. (Recordings
# note every behaviour setting, so newer fixtures always name them.)
BEHAVIOUR_BEFORE_THE_SETTING = {"FIRST_CHUNK": "sentence"}
# Settings that name a file: a fixture holds them relative to its own directory, so that the
# library replays from any checkout.
FILE_SETTINGS = ("AGENTS_FILE",)
# A name or id written as it is; anything else is written as a JSON string.
_PLAIN_WORD_RE = re.compile(r"^[A-Za-z0-9_.:/+-]+$")
_TOOL_NAMES_RE = re.compile(r"^[A-Za-z0-9_-]+(?:,[A-Za-z0-9_-]+)*$")


class FixtureError(ValueError):
    """The fixture cannot be read; says which file and line."""

    def __init__(self, path: str | Path, line_no: int, problem: str):
        super().__init__(f"{path}:{line_no}: {problem}")
        self.path, self.line_no, self.problem = str(path), line_no, problem


@dataclass(frozen=True)
class FixtureFrame:
    """Bytes FreeSWITCH sent, ``offset_s`` after the first one."""

    offset_s: float
    data: bytes
    line_no: int
    raw: bool = False  # written as @raw: not a well-formed frame


@dataclass(frozen=True)
class ToolResult:
    """What the daemon told the LLM about one of its tool calls (a ``tool`` message): a ``< `` line."""

    name: str
    content: str


@dataclass(frozen=True)
class LlmReply:
    """What the LLM answered (or how it failed) to the turn with this transcript.

    ``error``: the request failed before any text (``@llm-error``). ``stopped``: a streamed
    reply stopped after ``reply``, the text that had come by then, because it failed (one of
    LLM_ERROR_KINDS) or because the daemon stopped reading it (ABANDONED).
    ``tools``: the names of the tools the request offered, in order (none: it offered none).
    ``tool_calls``: the tools the reply called. ``tool_results``: set for a tool round, a
    request that ends with the results of the previous reply's tool calls instead of a new user
    message (``transcript`` is then "").
    """

    transcript: str
    reply: str | None
    error: str | None
    history: int | None
    delay_s: float
    line_no: int
    stopped: str | None = None
    tools: tuple[str, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_results: tuple[ToolResult, ...] = ()


def describe_request(transcript: str, tool_results: tuple[ToolResult, ...]) -> str:
    """What an LLM request answers, for messages: the transcript or the tool results."""
    if tool_results:
        return "the tool results " + ", ".join(f"{r.name} {r.content[:80]!r}" for r in tool_results)
    return repr(transcript)


def llm_request(messages: list[Message]) -> tuple[str, tuple[ToolResult, ...], int]:
    """What an LLM request answers, as a fixture writes it: (transcript, tool results, history).

    A request ends with a new user message (its text is the transcript) or, in a tool round,
    with ``tool`` messages (the results). ``history``: the messages before those, besides the
    system prompt.
    """
    results: list[ToolResult] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, ToolResult(str(message.get("name", "")), str(message.get("content", ""))))
    if results:
        return "", tuple(results), len(messages) - 1 - len(results)
    return messages[-1]["content"], (), len(messages) - 2


@dataclass(frozen=True)
class ExpectedCommand:
    text: str
    line_no: int

    @property
    def pattern(self) -> re.Pattern:
        parts, pos = [], 0
        for match in _PLACEHOLDER_RE.finditer(self.text):
            parts.append(re.escape(self.text[pos : match.start()]))
            parts.append(PLACEHOLDERS[match.group(0)])
            pos = match.end()
        parts.append(re.escape(self.text[pos:]))
        return re.compile("^" + "".join(parts) + "$")

    def matches(self, line: str) -> bool:
        return bool(self.pattern.match(line))

    @property
    def call_uuid(self) -> str | None:
        return call_uuid_of(self.text)


# Commands that check on the switch rather than act on a call (the resync's uuid_exists): their
# timing depends on when the connection came up, so fixtures neither record nor expect them.
HOUSEKEEPING_COMMANDS = ("api uuid_exists ",)


def is_call_command(command_line: str) -> bool:
    """An api/bgapi command a fixture records and a replay compares."""
    return command_line.startswith(("api ", "bgapi ")) and not command_line.startswith(HOUSEKEEPING_COMMANDS)


def call_uuid_of(command_line: str) -> str | None:
    """The channel a command is about: the first UUID in the line."""
    match = _UUID_RE.search(command_line)
    return match.group(0) if match else None


TimelineItem = FixtureFrame | LlmReply | ExpectedCommand


@dataclass
class Fixture:
    path: Path
    timeline: list[TimelineItem] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # settings the recording ran with (@env)
    # The file's order, for render(): ("line", a comment or blank line as it was), ("env", NAME),
    # ("item", None) for the next timeline item.
    layout: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def frames(self) -> list[FixtureFrame]:
        return [item for item in self.timeline if isinstance(item, FixtureFrame)]

    @property
    def llm_replies(self) -> list[LlmReply]:
        return [item for item in self.timeline if isinstance(item, LlmReply)]

    @property
    def expected(self) -> list[ExpectedCommand]:
        return [item for item in self.timeline if isinstance(item, ExpectedCommand)]

    @property
    def offers_tools(self) -> bool:
        """Whether the recording's LLM was offered tools (some request says ``tools=``)."""
        return any(reply.tools for reply in self.llm_replies)

    def render(self) -> bytes:
        """The file again: the timeline and env as they are now, comments and blank lines where
        they were. A file that render_fixture wrote, with comments added anywhere, comes back
        byte for byte."""
        out = bytearray(f"@fixture {FORMAT_VERSION}\n".encode())
        items = iter(self.timeline)
        # Settings added since loading go before the first item.
        new_env = [name for name in self.env if ("env", name) not in self.layout]
        for kind, value in self.layout:
            if kind == "item":
                item = next(items, None)
                if item is not None:
                    out += _env_lines(self.env, new_env) + _render_item(item)
                    new_env = []
            elif kind == "env":
                out += _env_lines(self.env, [value])
            else:
                out += f"{value}\n".encode()
        out += _env_lines(self.env, new_env)
        for item in items:
            out += _render_item(item)
        return bytes(out)

    def settings_env(self) -> dict[str, str]:
        """``env`` with its file settings made relative to the working directory (not to the fixture's),
        and the behaviour of its time for settings it predates (:data:`BEHAVIOUR_BEFORE_THE_SETTING`)."""
        env = {**BEHAVIOUR_BEFORE_THE_SETTING, **self.env}
        for name in FILE_SETTINGS:
            value = env.get(name, "").strip()
            if value and not os.path.isabs(value):
                env[name] = str(self.path.parent / value)
        return env


def recorded_settings(environment: Mapping[str, str], fixture_path: str | Path) -> dict[str, str]:
    """The ``@env`` a recording writes: the BEHAVIOUR_SETTINGS of ``environment``, file settings
    relative to the directory ``fixture_path`` is written to."""
    env = {name: value for name, value in environment.items() if name in BEHAVIOUR_SETTINGS}
    for name in FILE_SETTINGS:
        if env.get(name, "").strip():
            env[name] = os.path.relpath(os.path.abspath(env[name]), os.path.abspath(Path(fixture_path).parent))
    return env


def load_fixture(path: str | Path) -> Fixture:
    """Parse a fixture file; raises :class:`FixtureError` naming file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FixtureError(path, 0, f"cannot read: {exc.strerror or exc}") from None
    return _Reader(path, data).read()


class _Reader:
    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos, self.line_no = path, data, 0, 1

    def fail(self, problem: str, line_no: int | None = None) -> FixtureError:
        return FixtureError(self.path, line_no or self.line_no, problem)

    def peek_line(self) -> str:
        pos, line_no = self.pos, self.line_no
        try:
            return self.take_line()
        finally:
            self.pos, self.line_no = pos, line_no

    def take_line(self) -> str:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            end = len(self.data)
        raw = self.data[self.pos : end]
        self.pos = min(end + 1, len(self.data))
        self.line_no += 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("directive line is not UTF-8", self.line_no - 1) from None

    def take_bytes(self, count: int, what: str, line_no: int) -> bytes:
        if self.pos + count > len(self.data):
            raise self.fail(f"{what}: needs {count} bytes, the file ends after {len(self.data) - self.pos}", line_no)
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        self.line_no += chunk.count(b"\n")
        if self.pos < len(self.data):
            if self.data[self.pos : self.pos + 1] != b"\n":
                raise self.fail(f"{what}: expected a newline after its {count} bytes", line_no)
            self.pos += 1
            self.line_no += 1
        return chunk

    def read(self) -> Fixture:
        fixture = Fixture(self.path)
        saw_header = False
        while self.pos < len(self.data):
            line_no = self.line_no
            line = self.take_line()
            if not line.strip():
                if saw_header:
                    fixture.layout.append(("line", line))
                continue
            if line.startswith("#"):
                fixture.comments.append(line[1:].strip())
                fixture.layout.append(("line", line))
                continue
            directive, _, rest = line.partition(" ")
            if not saw_header:
                if directive != "@fixture" or rest.strip() != FORMAT_VERSION:
                    raise self.fail(f"expected '@fixture {FORMAT_VERSION}' first, got {line[:60]!r}", line_no)
                saw_header = True
                continue
            if directive == "@env":
                name, equals, value = rest.partition("=")
                if not equals or not _ENV_NAME_RE.match(name):
                    raise self.fail("@env needs NAME=VALUE (an environment variable name)", line_no)
                fixture.env[name] = value.rstrip("\r")
                fixture.layout.append(("env", name))
            elif directive == "@frame":
                fixture.timeline.append(FixtureFrame(self._offset(rest, line_no), self._frame_bytes(line_no), line_no))
                fixture.layout.append(("item", None))
            elif directive == "@raw":
                offset_text, _, count_text = rest.partition(" ")
                if not count_text.strip().isdigit():
                    raise self.fail("@raw needs '+SECONDS BYTES'", line_no)
                offset = self._offset(offset_text, line_no)
                fixture.timeline.append(FixtureFrame(offset, self.take_bytes(int(count_text), "@raw", line_no), line_no, raw=True))
                fixture.layout.append(("item", None))
            elif directive in ("@llm", "@llm-error"):
                fixture.timeline.append(self._llm(directive, rest, line_no))
                fixture.layout.append(("item", None))
            elif directive == "@expect":
                if not rest.strip():
                    raise self.fail("@expect needs a command line", line_no)
                fixture.timeline.append(ExpectedCommand(rest.rstrip("\r"), line_no))
                fixture.layout.append(("item", None))
            else:
                raise self.fail(f"unknown directive {directive[:30]!r}", line_no)
        if not saw_header:
            raise self.fail(f"empty file: expected '@fixture {FORMAT_VERSION}'", 1)
        offsets = [f.offset_s for f in fixture.frames]
        if offsets != sorted(offsets):
            bad = next(f for prev, f in zip(fixture.frames, fixture.frames[1:]) if f.offset_s < prev.offset_s)
            raise self.fail("frame offsets must not go backwards", bad.line_no)
        return fixture

    def _offset(self, text: str, line_no: int) -> float:
        match = _OFFSET_RE.match(text.strip())
        if not match:
            raise self.fail(f"expected a time offset like +0.250, got {text.strip()[:20]!r}", line_no)
        return float(match.group(1))

    def _frame_bytes(self, line_no: int) -> bytes:
        end = self.data.find(b"\n\n", self.pos)
        if end < 0:
            raise self.fail("@frame: no blank line ends its headers", line_no)
        try:
            headers = parse_header_lines(self.data[self.pos : end].decode("utf-8"), url_decoded=False)
        except (UnicodeDecodeError, MalformedEvent) as exc:
            raise self.fail(f"@frame: bad header block ({exc}); use @raw for broken frames", line_no) from None
        length_text = headers.get("Content-Length", "0")
        if not length_text.isdigit():
            raise self.fail(f"@frame: bad Content-Length {length_text!r}; use @raw for broken frames", line_no)
        return self.take_bytes(end + 2 - self.pos + int(length_text), "@frame", line_no)

    def _llm(self, directive: str, rest: str, line_no: int) -> LlmReply:
        options, error = {}, None
        for word in rest.split():
            key, sep, value = word.partition("=")
            if sep:
                options[key] = value
            elif directive == "@llm-error" and error is None:
                error = word
            else:
                raise self.fail(f"{directive}: unexpected word {word!r}", line_no)
        if directive == "@llm-error" and error not in LLM_ERROR_KINDS:
            raise self.fail(f"@llm-error needs one of {', '.join(LLM_ERROR_KINDS)}", line_no)
        unknown = set(options) - ({"history", "delay", "stopped", "tools"} if directive == "@llm"
                                  else {"history", "delay", "tools"})
        if unknown:
            raise self.fail(f"{directive}: unknown option {sorted(unknown)[0]!r}", line_no)
        if "tools" in options and not _TOOL_NAMES_RE.match(options["tools"]):
            raise self.fail(f"{directive}: tools= needs tool names separated by commas", line_no)
        tools = tuple(options["tools"].split(",")) if "tools" in options else ()
        stopped = options.get("stopped")
        if stopped is not None and stopped not in STOPPED_KINDS:
            raise self.fail(f"@llm: stopped= needs one of {', '.join(STOPPED_KINDS)}", line_no)
        try:
            history = int(options["history"]) if "history" in options else None
            delay_s = float(options.get("delay", "0"))
        except ValueError:
            raise self.fail(f"{directive}: history must be a whole number and delay a number of seconds", line_no) from None
        transcript, results = "", []
        request_line = self.take_line()
        if request_line.startswith("> "):
            transcript = request_line[2:]
        elif request_line.startswith("< "):
            while True:
                results.append(self._tool_result(request_line[2:], self.line_no - 1))
                if self.pos >= len(self.data) or not self.peek_line().startswith("< "):
                    break
                request_line = self.take_line()
        else:
            raise self.fail(f"{directive}: the next line must be '> <what the caller said>'"
                            f" (or '< <tool> <result>' lines for a tool round)", self.line_no - 1)
        if directive == "@llm-error":
            return LlmReply(transcript, None, error, history, delay_s, line_no, tools=tools,
                            tool_results=tuple(results))
        lines, calls = [], []
        while True:
            if self.pos >= len(self.data):
                raise self.fail("@llm: no @end before the end of the file", line_no)
            line = self.take_line()
            if line == "@end":
                break
            if line.startswith("@tool "):
                calls.append(self._tool_call(line[len("@tool "):], self.line_no - 1))
            elif calls:
                raise self.fail("@llm: reply text after a @tool line (the tool calls come last)", self.line_no - 1)
            else:
                lines.append(line)
        return LlmReply(transcript, "\n".join(lines), None, history, delay_s, line_no, stopped, tools, tuple(calls),
                        tuple(results))

    def _tool_call(self, text: str, line_no: int) -> ToolCall:
        """``NAME [id=ID] ARGUMENTS`` (see the module docstring)."""
        try:
            name, rest = _take_word(text)
            call_id = ""
            if rest.startswith("id="):
                call_id, rest = _take_word(rest[len("id="):])
            raw_arguments = _take_text(rest)
        except ValueError as exc:
            raise self.fail(f"@tool: {exc}; expected 'NAME [id=ID] ARGUMENTS'", line_no) from None
        return ToolCall(name, parse_tool_arguments(raw_arguments), raw_arguments, call_id)

    def _tool_result(self, text: str, line_no: int) -> ToolResult:
        """``NAME CONTENT`` of a ``< `` line."""
        try:
            name, rest = _take_word(text)
            return ToolResult(name, _take_text(rest))
        except ValueError as exc:
            raise self.fail(f"'< ' line: {exc}; expected '< TOOL RESULT'", line_no) from None


def _word(text: str) -> str:
    """A name or id as a fixture writes it: as it is when plain, else as a JSON string."""
    return text if _PLAIN_WORD_RE.match(text) else json.dumps(text, ensure_ascii=False)


def _take_word(text: str) -> tuple[str, str]:
    """(the word at the start of ``text``, the rest after one space); ValueError if there is none."""
    if text.startswith('"'):
        try:
            word, end = json.JSONDecoder().raw_decode(text)
        except ValueError:
            raise ValueError("a quoted name that is not a JSON string") from None
    else:
        end = text.find(" ")
        end = len(text) if end < 0 else end
        word = text[:end]
    if not isinstance(word, str) or not word:
        raise ValueError("no name")
    rest = text[end:]
    if rest and not rest.startswith(" "):
        raise ValueError("no space after the quoted name")
    return word, rest[1:]


def _text(text: str) -> str:
    """Arguments or a result as a fixture writes them: verbatim when that reads back the same."""
    verbatim = (text and text == text.strip() and "\n" not in text and "\r" not in text
                and not text.startswith(("raw=", "id=")))
    return text if verbatim else "raw=" + json.dumps(text, ensure_ascii=False)


def _take_text(text: str) -> str:
    if not text.startswith("raw="):
        if not text:
            raise ValueError("nothing after the name (empty arguments are raw=\"\")")
        return text.rstrip("\r")
    try:
        value = json.loads(text[len("raw="):])
    except ValueError:
        value = None
    if not isinstance(value, str):
        raise ValueError("raw= needs one JSON string")
    return value


def render_fixture(timeline: list[TimelineItem], comments: list[str] = (), env: dict[str, str] | None = None) -> bytes:
    """Write a fixture from its timeline (line numbers in the items are ignored)."""
    out = bytearray(f"@fixture {FORMAT_VERSION}\n".encode())
    for comment in comments:
        out += f"# {comment}\n".encode()
    out += _env_lines(env or {}, list(env or {}))
    for item in timeline:
        out += _render_item(item)
    return bytes(out)


def _env_lines(env: Mapping[str, str], names: list[str]) -> bytes:
    return b"".join(f"@env {name}={env[name]}\n".encode() for name in names if name in env)


def _render_item(item: TimelineItem) -> bytes:
    """One timeline item's lines (line numbers in it are ignored)."""
    out = bytearray()
    if isinstance(item, FixtureFrame):
        head = f"@raw +{item.offset_s:.3f} {len(item.data)}" if item.raw else f"@frame +{item.offset_s:.3f}"
        out += head.encode() + b"\n" + item.data + b"\n"
    elif isinstance(item, LlmReply):
        options = [f"history={item.history}"] if item.history is not None else []
        if item.delay_s:
            options.append(f"delay={item.delay_s:g}")
        if item.stopped and not item.error:
            options.append(f"stopped={item.stopped}")
        if item.tools:
            options.append("tools=" + ",".join(item.tools))
        head = f"@llm-error {item.error}" if item.error else "@llm"
        out += (" ".join([head, *options]) + "\n").encode()
        if item.tool_results:
            for result in item.tool_results:
                out += f"< {_word(result.name)} {_text(result.content)}\n".encode()
        else:
            out += f"> {item.transcript}\n".encode()
        if not item.error:
            if item.reply or not item.tool_calls:
                out += f"{item.reply}\n".encode()
            for call in item.tool_calls:
                call_id = f" id={_word(call.call_id)}" if call.call_id else ""
                out += f"@tool {_word(call.name)}{call_id} {_text(call.raw_arguments)}\n".encode()
            out += b"@end\n"
    else:
        out += f"@expect {item.text}\n".encode()
    return bytes(out)
