"""The agents' HTTP tools: the business's own endpoints the LLM may call in the middle of a call.

An agent's ``[[agents.NAME.tools]]`` tables (see ``agents.example.toml``) become
:class:`HttpTool` s at start-up: name, description, url (http/https), method (POST or GET),
``parameters`` (a JSON Schema object, checked to be a valid schema with jsonschema's
``check_schema``), ``timeout_s`` and ``headers`` whose ``${NAME}`` references are read from the
environment then, so secrets stay out of the file (and out of every log line: headers are
never logged). A mistake is a ConfigError naming the file, the agent and the tool.

In a call, :func:`run_tool` checks the LLM's arguments against the schema before anything is
sent (invalid arguments go back to the LLM as an error, the endpoint never sees them), sends
them with what the call knows (POST: a JSON body ``{"arguments", "call_uuid", "agent",
"caller_number", "variables"}``; GET: the arguments and those names as query parameters,
``variables`` as a JSON string), and returns what the LLM is told: the endpoint's JSON
(read with streaming, at most ``MAX_RESPONSE_BYTES``) or ``{"error": ...}`` when it is down,
slower than ``timeout_s``, answers 3xx/4xx/5xx, too much, or not JSON. It never raises for any
of those: the caller must hear the LLM's answer, never dead air.

``requests`` under gevent's monkey-patching (as the LLM clients): a tool runs on its own
greenlet, and a slow endpoint holds only its own call.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import urlsplit

import gevent
import jsonschema
import jsonschema.exceptions
import jsonschema.validators
import requests

from ivr_daemon.config import ConfigError
from ivr_daemon.llm.base import ToolSpec
from ivr_daemon.logs import get_logger

log = get_logger(__name__)

TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
BUILT_IN_TOOLS = frozenset({"transfer_call", "end_call"})
TOOL_KEYS = frozenset({"name", "description", "url", "method", "parameters", "timeout_s", "headers"})
METHODS = ("POST", "GET")
DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 60.0
MAX_RESPONSE_BYTES = 64 * 1024
MAX_DESCRIPTION_CHARS = 1024
READ_CHUNK_BYTES = 8192
# What the daemon adds to every request; a GET tool's own parameters must not shadow them.
CALL_FIELDS = ("call_uuid", "agent", "caller_number", "variables")
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")  # RFC 9110 token


@dataclass(frozen=True)
class HttpTool:
    name: str
    description: str
    url: str
    method: str
    parameters: Mapping
    timeout_s: float
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold secrets
    validator: object = field(default=None, repr=False, compare=False)

    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, json.loads(json.dumps(self.parameters)))


@dataclass(frozen=True)
class CallContext:
    """What the endpoint is told about the call besides the arguments."""

    call_uuid: str
    agent: str | None
    caller_number: str | None
    variables: Mapping[str, str]


@dataclass(frozen=True)
class ToolOutcome:
    content: str  # JSON text: the tool message the LLM gets
    ok: bool
    reason: str  # "ok" | "invalid_arguments" | "unreachable" | "timeout" | "http_status" | "too_large" | "not_json"
    sent: bool  # the endpoint was asked


# -- start-up -----------------------------------------------------------------------------------

def parse_tools(tables: object, where: str, environ: Mapping[str, str]) -> tuple[HttpTool, ...]:
    """The agent's ``tools`` array of tables; ConfigError("AGENTS_FILE", "<where>: tools[i] <name>: ...")."""
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise ConfigError("AGENTS_FILE", f"{where}tools: must be an array of tables ([[agents.NAME.tools]])")
    tools: list[HttpTool] = []
    for index, table in enumerate(tables):
        name = table.get("name")
        label = f"{where}tools[{index}]" + (f" {name!r}" if isinstance(name, str) else "")
        tool = _parse_tool(table, label, environ)
        if tool.name in {t.name for t in tools}:
            raise ConfigError("AGENTS_FILE", f"{label}: a second tool of that name")
        tools.append(tool)
    return tuple(tools)


def _problem(label: str, text: str) -> ConfigError:
    return ConfigError("AGENTS_FILE", f"{label}: {text}")


