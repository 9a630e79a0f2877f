"""The embedded default's PostgreSQL: Airflow's metadata database in ``<state>/postgres``, no root needed.

SQLite cannot carry the demo's concurrency: four Airflow components and their task processes write one
file, and Airflow 3.3's scheduler died on its races (``StaleDataError`` on ``dag_run``,
``PendingRollbackError`` after "database is locked") while the API server refused writes with "database
is locked". ``make demo`` and ``make ui`` therefore run Airflow on a PostgreSQL server that the project
starts itself with PostgreSQL's own tools (``initdb``, ``pg_ctl``) from the Debian package
``postgresql-15`` (``make`` installs it when missing):

- the data folder, the socket and the log live in ``<state>/postgres``; ``pg_ctl`` runs the server in the
  background and stops it (``python -m airflow_mlops.demo db --stop``, ``make down``);
- it listens on a Unix socket only (``listen_addresses = ''``) in a folder only its owner may open (mode
  0700), so no other user of the machine and nothing on the network reaches it; connections on it are
  trusted (no password to keep);
- it runs as the user who starts it. PostgreSQL refuses to run as root: started by root it runs as the
  ``postgres`` account (the Debian package creates it), which then owns ``<state>/postgres``.

:class:`LocalPostgres` also serves the test suite, which adds TCP with a generated password
(``listen="*"``) for processes in network namespaces.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

from airflow_mlops.exceptions import MLOpsError

#: where ``initdb`` and ``pg_ctl`` are searched when ``MLOPS_PG_BIN`` is not set (Debian's layout)
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
#: the account the server runs as when root starts it
ROOT_RUNS_AS = "postgres"
#: the superuser the server is created with and the demo connects as
SUPERUSER = "airflow"


class PostgresError(MLOpsError):
    """The embedded PostgreSQL could not be set up, started or reached."""


def pg_bin() -> Path:
    """The folder of PostgreSQL's programs: ``$MLOPS_PG_BIN``, else the newest ``/usr/lib/postgresql/*/bin``,
    else the folder of ``initdb`` on ``PATH``."""
    if configured := os.environ.get("MLOPS_PG_BIN"):
        return Path(configured)
    versions = sorted(
        (p for p in DEBIAN_PG_ROOT.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1]
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PostgresError(
        "PostgreSQL's programs (initdb, pg_ctl) are not installed.",
        fix="install the Debian package postgresql-15 (`make demo` and `make test` do when they may run apt), "
        "or set MLOPS_PG_BIN to the folder holding initdb and pg_ctl.",
    )


class LocalPostgres:
    """A PostgreSQL server in ``folder`` (``data/``, ``socket/``, ``postgres.log``), started by :meth:`start`.

    :param folder: the server's folder; created if missing.
    :param port: the port (with ``listen=""`` it only names the socket file ``.s.PGSQL.<port>``).
    :param listen: ``""`` for the Unix socket only (trusted, owner-only), ``"*"`` to listen on TCP too,
        where clients need the password generated at the first start (kept in ``folder/password``, 0600).
    :param durable: ``False`` turns ``fsync`` off (throw-away servers of the test suite).
    """

    def __init__(self, folder: Path, *, port: int = 5432, listen: str = "", durable: bool = True) -> None:
        self.folder = Path(folder).absolute()
        self.port = port
        self.listen = listen
        self.durable = durable
        self.data = self.folder / "data"
        self.socket_dir = self.folder / "socket"
        self.log = self.folder / "postgres.log"
        self.password_file = self.folder / "password"

    # ------------------------------------------------------------------------------ who runs it
    @property
    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _owner(self) -> pwd.struct_passwd:
        if not self._as_root:
            return pwd.getpwuid(os.geteuid())
        try:
            return pwd.getpwnam(ROOT_RUNS_AS)
        except KeyError:
            raise PostgresError(
                f"PostgreSQL refuses to run as root and there is no '{ROOT_RUNS_AS}' account to run it as.",
                fix="install the Debian package postgresql-15 (it creates the account), or start the demo as "
                "another user.",
            ) from None

    def _run(self, *args: str | Path, what: str, timeout: float = 180) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if self._as_root:
            command = ["runuser", "-u", self._owner().pw_name, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.folder)
        if result.returncode != 0 and what:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise PostgresError(
                f"PostgreSQL {what} failed (exit code {result.returncode}) for the server in {self.folder}:\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}{log}",
                fix=f"read the output above and {self.log}; `make down` stops a server left running, "
                f"deleting {self.folder} starts from an empty database.",
            )
        return result

    # ------------------------------------------------------------------------------ set up, start, stop
    @property
    def password(self) -> str | None:
        return self.password_file.read_text().strip() if self.password_file.exists() else None

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def running(self) -> bool:
        if not self.initialized():
            return False
        return self._run(pg_bin() / "pg_ctl", "-D", self.data, "status", what="").returncode == 0

    def _init(self) -> None:
        owner = self._owner()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        os.chmod(self.socket_dir, 0o700)
        args: list[str | Path] = [pg_bin() / "initdb", "-D", self.data, "-U", SUPERUSER, "-E", "UTF8"]
        args += ["--auth-local=trust", "--no-sync"]
        if self.listen:
            self.password_file.write_text(secrets.token_urlsafe(16) + "\n")
            os.chmod(self.password_file, 0o600)
            args += ["--auth-host=scram-sha-256", "--pwfile", self.password_file]
        for path in (self.folder, self.socket_dir, *([self.password_file] if self.listen else [])):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(*args, what="initdb")
        settings = {
            "listen_addresses": f"'{self.listen}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "unix_socket_permissions": "0700",
            "max_connections": "200",
            # a crash may lose the last transactions, never the database's consistency
            "synchronous_commit": "off",
            **({} if self.durable else {"fsync": "off", "full_page_writes": "off"}),
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# airflow_mlops.demo.postgres\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        if self.listen:
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write("host all all 0.0.0.0/0 scram-sha-256\n")

    def _check_reachable(self) -> None:
        """The server's user must reach its folder: every parent of it must be searchable (``o+x``)."""
        if not self._as_root:
            return
        for parent in self.folder.parents:
            if parent.exists() and not os.stat(parent).st_mode & 0o001:
                raise PostgresError(
                    f"PostgreSQL runs as '{ROOT_RUNS_AS}' (it refuses root), which cannot enter {parent}.",
                    fix=f"allow it (`chmod o+x {parent}`), or put the state folder elsewhere "
                    "(AIRFLOW__MLOPS__STATE_DIR / make STATE=...).",
                )

    def start(self) -> LocalPostgres:
        """Create the server if its folder is empty and start it if it is not running (idempotent)."""
        self._check_reachable()
        if not self.initialized():
            self._init()
        if not self.running():
            self._run(
                pg_bin() / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "120", "start", what="start"
            )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs (``mode``: ``fast`` lets it write a checkpoint, ``immediate`` does not)."""
        if (self.data / "postmaster.pid").exists():
            self._run(pg_bin() / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", what="")

    # ------------------------------------------------------------------------------ databases
    def url(
        self, database: str = "postgres", host: str | None = None, driver: str = "postgresql+psycopg2"
    ) -> str:
        """The SQLAlchemy URL of ``database``: over the socket, or over TCP at ``host`` with the password."""
        if host is None:
            return f"{driver}://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"
        return f"{driver}://{SUPERUSER}:{self.password}@{host}:{self.port}/{database}"

    def _connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname=database)

    def create_database(
        self,
        name: str,
        *,
        replace: bool = False,
        host: str | None = None,
        driver: str = "postgresql+psycopg2",
    ) -> str:
        """Create database ``name`` (dropped first with ``replace``, kept if it exists otherwise); its URL."""
        with contextlib.closing(self._connect()) as con:
            con.autocommit = True
            with con.cursor() as cursor:
                if replace:
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        return self.url(name, host=host, driver=driver)


def demo_database(state_dir: Path, airflow_home: Path) -> str:
    """The embedded default's Airflow metadata database: ``<state_dir>/postgres`` started (created at the
    first call), database ``airflow`` in it migrated by ``airflow db migrate`` (once per Airflow version;
    its output in ``<state_dir>/db-migrate.log``). Returns its SQLAlchemy URL."""
    import sys
    from importlib.metadata import version

    server = LocalPostgres(Path(state_dir) / "postgres").start()
    url = server.create_database("airflow")
    stamp = server.folder / "airflow-migrated"
    airflow_version = version("apache-airflow")
    if not stamp.exists() or stamp.read_text().strip() != airflow_version:
        log = Path(state_dir) / "db-migrate.log"
        env = {**os.environ, "AIRFLOW_HOME": str(airflow_home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url}
        Path(airflow_home).mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            code = subprocess.call(
                [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if code != 0:
            raise PostgresError(
                f"`airflow db migrate` failed (exit code {code}) on the database in {server.folder}:\n"
                f"{log.read_text(errors='replace')[-3000:]}",
                fix=f"read {log}; deleting {server.folder} starts from an empty database.",
            )
        stamp.write_text(airflow_version + "\n")
    return url
