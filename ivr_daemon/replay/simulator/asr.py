"""mod_vosk's part: each call's caller audio streamed to a vosk server, its replies fired as DETECTED_SPEECH.

With ``FreeswitchSimulator(asr_server=(host, port))`` (mod_vosk's ``server-url``, e.g. an
``ivr-daemon asr-server``) every IVR leg does what ``detect_speech vosk`` does on a real switch
(tests/captures/mod_vosk-websocket/README.md): when the leg is up it opens one WebSocket to the
server, then once per 20 ms media frame feeds the caller's audio (what :meth:`caller_says`
queued, else silence: a real call streams silence too) and reads at most one reply; a partial
with text becomes a ``detected-partial-speech`` DETECTED_SPEECH, a final with text a
``detected-speech`` one (body: the text), through :meth:`speak`, so the double delivery while
parked is the same as for typed speech. At hangup the stream ends with libks's malformed close.
A server that cannot be reached leaves the call without speech events (mod_vosk's "Websocket
connect ... failed"); one that goes away mid-call ends the stream ("Error Feeding Data"): the
call stays up either way.

``caller_audio_speed`` paces the media frames: 1.0 is real time, as FreeSWITCH does; 2.0 feeds
the caller's audio twice as fast (a test that wants less wall time; the server decodes the
same frames). The audio is PCM16 at 8 kHz, the captured L16 channel's rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import gevent
import gevent.event

from ivr_daemon.logs import get_logger
from ivr_daemon.replay.simulator.errors import SimulatorError

log = get_logger(__package__)  # one logger name for the whole simulator

CHANNEL_RATE_HZ = 8000  # Channel-Read-Codec-Rate of the captured legs (L16)
# An utterance is "settled" once the server has answered its frames and this much silence after
# them: time enough for an endpointer (pocketsphinx's wants ~0.5 s) to have ended it. Counted in
# the server's replies, not on the clock, so a server decoding behind real time is waited for.
SETTLE_AFTER_S = 3.0


@dataclass(eq=False)
class CallerUtterance:
    """Caller audio queued on a leg.

    ``fed`` is set once its last byte went out to the server (at ``fed_at_s``, time.monotonic());
    ``settled`` once the server has answered every frame of it and ``SETTLE_AFTER_S`` of
    silence after it, so whatever it was going to recognise has been fired as DETECTED_SPEECH
    (no final by then: it recognised nothing). Both are also set when the stream ends first.
    """

    pcm: bytes
    fed: gevent.event.Event = field(default_factory=gevent.event.Event)
    settled: gevent.event.Event = field(default_factory=gevent.event.Event)
    fed_at_s: float | None = None
    offset: int = 0
    last_frame: int | None = None  # the 3,200-byte frame its last bytes went out in (or a later one)

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / CHANNEL_RATE_HZ


@dataclass(eq=False)
class _AsrStream:
    """One leg's detect_speech: what the caller will say, and the greenlet feeding the server."""

    uuid: str
    pending: list[CallerUtterance] = field(default_factory=list)
    unsettled: list[CallerUtterance] = field(default_factory=list)
    greenlet: gevent.Greenlet | None = None
    connected: gevent.event.Event = field(default_factory=gevent.event.Event)
    ended: gevent.event.Event = field(default_factory=gevent.event.Event)

    def next_media_frame(self, frame_bytes: int) -> bytes:
        """The caller's next 20 ms: queued audio, else silence (a shorter tail is padded)."""
        while self.pending:
            utterance = self.pending[0]
            chunk = utterance.pcm[utterance.offset:utterance.offset + frame_bytes]
            utterance.offset += len(chunk)
            if utterance.offset >= len(utterance.pcm):
                self.pending.pop(0)
                utterance.fed_at_s = time.monotonic()
                utterance.fed.set()
            if chunk:
                return chunk + bytes(frame_bytes - len(chunk))
        return bytes(frame_bytes)

    def settle(self, frames_sent: int, replies: int, settle_frames: int) -> None:
        """Mark the utterances whose frames, and ``settle_frames`` after them, have all had their reply."""
        for utterance in list(self.unsettled):
            if utterance.last_frame is None and utterance.fed.is_set():
                # Its last bytes are in the frame sent last, or still buffered for the next one.
                utterance.last_frame = frames_sent
            if utterance.last_frame is not None and replies > utterance.last_frame + settle_frames:
                utterance.settled.set()
                self.unsettled.remove(utterance)


