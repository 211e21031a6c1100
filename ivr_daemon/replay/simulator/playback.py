"""The playback engine: uuid_broadcast's queue, PLAYBACK_START/STOP and uuid_break, as tests/captures/playback/ shows them."""

from __future__ import annotations

import math
import os
import re
import time
import uuid as uuid_lib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gevent
import gevent.event
import soundfile

from ivr_daemon.logs import get_logger

if TYPE_CHECKING:
    from ivr_daemon.replay.simulator.channels import CallState

log = get_logger(__package__)  # one logger name for the whole simulator

CHANNEL_RATE_HZ = 8000  # the captured IVR leg is L16 at 8 kHz
FRAME_SAMPLES = 160  # FreeSWITCH reads files in 20 ms frames: offsets come in whole frames (X09: 2560)


@dataclass(frozen=True)
class PlaybackRecord:
    """How one broadcast ended: ``done``, ``break``, ``hangup``, ``not-found`` or ``flushed``."""

    path: str
    status: str
    offset_samples: int


@dataclass(eq=False)
class PlaybackItem:
    """One uuid_broadcast on a leg, from queued to finished; its greenlet plays it."""

    source: str  # as given to uuid_broadcast
    app: str
    path: str  # Application-Data and Playback-File-Path ("playback::" prefix removed, S5)
    app_uuid: str = field(default_factory=lambda: str(uuid_lib.uuid4()))
    state: str = "queued"  # queued -> starting -> playing -> finished
    total_samples: int = 0
    started_monotonic: float = 0.0
    stop_event: gevent.event.Event = field(default_factory=gevent.event.Event)
    greenlet: gevent.Greenlet | None = None


def _probe_media_seconds(path: str) -> float | None:
    """Duration FreeSWITCH would play, or None when it could not open the file (FILE NOT FOUND)."""
    if path.startswith("silence_stream://"):
        digits = re.match(r"-?\d+", path[len("silence_stream://") :])
        if not digits:
            return None
        ms = int(digits.group())
        return math.inf if ms <= 0 else ms / 1000.0
    if path.startswith("tone_stream://"):
        segments = re.findall(r"%\((\d+),(\d+)", path)
        if not segments:
            return None
        loops_match = re.search(r"loops=(-?\d+)", path)
        loops = int(loops_match.group(1)) if loops_match else 1
        once_ms = sum(int(on) + int(off) for on, off in segments)
        return math.inf if loops < 0 else once_ms * max(loops, 1) / 1000.0
    if "://" in path or not os.path.isfile(path):
        return None
    try:
        info = soundfile.info(path)
    except (RuntimeError, OSError, ValueError):
        return None
    return info.frames / info.samplerate if info.samplerate else None


