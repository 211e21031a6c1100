"""Call records and transcripts: every call and turn, in SQLite or PostgreSQL (DATABASE_URL).

- :mod:`.schema`: the ``calls`` and ``turns`` tables (SQLAlchemy Core);
- :mod:`.store`: the database (engine, Alembic migrations shipped in ``migrations/``, queries);
- :mod:`.writer`: the bounded queue and the one native thread that writes, off the gevent loop;
- :mod:`.recorder`: what a phone call records, and when;
- :mod:`.views`: a recorded call as JSON, CSV rows or a readable dialogue;
- :mod:`.cli`: ``ivr-daemon calls list|show|export``.

For ``ivr-daemon doctor``: :func:`check_database` (one line, or DatabaseUnavailable/BadDatabaseUrl).

Arrows point down: the call flow hands records to the writer; nothing here knows ESL or HTTP.
"""

from ivr_daemon.records.store import (BadDatabaseUrl, DatabaseUnavailable, RecordRefused, RecordsError, RecordStore,
                                      check_database, database_url)
from ivr_daemon.records.writer import RecordWriter

__all__ = ["BadDatabaseUrl", "DatabaseUnavailable", "RecordRefused", "RecordStore", "RecordWriter", "RecordsError",
           "check_database", "database_url"]
