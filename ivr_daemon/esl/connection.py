"""The event socket connection: greenswitch's InboundESL for socket and auth, our own framing.

:class:`EslConnection` is one authenticated socket. Its reader greenlet cuts frames with
:class:`~ivr_daemon.esl.protocol.FrameParser` (greenswitch's own reader mangles event bodies)
and only routes: replies to the command waiting for them, events to ``on_event``. It never
runs call logic.

One writer greenlet per connection owns ``sendall``: :meth:`EslConnection.send` queues the
command and waits. The writer puts each command on the wire whole, and registers its reply in
the FIFO of waiting replies as its bytes go out, so replies pair with commands in wire order.
Killing a caller (a turn cut by barge-in or hangup) cannot cut a command in half: a command
already being written goes out whole and its reply is still consumed; one not yet begun is
dropped. A write that cannot finish within the command timeout (FreeSWITCH stopped reading)
closes the connection: its command's outcome is unknown, the queued ones were not sent.

:class:`EslClient` keeps a connection up: connect, authenticate, subscribe, and on loss
reconnect with capped exponential backoff (0.5 s doubling to 10 s), subscribing again. A wrong
password is final (:class:`AuthenticationFailed`); anything else is retried. :meth:`EslClient.stop`
ends :meth:`EslClient.run` at once from anywhere: connecting, subscribing, connected, or in the
backoff sleep.
"""

from __future__ import annotations

import collections
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import gevent
import gevent.event
import gevent.queue
import gevent.socket
from greenswitch.esl import InboundESL
from greenswitch.esl import NotConnectedError as _GreenswitchNotConnected

from ivr_daemon.esl import commands
from ivr_daemon.esl.commands import EslCommand
from ivr_daemon.esl.protocol import Frame, FrameParser, MalformedEvent, MalformedFrame, EslEvent
from ivr_daemon.logs import get_logger

log = get_logger(__name__)

RECV_CHUNK_BYTES = 65536
MALFORMED_LOG_PER_S = 10
EXIT_TIMEOUT_S = 2.0  # close(send_exit=True): the most a goodbye may take
_STOP_WRITING = None  # queued last, after a close: the writer returns


class EslError(Exception):
    """Base of the event socket errors."""


class NotConnectedError(EslError, _GreenswitchNotConnected):
    """No live, authenticated connection to FreeSWITCH right now: the command was not sent."""


class SendStalled(EslError):
    """FreeSWITCH did not take a command's bytes within the command timeout."""


class CommandOutcomeUnknown(EslError):
    """The command was written but the connection died before FreeSWITCH answered: it may or
    may not have run. Not retried, so nothing is done twice."""


class AuthenticationFailed(EslError):
    """FreeSWITCH refused the password (``-ERR invalid``): retrying cannot help."""


class CommandTimedOut(EslError):
    """FreeSWITCH did not answer a command in time; the connection may be stuck."""


class SubscriptionRefused(EslError):
    """FreeSWITCH answered ``event ...`` with an error."""


@dataclass(frozen=True)
class CommandReply:
    """FreeSWITCH's answer: the api body, or the Reply-Text of a command/reply."""

    command: EslCommand
    text: str
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.text.startswith("-ERR") and not self.text.startswith("-USAGE")

    @property
    def job_uuid(self) -> str | None:
        return self.headers.get("Job-UUID")


@dataclass(eq=False)
class _Outgoing:
    """A command on its way: queued, then written whole by the writer, then answered."""

    command: EslCommand
    # Its reply, or why there is none: a write that failed fails it too.
    reply: gevent.event.AsyncResult = field(default_factory=gevent.event.AsyncResult)
    written_s: float | None = None  # when the writer had written it whole (time.monotonic)
    abandoned: bool = False  # its caller left before the write began: the writer skips it

    def fail(self, exc: EslError) -> None:
        if not self.reply.ready():
            self.reply.set_exception(exc)


