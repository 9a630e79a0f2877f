"""A PostgreSQL 15 server for the tests: one per pytest session, started by the suite itself (no Docker).

:class:`PgServer` runs ``initdb`` and ``pg_ctl`` of ``/usr/lib/postgresql/15/bin`` as the ``postgres``
user (PostgreSQL refuses to run as root) on a data folder in a temporary path owned by that user. It
listens on every address (``listen_addresses='*'``: processes in network namespaces reach it over their
veth) on a free port; connections over TCP need the superuser's password, generated per start (SCRAM),
so nothing else on the machine can use the server. :meth:`PgServer.create_database` returns a
SQLAlchemy URL for a new database.

The suite starts one per session: fixture ``postgres_server`` (``tests/conftest.py``), and
``postgres_url`` for a fresh database of the calling test::

    url = postgres_server.create_database("airflow")               # on 127.0.0.1
    url = postgres_server.create_database("x", host="10.213.0.1")  # the URL a namespace uses
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import subprocess
from pathlib import Path

from airflow_mlops.net import free_port

PG_BIN = Path(os.environ.get("MLOPS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"


class PgServer:
    """A throw-away PostgreSQL server.

    :param root: empty folder for the data directory, the socket and the log (made owned by ``postgres``).
    :param port: TCP port; default a free one.
    """

    def __init__(self, root: Path, port: int = 0) -> None:
        self.root = root
        self.port = port or free_port()
        self.password = secrets.token_urlsafe(16)
        self.data = root / "data"
        self.socket_dir = root / "socket"
        self.log = root / "postgres.log"

    def _as_postgres(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", PG_USER, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)

    def _check(self, result: subprocess.CompletedProcess, what: str) -> None:
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"PostgreSQL {what} failed ({result.returncode}):\n{result.stdout}{result.stderr}{log}"
            )

    def start(self) -> PgServer:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(
                f"PostgreSQL 15 is not installed in {PG_BIN}: `make test` installs it "
                "(Debian package postgresql-15), or set MLOPS_TEST_PG_BIN"
            )
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            user = pwd.getpwnam(PG_USER)
            for path in (self.root, self.socket_dir, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._check(
            self._as_postgres(
                PG_BIN / "initdb", "-D", self.data, "-U", PG_USER, "--pwfile", pwfile,
                "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8",
            ),
            "initdb",
        )  # fmt: skip
        pwfile.unlink()
        with (self.data / "pg_hba.conf").open("a") as hba:
            # every TCP client (the network namespaces' too) with the password
            hba.write("host all all 0.0.0.0/0 scram-sha-256\n")
        options = (
            f"-c listen_addresses=* -p {self.port} -k {self.socket_dir} -c fsync=off -c max_connections=200"
        )
        self._check(
            self._as_postgres(
                PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "start"
            ),
            "start",
        )
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def url(
        self, database: str = "postgres", host: str = "127.0.0.1", driver: str = "postgresql+psycopg2"
    ) -> str:
        """A SQLAlchemy URL of ``database`` as the superuser, reached at ``host``."""
        return f"{driver}://{PG_USER}:{self.password}@{host}:{self.port}/{database}"

    def create_database(self, name: str, host: str = "127.0.0.1", driver: str = "postgresql+psycopg2") -> str:
        """Create database ``name`` (dropped first if it exists) and return its URL at ``host``
        (``driver="postgresql"`` gives the URI form of an Airflow connection)."""
        import psycopg2

        with contextlib.closing(
            psycopg2.connect(
                host="127.0.0.1", port=self.port, user=PG_USER, password=self.password, dbname="postgres"
            )
        ) as con:
            con.autocommit = True
            with con.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                cursor.execute(f'CREATE DATABASE "{name}"')
        return self.url(name, host=host, driver=driver)
