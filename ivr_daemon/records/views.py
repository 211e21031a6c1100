"""A recorded call as JSON (HTTP, jsonl export), as CSV rows, and as a readable dialogue."""

from __future__ import annotations

import textwrap

from ivr_daemon.records.store import iso

CSV_FIELDS = ("call_uuid", "agent", "caller_number", "variables", "call_started", "answered", "ended",
              "hangup_cause", "transferred_to", "turn", "turn_started", "transcript", "reply", "heard",
              "interrupted", "used_fallback", "llm_ms", "tts_ms", "first_audio_ms", "tool_calls")


def call_json(call: dict) -> dict:
    """A call with its turns (``RecordStore.call``/``export``) as plain JSON values."""
    return {
        "uuid": call["uuid"],
        "agent": call["agent"],
        "caller_number": call["caller_number"],
        "variables": call["variables"] or {},
        "started": iso(call["started_at"]),
        "answered": iso(call["answered_at"]),
        "ended": iso(call["ended_at"]),
        "hangup_cause": call["hangup_cause"],
        "transferred_to": call["transferred_to"],
        "turns": [turn_json(turn) for turn in call.get("turns", [])],
    }


def turn_json(turn: dict) -> dict:
    return {
        "turn": turn["turn_index"],
        "started": iso(turn["started_at"]),
        "transcript": turn["transcript"],
        "reply": turn["reply"],
        "heard": turn["heard"],
        "interrupted": bool(turn["interrupted"]),
        "used_fallback": bool(turn["used_fallback"]),
        "llm_ms": turn["llm_ms"],
        "tts_ms": turn["tts_ms"],
        "first_audio_ms": turn["first_audio_ms"],
        "tool_calls": turn["tool_calls"] or [],
    }


def csv_rows(call: dict) -> list[dict]:
    """One row per turn, the call's columns repeated; a call without turns is one row."""
    import json

    data = call_json(call)
    base = {"call_uuid": data["uuid"], "agent": data["agent"], "caller_number": data["caller_number"],
            "variables": json.dumps(data["variables"], ensure_ascii=False, sort_keys=True),
            "call_started": data["started"], "answered": data["answered"], "ended": data["ended"],
            "hangup_cause": data["hangup_cause"], "transferred_to": data["transferred_to"]}
    if not data["turns"]:
        return [base]
    return [{**base, "turn": turn["turn"], "turn_started": turn["started"], "transcript": turn["transcript"],
             "reply": turn["reply"], "heard": turn["heard"], "interrupted": turn["interrupted"],
             "used_fallback": turn["used_fallback"], "llm_ms": turn["llm_ms"], "tts_ms": turn["tts_ms"],
             "first_audio_ms": turn["first_audio_ms"],
             "tool_calls": json.dumps(turn["tool_calls"], ensure_ascii=False) if turn["tool_calls"] else ""}
            for turn in data["turns"]]


def dialogue(call: dict, width: int = 100) -> str:
    """The call as its administrator reads it: who called, when, and what each side said."""
    data = call_json(call)
    lines = [f"call {data['uuid']}",
             f"  agent {data['agent'] or '?'}, from {data['caller_number'] or 'an unknown number'}",
             f"  started {_when(data['started'])}, answered {_when(data['answered'])}, "
             f"ended {_when(data['ended'])}" + (f" ({data['hangup_cause']})" if data["hangup_cause"] else "")]
    if data["transferred_to"]:
        lines.append(f"  transferred to {data['transferred_to']}")
    if data["variables"]:
        lines.append("  variables: " + ", ".join(f"{k}={v}" for k, v in sorted(data["variables"].items())))
    if not data["turns"]:
        lines.append("")
        lines.append("  (no turns: the caller said nothing the bot answered)")
    for turn in data["turns"]:
        lines.append("")
        lines.append(f"[{turn['turn']}] {_when(turn['started'])}")
        lines.extend(_said("caller", turn["transcript"], width))
        heard = turn["heard"]
        if turn["interrupted"]:
            lines.extend(_said("bot", heard or "(nothing: cut before the first sentence ended)", width))
            unheard = turn["reply"][len(heard):].strip() if turn["reply"].startswith(heard) else turn["reply"]
            if unheard:
                lines.extend(_said("  (cut)", unheard, width))
        else:
            lines.extend(_said("bot", heard or turn["reply"] or "(nothing was played)", width))
        notes = []
        if turn["used_fallback"]:
            notes.append("fallback phrase")
        for call_made in turn["tool_calls"]:
            notes.append(f"tool {call_made['name']}({_arguments(call_made['arguments'])})")
        timing = [f"{name} {turn[key]:.0f} ms" for name, key in (("llm", "llm_ms"), ("tts", "tts_ms"),
                                                                  ("first audio", "first_audio_ms"))
                  if turn[key] is not None]
        if timing:
            notes.append(", ".join(timing))
        if notes:
            lines.append(f"{'':9}  [{'; '.join(notes)}]")
    return "\n".join(lines) + "\n"


def _said(who: str, text: str, width: int) -> list[str]:
    wrapped = textwrap.wrap(text, width=max(20, width - 11)) or [""]
    return [f"{who + ':' if index == 0 else '':9}  {line}" for index, line in enumerate(wrapped)]


def _when(value: str | None) -> str:
    return value.replace("T", " ") if value else "-"


def _arguments(arguments: object) -> str:
    import json

    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return text[:120]


__all__ = ["CSV_FIELDS", "call_json", "csv_rows", "dialogue", "turn_json"]
