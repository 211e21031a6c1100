"""The simulator's interactive runner (``ivr-daemon simulator``): lines on stdin drive calls, commands are echoed."""

from __future__ import annotations

import sys

import gevent

from ivr_daemon.replay.simulator.channels import DTMF_DIGITS
from ivr_daemon.replay.simulator.errors import InvalidDtmfDigit, NoSuchCall, SimulatorError
from ivr_daemon.replay.simulator.server import FreeswitchSimulator
from ivr_daemon.replay.simulator.wire import redacted

_STANDALONE_HELP = """commands:
  call [caller_number]          new parked call (prints its uuid)
  say <uuid|last> <text...>     final DETECTED_SPEECH
  partial <uuid|last> <text...> detected-partial-speech
  dtmf <uuid|last> <digits>     one DTMF event per digit (0-9 * # A-D), e.g. dtmf last 5#
  hangup <uuid|last>            hang the call up
  drop                          close every client socket abruptly
  calls                         list live calls
  commands                      every command the daemon sent
  help                          this text
  quit                          stop the simulator"""


def run_standalone(port: int, password: str, host: str = "127.0.0.1") -> int:
    """Run the simulator until ``quit`` or end of input, driven by lines on stdin."""
    sim = FreeswitchSimulator(host=host, port=port, password=password)
    sim.start()
    print(f"FreeSWITCH simulator listening on {host}:{sim.port} (password {'*' * len(password)}); type 'help'", flush=True)

    def echo_commands() -> None:
        index = 0
        while True:
            command = sim.wait_for_command(lambda c: True, timeout_s=None, start_index=index, consume=False)
            index += 1
            print(f"<- [conn {command.connection_id}] {redacted(command.line)}", flush=True)

    watcher = gevent.spawn(echo_commands)
    last_uuid: str | None = None
    threadpool = gevent.get_hub().threadpool
    try:
        while True:
            # readline in a native thread: the gevent loop keeps serving the sockets meanwhile.
            line = threadpool.apply(sys.stdin.readline)
            if not line:
                break
            words = line.split()
            if not words:
                continue
            verb, args = words[0].lower(), words[1:]

            def target() -> str:
                if not args:
                    raise NoSuchCall("give a uuid or 'last'")
                if args[0] == "last":
                    if last_uuid is None:
                        raise NoSuchCall("no call made yet")
                    return last_uuid
                return args[0]

            try:
                if verb in ("quit", "exit"):
                    break
                elif verb == "help":
                    print(_STANDALONE_HELP, flush=True)
                elif verb == "call":
                    last_uuid = sim.new_call(args[0]) if args else sim.new_call()
                    print(last_uuid, flush=True)
                elif verb in ("say", "partial"):
                    uuid = target()
                    sequence = sim.speak(uuid, " ".join(args[1:]), final=verb == "say")
                    print(f"DETECTED_SPEECH Event-Sequence {sequence}", flush=True)
                elif verb == "dtmf":
                    uuid = target()
                    digits = args[1].upper() if len(args) > 1 else ""
                    bad = [digit for digit in digits if digit not in DTMF_DIGITS]
                    if not digits or bad:
                        raise InvalidDtmfDigit(f"not a DTMF digit: {(bad[0] if bad else digits)!r}")
                    for digit in digits:
                        print(f"DTMF Event-Sequence {sim.dtmf(uuid, digit)}", flush=True)
                elif verb == "hangup":
                    sim.hangup(target())
                elif verb == "drop":
                    print(f"dropped {sim.drop_connections()} connection(s)", flush=True)
                elif verb == "calls":
                    for uuid in sim.calls():
                        print(f"{uuid} playing={sim.playing(uuid)}", flush=True)
                elif verb == "commands":
                    for command in sim.commands:
                        print(f"[conn {command.connection_id}] {redacted(command.line)}", flush=True)
                else:
                    print(f"unknown command {verb!r}; type 'help'", flush=True)
            except SimulatorError as exc:
                print(f"error: {exc}", flush=True)
    finally:
        watcher.kill(block=False)
        sim.stop()
    return 0
