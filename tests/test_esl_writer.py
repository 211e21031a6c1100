"""The one writer and a prompt stop, against scripted peers on real sockets.

A turn killed by barge-in or hangup must never leave half a command on the wire (every later
reply would go to the wrong command), and ``EslClient.stop()`` must end ``run()`` whatever it is
doing: connecting, waiting for the subscription's reply, or sleeping before a retry.
"""

import contextlib
import socket

import gevent
import gevent.event
import gevent.server

from ivr_daemon.esl import commands
from ivr_daemon.esl.connection import EslClient, EslConnection
from ivr_daemon.esl.protocol import AUTH_REQUEST, build_api_response, build_command_reply
from ivr_daemon.replay.simulator import CommandPacketParser, FreeswitchSimulator

CALL_UUID = "03362ffb-115a-4a3d-9eb6-770e2089d43f"
EVENT_NAMES = ("DETECTED_SPEECH", "CHANNEL_HANGUP_COMPLETE")
SMALL_BUFFER_BYTES = 4096
BIG_VALUE_CHARS = 1_000_000  # far more than both (small, fixed) kernel buffers hold
JOIN_S = 10  # generous: each wait below ends on an event long before this


@contextlib.contextmanager
def scripted_switch(handle, rcvbuf_bytes=None):
    """A one-handler event socket on port 0; ``rcvbuf_bytes`` fixes its receive buffer small."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf_bytes is not None:
        # Set before listen(): accepted sockets inherit it, and autotuning stays off.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    server = gevent.server.StreamServer(listener, handle)
    server.start()
    try:
        yield server.server_port
    finally:
        server.stop(timeout=1)


def reply_to(line):
    """What the scripted switch answers; an api reply names the command it answers."""
    if line.startswith("auth "):
        return build_command_reply("+OK accepted")
    if line.startswith("event "):
        return build_command_reply("+OK event listener enabled plain")
    if line == "exit":
        return build_command_reply("+OK bye")
    return build_api_response(f"reply to {line[4:].split(' ')[0]}\n")


class PausingSwitch:
    """A scripted switch that greets, accepts the password, takes 1 kB of the next command, then
    stops reading until ``resume_reading`` is set: the daemon's write of that command cannot
    finish meanwhile. Then it answers every command, in order, at once."""

    def __init__(self):
        self.received: list[str] = []
        self.inside_the_big_write, self.resume_reading = gevent.event.Event(), gevent.event.Event()

    def handle(self, sock, address):
        sock.sendall(AUTH_REQUEST)
        parser = CommandPacketParser()
        paused = False
        while True:
            if self.received == ["auth ClueCon"] and not paused:
                parser.feed(sock.recv(1024))  # the head of the big command, no whole packet
                paused = True
                self.inside_the_big_write.set()
                self.resume_reading.wait()
            data = sock.recv(65536)
            if not data:
                return
            for packet in parser.feed(data):
                self.received.append(packet.line)
                sock.sendall(reply_to(packet.line))


def test_a_turn_killed_inside_a_write_leaves_no_half_command_and_the_next_command_gets_its_own_reply():
    switch = PausingSwitch()

    with scripted_switch(switch.handle, rcvbuf_bytes=SMALL_BUFFER_BYTES) as port:
        conn = EslConnection("127.0.0.1", port, "ClueCon", lambda event: None)
        conn.connect()
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER_BYTES)
            big = commands.uuid_setvar(CALL_UUID, "note", "x" * BIG_VALUE_CHARS)
            turn = gevent.spawn(conn.send, big)
            assert switch.inside_the_big_write.wait(JOIN_S)
            turn.kill()  # barge-in: the turn goes, its command's bytes are half on the wire
            # Queued behind the big write, then abandoned before its first byte went out.
            abandoned = gevent.spawn(conn.send, commands.uuid_break(CALL_UUID))
            gevent.sleep(0)  # let it queue its command
            abandoned.kill()
            switch.resume_reading.set()

            reply = conn.send(commands.status())

            assert reply.text == "reply to status\n"
            assert switch.received == ["auth ClueCon", big.line, "api status"]
            assert not conn.closed
        finally:
            conn.close()


def test_a_command_queued_behind_a_slow_write_gets_its_whole_reply_timeout_after_its_own_write():
    switch, reply_timeout_s = PausingSwitch(), 1.0

    with scripted_switch(switch.handle, rcvbuf_bytes=SMALL_BUFFER_BYTES) as port:
        conn = EslConnection("127.0.0.1", port, "ClueCon", lambda event: None, command_timeout_s=JOIN_S)
        conn.connect()
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER_BYTES)
            big = gevent.spawn(conn.send, commands.uuid_setvar(CALL_UUID, "note", "x" * BIG_VALUE_CHARS))
            assert switch.inside_the_big_write.wait(JOIN_S)
            queued = gevent.spawn(conn.send, commands.status(), timeout_s=reply_timeout_s)
            # Longer than its reply timeout, all of it spent queued behind the big write: no
            # reply was due yet, since the command was not on the wire.
            gevent.sleep(reply_timeout_s * 1.5)
            assert not queued.ready()
            switch.resume_reading.set()

            assert queued.get(timeout=JOIN_S).text == "reply to status\n"
            assert big.get(timeout=JOIN_S).text == "reply to uuid_setvar\n"
            assert switch.received[2] == "api status"
        finally:
            conn.close()


def test_a_turn_killed_while_waiting_for_its_reply_leaves_that_reply_to_no_other_command():
    received, first_in, answer_first = [], gevent.event.Event(), gevent.event.Event()

    def handle(sock, address):
        # Answers the first api command only when told to, and everything in order.
        sock.sendall(AUTH_REQUEST)
        parser = CommandPacketParser()
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for packet in parser.feed(data):
                received.append(packet.line)
                if packet.line.startswith("api ") and not first_in.is_set():
                    first_in.set()
                    answer_first.wait()
                sock.sendall(reply_to(packet.line))

    with scripted_switch(handle) as port:
        conn = EslConnection("127.0.0.1", port, "ClueCon", lambda event: None)
        conn.connect()
        try:
            turn = gevent.spawn(conn.send, commands.uuid_break(CALL_UUID))
            assert first_in.wait(JOIN_S)  # written whole, its reply not yet sent
            turn.kill()  # hangup: nobody waits for that reply any more
            answer_first.set()

            reply = conn.send(commands.status())

            assert reply.text == "reply to status\n"
            assert received == ["auth ClueCon", "api uuid_break " + CALL_UUID + " all", "api status"]
        finally:
            conn.close()


def test_a_stop_while_the_subscription_is_on_the_wire_ends_run():
    received, subscribed, release = [], gevent.event.Event(), gevent.event.Event()

    def handle(sock, address):
        # Holds its reply to the subscription until the test lets it go or `exit` arrives.
        sock.sendall(AUTH_REQUEST)
        parser = CommandPacketParser()
        holder = None
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for packet in parser.feed(data):
                received.append(packet.line)
                if packet.line.startswith("event "):
                    held = reply_to(packet.line)
                    holder = gevent.spawn(lambda: (release.wait(), sock.sendall(held)))
                    subscribed.set()
                    continue
                if packet.line == "exit" and holder is not None:
                    release.set()
                    holder.join()
                sock.sendall(reply_to(packet.line))

    with scripted_switch(handle) as port:
        client = EslClient("127.0.0.1", port, "ClueCon", EVENT_NAMES, lambda event: None)
        runner = gevent.spawn(client.run)
        assert subscribed.wait(JOIN_S)  # connect() returned; the subscription awaits its reply
        stopper = gevent.spawn(client.stop)
        stopper.join(JOIN_S)
        release.set()  # the reply comes after the stop: run() must not wait for good on it

        runner.join(JOIN_S)

        assert runner.dead and stopper.dead
        assert received[-1] == "exit"
        assert client.connections_made == 0 and not client.connected


def test_a_stop_while_connecting_to_a_switch_that_never_greets_ends_run_at_once():
    accepted, hung_up = gevent.event.Event(), gevent.event.Event()

    def handle(sock, address):
        accepted.set()  # ... and never sends auth/request
        while sock.recv(4096):
            pass
        hung_up.set()

    sleeps = []
    with scripted_switch(handle) as port:
        # Only the stop can end this connect: its own timeout is an hour away.
        client = EslClient("127.0.0.1", port, "ClueCon", EVENT_NAMES, lambda event: None,
                           connect_timeout_s=3600, sleep=sleeps.append)
        runner = gevent.spawn(client.run)
        assert accepted.wait(JOIN_S)

        client.stop()
        runner.join(JOIN_S)

        assert runner.dead and runner.successful()
        assert hung_up.wait(JOIN_S)
        assert sleeps == []  # ended by the stop, not by a failed attempt and a retry


def test_a_stop_during_the_backoff_sleep_ends_run_at_once():
    with FreeswitchSimulator() as sim:
        port = sim.port
    # Nothing listens on the port now: the first attempt fails and run() sleeps before the next.
    sleeps, sleeping = [], gevent.event.Event()

    def hour_long_sleep(seconds):
        sleeps.append(seconds)
        sleeping.set()
        gevent.sleep(3600)

    client = EslClient("127.0.0.1", port, "ClueCon", EVENT_NAMES, lambda event: None, sleep=hour_long_sleep)
    runner = gevent.spawn(client.run)
    assert sleeping.wait(JOIN_S)

    client.stop()
    runner.join(JOIN_S)

    assert runner.dead and runner.successful()
    assert sleeps == [0.5]  # one sleep, cut short; no second attempt after the stop
