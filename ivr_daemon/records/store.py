"""The records database: SQLAlchemy Core on SQLite or PostgreSQL, its schema kept by Alembic.

Blocking, plain code: in the daemon every call into a :class:`RecordStore` runs in the records
process (:mod:`ivr_daemon.records.db_process`, the daemon's side is
:class:`ivr_daemon.records.remote.RemoteStore`), never in the daemon's own process; the
``calls`` CLI and ``doctor`` call it directly.

Errors come in two kinds, because the writer treats them differently:

- :class:`DatabaseUnavailable`: the database cannot be reached or went away (connection refused,
  server shut down, SQLite file locked or unreadable). Nothing is wrong with the records: they
  wait and are written when it is back.
- :class:`RecordRefused`: the database refused a record itself (a constraint, a value it cannot
  store). Retrying it will not help: it is dropped, logged and counted.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import stat
import sys
from pathlib import Path
from typing import Iterator

import alembic.command
import alembic.config
import alembic.runtime.migration
import alembic.script
import sqlalchemy
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
import sqlalchemy.exc
from sqlalchemy import and_, func, select

from ivr_daemon.records.schema import calls, turns

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
DB_FILE_MODE = 0o600  # callers' numbers and words: nobody else reads them
DB_DIR_MODE = 0o750
CONNECT_TIMEOUT_S = 5
# Plain postgresql:// (and Heroku-style postgres://) mean psycopg 3, the driver this package ships.
_POSTGRES_SCHEMES = {"postgresql", "postgres", "postgresql+psycopg"}


class RecordsError(Exception):
    """Something about the records database; the message says what and, where it can, the fix."""


class BadDatabaseUrl(RecordsError, ValueError):
    """DATABASE_URL is not a database this daemon can use."""


class DatabaseUnavailable(RecordsError):
    """The database cannot be reached now: records wait and are retried."""


class RecordRefused(RecordsError):
    """The database refused a record (constraint, value): retrying will not help."""


def database_url(raw: str) -> sqlalchemy.URL:
    """DATABASE_URL as SQLAlchemy's URL: ``sqlite:///path`` or ``postgresql://`` (psycopg 3).

    Raises BadDatabaseUrl for anything else (another database, another driver, not a URL).
    """
    try:
        url = sqlalchemy.make_url(raw.strip())
    except sqlalchemy.exc.ArgumentError:
        raise BadDatabaseUrl(f"not a database URL: {redact(raw)!r} (e.g. sqlite:////var/lib/ivr-daemon/ivr_daemon.db "
                             "or postgresql://user:password@host/dbname)") from None
    if url.drivername in _POSTGRES_SCHEMES:
        if not url.host and not url.query.get("host"):
            raise BadDatabaseUrl(f"{redact(raw)!r} names no host (postgresql://user:password@host:5432/dbname)")
        return url.set(drivername="postgresql+psycopg")
    if url.drivername in ("sqlite", "sqlite+pysqlite"):
        if not url.database or url.database == ":memory:":
            raise BadDatabaseUrl(f"{redact(raw)!r}: SQLite needs a file path, sqlite:////absolute/path/ivr_daemon.db")
        return url.set(drivername="sqlite")
    raise BadDatabaseUrl(f"{redact(raw)!r}: only sqlite:///FILE and postgresql://... are supported, "
                         f"not {url.drivername}")


def redact(raw: str) -> str:
    """The URL with its password hidden, for logs and messages."""
    try:
        return sqlalchemy.make_url(raw.strip()).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return raw.split("@")[-1][:200]


def utc_now() -> datetime.datetime:
    """What the tables store: UTC without a zone (see schema)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def iso(moment: datetime.datetime | None) -> str | None:
    """A stored (UTC, zone-less) time as ISO 8601 with a Z."""
    return None if moment is None else moment.isoformat(timespec="milliseconds") + "Z"


