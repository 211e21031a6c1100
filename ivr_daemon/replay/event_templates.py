"""Event templates cut from real FreeSWITCH 1.11.3 captures, split into head, channel variables and tail.

Each file under ``ivr_daemon/replay/templates/`` is the exact byte stream of one frame read
from a real event socket (copies of ``tests/captures/`` files, ``D*`` of ``tests/captures/dtmf/``,
or single frames cut from ``80_all_events_full_stream.txt``); the ``*_A_LEG`` kinds are the
``loopback/ai-a`` leg of a loopback call. The simulator never invents a header list: it takes a
template's headers in their captured order and only replaces values (uuids, dates, sequence
numbers, caller number...), so whatever FreeSWITCH sends, in the order it sends it, stays.

A channel event is three blocks in FreeSWITCH: the event's own and the channel's headers
(``head``), the ``variable_*`` headers when the event type carries them (``variables``), and
headers the firing code adds last (``tail``: ``Application``, ``Playback-File-Path``...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Mapping

from ivr_daemon.esl.protocol import Frame, FrameParser, split_plain_event

TEMPLATE_PACKAGE = "ivr_daemon.replay"
TEMPLATE_DIR = "templates"

# Event kind -> capture file (under ivr_daemon/replay/templates/).
EVENT_TEMPLATE_FILES: Mapping[str, str] = {
    "CHANNEL_ANSWER": "31_event_plain_CHANNEL_ANSWER_ivr_leg.txt",
    "CHANNEL_PARK": "80_all_event_plain_CHANNEL_PARK_ivr_leg.txt",
    "CHANNEL_PARK_A_LEG": "D02_dtmf_event_plain_CHANNEL_PARK_loopback_a_leg.txt",
    "CHANNEL_EXECUTE": "X01_S1_event_plain_CHANNEL_EXECUTE_playback_via_broadcast.txt",
    "CHANNEL_EXECUTE_COMPLETE": "X04_S1_event_plain_CHANNEL_EXECUTE_COMPLETE_playback_FILE_PLAYED.txt",
    "CHANNEL_EXECUTE_COMPLETE_AT_HANGUP": "X08_S1_event_plain_CHANNEL_EXECUTE_COMPLETE_park_at_hangup_stale_response.txt",
    "PLAYBACK_START": "X02_S1_event_plain_PLAYBACK_START_a_wav.txt",
    "PLAYBACK_STOP": "X03_S1_event_plain_PLAYBACK_STOP_a_wav_done.txt",
    "DETECTED_SPEECH": "40_event_plain_DETECTED_SPEECH_detected-speech.txt",
    "DETECTED_SPEECH_CLOSED": "47_event_plain_DETECTED_SPEECH_closed.txt",
    "CHANNEL_HANGUP_COMPLETE": "61_event_plain_CHANNEL_HANGUP_COMPLETE_ivr_leg.txt",
    "CHANNEL_HANGUP_COMPLETE_A_LEG": "62_event_plain_CHANNEL_HANGUP_COMPLETE_other_leg.txt",
    "DTMF": "D01_dtmf_event_plain_DTMF.txt",
    "BACKGROUND_JOB": "21_event_plain_BACKGROUND_JOB_originate.txt",
    "API": "80_all_event_plain_API_show_channels_as_json.txt",
}
SHOW_CHANNELS_JSON_FILE = "51_api_show_channels_as_json_live.txt"

VARIABLE_PREFIX = "variable_"


class TemplateUnreadable(ValueError):
    """A packaged template file is not the single well-formed frame it should be."""


@dataclass(frozen=True)
class EventTemplate:
    """One captured event, URL-decoded, with repeated headers kept in order."""

    file_name: str
    head: tuple[tuple[str, str], ...]
    variables: tuple[tuple[str, str], ...]  # names without the "variable_" prefix
    tail: tuple[tuple[str, str], ...]
    body: str | None

    @property
    def event_name(self) -> str:
        return dict(self.head).get("Event-Name", "")

    def variable_names(self) -> list[str]:
        return [name for name, _ in self.variables]


def template_bytes(file_name: str) -> bytes:
    """The raw captured bytes of one packaged template file."""
    return resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_DIR).joinpath(file_name).read_bytes()


def _single_frame(file_name: str) -> Frame:
    parser = FrameParser()
    items = parser.feed(template_bytes(file_name))
    if len(items) != 1 or not isinstance(items[0], Frame) or parser.buffered_bytes:
        raise TemplateUnreadable(f"{file_name}: expected exactly one frame")
    return items[0]


@lru_cache(maxsize=None)
def load_event_template(kind: str) -> EventTemplate:
    """The parsed template for an event kind of :data:`EVENT_TEMPLATE_FILES`."""
    file_name = EVENT_TEMPLATE_FILES[kind]
    frame = _single_frame(file_name)
    if frame.content_type != "text/event-plain":
        raise TemplateUnreadable(f"{file_name}: not a text/event-plain frame")
    pairs, body = split_plain_event(frame.body)

    head: list[tuple[str, str]] = []
    variables: list[tuple[str, str]] = []
    tail: list[tuple[str, str]] = []
    for key, value in pairs:
        if key.startswith(VARIABLE_PREFIX):
            variables.append((key[len(VARIABLE_PREFIX) :], value))
        elif variables:
            tail.append((key, value))
        else:
            head.append((key, value))
    return EventTemplate(file_name, tuple(head), tuple(variables), tuple(tail), body)


@lru_cache(maxsize=None)
def load_channel_row_template() -> tuple[tuple[str, str], ...]:
    """The IVR leg's row (loopback/ai-b) of a live ``show channels as json``, keys in order."""
    frame = _single_frame(SHOW_CHANNELS_JSON_FILE)
    rows = json.loads(frame.body.decode("utf-8"))["rows"]
    for row in rows:
        if row.get("name", "").endswith("-b"):
            return tuple(row.items())
    raise TemplateUnreadable(f"{SHOW_CHANNELS_JSON_FILE}: no IVR-leg row")
