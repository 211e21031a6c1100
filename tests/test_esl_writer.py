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


def test_a_turn_killed_inside_a_write_leaves_no_half_command_and_the_next_command_gets_its_own_reply():
    received, inside_the_big_write, resume_reading = [], gevent.event.Event(), gevent.event.Event()

    def handle(sock, address):
        # Greets, accepts the password, takes 1 kB of the next command, then stops reading
        # until told to go on: the daemon's write of that command cannot finish meanwhile.
        sock.sendall(AUTH_REQUEST)
        parser = CommandPacketParser()
        paused = False
        while True:
            if received == ["auth ClueCon"] and not paused:
                parser.feed(sock.recv(1024))  # the head of the big command, no whole packet
                paused = True
                inside_the_big_write.set()
                resume_reading.wait()
            data = sock.recv(65536)
            if not data:
                return
            for packet in parser.feed(data):
                received.append(packet.line)
                sock.sendall(reply_to(packet.line))

    with scripted_switch(handle, rcvbuf_bytes=SMALL_BUFFER_BYTES) as port:
        conn = EslConnection("127.0.0.1", port, "ClueCon", lambda event: None)
        conn.connect()
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER_BYTES)
            big = commands.uuid_setvar(CALL_UUID, "note", "x" * BIG_VALUE_CHARS)
            turn = gevent.spawn(conn.send, big)
            assert inside_the_big_write.wait(JOIN_S)
            turn.kill()  # barge-in: the turn goes, its command's bytes are half on the wire
            # Queued behind the big write, then abandoned before its first byte went out.
            abandoned = gevent.spawn(conn.send, commands.uuid_break(CALL_UUID))
            gevent.sleep(0)  # let it queue its command
            abandoned.kill()
            resume_reading.set()

            reply = conn.send(commands.status())

            assert reply.text == "reply to status\n"
            assert received == ["auth ClueCon", big.line, "api status"]
            assert not conn.closed
        finally:
            conn.close()