class RecordStore:
    """One database; thread-compatible, not thread-safe: one thread at a time uses it."""

    def __init__(self, raw_url: str, *, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.url = database_url(raw_url)
        self.connect_timeout_s = connect_timeout_s
        self.description = self.url.render_as_string(hide_password=True)
        if self.url.get_backend_name() == "sqlite":
            prepare_sqlite_file(Path(self.url.database))
            # timeout: how long a write waits for another process's lock (a second daemon, the CLI).
            connect_args = {"timeout": connect_timeout_s}
        else:
            _psycopg()  # SQLAlchemy's postgresql+psycopg dialect loads it; missing, say so now
            connect_args = {"connect_timeout": max(1, int(connect_timeout_s))}
        # pre_ping: a pooled connection that died with the server is noticed and replaced. An
        # SQLite file has no server to lose, and the ping (a SELECT 1 before each transaction) was
        # a third of the records thread's Python work a write.
        self.engine = sqlalchemy.create_engine(self.url, pool_pre_ping=self.url.get_backend_name() != "sqlite",
                                               connect_args=connect_args)
        self._upserts = _upsert_statements(self.url.get_backend_name())
        self.migrated = False

    # -- schema ---------------------------------------------------------------------------------

    def migrate(self) -> str:
        """Create or upgrade the tables to the newest migration; returns the revision."""
        with _classified(self.description):
            with self.engine.begin() as connection:
                config = _alembic_config()
                config.attributes["connection"] = connection
                alembic.command.upgrade(config, "head")
                revision = alembic.runtime.migration.MigrationContext.configure(connection).get_current_revision()
        self.migrated = True
        return revision or ""

    def revision(self) -> str | None:
        """The schema revision the database is at (None: no tables yet)."""
        with _classified(self.description), self.engine.connect() as connection:
            return alembic.runtime.migration.MigrationContext.configure(connection).get_current_revision()

    def ping(self) -> None:
        with _classified(self.description), self.engine.connect() as connection:
            connection.execute(select(1))

    def server_version(self) -> str:
        """e.g. ``PostgreSQL 15.14 (libpq 170005)`` or ``SQLite 3.40.1``."""
        with _classified(self.description), self.engine.connect() as connection:
            version = ".".join(map(str, connection.dialect.server_version_info or ()))
        if self.url.get_backend_name() == "sqlite":
            return f"SQLite {version}"
        return f"PostgreSQL {version} (libpq {_psycopg().pq.version()})"

    # -- writes ---------------------------------------------------------------------------------

    def write(self, records: list[tuple[str, dict]]) -> int:
        """Upsert ``("call", row)`` and ``("turn", row)`` records in one transaction; returns how many."""
        if not self.migrated:
            self.migrate()
        by_kind: dict[str, dict[tuple, dict]] = {"call": {}, "turn": {}}
        for kind, row in records:
            if kind not in by_kind:
                raise RecordRefused(f"unknown record kind {kind!r}")
            by_kind[kind][tuple(row.get(name) for name in _KEYS[kind])] = row  # the batch's last snapshot wins
        with _classified(self.description), self.engine.begin() as connection:
            # Calls first: their turns refer to them. One executemany per kind: the driver's own
            # (sqlite3 loops over the rows in C; psycopg pipelines them, one round trip).
            # SQLAlchemy's insertmanyvalues (one multi-row INSERT) serves only statements with
            # RETURNING on these dialects; forced here, it cost the records thread no less CPU
            # (PostgreSQL 1.9-3.8 against 2.0-2.5 ms a transaction of 10 records, 3 rounds).
            for kind in ("call", "turn"):
                if by_kind[kind]:
                    connection.execute(self._upserts[kind],
                                       [_full_row(_TABLES[kind], row) for row in by_kind[kind].values()])
        return len(records)

    def delete_older_than(self, cutoff: datetime.datetime) -> int:
        """Delete the calls started before ``cutoff`` and their turns; returns how many calls."""
        if not self.migrated:
            self.migrate()
        old = select(calls.c.uuid).where(calls.c.started_at < cutoff)
        with _classified(self.description), self.engine.begin() as connection:
            connection.execute(turns.delete().where(turns.c.call_uuid.in_(old)))
            return connection.execute(calls.delete().where(calls.c.started_at < cutoff)).rowcount

    # -- reads ----------------------------------------------------------------------------------

    def list_calls(self, *, since: datetime.datetime | None = None, agent: str | None = None,
                   limit: int | None = 100) -> list[dict]:
        """Calls, newest first, each with its number of turns."""
        # A correlated count, not a GROUP BY: PostgreSQL cannot group by a json column.
        turn_count = select(func.count()).where(turns.c.call_uuid == calls.c.uuid).scalar_subquery()
        query = select(*calls.c, turn_count.label("turns")).order_by(calls.c.started_at.desc(), calls.c.uuid)
        query = _filtered(query, since, agent)
        if limit:
            query = query.limit(limit)
        with _classified(self.description), self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def call(self, call_uuid: str) -> dict | None:
        """One call with its ``turns`` (in order); None when there is no such call."""
        with _classified(self.description), self.engine.connect() as connection:
            row = connection.execute(select(calls).where(calls.c.uuid == call_uuid)).first()
            if row is None:
                return None
            found = connection.execute(
                select(turns).where(turns.c.call_uuid == call_uuid).order_by(turns.c.turn_index))
            return {**row._mapping, "turns": [dict(t._mapping) for t in found]}

    def export(self, *, since: datetime.datetime | None = None, agent: str | None = None,
               batch_calls: int = 500) -> Iterator[dict]:
        """Every call (oldest first) with its turns, a batch of calls at a time."""
        query = _filtered(select(calls), since, agent).order_by(calls.c.started_at, calls.c.uuid)
        with _classified(self.description), self.engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(query)]
            for start in range(0, len(rows), batch_calls):
                chunk = rows[start:start + batch_calls]
                by_call: dict[str, list[dict]] = {row["uuid"]: [] for row in chunk}
                found = connection.execute(select(turns).where(turns.c.call_uuid.in_(list(by_call)))
                                           .order_by(turns.c.call_uuid, turns.c.turn_index))
                for turn in found:
                    by_call[turn.call_uuid].append(dict(turn._mapping))
                for row in chunk:
                    yield {**row, "turns": by_call[row["uuid"]]}

    def close(self) -> None:
        self.engine.dispose()


