"""Call records and transcripts: every call and turn, in SQLite or PostgreSQL (DATABASE_URL).

- :mod:`.schema`: the ``calls`` and ``turns`` tables (SQLAlchemy Core);
- :mod:`.store`: the database (engine, Alembic migrations shipped in ``migrations/``, queries);
- :mod:`.writer`: the bounded queue, and the pump that hands it to the records process;
- :mod:`.remote`, :mod:`.db_process`: the records process (the database work, off the daemon's
  process) and the daemon's side of it;
- :mod:`.recorder`: what a phone call records, and when;
- :mod:`.views`: a recorded call as JSON, CSV rows or a readable dialogue;
- :mod:`.cli`: ``ivr-daemon calls list|show|export``.

For ``ivr-daemon doctor``: :func:`check_database` (one line, or DatabaseUnavailable/BadDatabaseUrl).

Arrows point down: the call flow hands records to the writer; nothing here knows ESL or HTTP.
"""

from ivr_daemon.records.store import (BadDatabaseUrl, DatabaseUnavailable, RecordRefused, RecordsError, RecordStore,
                                      check_database, database_url)


def __getattr__(name: str):
    # Imported when asked for: the records process imports this package for the store alone,
    # and the writer brings gevent and the daemon's metrics.
    if name == "RecordWriter":
        from ivr_daemon.records.writer import RecordWriter

        return RecordWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BadDatabaseUrl", "DatabaseUnavailable", "RecordRefused", "RecordStore", "RecordWriter", "RecordsError",
           "check_database", "database_url"]
