"""A throwaway PostgreSQL server for the tests: initdb + pg_ctl on a free port, removed afterwards.

Debian's ``postgresql`` package provides the binaries (``make test`` installs it when missing).
Run as root (CI, containers), the cluster belongs to the ``postgres`` user (``runuser``):
PostgreSQL refuses to run as root. No mocks, no skip: missing binaries fail the tests loudly.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

PG_VERSION_PREFERRED = "15"


def pg_bin() -> Path:
    """/usr/lib/postgresql/15/bin (or the only other version installed)."""
    preferred = Path(f"/usr/lib/postgresql/{PG_VERSION_PREFERRED}/bin")
    if (preferred / "initdb").exists():
        return preferred
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found (/usr/lib/postgresql/15/bin/initdb): "
                           "apt-get install postgresql (make test and .ci/run do this)")
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One cluster in a temporary directory; ``stop()``/``start()`` take it away and bring it back."""

    def __init__(self):
        self.bin = pg_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ivr-pg-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        os.chmod(self.dir, 0o700)
        self.running = False

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout_s: float = 120) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{log}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log_path), "-w", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``fast``: connections are cut, as when the server is shut down under the daemon."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def new_database(self) -> str:
        """A fresh, empty database on this server: its URL (plain postgresql://, as an admin writes it)."""
        import psycopg

        name = f"ivr_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def remove(self) -> None:
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    @classmethod
    @contextlib.contextmanager
    def started(cls) -> Iterator["PostgresServer"]:
        server = cls()
        try:
            server.init()
            server.start()
            yield server
        finally:
            server.remove()