def check_database(raw_url: str, *, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """For ``ivr-daemon doctor``: connect, read the schema revision; one line saying so.

    Raises BadDatabaseUrl for a URL this daemon cannot use and DatabaseUnavailable (naming the
    database, never its password) when it cannot be reached. Creates nothing but a missing
    SQLite file's directory and file (which ``run`` would create too).
    """
    store = RecordStore(raw_url, connect_timeout_s=connect_timeout_s)
    try:
        store.ping()
        version = store.server_version()
        revision = store.revision()
    finally:
        store.close()
    head = alembic.script.ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if revision is None:
        state = f"no tables yet (ivr-daemon run creates them at revision {head})"
    elif revision == head:
        state = f"schema at revision {revision}, the newest"
    else:
        state = f"schema at revision {revision}; ivr-daemon run upgrades it to {head}"
    return f"{store.description} reachable ({version}), {state}"


def prepare_sqlite_file(path: Path) -> None:
    """A missing directory created 0750, a missing file created 0600; an existing file must be a
    regular file of ours (not a symlink someone planted where the daemon writes)."""
    path = path.absolute()
    if not path.parent.exists():
        try:
            os.makedirs(path.parent, DB_DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise BadDatabaseUrl(f"{path.parent} cannot be created ({exc.strerror or exc}): create it or choose "
                                 "another DATABASE_URL") from exc
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, DB_FILE_MODE))
        except FileExistsError:
            info = os.lstat(path)  # another daemon created it meanwhile: checked below
        except OSError as exc:
            raise BadDatabaseUrl(f"{path} cannot be created ({exc.strerror or exc}): choose a writable "
                                 "DATABASE_URL") from exc
        else:
            return
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise BadDatabaseUrl(f"{path} is not a regular file (a symlink or something else): use the real file's path")
    if info.st_uid != os.geteuid():
        raise BadDatabaseUrl(f"{path} is owned by uid {info.st_uid}, not by uid {os.geteuid()} that runs the daemon: "
                             f"chown it, or choose another DATABASE_URL")


