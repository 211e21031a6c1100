"""``ivr-daemon calls list|show|export``: the call records of DATABASE_URL, read by an administrator.

Exit codes: 0; 1 when the call is not found or the database cannot be reached (one line on
stderr saying which database and why); 2 for a bad setting or argument.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys

from ivr_daemon.cli_settings import EXIT_FAILED, EXIT_OK, config_error, settings_or_exit

_RELATIVE = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """``7d``, ``24h``, ``30m``, ``2w`` ago, or an ISO date/time (UTC unless it names a zone)."""
    now = now or datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    match = _RELATIVE.match(text)
    if match:
        return now - datetime.timedelta(seconds=int(match.group(1)) * _UNIT_S[match.group(2)])
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected e.g. 24h, 7d, 2026-11-30 or 2026-11-30T08:00 (UTC)") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return moment


def add_parser(sub) -> None:
    """The ``calls`` subcommand and its three actions, on the main parser's subparsers."""
    calls = sub.add_parser("calls", help="call records and transcripts (DATABASE_URL): list, show, export")
    actions = calls.add_subparsers(dest="calls_command", required=True)
    listing = actions.add_parser("list", help="recorded calls, newest first")
    _filters(listing)
    listing.add_argument("--limit", type=int, default=100, help="at most this many calls (default 100; 0: all)")
    show = actions.add_parser("show", help="one call's transcript as a readable dialogue")
    show.add_argument("uuid", help="the call's UUID (see calls list)")
    export = actions.add_parser("export", help="calls and their turns as JSON lines or CSV")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                        help="jsonl: one call (with its turns) a line; csv: one turn a row")
    export.add_argument("--out", default="-", help="file to write (default: standard output)")
    _filters(export)
    calls.set_defaults(func=cmd_calls)


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=parse_since, default=None,
                        help="calls started since: 24h, 7d, 2026-11-30, 2026-11-30T08:00 (UTC)")
    parser.add_argument("--agent", default=None, help="only this agent's calls")


def cmd_calls(args) -> int:
    from ivr_daemon.records.store import DatabaseUnavailable, RecordsError, RecordStore

    settings = settings_or_exit(args)
    try:
        store = RecordStore(settings.database_url)
    except RecordsError as exc:
        return config_error(f"DATABASE_URL: {exc}")
    try:
        store.migrate()  # what `run` does first: a fresh database answers with no calls
        return _ACTIONS[args.calls_command](store, args)
    except DatabaseUnavailable as exc:
        print(f"ivr-daemon: records database unavailable: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except RecordsError as exc:
        print(f"ivr-daemon: records database error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        store.close()


def _list(store, args) -> int:
    from ivr_daemon.records.store import iso

    rows = store.list_calls(since=args.since, agent=args.agent, limit=args.limit or None)
    if not rows:
        print("no calls recorded" + (" that match" if args.since or args.agent else ""), file=sys.stderr)
        return EXIT_OK
    table = [("started (UTC)", "uuid", "agent", "caller", "turns", "duration", "end")]
    for row in rows:
        duration = (f"{(row['ended_at'] - row['started_at']).total_seconds():.0f} s"
                    if row["ended_at"] and row["started_at"] else "live")
        end = f"transferred to {row['transferred_to']}" if row["transferred_to"] else (row["hangup_cause"] or "")
        table.append(((iso(row["started_at"]) or "")[:19].replace("T", " "), row["uuid"], row["agent"] or "",
                      row["caller_number"] or "", str(row["turns"]), duration, end))
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return EXIT_OK


def _show(store, args) -> int:
    from ivr_daemon.records.views import dialogue

    call = store.call(args.uuid)
    if call is None:
        print(f"ivr-daemon: no recorded call {args.uuid[:128]} in {store.description}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(dialogue(call))
    return EXIT_OK


def _export(store, args) -> int:
    import contextlib
    import csv
    import json

    from ivr_daemon.records.views import CSV_FIELDS, call_json, csv_rows

    with contextlib.ExitStack() as stack:
        out = sys.stdout if args.out == "-" else stack.enter_context(open(args.out, "w", newline="", encoding="utf-8"))
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS) if args.format == "csv" else None
        if writer is not None:
            writer.writeheader()
        count = 0
        for call in store.export(since=args.since, agent=args.agent):
            count += 1
            if writer is not None:
                writer.writerows(csv_rows(call))
            else:
                out.write(json.dumps(call_json(call), ensure_ascii=False) + "\n")
    if args.out != "-":
        print(f"wrote {count} calls to {args.out}", file=sys.stderr)
    return EXIT_OK


_ACTIONS = {"list": _list, "show": _show, "export": _export}

__all__ = ["add_parser", "cmd_calls", "parse_since"]