class EslConnection(InboundESL):
    """One inbound event socket; ``connect()`` returns once authenticated."""

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        on_event: Callable[[EslEvent], None],
        on_malformed: Callable[[str], None] | None = None,
        on_frame: Callable[[bytes, bool], None] | None = None,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 10.0,
        on_closed: Callable[[], None] | None = None,
    ):
        super().__init__(host, port, password, timeout=connect_timeout_s)
        self._on_closed = on_closed
        self._malformed_window_s = 0.0
        self._malformed_in_window = 0
        self._on_event = on_event
        self._on_malformed = on_malformed or (lambda reason: None)
        self._on_frame = on_frame
        self.command_timeout_s = command_timeout_s
        self._outbox: gevent.queue.Queue[_Outgoing | None] = gevent.queue.Queue()
        # Written, unanswered, in wire order: each reply pops the first.
        self._pending: collections.deque[_Outgoing] = collections.deque()
        self._writer_greenlet: gevent.Greenlet | None = None
        self._closed = gevent.event.Event()
        self.authenticated = False
        self.close_reason = ""
        self.sock = None

    # -- greenswitch hooks ------------------------------------------------------------------

    def connect(self) -> None:
        """greenswitch's connect (socket, wait for auth/request, auth), bounded in time.

        A :meth:`close` from another greenlet meanwhile ends it with NotConnectedError.
        """
        if self.closed:
            raise NotConnectedError(f"connection to {self.host}:{self.port} closed before it was made")
        try:
            with gevent.Timeout(self.timeout, NotConnectedError(f"no auth/request from {self.host}:{self.port} within {self.timeout} s")):
                super().connect()
            if self.closed:
                raise NotConnectedError(f"connection to {self.host}:{self.port} closed while it was made")
            # Commands are small and latency-bound (uuid_break on barge-in): no Nagle delay.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except _GreenswitchNotConnected as exc:
            self.close()
            if isinstance(exc, NotConnectedError):
                raise
            raise NotConnectedError(str(exc) or "connection closed before authentication") from None
        except OSError as exc:
            self.close()
            raise NotConnectedError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        except BaseException:
            self.close()
            raise

    def start_event_handlers(self) -> None:
        # Our reader and our writer: greenswitch's process_events queue is not used.
        self._receive_events_greenlet = gevent.spawn(self.receive_events)
        self._writer_greenlet = gevent.spawn(self._write_commands)

    def authenticate(self) -> None:
        reply = self.send(commands.auth(self.password))
        if reply.text != "+OK accepted":
            raise AuthenticationFailed(f"FreeSWITCH refused the event socket password ({reply.text})")
        self.authenticated = True

    def receive_events(self) -> None:
        parser = FrameParser()
        reason = "closed by FreeSWITCH"
        try:
            while True:
                data = self.sock.recv(RECV_CHUNK_BYTES)
                if not data:
                    break
                # A read is routed whole, however many frames it holds: the reader feeds every
                # turn, and a reader that yielded between them went behind all the loop's ready
                # work each time (bench/loop_slices.py: transcripts waited longer to be read in
                # 4 of 5 A/B rounds).
                for item in parser.feed(data):
                    self._route(item, parser)
        except OSError as exc:
            reason = f"socket error: {exc}"
        except gevent.GreenletExit:
            reason = "closed by the daemon"
        finally:
            self._mark_closed(reason)

    def send(self, command: EslCommand, timeout_s: float | None = None) -> CommandReply:  # type: ignore[override]
        """Have the writer send one command, then wait up to ``timeout_s`` (default: the command
        timeout) for its reply. Fails fast when not connected.

        Raises NotConnectedError (not sent), CommandOutcomeUnknown (written, then the connection
        died) or CommandTimedOut (no reply in time). Killing the caller is safe at any point.
        """
        if not isinstance(command, EslCommand):
            raise TypeError("send() takes an EslCommand from ivr_daemon.esl.commands")
        if not self.connected or self.sock is None or self.closed:
            raise NotConnectedError(f"not connected to FreeSWITCH; {command.line.split(' ')[0]} not sent")
        outgoing = _Outgoing(command)
        self._outbox.put(outgoing)
        try:
            return _await_reply(outgoing, self.command_timeout_s if timeout_s is None else timeout_s)
        except BaseException:
            outgoing.abandoned = True  # too late if the write has begun: it then goes out whole
            raise

    def stop(self) -> None:
        self.close()

    # -- ours -------------------------------------------------------------------------------

    def close(self, send_exit: bool = False, exit_timeout_s: float = EXIT_TIMEOUT_S) -> None:
        """Close now; from any greenlet, also while :meth:`connect` is under way (it then
        raises NotConnectedError). ``send_exit``: say ``exit`` first if authenticated, waiting
        at most ``exit_timeout_s``."""
        if send_exit and self.authenticated and not self.closed:
            with gevent.Timeout(exit_timeout_s, False):
                try:
                    self.send(commands.exit_(), timeout_s=exit_timeout_s)
                except EslError:
                    pass
        sock, self.sock = self.sock, None
        for closeable in (getattr(self, "sock_file", None), sock):
            if closeable is not None:
                try:
                    closeable.close()
                except OSError:
                    pass
        for greenlet in (getattr(self, "_receive_events_greenlet", None), self._writer_greenlet):
            if greenlet is not None and greenlet is not gevent.getcurrent():
                greenlet.kill(block=True, timeout=2)
        self._mark_closed(self.close_reason or "closed by the daemon")

    def wait_closed(self, timeout_s: float | None = None) -> bool:
        return self._closed.wait(timeout_s)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _mark_closed(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self.connected = False
        self.close_reason = reason
        self._auth_request_event.set()  # wake connect() if it still waits for auth/request
        if self._on_closed is not None:
            self._on_closed()
        while self._pending:
            outgoing = self._pending.popleft()
            outgoing.fail(CommandOutcomeUnknown(
                f"connection lost ({reason}) before FreeSWITCH answered {_redacted(outgoing.command)!r}"))
        while not self._outbox.empty():
            outgoing = self._outbox.get_nowait()
            if outgoing is not _STOP_WRITING:
                outgoing.fail(NotConnectedError(
                    f"connection lost ({reason}); {_redacted(outgoing.command)!r} not sent"))
        self._outbox.put(_STOP_WRITING)
        self._closed.set()

    def _write_commands(self) -> None:
        """The one writer: each command goes on the wire whole, in queue order."""
        reason = "closed by the daemon"
        try:
            while True:
                outgoing = self._outbox.get()
                if outgoing is _STOP_WRITING or not self._write(outgoing):
                    return
        except Exception as exc:
            # A bug here must not leave senders waiting for a writer that is gone.
            log.exception("esl_writer_failed")
            reason = f"writer failed: {exc}"
        finally:
            self._mark_closed(reason)

    def _write(self, outgoing: _Outgoing) -> bool:
        """Write one command whole (or skip it, if its caller left first); False: the
        connection is dead."""
        if outgoing.abandoned:
            return True
        sock = self.sock
        if sock is None:
            outgoing.fail(NotConnectedError(f"connection closed; {_redacted(outgoing.command)!r} not sent"))
            return False
        # Registered as its bytes go out: its reply is the first one no earlier command takes.
        self._pending.append(outgoing)
        try:
            # Bounded: a switch that stops reading would otherwise hold the one writer, and
            # every call's commands behind it, for good.
            with gevent.Timeout(self.command_timeout_s, SendStalled("socket not writable")):
                sock.sendall(outgoing.command.wire_bytes)
        except (OSError, SendStalled) as exc:
            if outgoing in self._pending:
                self._pending.remove(outgoing)
            outgoing.fail(CommandOutcomeUnknown(
                f"connection lost while sending {_redacted(outgoing.command)!r}: {exc}"))
            # Half a command may be on the wire: nothing after it can be trusted.
            self._mark_closed(f"send failed: {exc}")
            self._shutdown_socket()
            return False
        outgoing.written_s = time.monotonic()
        return True

    def _route(self, item: Frame | MalformedFrame, parser: FrameParser) -> None:
        """What ``item``, cut by ``parser`` (this connection's), is for: reply, event, notice."""
        if self._on_frame is not None:
            # Recording sees every byte that arrived, well-formed or not.
            self._on_frame(item.raw, isinstance(item, MalformedFrame))
        if isinstance(item, MalformedFrame):
            self._log_malformed("esl_malformed_frame_skipped", item.reason, item.preview[:80].decode("latin-1"))
            self._on_malformed(item.reason)
            if item.over_cap:
                # Skipping it would leave the connection deaf for as long as the peer claims.
                log.error("esl_stream_corrupt_reconnecting", reason=item.reason)
                self._mark_closed(f"stream corrupt: {item.reason}")
                self._shutdown_socket()
            return
        content_type = item.content_type
        if content_type == "auth/request":
            self._auth_request_event.set()
        elif content_type in (commands.COMMAND_REPLY, commands.API_RESPONSE):
            self._resolve_reply(item)
        elif content_type.startswith("text/event-"):
            try:
                event = parser.parse_event(item, received_s=time.monotonic())
            except MalformedEvent as exc:
                self._log_malformed("esl_malformed_event_skipped", str(exc), "")
                self._on_malformed(str(exc))
                return
            try:
                self._on_event(event)
            except Exception:
                # The reader must survive anything a router does.
                log.exception("esl_event_routing_failed", event_name=event.name, call_uuid=event.unique_id)
        elif content_type == "text/disconnect-notice":
            log.info("esl_disconnect_notice", body=item.body.decode("utf-8", "replace").strip()[:200])
            self._mark_closed("disconnect-notice")  # FreeSWITCH closes the socket next
        elif content_type == "text/rude-rejection":
            log.error("esl_rejected_by_acl", body=item.body.decode("utf-8", "replace").strip()[:200])
            self._mark_closed("rude-rejection (ACL)")
        else:
            log.debug("esl_frame_ignored", content_type=content_type)

    def _log_malformed(self, event: str, reason: str, preview: str) -> None:
        """At most MALFORMED_LOG_PER_S lines a second: a burst of junk must not flood the log."""
        now = time.monotonic()
        if now - self._malformed_window_s >= 1.0:
            if self._malformed_in_window > MALFORMED_LOG_PER_S:
                log.warning("esl_malformed_logs_suppressed", count=self._malformed_in_window - MALFORMED_LOG_PER_S)
            self._malformed_window_s, self._malformed_in_window = now, 0
        self._malformed_in_window += 1
        if self._malformed_in_window <= MALFORMED_LOG_PER_S:
            log.warning(event, reason=reason, preview=preview)

    def _shutdown_socket(self) -> None:
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _resolve_reply(self, frame: Frame) -> None:
        if not self._pending:
            log.warning("esl_unexpected_reply", content_type=frame.content_type)
            return
        # Its caller may be gone (killed while waiting): the entry is popped all the same.
        outgoing = self._pending.popleft()
        if frame.content_type == commands.API_RESPONSE:
            text = frame.body.decode("utf-8", "replace")
        else:
            text = frame.headers.get("Reply-Text", "")
        outgoing.reply.set(CommandReply(command=outgoing.command, text=text, headers=dict(frame.headers)))


def _await_reply(outgoing: _Outgoing, reply_timeout_s: float) -> CommandReply:
    """The reply to ``outgoing``, or the error its write or the connection failed it with.

    One wait, for the reply: waiting for the write first woke the caller twice a command (three
    broadcasts a turn). The reply's time runs from the write: a command queued behind others
    still gets all of it, and the time before the write is bounded by the writer (each write
    ends, or fails and closes the connection, within the command timeout).
    """
    wait_s = reply_timeout_s
    while True:
        try:
            return outgoing.reply.get(timeout=wait_s)
        except gevent.Timeout:
            pass
        if outgoing.written_s is not None:  # else still queued or being written: wait on
            wait_s = outgoing.written_s + reply_timeout_s - time.monotonic()
            if wait_s <= 0:
                # The entry stays pending so the late reply pops it and later replies stay aligned.
                raise CommandTimedOut(f"no reply to {_redacted(outgoing.command)!r} within {reply_timeout_s} s")


def _redacted(command: EslCommand) -> str:
    """The command for a log line or an error: no password, at most 120 characters."""
    line = "auth ***" if command.line.startswith("auth ") else command.line
    return line if len(line) <= 120 else line[:117] + "..."


class EslClient:
    """Keeps one authenticated, subscribed connection to FreeSWITCH, reconnecting on loss."""

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        event_names: tuple[str, ...],
        on_event: Callable[[EslEvent], None],
        *,
        on_connected: Callable[[], None] | None = None,
        on_malformed: Callable[[str], None] | None = None,
        on_frame: Callable[[bytes, bool], None] | None = None,
        on_command: Callable[[EslCommand], None] | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 10.0,
        wire_format: str = "plain",
        sleep: Callable[[float], None] = gevent.sleep,
    ):
        self.host, self.port, self._password = host, port, password
        self._sleep = sleep
        self._subscribe = commands.subscribe_events(list(event_names), wire_format)
        self._on_event = on_event
        self._on_connected = on_connected
        self._on_malformed = on_malformed
        self._on_frame = on_frame
        self._on_command = on_command
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self._connection: EslConnection | None = None  # the one up and subscribed, for send()
        self._latest: EslConnection | None = None  # the one run() is making or using, for stop()
        self._stop_requested = gevent.event.Event()
        self._connected_event = gevent.event.Event()
        self.connections_made = 0

    @property
    def connected(self) -> bool:
        conn = self._connection
        return conn is not None and conn.connected and not conn.closed

    def wait_connected(self, timeout_s: float | None = None) -> bool:
        return self._connected_event.wait(timeout_s)

    def send(self, command: EslCommand, timeout_s: float | None = None) -> CommandReply:
        conn = self._connection
        if conn is None:
            raise NotConnectedError(f"not connected to FreeSWITCH; {command.line.split(' ')[0]} not sent")
        if self._on_command is not None:
            self._on_command(command)
        return conn.send(command, timeout_s)

    def run(self) -> None:
        """Connect and stay connected until :meth:`stop`; raises AuthenticationFailed."""
        delay_s = self.backoff_initial_s
        while not self._stop_requested.is_set():
            conn = self._latest = EslConnection(
                self.host, self.port, self._password, self._on_event,
                on_malformed=self._on_malformed, on_frame=self._on_frame,
                connect_timeout_s=self.connect_timeout_s, command_timeout_s=self.command_timeout_s,
                # At once, not when run() next gets the loop: senders waiting for a reconnect
                # must not see a dead connection as a live one.
                on_closed=self._connected_event.clear,
            )
            try:
                conn.connect()
                reply = conn.send(self._subscribe)
                if not reply.ok:
                    raise SubscriptionRefused(f"FreeSWITCH refused the subscription: {reply.text}")
            except AuthenticationFailed:
                conn.close()
                raise
            except EslError as exc:
                conn.close()
                if self._stop_requested.is_set():
                    break
                log.warning("esl_connect_failed", host=self.host, port=self.port, error=str(exc), retry_in_s=delay_s)
                self._pause(delay_s)
                delay_s = min(delay_s * 2, self.backoff_max_s)
                continue
            if self._stop_requested.is_set():
                # Stopped while subscribing: stop() is closing this one; nothing to announce.
                conn.wait_closed()
                conn.close()
                break

            self._connection = conn
            self.connections_made += 1
            delay_s = self.backoff_initial_s
            log.info("esl_connected", host=self.host, port=self.port, subscribed=self._subscribe.line)
            self._connected_event.set()
            if self._on_connected is not None:
                gevent.spawn(self._run_on_connected)
            conn.wait_closed()
            conn.close()
            self._connected_event.clear()
            if self._stop_requested.is_set():
                break
            log.warning("esl_connection_lost", reason=conn.close_reason, retry_in_s=delay_s)
            self._pause(delay_s)
        self._connected_event.clear()

    def _pause(self, delay_s: float) -> None:
        """The backoff: the (injectable) sleep, cut short by :meth:`stop`."""
        sleeper = gevent.spawn(self._sleep, delay_s)
        try:
            gevent.wait([sleeper, self._stop_requested], count=1)
        finally:
            sleeper.kill()
        if sleeper.exception is not None:
            raise sleeper.exception

    def _run_on_connected(self) -> None:
        try:
            self._on_connected()
        except Exception:
            log.exception("esl_on_connected_failed")

    def stop(self, send_exit: bool = True, exit_timeout_s: float = EXIT_TIMEOUT_S) -> None:
        """Close cleanly: ``exit`` to FreeSWITCH (if authenticated, waiting at most
        ``exit_timeout_s`` for its reply), then the socket; ``run()`` returns at once, whether
        it was connecting, subscribing, connected or sleeping."""
        self._stop_requested.set()
        conn = self._latest
        if conn is not None:
            conn.close(send_exit=send_exit, exit_timeout_s=exit_timeout_s)
