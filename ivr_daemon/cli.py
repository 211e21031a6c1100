"""The ``ivr-daemon`` command: parse arguments, load settings, hand over. Nothing else."""

from gevent import monkey

# First thing: requests, sockets and threading must be cooperative before anything imports them.
monkey.patch_all()

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_AUTH = 3


def _settings_or_exit(args):
    from ivr_daemon.config import ConfigError, load_settings

    try:
        return load_settings(dotenv_path=args.env_file)
    except ConfigError as exc:
        print(f"ivr-daemon: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)


def _agents_or_exit(settings):
    from ivr_daemon.agents import load_agents
    from ivr_daemon.config import ConfigError

    try:
        return load_agents(settings)
    except ConfigError as exc:
        print(f"ivr-daemon: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)


def cmd_run(args) -> int:
    from ivr_daemon.daemon import build_conversation_daemon
    from ivr_daemon.storage import UnsafeOutputDir
    from ivr_daemon.esl.connection import AuthenticationFailed
    from ivr_daemon.logs import configure_logging, get_logger
    from ivr_daemon.tts.base import TtsModelUnavailable

    settings = _settings_or_exit(args)
    configure_logging(settings.log_level, settings.log_format)
    log = get_logger("ivr_daemon.cli")
    if settings.uses_default_esl_password:
        log.warning("esl_default_password", hint="FREESWITCH_PASSWORD is FreeSWITCH's well-known default ClueCon: change it on the switch and here")
    agents = _agents_or_exit(settings)
    try:
        daemon = build_conversation_daemon(settings, agents=agents)
    except TtsModelUnavailable as exc:
        print(f"ivr-daemon: TTS model unavailable: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except UnsafeOutputDir as exc:
        print(f"ivr-daemon: configuration error: TTS_OUTPUT_DIR: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # Signal handlers run on the loop; the shutdown waits, so it gets its own greenlet.
    shutting_down: list[gevent.Greenlet] = []

    def on_signal() -> None:
        if not shutting_down:
            shutting_down.append(gevent.spawn(daemon.shutdown))

    gevent.signal_handler(signal.SIGTERM, on_signal)
    gevent.signal_handler(signal.SIGINT, on_signal)
    log.info("daemon_starting", freeswitch=f"{settings.freeswitch_host}:{settings.freeswitch_port}")
    try:
        daemon.run()
    except AuthenticationFailed as exc:
        log.error("esl_authentication_failed", error=str(exc), hint="set FREESWITCH_PASSWORD to the password in event_socket.conf.xml")
        return EXIT_AUTH
    finally:
        for greenlet in shutting_down:
            greenlet.join(timeout=10)
        daemon.close_voices()  # after the shutdown, which lets syntheses in flight land
    log.info("daemon_stopped")
    return EXIT_OK


def cmd_simulator(args) -> int:
    from ivr_daemon.logs import configure_logging
    from ivr_daemon.replay.simulator import run_standalone

    configure_logging("WARNING", "console")
    run_standalone(port=args.port, password=args.password, host=args.host)
    return EXIT_OK


def cmd_demo(args) -> int:
    from pathlib import Path

    from ivr_daemon.demo import run_demo
    from ivr_daemon.logs import configure_logging

    configure_logging("WARNING", "console")
    return run_demo(cache_dir=Path(args.cache_dir), out_dir=Path(args.out_dir), tts_engine=args.tts_engine)


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
        print(f"ivr-daemon: configuration error: TTS_OUTPUT_DIR: {exc}", file=sys.stderr)
        return EXIT_CONFIG
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
    from ivr_daemon.replay.fixture import BEHAVIOUR_SETTINGS

    recorded_with = {k: v for k, v in settings.as_environment().items() if k in BEHAVIOUR_SETTINGS}
    size = recorder.write(out_path, comments=[f"recorded by ivr-daemon record from {settings.freeswitch_host}:{settings.freeswitch_port}"],
                          env=recorded_with)
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
        print(f"ivr-daemon: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TtsModelUnavailable as exc:
        print(f"ivr-daemon: TTS model unavailable: {exc}", file=sys.stderr)
        return EXIT_CONFIG


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
    record.set_defaults(func=cmd_record)

    replay = sub.add_parser("replay", help="replay fixtures against the daemon and check the commands it sends")
    replay.add_argument("fixtures", nargs="+", metavar="FILE")
    replay.add_argument("--speed", type=float, default=0.0, help="time scale: 1 as recorded, 0 as fast as possible")
    replay.add_argument("--junit-xml", default=None, metavar="PATH", help="write a JUnit XML report")
    replay.add_argument("--json", default=None, metavar="PATH", help="write the results, with every command sent, as JSON")
    replay.set_defaults(func=cmd_replay)

    demo = sub.add_parser("demo", help="a whole call on this machine: local LLM, simulator, daemon, scripted caller")
    demo.add_argument("--cache-dir", default=".cache", help="where the LLM model is kept (default: .cache)")
    demo.add_argument("--out-dir", default=".cache/demo", help="where the WAVs and server log go")
    demo.add_argument("--tts-engine", default="piper", choices=["piper", "coqui", "null"])
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