class AsrMixin:
    """FreeswitchSimulator's mod_vosk. The host provides ``speak``, ``_live_call`` and ``_guarded``."""

    def _init_asr(self, asr_server: tuple[str, int] | None, caller_audio_speed: float) -> None:
        if caller_audio_speed <= 0:
            raise ValueError(f"caller_audio_speed must be positive, got {caller_audio_speed}")
        self.asr_server = asr_server
        self.caller_audio_speed = caller_audio_speed
        self._asr_streams: dict[str, _AsrStream] = {}

    def caller_says(self, uuid: str, pcm: bytes) -> CallerUtterance:
        """Queue PCM16 (8 kHz mono) as the caller's speech on the leg, after what is queued already.

        mod_vosk streams it to the ASR server in real time (times ``caller_audio_speed``); what the
        server hears comes back as DETECTED_SPEECH events. Wait on the result's ``fed`` to know
        the last of it has been sent, on its ``settled`` to know all the server made of it was fired.
        """
        if self.asr_server is None:
            raise SimulatorError("no ASR server: make the simulator with asr_server=(host, port)")
        self._live_call(uuid)
        stream = self._asr_streams.get(uuid)
        if stream is None or stream.ended.is_set():
            raise SimulatorError(f"call {uuid} runs no detect_speech (no ASR stream, or it ended)")
        utterance = CallerUtterance(bytes(pcm))
        stream.pending.append(utterance)
        stream.unsettled.append(utterance)
        return utterance

    def wait_asr_connected(self, uuid: str, timeout_s: float | None = 10.0) -> bool:
        """Block this greenlet until the leg's stream to the ASR server is open (False: not in time, or failed)."""
        stream = self._asr_streams.get(uuid)
        if stream is None:
            return False
        gevent.wait([stream.connected, stream.ended], timeout=timeout_s, count=1)
        return stream.connected.is_set() and not stream.ended.is_set()

    def wait_asr_ended(self, uuid: str, timeout_s: float | None = 10.0) -> bool:
        """Block this greenlet until the leg's stream to the ASR server is over (hangup, server gone)."""
        stream = self._asr_streams.get(uuid)
        return stream is not None and stream.ended.wait(timeout_s)

    def _start_detect_speech(self, call) -> None:
        if self.asr_server is None:
            return
        # Streams are kept for the waits above while their calls are remembered (history_limit).
        for uuid in [uuid for uuid in self._asr_streams if uuid not in self._calls]:
            del self._asr_streams[uuid]
        stream = _AsrStream(call.uuid)
        self._asr_streams[call.uuid] = stream
        stream.greenlet = gevent.spawn(self._guarded, self._run_mod_vosk, call, stream)

    def _stop_asr(self) -> None:
        for stream in list(self._asr_streams.values()):
            if stream.greenlet is not None:
                stream.greenlet.kill(block=False)

    def _run_mod_vosk(self, call, stream: _AsrStream) -> None:
        # The wire client needs wsproto ([asr] extra): imported only when mod_vosk is asked for.
        from ivr_daemon.asr.modvosk_client import FRAME_BYTES, MEDIA_FRAME_S, ModVoskClient, ModVoskRun, sleep_until

        clog = log.bind(call_uuid=call.uuid)
        host, port = self.asr_server
        try:
            try:
                client = ModVoskClient(host, port, sample_rate_hz=CHANNEL_RATE_HZ)
            except OSError as exc:
                clog.warning("sim_asr_connect_failed", url=f"ws://{host}:{port}", error=str(exc))
                return
            stream.connected.set()
            clog.info("sim_asr_stream_open", url=f"ws://{host}:{port}")
            run = ModVoskRun(started_s=time.monotonic())
            tick_s = MEDIA_FRAME_S / self.caller_audio_speed
            settle_frames = round(SETTLE_AFTER_S * CHANNEL_RATE_HZ * 2 / FRAME_BYTES)
            ticks = 0
            try:
                while call.live:
                    try:
                        heard = client.media_frame(stream.next_media_frame(client.media_frame_bytes), run)
                    except OSError as exc:
                        clog.warning("sim_asr_feed_failed", error=str(exc))
                        return
                    if heard is not None and call.live:
                        clog.debug("sim_asr_heard", final=heard.final, chars=len(heard.text))
                        self.speak(call.uuid, heard.text, final=heard.final)
                    stream.settle(run.frames_sent, len(run.replies), settle_frames)
                    if client.closed:
                        clog.warning("sim_asr_feed_failed", error="the ASR server closed the stream")
                        return
                    ticks += 1
                    # An absolute schedule: the pacing does not drift with the time spent working.
                    sleep_until(run.started_s + ticks * tick_s)
            finally:
                client.hang_up()
                clog.info("sim_asr_stream_closed", frames_sent=run.frames_sent, heard=len(run.heard))
        finally:
            stream.ended.set()
            for utterance in stream.pending + stream.unsettled:
                # Nothing more will be sent or heard: nobody waits forever.
                utterance.fed.set()
                utterance.settled.set()
