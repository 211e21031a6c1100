"""The ``ivr-daemon`` command: parse arguments, load settings, hand over. Nothing else."""

from gevent import monkey

# First thing: requests, sockets and threading must be cooperative before anything imports them.
monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from ivr_daemon.cli_settings import EXIT_AUTH, EXIT_CONFIG, EXIT_OK, config_error  # noqa: E402
from ivr_daemon.cli_settings import agents_or_exit as _agents_or_exit  # noqa: E402
from ivr_daemon.cli_settings import settings_or_exit as _settings_or_exit  # noqa: E402


def cmd_run(args) -> int:
    import time

    from ivr_daemon import resolver
    from ivr_daemon.collector import CollectorSchedule
    from ivr_daemon.daemon import SHUTDOWN_BUDGET_S, build_conversation_daemon, open_records
    from ivr_daemon.http.server import STOP_TIMEOUT_S
    from ivr_daemon.records import RecordsError
    from ivr_daemon.storage import UnsafeOutputDir
    from ivr_daemon.esl.connection import AuthenticationFailed
    from ivr_daemon.logs import configure_logging, get_logger
    from ivr_daemon.tts.base import TtsModelUnavailable
    from ivr_daemon.config import DEFAULT_ESL_PASSWORD

    settings = _settings_or_exit(args)
    configure_logging(settings.log_level, settings.log_format)
    log = get_logger("ivr_daemon.cli")
    resolver.install()  # an LLM at an IP address is connected to without a thread-pool lookup
    if settings.uses_default_esl_password:
        log.warning("esl_default_password", hint="FREESWITCH_PASSWORD is FreeSWITCH's well-known default ClueCon: change it on the switch and here",
                    switches=[switch.name for switch in settings.switches if switch.password == DEFAULT_ESL_PASSWORD])
    agents = _agents_or_exit(settings)
    try:
        records = open_records(settings)  # tables created or upgraded; a database down is waited for
    except RecordsError as exc:
        return config_error(f"DATABASE_URL: {exc}")
    try:
        daemon = build_conversation_daemon(settings, agents=agents, records=records)
    except TtsModelUnavailable as exc:
        print(f"ivr-daemon: TTS model unavailable: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except UnsafeOutputDir as exc:
        return config_error(f"TTS_OUTPUT_DIR: {exc}")
    http = _http_server_or_exit(daemon, settings)
    # systemd (Type=notify): READY once FreeSWITCH is connected and the HTTP API listens (it
    # already does here), the watchdog fed from this loop, STOPPING at SIGTERM.
    from ivr_daemon.service_manager import ServiceNotifier

    notifier = ServiceNotifier()
    freeswitch = f"{settings.freeswitch_host}:{settings.freeswitch_port}"
    http_where = f", HTTP on {http.url}" if http is not None else ""

    def tell_systemd_when_ready() -> None:
        daemon.esl.wait_connected()
        notifier.ready(f"connected to FreeSWITCH {freeswitch}{http_where}")

    if notifier.enabled:
        notifier.start_watchdog()
        notifier.status(f"connecting to FreeSWITCH {freeswitch}")
        gevent.spawn(tell_systemd_when_ready)
    # Signal handlers run on the loop; the shutdown waits, so it gets its own greenlet.
    shutting_down: list[gevent.Greenlet] = []

    def shutdown() -> None:
        notifier.stopping("stopping: finishing turns in flight")
        started_s = time.monotonic()
        if http is not None:
            http.close()  # no new connections; new test turns are refused like calls' turns
        daemon.shutdown()
        if http is not None:
            # Requests still running (a test turn) get what is left of the budget, at most STOP_TIMEOUT_S.
            left_s = SHUTDOWN_BUDGET_S - (time.monotonic() - started_s)
            http.stop(timeout_s=max(0.0, min(STOP_TIMEOUT_S, left_s)))

    def on_signal() -> None:
        if not shutting_down:
            shutting_down.append(gevent.spawn(shutdown))

    gevent.signal_handler(signal.SIGTERM, on_signal)
    gevent.signal_handler(signal.SIGINT, on_signal)
    # What is built so far lives as long as the daemon (modules, settings, voices, the phrase
    # index: ~100k objects). Frozen out of the collector's generations, it is no longer walked
    # by every full collection, which ran on the loop for tens of milliseconds: every call's
    # events waited meanwhile.
    gc.collect()
    gc.freeze()
    # From here on the daemon collects garbage itself, from the idle lane, once a minute (collector.py).
    collector = CollectorSchedule().start()
    log.info("daemon_starting", freeswitch=", ".join(switch.name for switch in settings.switches))
    try:
        daemon.run()
    except AuthenticationFailed as exc:
        log.error("esl_authentication_failed", error=str(exc), hint="set FREESWITCH_PASSWORD to the password in event_socket.conf.xml")
        return EXIT_AUTH
    finally:
        for greenlet in shutting_down:
            greenlet.join(timeout=10)
        daemon.close_voices()  # after the shutdown, which lets syntheses in flight land
        collector.stop()
    log.info("daemon_stopped")
    return EXIT_OK


def _http_server_or_exit(daemon, settings):
    """The HTTP server listening (None with HTTP_PORT=0); exit 2 when its address cannot be had."""
    if not settings.http_port:
        return None
    from ivr_daemon.http import HttpServer

    http = HttpServer(daemon, settings)
    try:
        http.bind()
    except OSError as exc:
        raise SystemExit(config_error(f"HTTP_PORT: cannot listen on {settings.http_host}:{settings.http_port}: "
                                      f"{exc.strerror or exc}"))
    http.start()
    return http


def cmd_simulator(args) -> int:
    from ivr_daemon.logs import configure_logging
    from ivr_daemon.replay.simulator import run_standalone

    configure_logging("WARNING", "console")
    run_standalone(port=args.port, password=args.password, host=args.host)
    return EXIT_OK


def cmd_demo(args) -> int:
    import os
    from pathlib import Path

    from ivr_daemon.demo import run_demo
    from ivr_daemon.logs import configure_logging

    configure_logging("WARNING", "console")
    if args.asr_speed <= 0:
        print("ivr-daemon demo: --asr-speed must be positive", file=sys.stderr)
        return EXIT_CONFIG
    return run_demo(cache_dir=Path(args.cache_dir), out_dir=Path(args.out_dir), tts_engine=args.tts_engine,
                    asr=args.asr, asr_environ=os.environ, caller_audio_speed=args.asr_speed)


def cmd_record(args) -> int:
    from pathlib import Path

    from ivr_daemon.daemon import build_conversation_daemon
    from ivr_daemon.esl.connection import AuthenticationFailed
    from ivr_daemon.llm import make_llm_client
    from ivr_daemon.logs import configure_logging, get_logger
    from ivr_daemon.replay.recorder import Recorder, RecordingLlm
    from ivr_daemon.replay.replayer import wait_until_idle
    from ivr_daemon.storage import UnsafeOutputDir
    from ivr_daemon.tts.base import TtsModelUnavailable

    settings = _settings_or_exit(args)
    if len(settings.switches) > 1:
        # A fixture is one switch's timeline: two switches' frames (and their UUIDs) would mix.
        return config_error("FREESWITCH_HOSTS: record one switch at a time "
                            "(FREESWITCH_HOSTS with one entry, or FREESWITCH_HOST)")
    configure_logging(settings.log_level, settings.log_format)
    log = get_logger("ivr_daemon.cli")
    out_path = Path(args.out)
    recorder = Recorder(all_calls=args.all_calls, stop_after_calls=args.calls)
    try:
        daemon = build_conversation_daemon(settings, agents=_agents_or_exit(settings),
                                           llm=RecordingLlm(make_llm_client(settings), recorder),
                                           on_frame=recorder.on_frame, on_command=recorder.on_command)
    except TtsModelUnavailable as exc:
        print(f"ivr-daemon: TTS model unavailable: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except UnsafeOutputDir as exc:
        return config_error(f"TTS_OUTPUT_DIR: {exc}")
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    runner = daemon.start()
    log.info("recording", out=str(out_path), calls=args.calls, all_calls=args.all_calls)
    waiters = [gevent.spawn(stop.wait), gevent.spawn(recorder.enough_calls.wait), runner]
    gevent.joinall(waiters, count=1)
    if runner.dead and isinstance(runner.exception, AuthenticationFailed):
        log.error("esl_authentication_failed", error=str(runner.exception),
                  hint="set FREESWITCH_PASSWORD to the password in event_socket.conf.xml")
        return EXIT_AUTH
    wait_until_idle(daemon, timeout_s=30)
    daemon.stop()
    from ivr_daemon.replay.fixture import recorded_settings

    comments = [*args.comment, f"recorded by ivr-daemon record from {settings.switches[0].name}"]
    size = recorder.write(out_path, comments=comments, env=recorded_settings(settings.as_environment(), out_path))
    print(f"wrote {out_path}: {len(recorder.frames)} frames seen, {len(recorder.llm)} LLM replies, "
          f"{len(recorder.commands)} commands, {size} bytes", file=sys.stderr)
    return EXIT_OK


def cmd_replay(args) -> int:
    from pathlib import Path

    from ivr_daemon.config import ConfigError
    from ivr_daemon.logs import configure_logging
    from ivr_daemon.replay.replayer import replay_environment, replay_files
    from ivr_daemon.tts.base import TtsModelUnavailable

    # The settings `run` and `record` read (the environment over --env-file), but for what the
    # replay makes itself: the switch, the LLM and TTS_OUTPUT_DIR.
    base_env = replay_environment(args.env_file)
    configure_logging(base_env.get("LOG_LEVEL", "WARNING"), "console")
    try:
        return replay_files(args.fixtures, speed=args.speed, base_env=base_env,
                            junit_xml=Path(args.junit_xml) if args.junit_xml else None,
                            json_out=Path(args.json) if args.json else None)
    except ConfigError as exc:
        return config_error(exc)
    except TtsModelUnavailable as exc:
        print(f"ivr-daemon: TTS model unavailable: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_call(args) -> int:
    """Place one outbound call on its own ESL connection: 0 with the call's UUID on stdout,
    1 when FreeSWITCH refused or failed it (its error on stderr), 2 for a bad request."""
    from ivr_daemon.esl.connection import AuthenticationFailed, EslClient
    from ivr_daemon.logs import configure_logging
    from ivr_daemon.outbound import CallRequest, JobWaiters, OutboundError, prepare, place_call

    settings = _settings_or_exit(args)
    configure_logging(settings.log_level, settings.log_format)
    agents = _agents_or_exit(settings)
    variables = {}
    for item in args.var:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"ivr-daemon: --var {item[:64]!r}: expected KEY=VALUE", file=sys.stderr)
            return EXIT_CONFIG
        variables[key] = value
    request = CallRequest(args.destination, args.agent, variables, args.caller_id)
    try:
        prepare(request, agents)  # every check before connecting: nothing is dialled on a bad request
    except OutboundError as exc:
        print(f"ivr-daemon: call not placed: {exc.message}", file=sys.stderr)
        return exc.exit_code
    switches = {switch.name: switch for switch in settings.switches}
    switch = settings.switches[0] if args.switch is None else switches.get(args.switch)
    if switch is None:
        print(f"ivr-daemon: call not placed: no switch {args.switch!r} in FREESWITCH_HOSTS "
              f"({', '.join(switches)})", file=sys.stderr)
        return EXIT_CONFIG
    jobs = JobWaiters()
    client = EslClient(switch.host, switch.port, switch.password, ("BACKGROUND_JOB",), jobs.on_event,
                       backoff_max_s=1.0)
    runner = gevent.spawn(client.run)
    try:
        connected = gevent.spawn(client.wait_connected, args.connect_timeout)
        gevent.joinall([connected, runner], count=1, timeout=args.connect_timeout)
        if runner.dead and isinstance(runner.exception, AuthenticationFailed):
            print(f"ivr-daemon: call not placed: {runner.exception}", file=sys.stderr)
            return EXIT_AUTH
        if not client.connected:
            print(f"ivr-daemon: call not placed: cannot reach FreeSWITCH at {switch.name} "
                  f"within {args.connect_timeout:g} s", file=sys.stderr)
            return 1
        try:
            call_uuid = place_call(request, agents, client.send, jobs, timeout_s=args.timeout)
        except OutboundError as exc:
            print(f"ivr-daemon: call not placed: {exc.message}", file=sys.stderr)
            return exc.exit_code
        print(call_uuid)
        return EXIT_OK
    finally:
        client.stop()
        runner.kill(block=True, timeout=2)


def cmd_asr_server(args) -> int:
    from ivr_daemon.logs import configure_logging, get_logger

    settings = _settings_or_exit(args)
    configure_logging(settings.log_level, settings.log_format)
    log = get_logger("ivr_daemon.cli")
    try:
        from ivr_daemon.asr import AsrModelUnavailable, make_asr_engine
        from ivr_daemon.asr.server import AsrServer
    except ImportError as exc:  # the [asr] extra (wsproto, the engines) is not installed
        print(f"ivr-daemon: asr-server needs the asr extra: pip install 'ivr-daemon[asr]' ({exc})", file=sys.stderr)
        return EXIT_CONFIG
    try:
        engine = make_asr_engine(settings)
    except AsrModelUnavailable as exc:
        print(f"ivr-daemon: ASR model unavailable: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    server = AsrServer(engine, host=settings.asr_host, port=settings.asr_port,
                       sample_rate_hz=settings.asr_sample_rate_hz, log_transcripts=settings.log_transcripts)
    try:
        server.start()
    except OSError as exc:
        return config_error(f"ASR_HOST/ASR_PORT: cannot listen on {settings.asr_host}:{settings.asr_port}: "
                            f"{exc.strerror or exc}")
    from ivr_daemon.service_manager import ServiceNotifier

    notifier = ServiceNotifier()  # systemd Type=notify: READY now that it listens, the watchdog, STOPPING
    notifier.start_watchdog()
    host, port = server.address
    notifier.ready(f"listening on ws://{host}:{port} ({engine.name})")
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    notifier.stopping()
    log.info("asr_server_stopping", open_streams=server.open_streams)
    server.stop()
    log.info("asr_server_stopped")
    return EXIT_OK


def cmd_doctor(args) -> int:
    """Check, in order, everything the daemon needs; a ✔/✘ table with the fix for each ✘. 0: all fine."""
    from pathlib import Path

    from ivr_daemon.doctor import DoctorRun, doctor
    from ivr_daemon.logs import configure_logging

    configure_logging("CRITICAL", "console")  # the table is the output; the parts' own logs would bury it
    run = DoctorRun(env_file=args.env_file, vosk_conf=Path(args.vosk_conf) if args.vosk_conf else None,
                    freeswitch_user=args.freeswitch_user, timeout_s=args.timeout)
    return doctor(run, sys.stdout)


def cmd_fetch_model(args) -> int:
    """Download a Coqui model now (for a box that goes offline later); print the settings that use it."""
    from pathlib import Path

    from ivr_daemon.logs import configure_logging
    from ivr_daemon.tts.fetch import FetchFailed, fetch_coqui_model

    configure_logging("WARNING", "console")
    try:
        fetched = fetch_coqui_model(args.name, Path(args.dir).absolute(),
                                    Path(args.models_file) if args.models_file else None)
    except FetchFailed as exc:
        print(f"ivr-daemon: fetch-model: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"fetched {fetched.name}; put these in the daemon's environment or .env:", file=sys.stderr)
    if fetched.vocoder:
        print(f"note: {fetched.name} speaks through the vocoder {fetched.vocoder}, which COQUI_MODEL_PATH cannot "
              "name: the daemon would fall back to Griffin-Lim. An end-to-end model (.../vits) needs none.",
              file=sys.stderr)
    print("\n".join(fetched.settings_lines()))  # stdout: ready for >> .env
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ivr-daemon", description="A conversational IVR beside FreeSWITCH.")
    parser.add_argument("--env-file", default=".env", help="optional .env file (default: ./.env)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="connect to FreeSWITCH and answer callers")
    run.set_defaults(func=cmd_run)

    sim = sub.add_parser("simulator", help="a FreeSWITCH event-socket simulator to poke the daemon with")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8021)
    sim.add_argument("--password", default="ClueCon")
    sim.set_defaults(func=cmd_simulator)
    record = sub.add_parser("record", help="run the daemon on a live switch and record the call flow as a fixture")
    record.add_argument("--out", required=True, help="fixture file to write")
    record.add_argument("--calls", type=int, default=None, help="stop after this many calls have ended")
    record.add_argument("--all-calls", action="store_true", help="keep frames of every call, not only the IVR's")
    record.add_argument("--comment", action="append", default=[],
                        help="a '#' line to write at the top of the fixture (repeatable): what the recording is")
    record.set_defaults(func=cmd_record)

    replay = sub.add_parser("replay", help="replay fixtures against the daemon and check the commands it sends")
    replay.add_argument("fixtures", nargs="+", metavar="FILE")
    replay.add_argument("--speed", type=float, default=0.0, help="time scale: 1 as recorded, 0 as fast as possible")
    replay.add_argument("--junit-xml", default=None, metavar="PATH", help="write a JUnit XML report")
    replay.add_argument("--json", default=None, metavar="PATH", help="write the results, with every command sent, as JSON")
    replay.set_defaults(func=cmd_replay)

    call = sub.add_parser("call", help="place an outbound call into the IVR: prints its UUID")
    call.add_argument("destination", help="a FreeSWITCH dial string: user/1001, sofia/gateway/carrier/15551230000")
    call.add_argument("--agent", default=None, help="the agent that talks (default: the agents file's default)")
    call.add_argument("--var", action="append", default=[], metavar="KEY=VALUE",
                      help="a dynamic variable for the agent's {placeholders} and tools (repeatable)")
    call.add_argument("--caller-id", default=None, metavar="NUMBER", help="origination_caller_id_number")
    call.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer (default 60)")
    call.add_argument("--switch", default=None, metavar="HOST:PORT",
                      help="which of FREESWITCH_HOSTS places the call (default: the first)")
    call.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to reach FreeSWITCH (default 10)")
    call.set_defaults(func=cmd_call)

    asr = sub.add_parser("asr-server", help="speech recognition for mod_vosk: a vosk-server WebSocket on ASR_HOST:ASR_PORT")
    asr.set_defaults(func=cmd_asr_server)

    doc = sub.add_parser("doctor", help="check FreeSWITCH, mod_vosk, the recogniser, the LLM, the voices and "
                                         "TTS_OUTPUT_DIR in order; print what to fix (exit 1 if anything is)")
    doc.add_argument("--vosk-conf", default=None, metavar="PATH",
                     help="FreeSWITCH's vosk.conf.xml (default: /etc/freeswitch/autoload_configs/ or "
                          "/usr/local/freeswitch/conf/autoload_configs/; none: ASR_HOST/ASR_PORT)")
    doc.add_argument("--freeswitch-user", default="freeswitch", metavar="USER",
                     help="the user FreeSWITCH runs as, who must read the WAVs (default: freeswitch)")
    doc.add_argument("--timeout", type=float, default=5.0, help="seconds for each network check (default 5)")
    doc.set_defaults(func=cmd_doctor)

    fetch = sub.add_parser("fetch-model", help="download a Coqui model to a local directory and print the "
                                                "COQUI_MODEL_PATH/COQUI_CONFIG_PATH that use it")
    fetch.add_argument("name", metavar="NAME", help="a Coqui model name, e.g. tts_models/en/ljspeech/vits")
    fetch.add_argument("--dir", default="models", help="where the model goes (under DIR/tts/; default: ./models)")
    fetch.add_argument("--models-file", default=None, metavar="PATH",
                       help="a models.json of your own (e.g. pointing at a mirror) instead of the list Coqui ships")
    fetch.set_defaults(func=cmd_fetch_model)

    demo = sub.add_parser("demo", help="a whole call on this machine: local LLM, simulator, daemon, scripted caller")
    demo.add_argument("--cache-dir", default=".cache", help="where the LLM model is kept (default: .cache)")
    demo.add_argument("--out-dir", default=".cache/demo", help="where the WAVs and server log go")
    demo.add_argument("--tts-engine", default="piper", choices=["piper", "coqui", "null"])
    demo.add_argument("--asr", action="store_true",
                      help="the caller speaks: Piper audio streamed by the simulator (as mod_vosk) to an asr-server"
                           " started here (pocketsphinx; vosk with VOSK_MODEL_PATH), instead of typed text")
    demo.add_argument("--asr-speed", type=float, default=1.0, metavar="X",
                      help="with --asr: stream the caller's audio X times faster than real time (default 1: real time,"
                           " as FreeSWITCH does)")
    demo.set_defaults(func=cmd_demo)

    from ivr_daemon.records.cli import add_parser as add_calls_parser

    add_calls_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
