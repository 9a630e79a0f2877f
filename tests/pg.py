"""A real PostgreSQL server for the tests, started once per session (fixtures ``postgres_server`` and
``postgres_url`` in ``tests/conftest.py``).

The server runs from ``/usr/lib/postgresql/15/bin`` (``MLOPS_TEST_PG_BIN`` overrides it) with its data
folder under a temporary folder, listening on a free TCP port of 127.0.0.1 with ``trust`` authentication
for the user ``mlops``. PostgreSQL refuses to run as root: when the suite runs as root, ``initdb`` and
``pg_ctl`` run as the ``postgres`` user (``runuser``). Each caller of :meth:`PostgresServer.create_database`
gets a database of its own, so tests never see each other's tables.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path(os.environ.get("MLOPS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "mlops"
_counter = itertools.count(1)


class PostgresServer:
    """One PostgreSQL server: :meth:`start`, :meth:`create_database` per caller, :meth:`stop`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="mlops-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.log = self.root / "server.log"

    def _as_owner(self, args: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return args
        return ["runuser", "-u", "postgres", "--", *args]

    def _run(self, args: list[str], timeout: int = 120) -> None:
        result = subprocess.run(self._as_owner(args), capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}{log}")

    def start(self) -> PostgresServer:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL is not installed in {PG_BIN} (set MLOPS_TEST_PG_BIN)")
        self.root.chmod(0o755)
        self.sockets.mkdir()
        self.log.touch()
        if os.geteuid() == 0:
            for path in (self.root, self.sockets, self.log):
                shutil.chown(path, "postgres", "postgres")
        self._run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200 -c shared_buffers=32MB"
        )
        self._run(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"]
        )
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "mlops") -> str:
        """A new empty database; returns its URL (``postgresql://mlops@127.0.0.1:<port>/<name>``)."""
        import psycopg2

        name = f"{prefix}_{os.getpid()}_{next(_counter)}"
        conn = psycopg2.connect(self.url())
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)