def _parse_tool(table: dict, label: str, environ: Mapping[str, str]) -> HttpTool:
    unknown = sorted(set(table) - TOOL_KEYS)
    if unknown:
        raise _problem(label, f"unknown key {unknown[0]!r} (expected {', '.join(sorted(TOOL_KEYS))})")
    name = table.get("name")
    if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
        raise _problem(label, "name must be 1-64 of letters, digits, '_' and '-'")
    if name in BUILT_IN_TOOLS:
        raise _problem(label, f"name {name!r} is a built-in tool")
    description = table.get("description")
    if not isinstance(description, str) or not description.strip() or len(description) > MAX_DESCRIPTION_CHARS:
        raise _problem(label, f"description must be a non-empty string of at most {MAX_DESCRIPTION_CHARS} characters")
    url = table.get("url")
    if not isinstance(url, str):
        raise _problem(label, "url must be a string")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _problem(label, f"url is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c in url for c in "\r\n\t "):
        raise _problem(label, "url must be an http:// or https:// URL with a host")
    method = table.get("method", "POST")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise _problem(label, f"method must be one of {', '.join(METHODS)}")
    method = method.upper()
    timeout_s = table.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise _problem(label, f"timeout_s must be a number of seconds above 0, at most {MAX_TIMEOUT_S:g}")
    parameters = table.get("parameters", {"type": "object", "properties": {}})
    validator = _schema_validator(parameters, label)
    if method == "GET":
        shadowed = sorted(set(parameters.get("properties") or {}) & set(CALL_FIELDS))
        if shadowed:
            raise _problem(label, f"a GET tool's parameters must not be named {', '.join(shadowed)} "
                                  f"(the daemon sends those)")
    headers = _headers(table.get("headers", {}), label, environ)
    return HttpTool(name, description.strip(), url, method, parameters, float(timeout_s), headers, validator)


def _schema_validator(parameters: object, label: str):
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise _problem(label, 'parameters must be a JSON Schema object with type = "object"')
    cls = jsonschema.validators.validator_for(parameters)
    try:
        cls.check_schema(parameters)
    except jsonschema.exceptions.SchemaError as exc:
        at = "/".join(map(str, exc.path))
        raise _problem(label, f"parameters is not a valid JSON Schema: {exc.message}" + (f" (at {at})" if at else "")) \
            from None
    return cls(parameters)


def _headers(table: object, label: str, environ: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(table, dict):
        raise _problem(label, "headers must be a table of name = \"value\"")
    headers: dict[str, str] = {}
    for header, value in table.items():
        if not _HEADER_NAME.match(header):
            raise _problem(label, f"headers: {header[:40]!r} is not a header name")
        if not isinstance(value, str):
            raise _problem(label, f"headers.{header}: must be a string")

        def expand(match: re.Match) -> str:
            variable = match.group(1)
            if variable not in environ:
                # Names the variable, never a value: what it would hold is a secret.
                raise _problem(label, f"headers.{header}: environment variable {variable} is not set")
            return environ[variable]

        expanded = _ENV_REFERENCE.sub(expand, value)
        if any(c in expanded for c in "\r\n\x00"):
            raise _problem(label, f"headers.{header}: the value (after ${{...}}) must be one line")
        headers[header] = expanded
    return headers


# -- in a call ------------------------------------------------------------------------------------

class _ToolTimedOut(Exception):
    pass


class _TooLarge(Exception):
    pass


def run_tool(tool: HttpTool, arguments: object, context: CallContext, call_log=None) -> ToolOutcome:
    """Validate, send, read: what the LLM is told. Never raises for the endpoint's failures."""
    call_log = (call_log or log).bind(tool=tool.name)
    if not isinstance(arguments, dict):
        return _failed(call_log, tool, "invalid_arguments", "the arguments must be a JSON object", sent=False)
    error = jsonschema.exceptions.best_match(tool.validator.iter_errors(arguments))
    if error is not None:
        at = "/".join(map(str, error.absolute_path))
        why = f"invalid arguments: {error.message}" + (f" (at {at})" if at else "")
        return _failed(call_log, tool, "invalid_arguments", why[:300], sent=False)
    call_fields = {"call_uuid": context.call_uuid, "agent": context.agent, "caller_number": context.caller_number}
    if tool.method == "POST":
        send = {"json": {"arguments": arguments, **call_fields, "variables": dict(context.variables)}}
    else:
        query = {key: value if isinstance(value, str) else json.dumps(value) for key, value in arguments.items()}
        query.update({key: value for key, value in call_fields.items() if value is not None})
        query["variables"] = json.dumps(dict(context.variables))
        send = {"params": query}
    started_s = time.monotonic()
    try:
        # The socket timeouts bound each operation; the gevent.Timeout the whole exchange, so an
        # endpoint trickling its answer cannot hold the call past timeout_s either.
        with gevent.Timeout(tool.timeout_s, _ToolTimedOut):
            response = requests.request(tool.method, tool.url, headers=dict(tool.headers), stream=True,
                                        timeout=(tool.timeout_s, tool.timeout_s), allow_redirects=False, **send)
            try:
                status = response.status_code
                body = _read_bounded(response) if 200 <= status < 300 else b""
            finally:
                response.close()
    except (_ToolTimedOut, requests.Timeout):
        return _failed(call_log, tool, "timeout", f"no answer within {tool.timeout_s:g} s", started_s=started_s)
    except _TooLarge:
        return _failed(call_log, tool, "too_large", f"the answer is over {MAX_RESPONSE_BYTES} bytes",
                       started_s=started_s)
    except requests.RequestException as exc:
        return _failed(call_log, tool, "unreachable", f"the service cannot be reached ({type(exc).__name__})",
                       started_s=started_s)
    if not 200 <= status < 300:
        return _failed(call_log, tool, "http_status", f"the service answered HTTP {status}", started_s=started_s,
                       status=status)
    try:
        result = json.loads(body)
    except ValueError:  # also UnicodeDecodeError
        return _failed(call_log, tool, "not_json", "the service did not answer with JSON", started_s=started_s,
                       status=status)
    call_log.info("tool_call_done", status=status, response_bytes=len(body),
                  elapsed_ms=round((time.monotonic() - started_s) * 1000, 1))
    return ToolOutcome(json.dumps(result, ensure_ascii=False, separators=(",", ":")), True, "ok", True)


def _read_bounded(response: requests.Response) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(READ_CHUNK_BYTES):  # decoded: a gzip bomb is bounded too
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _failed(call_log, tool: HttpTool, reason: str, why: str, *, sent: bool = True, started_s: float | None = None,
            status: int | None = None) -> ToolOutcome:
    elapsed_ms = round((time.monotonic() - started_s) * 1000, 1) if started_s is not None else None
    call_log.warning("tool_call_failed", reason=reason, error=why, status=status, elapsed_ms=elapsed_ms)
    if reason == "invalid_arguments":
        content = json.dumps({"error": f"The tool {tool.name} was not called: {why}. Call it again with arguments"
                                       f" that match its parameters, or answer without it."})
    else:
        content = json.dumps({"error": f"The tool {tool.name} failed: {why}. Tell the caller it cannot be done now."})
    return ToolOutcome(content, False, reason, sent)
