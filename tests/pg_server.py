"""A PostgreSQL 15 server for the tests: one per pytest session, started by the suite itself (no Docker).

:class:`PgServer` is the embedded default's :class:`airflow_mlops.demo.postgres.LocalPostgres` (``initdb``
and ``pg_ctl``, run as the ``postgres`` account when the suite runs as root) with TCP on: it listens on
every address (``listen_addresses='*'``: processes in network namespaces reach it over their veth) on a
free port; connections over TCP need the superuser's password, generated per start (SCRAM), so nothing
else on the machine can use the server; ``fsync`` is off (a throw-away server). :meth:`PgServer.create_database`
returns a SQLAlchemy URL for a new database.

The suite starts one per session: fixture ``postgres_server`` (``tests/conftest.py``), and
``postgres_url`` for a fresh database of the calling test::

    url = postgres_server.create_database("airflow")               # on 127.0.0.1
    url = postgres_server.create_database("x", host="10.213.0.1")  # the URL a namespace uses
"""

from __future__ import annotations

from pathlib import Path

from airflow_mlops.demo.postgres import LocalPostgres
from airflow_mlops.net import free_port


class PgServer(LocalPostgres):
    """A throw-away PostgreSQL server on TCP.

    :param root: empty folder for the data directory, the socket and the log (made owned by ``postgres``).
    :param port: TCP port; default a free one.
    """

    def __init__(self, root: Path, port: int = 0) -> None:
        super().__init__(root, port=port or free_port(), listen="*", durable=False)

    def stop(self, mode: str = "immediate") -> None:
        super().stop(mode)

    def url(
        self, database: str = "postgres", host: str | None = "127.0.0.1", driver: str = "postgresql+psycopg2"
    ) -> str:
        return super().url(database, host=host, driver=driver)

    def create_database(
        self,
        name: str,
        host: str | None = "127.0.0.1",
        driver: str = "postgresql+psycopg2",
        *,
        replace: bool = True,
    ) -> str:
        """Create database ``name`` (dropped first if it exists) and return its URL at ``host``
        (``driver="postgresql"`` gives the URI form of an Airflow connection)."""
        return super().create_database(name, replace=replace, host=host, driver=driver)