class PlaybackMixin:
    """FreeswitchSimulator's media: what each leg plays, and the events that tell it.

    The host provides the calls (``_known_call``), channel variables and apps (``_set_var``,
    ``_execute_app``, ``_complete_app``, ``_unset_loop_vars``), events (``_emit``,
    ``_channel_event``), ``_guarded`` and the settings ``playback_gap_s``, ``playback_speed``
    and ``break_latency_s``.
    """

    def playing(self, uuid: str) -> str | None:
        """The Playback-File-Path playing now (between PLAYBACK_START and STOP), else None."""
        item = self._known_call(uuid).current
        return item.path if item is not None and item.state == "playing" else None

    def played_files(self, uuid: str) -> list[str]:
        """Every Playback-File-Path that got a PLAYBACK_START on this leg, in order."""
        return list(self._known_call(uuid).played)

    def playback_log(self, uuid: str) -> list[PlaybackRecord]:
        """How each broadcast on this leg ended, in order."""
        return list(self._known_call(uuid).playback_log)

    def _broadcast(self, call: CallState, source: str) -> None:
        app, sep, data = source.partition("::")
        if not sep:
            app, data = "playback", source
        item = PlaybackItem(source=source, app=app.lower() or "playback", path=data)
        if call.current is None:
            self._start_item(call, item)
        else:
            call.queue.append(item)

    def _start_item(self, call: CallState, item: PlaybackItem) -> None:
        call.current = item
        item.state = "starting"
        item.greenlet = gevent.spawn(self._guarded, self._run_item, call, item)

    def _advance(self, call: CallState) -> None:
        call.current = None
        if call.live and call.queue:
            self._start_item(call, call.queue.popleft())

    def _run_item(self, call: CallState, item: PlaybackItem) -> None:
        gevent.sleep(max(self.playback_gap_s, 0.0))
        if item.state == "finished" or not call.live:
            return
        clog = log.bind(call_uuid=call.uuid)
        self._set_var(call, "current_loop", "1")
        self._set_var(call, "total_loops", "1")
        self._execute_app(call, item.app, item.path or None, app_uuid=item.app_uuid)
        if item.app != "playback":
            self._complete_app(call, item.app, item.path or None, item.app_uuid)
            self._unset_loop_vars(call)
            item.state = "finished"
            self._advance(call)
            return
        seconds = _probe_media_seconds(item.path)
        # switch_ivr_play_file() names the file before it tries to open it (X11).
        self._set_var(call, "current_application_data", item.path)
        self._set_var(call, "current_application", "playback")
        if seconds is None:
            clog.info("sim_playback_file_not_found", path=item.path)
            self._set_var(call, "current_application_response", "FILE NOT FOUND")
            self._complete_app(call, "playback", item.path, item.app_uuid)
            self._unset_loop_vars(call)
            item.state = "finished"
            call.playback_log.append(PlaybackRecord(item.path, "not-found", 0))
            self._advance(call)
            return
        item.total_samples = int(round(seconds * CHANNEL_RATE_HZ)) if math.isfinite(seconds) else 0
        item.state = "playing"
        item.started_monotonic = time.monotonic()
        call.played.append(item.path)
        clog.info("sim_playback_start", path=item.path, duration_s=seconds)
        self._emit(self._channel_event("PLAYBACK_START", call, tail={"Playback-File-Path": item.path}))
        wait_s = seconds * self.playback_speed
        broken = item.stop_event.wait(None if math.isinf(wait_s) else max(wait_s, 0.0))
        if item.state == "finished" or not call.live:
            return
        self._finish_playback(call, item, "break" if broken else "done", "FILE PLAYED")
        self._advance(call)

    def _finish_playback(self, call: CallState, item: PlaybackItem, status: str, response: str, wire_status: str | None = None) -> None:
        item.state = "finished"
        offset = item.total_samples if status == "done" else self._elapsed_samples(item)
        total_ms = item.total_samples * 1000 // CHANNEL_RATE_HZ
        # On a break FreeSWITCH reports the real position but the whole file's length (X09).
        self._set_var(call, "playback_last_offset_pos", str(offset))
        self._set_var(call, "playback_seconds", str(total_ms // 1000))
        self._set_var(call, "playback_ms", str(total_ms))
        self._set_var(call, "playback_samples", str(item.total_samples))
        tail = {"Playback-File-Path": item.path, "Playback-Status": wire_status or status}
        self._emit(self._channel_event("PLAYBACK_STOP", call, tail=tail))
        self._set_var(call, "current_application_response", response)
        self._complete_app(call, "playback", item.path, item.app_uuid)
        self._unset_loop_vars(call)
        call.playback_log.append(PlaybackRecord(item.path, status, offset))
        log.bind(call_uuid=call.uuid).info("sim_playback_stop", path=item.path, status=status, offset_samples=offset)

    def _elapsed_samples(self, item: PlaybackItem) -> int:
        elapsed_s = time.monotonic() - item.started_monotonic
        audio_s = elapsed_s / self.playback_speed if self.playback_speed > 0 else math.inf
        samples = item.total_samples if not math.isfinite(audio_s) else int(audio_s * CHANNEL_RATE_HZ)
        if item.total_samples:
            samples = min(samples, item.total_samples)
        return samples - samples % FRAME_SAMPLES

    def _break(self, call: CallState, all_: bool) -> None:
        if all_:
            # uuid_break all flushes the queued broadcasts: they never produce an event (S2a).
            while call.queue:
                dropped = call.queue.popleft()
                call.playback_log.append(PlaybackRecord(dropped.path, "flushed", 0))
        item = call.current
        # Only a started file stops; one still being picked up plays on (capture 70).
        if item is None or item.state != "playing":
            return

        def stop_now() -> None:
            if item.state == "playing":
                item.stop_event.set()

        if self.break_latency_s > 0:
            gevent.spawn_later(self.break_latency_s, stop_now)
        else:
            stop_now()
