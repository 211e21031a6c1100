"""Agents: who answers which call. Named profiles from AGENTS_FILE (TOML), or one from the environment.

An agent is the daemon's settings with its own overrides (system prompt, greeting, voice, LLM,
barge-in, silence timing, phrases), plus its transfer allowlist and DTMF map. A call picks its
agent by the channel variable ``ivr_agent`` (set in the dialplan); an unknown name gets the
default agent. The file format, with every key, is in ``agents.example.toml``::

    default_agent = "reception"

    [agents.reception]
    greeting = "Hello, you reached reception."
    [agents.reception.transfer_targets]
    sales = "2000 XML default"
    [agents.reception.dtmf]
    "0" = "transfer:operator"

Every agent key is the lower-case name of the environment variable it overrides and is
validated exactly as that variable is; transfer destinations come only from this file, never
from a caller or the LLM. An agent's ``[[agents.NAME.tools]]`` are its HTTP tools
(:mod:`ivr_daemon.tools`), checked here too.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from ivr_daemon.config import ConfigError, Settings, check_transfer_destination, load_settings
from ivr_daemon.tools import HttpTool, parse_tools

DEFAULT_AGENT = "default"
OPERATOR_TARGET = "operator"
# The settings an agent may override: the lower-case environment names.
AGENT_KEYS: tuple[str, ...] = (
    "SYSTEM_PROMPT", "GREETING", "FALLBACK_PHRASE", "REPROMPT_PHRASE", "GOODBYE_PHRASE", "TRANSFER_PHRASE",
    "GOODBYE_WORDS", "SILENCE_TIMEOUT_S", "MAX_REPROMPTS", "BARGE_IN", "BARGE_IN_MIN_WORDS",
    "LLM_PROVIDER", "LLM_API_URL", "LLM_MODEL", "LLM_API_KEY", "LLM_TIMEOUT", "LLM_MAX_TOKENS", "LLM_STREAM",
    "MAX_REPLY_SENTENCES", "MAX_CONVERSATION_HISTORY", "TTS_ENGINE", "COQUI_MODEL", "COQUI_MODEL_PATH",
    "COQUI_CONFIG_PATH", "PIPER_VOICE", "OPERATOR_DESTINATION", "OPERATOR_WORDS", "LLM_TOOLS",
    "MAX_TOOL_CALLS", "TOOL_FILLER_PHRASE", "TOOL_FILLER_AFTER_S", "FIRST_CHUNK", "WEBHOOK_URL",
)
TABLE_KEYS = ("transfer_targets", "dtmf", "tools")
DTMF_DIGITS = frozenset("0123456789*#ABCD")
DTMF_ACTIONS = ("transfer", "hangup", "repeat", "llm")
# Names the LLM sees as an enum and callers may say: plain, short, no look-alikes of other scripts.
TARGET_NAME_RE = re.compile(r"^[a-z0-9_]{1,32}$")
AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class TransferTarget:
    """An allowlisted transfer: ``uuid_transfer <uuid> <destination> <dialplan> <context>``."""

    name: str
    destination: str
    dialplan: str
    context: str


@dataclass(frozen=True)
class DtmfAction:
    """What a digit does: ``transfer`` (to ``target``), ``hangup``, ``repeat`` or ``llm``."""

    kind: str
    target: str | None = None


@dataclass(frozen=True)
class Agent:
    name: str
    settings: Settings
    transfer_targets: Mapping[str, TransferTarget] = field(default_factory=dict)
    dtmf: Mapping[str, DtmfAction] = field(default_factory=dict)
    tools: tuple[HttpTool, ...] = ()  # its HTTP tools, besides the built-in transfer_call and end_call


@dataclass(frozen=True)
class AgentBook:
    """Every agent by name, and the one a call gets when it names none (or an unknown one)."""

    agents: Mapping[str, Agent]
    default_name: str

    @property
    def default(self) -> Agent:
        return self.agents[self.default_name]

    def get(self, name: str | None) -> Agent | None:
        """The agent called ``name`` exactly, or None."""
        return self.agents.get(name) if name else None


def load_agents(settings: Settings, environ: Mapping[str, str] | None = None) -> AgentBook:
    """The agents of ``settings.agents_file``, or the one ``default`` agent of ``settings``.

    ``environ`` (default ``os.environ``) is where tool headers' ``${NAME}`` are read.
    Raises ConfigError naming the file, the agent and the key (or tool).
    """
    environ = os.environ if environ is None else environ
    if not settings.agents_file:
        agent = _agent(DEFAULT_AGENT, settings, {}, {}, where="")
        return AgentBook(MappingProxyType({DEFAULT_AGENT: agent}), DEFAULT_AGENT)
    path = Path(settings.agents_file)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("AGENTS_FILE", f"{path}: cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("AGENTS_FILE", f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"default_agent", "agents"})
    if unknown:
        raise ConfigError("AGENTS_FILE", f"{path}: unknown key {unknown[0]!r} (expected default_agent and [agents.NAME])")
    tables = document.get("agents")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError("AGENTS_FILE", f"{path}: no [agents.NAME] table")
    agents: dict[str, Agent] = {}
    for name, table in tables.items():
        where = f"{path}: [agents.{name}]"
        if not AGENT_NAME_RE.match(name):
            raise ConfigError("AGENTS_FILE", f"{where}: agent names are letters, digits, '_' and '-'")
        if not isinstance(table, dict):
            raise ConfigError("AGENTS_FILE", f"{where}: must be a table")
        agents[name] = _agent_from_table(name, table, settings, where, environ)
    default_name = document.get("default_agent", next(iter(agents)))
    if default_name not in agents:
        raise ConfigError("AGENTS_FILE", f"{path}: default_agent {default_name!r} is not one of the agents "
                                         f"({', '.join(agents)})")
    return AgentBook(MappingProxyType(agents), default_name)


def _agent_from_table(name: str, table: dict, settings: Settings, where: str, environ: Mapping[str, str]) -> Agent:
    overrides: dict[str, str] = {}
    for key, value in table.items():
        if key in TABLE_KEYS:
            continue
        variable = key.upper()
        if key != key.lower() or variable not in AGENT_KEYS:
            raise ConfigError("AGENTS_FILE", f"{where}: unknown key {key!r}")
        overrides[variable] = _as_env_value(value, where, key)
    # The agent's values are validated exactly as the environment's are, over the daemon's own.
    try:
        agent_settings = load_settings(environ={**settings.as_environment(), "AGENTS_FILE": "", **overrides})
    except ConfigError as exc:
        key = exc.variable.lower() if exc.variable in overrides else exc.variable
        raise ConfigError("AGENTS_FILE", f"{where}: {key}: {exc.problem}") from None
    agent_settings = agent_settings.replace(agents_file=settings.agents_file)
    agent = _agent(name, agent_settings, table.get("transfer_targets", {}), table.get("dtmf", {}), where)
    if "tools" not in table:
        return agent
    tools = parse_tools(table["tools"], f"{where}: ", environ)
    if tools and not agent_settings.llm_tools:
        raise ConfigError("AGENTS_FILE", f"{where}: tools need llm_tools = true (and an LLM that calls tools)")
    if tools and agent_settings.llm_provider not in ("openai", "ollama"):
        raise ConfigError("AGENTS_FILE", f"{where}: tools need llm_provider openai or ollama "
                                         f"({agent_settings.llm_provider} cannot call tools)")
    return Agent(agent.name, agent.settings, agent.transfer_targets, agent.dtmf, tools)


def _as_env_value(value: object, where: str, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    raise ConfigError("AGENTS_FILE", f"{where}: {key}: must be a string, number, boolean or list of strings")


def _agent(name: str, settings: Settings, targets_table: object, dtmf_table: object, where: str) -> Agent:
    prefix = f"{where}: " if where else ""
    if not isinstance(targets_table, dict):
        raise ConfigError("AGENTS_FILE", f"{prefix}transfer_targets must be a table of name = \"destination\"")
    targets: dict[str, TransferTarget] = {}
    for target_name, destination in targets_table.items():
        if not TARGET_NAME_RE.match(target_name):
            raise ConfigError("AGENTS_FILE", f"{prefix}transfer_targets: name {target_name!r} must be 1-32 of a-z 0-9 _")
        if not isinstance(destination, str):
            raise ConfigError("AGENTS_FILE", f"{prefix}transfer_targets.{target_name}: must be a string")
        try:
            targets[target_name] = TransferTarget(target_name, *check_transfer_destination("", destination))
        except ConfigError as exc:
            raise ConfigError("AGENTS_FILE", f"{prefix}transfer_targets.{target_name}: {exc.problem}") from None
    if settings.operator_destination and OPERATOR_TARGET not in targets:
        targets[OPERATOR_TARGET] = TransferTarget(
            OPERATOR_TARGET, *check_transfer_destination("OPERATOR_DESTINATION", settings.operator_destination))
    if not isinstance(dtmf_table, dict):
        raise ConfigError("AGENTS_FILE", f"{prefix}dtmf must be a table of \"digit\" = \"action\"")
    dtmf: dict[str, DtmfAction] = {}
    if OPERATOR_TARGET in targets:
        dtmf["0"] = DtmfAction("transfer", OPERATOR_TARGET)  # what every IVR does with 0
    for digit, action in dtmf_table.items():
        if digit not in DTMF_DIGITS:
            raise ConfigError("AGENTS_FILE", f"{prefix}dtmf: {digit!r} is not a DTMF digit (0-9 * # A-D)")
        dtmf[digit] = _dtmf_action(action, targets, f"{prefix}dtmf.{digit!r}")
    return Agent(name, settings, MappingProxyType(targets), MappingProxyType(dtmf))


def _dtmf_action(action: object, targets: Mapping[str, TransferTarget], where: str) -> DtmfAction:
    if not isinstance(action, str):
        raise ConfigError("AGENTS_FILE", f"{where}: must be a string")
    kind, _, target = action.partition(":")
    if kind not in DTMF_ACTIONS or bool(target) != (kind == "transfer"):
        raise ConfigError("AGENTS_FILE", f"{where}: {action!r} must be transfer:<target>, hangup, repeat or llm")
    if kind == "transfer" and target not in targets:
        raise ConfigError("AGENTS_FILE", f"{where}: transfer target {target!r} is not in transfer_targets")
    return DtmfAction(kind, target or None)
