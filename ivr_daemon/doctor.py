"""``ivr-daemon doctor``: why does the daemon not answer? One command that checks, in order.

Each check is one function in :data:`CHECKS`: it gets the :class:`DoctorRun` (the settings
and what earlier checks found, e.g. the authenticated event socket) and yields one or more
:class:`Row` (one per agent for the voices). A check that needs something an earlier one
could not get yields a skipped row naming it, so a dead switch is one ✘, not six. Adding a
check is adding one function to the list.

The checks use the daemon's own code paths (its ESL connection, LLM client, TTS engines,
output-dir rules), so a ✔ here means the same thing works in ``ivr-daemon run``.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import socket
import stat
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO
from urllib.parse import urlsplit

import gevent
import gevent.socket
import numpy as np

from ivr_daemon.esl import commands
from ivr_daemon.esl.protocol import Frame, FrameParser

PASS, FAIL, SKIP = "pass", "fail", "skip"
MARKS = {PASS: "✔", FAIL: "✘", SKIP: "–"}
DEFAULT_TIMEOUT_S = 5.0
FREESWITCH_USER = "freeswitch"  # the user FreeSWITCH's packages run it as
# Where FreeSWITCH keeps vosk.conf.xml: package installs, then source installs (freeswitch_conf/README.md).
VOSK_CONF_CANDIDATES = (
    Path("/etc/freeswitch/autoload_configs/vosk.conf.xml"),
    Path("/usr/local/freeswitch/conf/autoload_configs/vosk.conf.xml"),
)
MOD_VOSK_DEFAULT_URL = "ws://127.0.0.1:2700"  # mod_vosk.c's server-url when vosk.conf sets none
LLM_PROMPT = [
    {"role": "system", "content": "You are a health check. Answer with exactly one word."},
    {"role": "user", "content": "Say hello."},
]
VOICE_PROBE_TEXT = "Hello."
RECV_CHUNK_BYTES = 65536


@dataclass(frozen=True)
class Row:
    status: str  # PASS | FAIL | SKIP
    detail: str
    fix: str = ""
    title: str = ""  # "": the check's own title (a check with several rows names each)


@dataclass
class DoctorRun:
    """What the checks share: the inputs, and what earlier checks found for later ones."""

    env_file: str | None = ".env"
    environ: dict[str, str] | None = None  # None: the process environment (tests pass their own)
    vosk_conf: Path | None = None  # None: the first of VOSK_CONF_CANDIDATES that exists
    freeswitch_user: str = FREESWITCH_USER
    timeout_s: float = DEFAULT_TIMEOUT_S
    settings: object | None = None
    agents: object | None = None
    # Per switch (by name, host:port): reachable, its authenticated EslConnection, subscribed.
    esl_reachable: set[str] = field(default_factory=set)
    esl: dict[str, object] = field(default_factory=dict)
    esl_subscribed: set[str] = field(default_factory=set)
    rows: list[Row] = field(default_factory=list)

    def close(self) -> None:
        while self.esl:
            _, conn = self.esl.popitem()
            conn.close(send_exit=True, exit_timeout_s=1.0)


class NotChecked(Exception):
    """A check cannot run: something an earlier check needed failed (the message says what)."""


@dataclass(frozen=True)
class Check:
    title: str
    run: Callable[[DoctorRun], Iterator[Row]]


# -- the checks, in order --------------------------------------------------------------------


def check_settings(run: DoctorRun) -> Iterator[Row]:
    from ivr_daemon.agents import load_agents
    from ivr_daemon.config import ConfigError, load_settings

    try:
        run.settings = load_settings(environ=run.environ, dotenv_path=run.env_file)
        run.agents = load_agents(run.settings)
    except ConfigError as exc:
        where = f"the environment or {run.env_file}" if run.env_file else "the environment"
        yield Row(FAIL, str(exc), f"correct {exc.variable} in {where}")
        return
    names = list(run.agents.agents)
    yield Row(PASS, f"{len(names)} agent{'s' * (len(names) != 1)}: {', '.join(names)}")


def check_esl_reachable(run: DoctorRun) -> Iterator[Row]:
    for switch, title in _switches(run, "FreeSWITCH event socket reachable"):
        where = switch.name
        variables = "FREESWITCH_HOSTS" if run.settings.freeswitch_hosts else "FREESWITCH_HOST/FREESWITCH_PORT"
        fix = (f"start FreeSWITCH (systemctl start freeswitch) with mod_event_socket loaded, and make "
               f"{variables} ({where}) match listen-ip/listen-port in event_socket.conf.xml")
        try:
            sock = gevent.socket.create_connection((switch.host, switch.port), timeout=run.timeout_s)
        except OSError as exc:
            yield Row(FAIL, f"cannot connect to {where}: {_reason(exc)}", fix, title=title)
            continue
        try:
            frame = _first_frame(sock, run.timeout_s)
        except OSError as exc:
            yield Row(FAIL, f"{where} accepted the connection but sent no auth/request: {_reason(exc)}", fix,
                      title=title)
            continue
        finally:
            sock.close()
        if frame is None:
            yield Row(FAIL, f"{where} closed the connection without a word", fix, title=title)
        elif frame.content_type == "auth/request":
            run.esl_reachable.add(switch.name)
            yield Row(PASS, f"{where} asks for the password", title=title)
        elif frame.content_type == "text/rude-rejection":
            # mod_event_socket's answer to an address its apply-inbound-acl does not allow.
            yield Row(FAIL, f"{where} refused this host: {frame.body.decode('utf-8', 'replace').strip()}",
                      "allow this host in event_socket.conf.xml's apply-inbound-acl (an acl.conf.xml list), "
                      "then fs_cli -x 'reload mod_event_socket'", title=title)
        else:
            yield Row(FAIL, f"{where} is not FreeSWITCH's event socket (first reply: {frame.content_type!r})", fix,
                      title=title)


def check_esl_password(run: DoctorRun) -> Iterator[Row]:
    from ivr_daemon.config import DEFAULT_ESL_PASSWORD
    from ivr_daemon.esl.connection import AuthenticationFailed, EslConnection, EslError

    for switch, title in _switches(run, "event socket password accepted"):
        if switch.name not in run.esl_reachable:
            yield Row(SKIP, "not checked: the event socket is unreachable", title=title)
            continue
        conn = EslConnection(switch.host, switch.port, switch.password, on_event=lambda event: None,
                             connect_timeout_s=run.timeout_s, command_timeout_s=run.timeout_s)
        where = f"{switch.name}: " if run.settings.freeswitch_hosts else ""
        try:
            conn.connect()
        except AuthenticationFailed as exc:
            variable = (f"the password of {switch.name} in FREESWITCH_HOSTS (password@host:port) or FREESWITCH_PASSWORD"
                        if run.settings.freeswitch_hosts else "FREESWITCH_PASSWORD")
            yield Row(FAIL, f"{where}{exc}", f"set {variable} to the password in event_socket.conf.xml "
                                             "(<param name=\"password\" .../>)", title=title)
            continue
        except EslError as exc:
            yield Row(FAIL, f"{where}{exc}",
                      "retry; if it persists, check FreeSWITCH's log (fs_cli -x 'console loglevel debug')",
                      title=title)
            continue
        run.esl[switch.name] = conn
        note = " (FreeSWITCH's well-known default ClueCon: change it on both sides)" \
            if switch.password == DEFAULT_ESL_PASSWORD else ""
        yield Row(PASS, f"{where}authenticated{note}", title=title)


def check_esl_events(run: DoctorRun) -> Iterator[Row]:
    from ivr_daemon.daemon import SUBSCRIBED_EVENTS
    from ivr_daemon.esl.connection import EslError

    def subscribe(switch, conn, where: str) -> Row:
        try:
            reply = conn.send(commands.subscribe_events(SUBSCRIBED_EVENTS))
        except EslError as exc:
            return Row(FAIL, f"{where}event {' '.join(SUBSCRIBED_EVENTS[:2])} ...: {exc}", "check FreeSWITCH's log")
        if not reply.ok:
            return Row(FAIL, f"{where}FreeSWITCH answered {reply.text!r}", "check FreeSWITCH's log")
        run.esl_subscribed.add(switch.name)
        return Row(PASS, f"{where}{reply.text} ({len(SUBSCRIBED_EVENTS)} event types)")

    yield from _each_authenticated_switch(run, "event subscription works", subscribe)


def check_mod_vosk(run: DoctorRun) -> Iterator[Row]:
    from ivr_daemon.esl.connection import EslError

    def module_exists(switch, conn, where: str) -> Row:
        try:
            answer = conn.send(commands.module_exists("mod_vosk")).text.strip()
        except EslError as exc:
            return Row(FAIL, f"{where}module_exists mod_vosk: {exc}", "check FreeSWITCH's log")
        if answer == "true":
            return Row(PASS, f"{where}module_exists mod_vosk: true")
        if answer == "false":
            return Row(FAIL, f"{where}module_exists mod_vosk: false (no speech events will come)",
                       "add <load module=\"mod_vosk\"/> to modules.conf.xml and run fs_cli -x 'load mod_vosk' "
                       "(freeswitch_conf/README.md, \"mod_vosk\", if your packages lack mod_vosk.so)")
        return Row(FAIL, f"{where}module_exists mod_vosk answered {answer[:80]!r}",
                   "check FreeSWITCH's version and log")

    yield from _each_authenticated_switch(run, "mod_vosk loaded", module_exists)


def check_asr(run: DoctorRun) -> Iterator[Row]:
    settings = _settings(run)
    url, source = recogniser_url(run, settings)
    fix = (f"start the recogniser mod_vosk connects to (systemctl start ivr-daemon-asr, or ivr-daemon "
           f"asr-server, or a vosk-server) listening at {url}, or correct server-url in {source}"
           if source.endswith(".xml") else
           f"start the recogniser (systemctl start ivr-daemon-asr, or ivr-daemon asr-server) on {url}, "
           f"or correct ASR_HOST/ASR_PORT")
    try:
        websocket_handshake(url, run.timeout_s)
    except (OSError, WebSocketRefused) as exc:
        yield Row(FAIL, f"{url} (from {source}): {_reason(exc)}", fix)
        return
    yield Row(PASS, f"{url} (from {source})")


def check_llm(run: DoctorRun) -> Iterator[Row]:
    """One row per agent's LLM; with several replicas (LLM_API_URL a list), one row per replica,
    so that the one that is down shows."""
    from ivr_daemon.llm import LlmError, make_llm_client
    from ivr_daemon.llm.replicas import redacted, replica_label, split_urls

    settings = _settings(run)
    agents = run.agents.agents if run.agents is not None else {"default": None}
    seen: dict[tuple, str] = {}
    for name, agent in agents.items():
        agent_settings = agent.settings if agent is not None else settings
        key = (agent_settings.llm_provider, agent_settings.llm_api_url, agent_settings.llm_model)
        title = f"LLM answers ({name})" if len(agents) > 1 else "LLM answers"
        if key in seen:
            yield Row(SKIP, f"the same LLM as agent {seen[key]}", title=title)
            continue
        seen[key] = name
        urls = split_urls(agent_settings.llm_api_url)
        for url in urls:
            replica_title, shown = title, url
            if len(urls) > 1:
                shown = replica_label(url)  # the URL may carry credentials
                replica_title = f"{title} [replica {shown}]"
            where = f"{agent_settings.llm_provider} {agent_settings.llm_model} at {shown}"
            started_s = time.monotonic()
            try:
                answer = make_llm_client(dataclasses.replace(agent_settings, llm_api_url=url)).complete(list(LLM_PROMPT))
            except LlmError as exc:
                if len(urls) > 1:
                    redacted(exc, url)
                elapsed_ms = (time.monotonic() - started_s) * 1000
                yield Row(FAIL, f"{where}: {exc} (after {elapsed_ms:.0f} ms)",
                          "start the LLM server, or correct LLM_PROVIDER/LLM_API_URL/LLM_MODEL "
                          "(for Ollama: ollama pull the model); a slow answer needs a larger LLM_TIMEOUT",
                          title=replica_title)
                continue
            elapsed_ms = (time.monotonic() - started_s) * 1000
            yield Row(PASS, f"{where}: {answer[:40]!r} in {elapsed_ms:.0f} ms", title=replica_title)


def check_voices(run: DoctorRun) -> Iterator[Row]:
    from ivr_daemon.tts import make_tts_engine
    from ivr_daemon.tts.base import TtsError

    _settings(run)  # NotChecked when the settings do not parse
    agents = run.agents.agents if run.agents is not None else {}
    pool = gevent.get_hub().threadpool  # synthesis is CPU-bound: a native thread, not the loop
    for name, agent in agents.items():
        voice_settings = agent.settings
        title = f"voice of agent {name} speaks"
        started_s = time.monotonic()
        try:
            engine, samples, rate_hz = _in_thread(pool, _load_and_speak, make_tts_engine, voice_settings)
        except TtsError as exc:
            yield Row(FAIL, f"tts_engine={voice_settings.tts_engine}: {exc}",
                      "point PIPER_VOICE (or COQUI_MODEL_PATH/COQUI_CONFIG_PATH) at a voice that loads, "
                      "or re-fetch it (ivr-daemon fetch-model NAME for Coqui)", title=title)
            continue
        elapsed_ms = (time.monotonic() - started_s) * 1000
        audio_s = len(samples) / rate_hz if rate_hz else 0.0
        if voice_settings.tts_engine != "null" and not np.any(np.asarray(samples)):  # null speaks silence
            yield Row(FAIL, f"{engine.name} {engine.voice_id}: {VOICE_PROBE_TEXT!r} came out silent",
                      "use another voice model", title=title)
            continue
        yield Row(PASS, f"{engine.voice_id}: {audio_s:.2f} s of audio in {elapsed_ms:.0f} ms", title=title)


def check_output_dir(run: DoctorRun) -> Iterator[Row]:
    from ivr_daemon.audio import write_telephony_wav
    from ivr_daemon.storage import UnsafeOutputDir, prepare_output_dir

    settings = _settings(run)
    try:
        directory = prepare_output_dir(settings.tts_output_dir)
        # A WAV made exactly as the daemon makes them (mode, group, atomic rename), then read back.
        probe = write_telephony_wav(np.zeros(800, dtype=np.float32), 8000, directory / f".doctor-{os.getpid()}.wav")
    except UnsafeOutputDir as exc:
        yield Row(FAIL, str(exc), "see the detail: it names the fix")
        return
    except OSError as exc:
        yield Row(FAIL, f"{settings.tts_output_dir}: cannot write a WAV: {_reason(exc)}",
                  f"give the daemon's user write access to {settings.tts_output_dir}")
        return
    try:
        probe.read_bytes()
        yield Row(PASS, str(directory))
        yield from _readable_by(run.freeswitch_user, probe)
    finally:
        probe.unlink(missing_ok=True)


def check_database(run: DoctorRun) -> Iterator[Row]:
    from ivr_daemon.records import BadDatabaseUrl, DatabaseUnavailable, check_database as reach_database

    settings = _settings(run)
    if not settings.database_url:
        yield Row(PASS, "DATABASE_URL=off: no call records kept")
        return
    try:
        # A blocking driver (psycopg, sqlite3): on a native thread, as the daemon's records writer does.
        detail = _in_thread(gevent.get_hub().threadpool, reach_database, settings.database_url)
    except BadDatabaseUrl as exc:
        yield Row(FAIL, str(exc), "set DATABASE_URL to sqlite:///PATH or postgresql://USER@HOST/DB (or off)")
    except DatabaseUnavailable as exc:
        yield Row(FAIL, str(exc), "start the database server, or fix DATABASE_URL's host, port, user and "
                  "password; the daemon keeps records in memory (RECORDS_QUEUE_MAX) while it is down")
    else:
        yield Row(PASS, detail)


CHECKS: list[Check] = [
    Check("settings parse", check_settings),
    Check("FreeSWITCH event socket reachable", check_esl_reachable),
    Check("event socket password accepted", check_esl_password),
    Check("event subscription works", check_esl_events),
    Check("mod_vosk loaded", check_mod_vosk),
    Check("recogniser accepts a WebSocket", check_asr),
    Check("LLM answers", check_llm),
    Check("voices speak", check_voices),
    Check("TTS_OUTPUT_DIR writable", check_output_dir),
    Check("call-records database reachable", check_database),
]


# -- running and printing --------------------------------------------------------------------


def run_checks(run: DoctorRun, checks: list[Check] | None = None) -> list[Row]:
    """Every check in order; a check that crashes is a ✘ row, never the end of the doctor."""
    try:
        for check in checks if checks is not None else CHECKS:
            try:
                for row in check.run(run):
                    run.rows.append(row if row.title else dataclasses.replace(row, title=check.title))
            except NotChecked as exc:
                run.rows.append(Row(SKIP, f"not checked: {exc}", title=check.title))
            except Exception as exc:  # a bug or a surprise in one check must not hide the others
                run.rows.append(Row(FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                                    "report this with the detail", title=check.title))
    finally:
        run.close()
    return run.rows


def exit_code(rows: list[Row]) -> int:
    return 1 if any(row.status == FAIL for row in rows) else 0


MAX_DETAIL_CHARS = 240  # a library's error can be a whole chain of causes; the start says what it is


def print_table(rows: list[Row], stream: TextIO) -> None:
    width = max((len(row.title) for row in rows), default=0)
    for row in rows:
        detail = row.detail if len(row.detail) <= MAX_DETAIL_CHARS else row.detail[:MAX_DETAIL_CHARS - 1] + "…"
        print(f"{MARKS[row.status]} {row.title.ljust(width)}  {detail}", file=stream)
        if row.status == FAIL and row.fix:
            print(f"  {' ' * width}  fix: {row.fix}", file=stream)
    counts = {status: sum(row.status == status for row in rows) for status in MARKS}
    summary = [f"{counts[PASS]} fine"] + [f"{counts[FAIL]} to fix"] * bool(counts[FAIL]) \
        + [f"{counts[SKIP]} not checked"] * bool(counts[SKIP])
    print("\n" + ", ".join(summary), file=stream)


def doctor(run: DoctorRun, stream: TextIO) -> int:
    rows = run_checks(run)
    print_table(rows, stream)
    return exit_code(rows)


# -- helpers ---------------------------------------------------------------------------------


def _settings(run: DoctorRun):
    if run.settings is None:
        raise NotChecked("the settings do not parse")
    return run.settings


def _switches(run: DoctorRun, title: str) -> Iterator[tuple[object, str]]:
    """(switch address, row title) of every switch the daemon connects to (FREESWITCH_HOSTS, or
    FREESWITCH_HOST): with one, "" (the check's own title); with several, ``title [host:port]``."""
    switches = _settings(run).switches
    for switch in switches:
        yield switch, (f"{title} [{switch.name}]" if len(switches) > 1 else "")


def _each_authenticated_switch(run: DoctorRun, title: str,
                               probe: Callable[[object, object, str], Row]) -> Iterator[Row]:
    """``probe(switch, connection, where)``'s row for every switch with an authenticated event
    socket (check_esl_password's); a skipped row for each other one, so a dead switch is one ✘.
    ``where`` starts each detail: "host:port: " with several switches, "" with one. The rows
    get their switch's title here."""
    for switch, row_title in _switches(run, title):
        conn = run.esl.get(switch.name)
        if conn is None:
            yield Row(SKIP, "not checked: no authenticated event socket", title=row_title)
            continue
        where = f"{switch.name}: " if run.settings.freeswitch_hosts else ""
        yield dataclasses.replace(probe(switch, conn, where), title=row_title)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _first_frame(sock, timeout_s: float):
    """The first ESL frame the server sends (None if it closes first)."""
    parser = FrameParser()
    sock.settimeout(timeout_s)
    while True:
        data = sock.recv(RECV_CHUNK_BYTES)
        if not data:
            return None
        for item in parser.feed(data):
            if isinstance(item, Frame):
                return item


def recogniser_url(run: DoctorRun, settings) -> tuple[str, str]:
    """(the WebSocket URL mod_vosk uses, where it came from): vosk.conf.xml's server-url, else ASR_HOST:ASR_PORT."""
    candidates = [run.vosk_conf] if run.vosk_conf is not None else list(VOSK_CONF_CANDIDATES)
    for path in candidates:
        if path.is_file():
            try:
                root = ElementTree.parse(path).getroot()
            except ElementTree.ParseError as exc:
                raise NotChecked(f"{path} is not valid XML: {exc}") from None
            for param in root.iter("param"):
                if param.get("name") == "server-url" and param.get("value"):
                    return param.get("value").strip(), str(path)
            return MOD_VOSK_DEFAULT_URL, f"{path}, which sets no server-url: mod_vosk's default"
    host = settings.asr_host if settings.asr_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"ws://{host}:{settings.asr_port}", "ASR_HOST/ASR_PORT (no vosk.conf.xml found)"


class WebSocketRefused(Exception):
    """The server answered the WebSocket upgrade with something else."""


def websocket_handshake(url: str, timeout_s: float) -> None:
    """Open a WebSocket to ``url`` (ws:// only, as mod_vosk's) and close it cleanly; raises on failure."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request
    from wsproto.utilities import RemoteProtocolError

    parts = urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise WebSocketRefused(f"not a ws:// URL: {url!r}")
    port = parts.port or 80
    ws = WSConnection(ConnectionType.CLIENT)
    with gevent.socket.create_connection((parts.hostname, port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(ws.send(Request(host=f"{parts.hostname}:{port}", target=parts.path or "/")))
        while True:
            data = sock.recv(RECV_CHUNK_BYTES)
            if not data:
                raise WebSocketRefused("the server closed the connection during the handshake")
            try:
                ws.receive_data(data)
                events = list(ws.events())
            except RemoteProtocolError as exc:
                raise WebSocketRefused(f"not a WebSocket server (it answered {data[:40]!r}: {exc})") from None
            for event in events:
                if isinstance(event, AcceptConnection):
                    sock.sendall(ws.send(CloseConnection(code=1000)))
                    return
                if isinstance(event, RejectConnection):
                    raise WebSocketRefused(f"the upgrade was refused with HTTP {event.status_code}")


def _load_and_speak(make_tts_engine, voice_settings):
    engine = make_tts_engine(voice_settings)
    samples, rate_hz = engine.synthesize(VOICE_PROBE_TEXT)
    return engine, samples, rate_hz


def _in_thread(pool, function, *args):
    """``function(*args)`` on a native thread; its exception re-raised here (gevent's pool would
    also print it to stderr, burying the table)."""
    def catching():
        try:
            return function(*args), None
        except Exception as exc:
            return None, exc

    result, error = pool.apply(catching)
    if error is not None:
        raise error
    return result


def _may(info: os.stat_result, uid: int, gids: set[int], want: int) -> bool:
    """Whether a user may ``want`` (4 read, 1 traverse) by the mode bits (POSIX ACLs not read)."""
    if uid == 0:
        return True
    if info.st_uid == uid:
        return bool(info.st_mode & (want << 6))
    if info.st_gid in gids:
        return bool(info.st_mode & (want << 3))
    return bool(info.st_mode & want)


def _readable_by(user: str, wav: Path) -> Iterator[Row]:
    title = f"WAVs readable by {user}"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        yield Row(SKIP, f"no user {user} on this host (FreeSWITCH elsewhere or under another user)", title=title)
        return
    gids = set(os.getgrouplist(user, entry.pw_gid))
    blocked = [parent for parent in reversed(wav.parent.absolute().parents) if not _may(os.stat(parent), entry.pw_uid, gids, 1)]
    if not _may(os.stat(wav.parent), entry.pw_uid, gids, 1):
        blocked.append(wav.parent)
    if blocked:
        yield Row(FAIL, f"{user} cannot enter {blocked[0]} (mode {stat.S_IMODE(os.stat(blocked[0]).st_mode):04o})",
                  f"chmod o+x {blocked[0]}, or put TTS_OUTPUT_DIR where {user} can reach it", title=title)
        return
    info = os.stat(wav)
    if not _may(info, entry.pw_uid, gids, 4):
        group = _group_name(info.st_gid)
        yield Row(FAIL, f"a new WAV is mode {stat.S_IMODE(info.st_mode):04o}, group {group}: {user} cannot read it",
                  f"chgrp {user} {wav.parent} && chmod g+s {wav.parent} (new WAVs then get group {user}), "
                  f"or add {user} to group {group}", title=title)
        return
    yield Row(PASS, f"a new WAV is mode {stat.S_IMODE(info.st_mode):04o}, group {_group_name(info.st_gid)}", title=title)


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
