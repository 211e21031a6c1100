"""Pure builders for every line the daemon writes to the event socket, refusing unsafe values.

A command is one line ended by a blank line (``api uuid_break <uuid> all\\n\\n``). A CR or LF
in any argument would end the command early and let the rest run as a second command, and a
space would shift arguments, so every argument is checked against what its slot allows and
:class:`UnsafeCommandArgument` is raised otherwise. :class:`EslCommand` can only be made here;
the connection sends nothing else.

Reply texts are FreeSWITCH's (mod_commands): ``uuid_broadcast`` -> ``+OK Message sent``,
``uuid_break``/``uuid_kill``/``uuid_setvar``/``uuid_transfer`` -> ``+OK`` or
``-ERR No such channel!``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

COMMAND_REPLY = "command/reply"
API_RESPONSE = "api/response"

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.+@:/\-]+$")
# One C scan instead of a Python loop per character: each turn checks a few paths and UUIDs.
_CONTROL_CHAR = re.compile("[\x00-\x1f\x7f]")
# For str patterns re's \s is str.isspace() (both use Py_UNICODE_ISSPACE).
_WHITESPACE = re.compile(r"\s")
_EVENT_NAME_RE = re.compile(r"^[A-Za-z0-9_:]+$")
_PASSWORD_RE = re.compile(r"^[\x21-\x7e]+$")


class UnsafeCommandArgument(ValueError):
    """An argument would break the command line or smuggle a second command."""

    def __init__(self, slot: str, value: object, why: str):
        super().__init__(f"refusing {slot}={str(value)[:80]!r}: {why}")
        self.slot = slot


@dataclass(frozen=True)
class EslCommand:
    """One validated command line and the kind of reply FreeSWITCH answers it with."""

    line: str
    reply_type: str
    _token: object = None

    def __post_init__(self):
        if self._token is not _BUILDER:
            raise TypeError("EslCommand is made by the builders in ivr_daemon.esl.commands")

    @property
    def wire_bytes(self) -> bytes:
        return (self.line + "\n\n").encode("utf-8")


_BUILDER = object()


def _make(line: str, reply_type: str) -> EslCommand:
    # Last line of defence: whatever a builder assembled, it is exactly one line.
    if any(c in line for c in "\r\n\0"):
        raise UnsafeCommandArgument("line", line, "contains CR, LF or NUL")
    return EslCommand(line, reply_type, _BUILDER)


def _no_line_breaks(slot: str, value: str) -> str:
    if not isinstance(value, str):
        raise UnsafeCommandArgument(slot, value, "must be a string")
    if _CONTROL_CHAR.search(value):
        raise UnsafeCommandArgument(slot, value, "contains a control character (CR, LF, tab, NUL...)")
    return value


def check_uuid(value: str, slot: str = "uuid") -> str:
    _no_line_breaks(slot, value)
    if not _UUID_RE.match(value):
        raise UnsafeCommandArgument(slot, value, "not a UUID")
    return value


def check_token(value: str, slot: str) -> str:
    _no_line_breaks(slot, value)
    if not _TOKEN_RE.match(value):
        raise UnsafeCommandArgument(slot, value, "only letters, digits and _.+@:/- are allowed")
    return value


def check_path(value: str, slot: str = "path") -> str:
    _no_line_breaks(slot, value)
    if not value:
        raise UnsafeCommandArgument(slot, value, "empty")
    if _WHITESPACE.search(value) or ";" in value:
        raise UnsafeCommandArgument(slot, value, "a path may not contain whitespace or ';'")
    return value


def check_free_text(value: str, slot: str) -> str:
    """Text that ends a command line (a variable's value): spaces allowed, line breaks not."""
    _no_line_breaks(slot, value)
    if value != value.strip():
        raise UnsafeCommandArgument(slot, value, "leading or trailing whitespace")
    return value


# --- Connection-level commands --------------------------------------------------------------


def auth(password: str) -> EslCommand:
    _no_line_breaks("password", password)
    if not _PASSWORD_RE.match(password):
        raise UnsafeCommandArgument("password", "***", "must be printable ASCII without spaces")
    return _make(f"auth {password}", COMMAND_REPLY)


def subscribe_events(event_names: list[str] | tuple[str, ...], wire_format: str = "plain") -> EslCommand:
    """``event plain NAME NAME ...`` (https://developer.signalwire.com/freeswitch/FreeSWITCH-Explained/Modules/mod_event_socket_1048924/#event)."""
    if wire_format not in ("plain", "json", "xml"):
        raise UnsafeCommandArgument("wire_format", wire_format, "must be plain, json or xml")
    if not event_names:
        raise UnsafeCommandArgument("event_names", event_names, "at least one event name")
    for name in event_names:
        _no_line_breaks("event_name", name)
        if not _EVENT_NAME_RE.match(name):
            raise UnsafeCommandArgument("event_name", name, "not an event name")
    return _make(f"event {wire_format} {' '.join(event_names)}", COMMAND_REPLY)


def exit_() -> EslCommand:
    return _make("exit", COMMAND_REPLY)


# --- api commands ---------------------------------------------------------------------------


def _api(*parts: str, background: bool = False) -> EslCommand:
    verb = "bgapi" if background else "api"
    return _make(" ".join((verb, *parts)), COMMAND_REPLY if background else API_RESPONSE)


def uuid_broadcast(uuid: str, path: str, leg: str = "aleg") -> EslCommand:
    """Play a file to a channel; replies ``+OK Message sent`` before playback starts."""
    if leg not in ("aleg", "bleg", "both"):
        raise UnsafeCommandArgument("leg", leg, "must be aleg, bleg or both")
    return _api("uuid_broadcast", check_uuid(uuid), check_path(path), leg)


def uuid_break(uuid: str, all_: bool = True) -> EslCommand:
    """Stop what the channel plays; ``all`` also drops queued broadcasts (capture S2a)."""
    parts = ["uuid_break", check_uuid(uuid)] + (["all"] if all_ else [])
    return _api(*parts)


def uuid_kill(uuid: str, cause: str | None = None) -> EslCommand:
    parts = ["uuid_kill", check_uuid(uuid)]
    if cause is not None:
        parts.append(check_token(cause, "cause"))
    return _api(*parts)


def uuid_transfer(uuid: str, destination: str, dialplan: str = "XML", context: str = "default") -> EslCommand:
    return _api(
        "uuid_transfer",
        check_uuid(uuid),
        check_token(destination, "destination"),
        check_token(dialplan, "dialplan"),
        check_token(context, "context"),
    )


def uuid_setvar(uuid: str, name: str, value: str | None = None) -> EslCommand:
    """Set (or, without a value, unset) a channel variable; the value may contain spaces."""
    parts = ["uuid_setvar", check_uuid(uuid), check_token(name, "variable")]
    if value is not None:
        parts.append(check_free_text(value, "value"))
    return _api(*parts)


def uuid_getvar(uuid: str, name: str) -> EslCommand:
    return _api("uuid_getvar", check_uuid(uuid), check_token(name, "variable"))


def uuid_exists(uuid: str) -> EslCommand:
    """Replies ``true`` or ``false`` with no trailing newline (captures 53, 64)."""
    return _api("uuid_exists", check_uuid(uuid))


def module_exists(module: str) -> EslCommand:
    """Replies ``true`` or ``false`` with no trailing newline (mod_commands.c module_exists_function)."""
    return _api("module_exists", check_token(module, "module"))


def show_channels_json() -> EslCommand:
    return _api("show", "channels", "as", "json")


def status() -> EslCommand:
    return _api("status")


def originate(
    endpoint: str,
    application: str,
    app_args: str = "",
    variables: Mapping[str, str] | None = None,
    background: bool = True,
) -> EslCommand:
    """``originate {k=v,...}endpoint &app(args)``; FreeSWITCH cuts args at the first ')' (capture 95)."""
    check_token(endpoint, "endpoint")
    check_token(application, "application")
    if app_args:
        _no_line_breaks("app_args", app_args)
        if any(c.isspace() or c in "();" for c in app_args):
            raise UnsafeCommandArgument("app_args", app_args, "no whitespace, ';' or parentheses")
    prefix = ""
    if variables:
        pairs = []
        for key, value in variables.items():
            check_token(key, "variable")
            check_token(value, "variable value")
            pairs.append(f"{key}={value}")
        prefix = "{" + ",".join(pairs) + "}"
    return _api("originate", f"{prefix}{endpoint}", f"&{application}({app_args})", background=background)


# Characters with a meaning in originate's {k=v,...} block (switch_ivr_originate.c: ',' splits
# pairs, '}' ends the block, '^^<c>' changes the separator, quotes group) or that would split
# the api line's arguments; '=' only splits at the first, but a value has no need of it.
_ORIGINATE_VALUE_FORBIDDEN = frozenset(",{}[]<>'\"^=|\\")
MAX_ORIGINATE_VALUE_CHARS = 256


def check_originate_value(value: str, slot: str) -> str:
    """A channel variable's value inside originate's ``{...}``: printable ASCII, no separators."""
    _no_line_breaks(slot, value)
    if not value or value != value.strip():
        raise UnsafeCommandArgument(slot, value, "empty, or whitespace at either end")
    if len(value) > MAX_ORIGINATE_VALUE_CHARS:
        raise UnsafeCommandArgument(slot, value, f"longer than {MAX_ORIGINATE_VALUE_CHARS} characters")
    if not value.isascii() or not value.isprintable():
        raise UnsafeCommandArgument(slot, value, "only printable ASCII")
    if any(c in _ORIGINATE_VALUE_FORBIDDEN for c in value):
        raise UnsafeCommandArgument(slot, value, "may not contain any of , { } [ ] < > ' \" ^ = | \\")
    return value


def originate_extension(
    endpoint: str,
    extension: str,
    dialplan: str,
    context: str,
    variables: Mapping[str, str],
    background: bool = True,
) -> EslCommand:
    """``bgapi originate {k=v,...}endpoint extension dialplan context``: the answered leg runs the
    extension (its ``origination_uuid`` is then that leg's uuid; with a loopback endpoint, S8,
    it is the loopback A leg's). Keys are ``[a-z0-9_]``; values pass :func:`check_originate_value`,
    and one with a space is single-quoted (``{customer_name='Ann Lee'}``)."""
    check_token(endpoint, "endpoint")
    if endpoint.startswith(("{", "[", "<", "&")) or "," in endpoint:
        raise UnsafeCommandArgument("endpoint", endpoint, "a dial string without variables or lists")
    check_token(extension, "extension")
    check_token(dialplan, "dialplan")
    check_token(context, "context")
    pairs = []
    for key, value in variables.items():
        _no_line_breaks("variable", key)
        if not re.fullmatch(r"[a-z0-9_]+", key):
            raise UnsafeCommandArgument("variable", key, "names are a-z 0-9 _")
        value = check_originate_value(value, key)
        # switch_separate_string() splits the api line at blanks outside '...' and drops the
        # quotes, so a value with a space is quoted ('\'' itself is refused above).
        pairs.append(f"{key}='{value}'" if " " in value else f"{key}={value}")
    prefix = "{" + ",".join(pairs) + "}" if pairs else ""
    return _api("originate", f"{prefix}{endpoint}", extension, dialplan, context, background=background)