def _psycopg():
    # psycopg sees gevent's patched select and would wait for the server through a gevent hub of
    # its own in the records' native thread; that thread must simply block (libpq's C wait,
    # GIL released). Decided when psycopg is first imported; an explicit setting wins.
    if "psycopg" not in sys.modules and importlib.util.find_spec("psycopg_binary") is not None:
        os.environ.setdefault("PSYCOPG_WAIT_FUNC", "wait_c")
    try:
        import psycopg
    except ImportError as exc:
        raise BadDatabaseUrl(f"PostgreSQL needs psycopg 3: pip install 'psycopg[binary]' ({exc})") from exc
    return psycopg


def _alembic_config() -> alembic.config.Config:
    config = alembic.config.Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _filtered(query, since: datetime.datetime | None, agent: str | None):
    conditions = []
    if since is not None:
        conditions.append(calls.c.started_at >= since)
    if agent is not None:
        conditions.append(calls.c.agent == agent)
    return query.where(and_(*conditions)) if conditions else query


def _upsert_statements(backend: str) -> dict[str, sqlalchemy.Insert]:
    """For each record kind, one ``INSERT ... ON CONFLICT (key) DO UPDATE`` of every other column:
    a record written twice is the same row. Built once per store (SQLAlchemy memoizes a
    statement's cache key, so each write skips building and keying it again): the Python work on
    the records thread competes with the gevent loop for the GIL."""
    dialect_insert = sqlalchemy.dialects.postgresql.insert if backend == "postgresql" else sqlalchemy.dialects.sqlite.insert
    statements = {}
    for kind, table, key in (("call", calls, ("uuid",)), ("turn", turns, ("call_uuid", "turn_index"))):
        statement = dialect_insert(table)
        statements[kind] = statement.on_conflict_do_update(
            index_elements=[table.c[name] for name in key],
            set_={column.name: statement.excluded[column.name] for column in table.c if column.name not in key})
    return statements


# The key of a record of each kind: a batch keeps only its last snapshot of a row (a row changed
# twice by one INSERT ... ON CONFLICT is an error on PostgreSQL).
_KEYS = {"call": ("uuid",), "turn": ("call_uuid", "turn_index")}
_TABLES = {"call": calls, "turn": turns}


def _full_row(table: sqlalchemy.Table, row: dict) -> dict:
    """Every column of the table (executemany wants the same keys in every row): a missing one
    gets its column's default (``variables``, ``tool_calls``) or NULL."""
    if len(row) == len(table.c) and all(column.name in row for column in table.c):
        return row
    full = {}
    for column in table.c:
        if column.name in row:
            full[column.name] = row[column.name]
        elif column.default is not None and column.default.is_callable:
            full[column.name] = column.default.arg(None)
        else:
            full[column.name] = None if column.default is None else column.default.arg
    return full


class _classified:
    """Turn the driver's exceptions into DatabaseUnavailable or RecordRefused."""

    def __init__(self, description: str):
        self.description = description

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, RecordsError):
            return False
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError)) or (
                isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated):
            raise DatabaseUnavailable(f"{self.description}: {_first_line(exc)}") from exc
        if isinstance(exc, sqlalchemy.exc.SQLAlchemyError):
            raise RecordRefused(f"{self.description}: {_first_line(exc)}") from exc
        return False


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]


__all__ = ["BadDatabaseUrl", "DatabaseUnavailable", "RecordRefused", "RecordStore", "RecordsError",
           "check_database", "database_url", "iso", "redact", "utc_now"]
