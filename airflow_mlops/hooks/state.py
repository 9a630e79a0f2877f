"""Shared state of the ML lifecycle in a SQL database reached through an Airflow connection.

Everything one task writes for another task, possibly on another worker host, lives here: the model
registry's metadata (versions, stages, signed records, promotion decisions; see
:class:`~airflow_mlops.hooks.bentoml.BentoMLHook`), the deployments' state, the retraining gate's
events and cooldown. Model files stay in the artifact store; a worker's ``state_dir`` is only a cache.

The database is the Airflow connection ``[mlops] state_conn_id`` (default ``mlops_state``), typically
PostgreSQL (``AIRFLOW_CONN_MLOPS_STATE='postgresql://user:pass@host:5432/mlops'``). Without that
connection, the embedded default is the SQLite file ``<state_dir>/mlops-state.db``, which serves every
process of one machine.

Concurrent writers are serialized by database transactions, never by host-local lock files:

- PostgreSQL: the row is created if missing (``INSERT ... ON CONFLICT DO NOTHING``), then locked with
  ``SELECT ... FOR UPDATE`` for the read-modify-write; writers of other keys proceed in parallel;
- SQLite: ``BEGIN IMMEDIATE`` takes the database's write lock, waited for up to ``busy_timeout`` seconds
  (readers are never blocked: the file is in WAL mode).

Storage is one table of JSON documents, ``mlops_state(namespace, key, body, revision, updated_at)``,
one document per registry model (``registry``), deployment (``deployment``) and gated model
(``retraining``). A normalized schema (a row per version, a row per decision) was considered: it would
let the UI (issue 15) filter versions in SQL, but every writer here already reads and rewrites a
model's whole index in one transaction (a promotion changes two versions' stages, the production
pointer and the history at once), the documents are small (a model has tens of versions), and the
document keeps the index's shape that the operators, the model server and the tests exchange, so the
move to SQL changed no interface. ``revision`` counts the writes of a document (optimistic readers
and the UI can tell whether what they show is current); ``updated_at`` says when.

Documents a former release kept as JSON files (``index.json`` of the registry, the deployment and
retraining state files) are imported into the store the first time their key is read, and the files
are never written again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from airflow_mlops.exceptions import MLOpsConfigError, MLOpsError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection, Engine

#: the Airflow connection of the state database when ``[mlops] state_conn_id`` is not set
STATE_CONN_ID = "mlops_state"
#: the embedded default's SQLite file in the state folder
SQLITE_FILE = "mlops-state.db"
#: the table of documents
TABLE = "mlops_state"
#: seconds a SQLite writer waits for another writer's transaction before failing
SQLITE_BUSY_TIMEOUT = 600.0

_ENGINES: dict[tuple[int, str], Engine] = {}
_READY: set[tuple[int, str]] = set()
_GUARD = threading.Lock()
#: how many read-modify-writes this thread is inside
_WRITING = threading.local()


class StateStoreError(MLOpsError):
    """The state database could not be reached, or refused an operation."""


def _now() -> datetime:
    return datetime.now(UTC)


class MLOpsStateHook(BaseHook):
    """Transactional JSON documents in the shared state database.

    :param state_conn_id: Airflow connection of the database (PostgreSQL, or ``sqlite``); default
        ``[mlops] state_conn_id``, else ``mlops_state``. When it does not exist, the embedded default
        ``sqlite:///<default_dir>/mlops-state.db`` is used.
    :param default_dir: folder of the embedded default's SQLite file; default ``[mlops] state_dir``.
    """

    conn_name_attr = "state_conn_id"
    default_conn_name = STATE_CONN_ID
    hook_name = "ML lifecycle state"

    def __init__(
        self, state_conn_id: str | None = None, default_dir: str | Path | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._state_conn_id = state_conn_id
        self.default_dir = default_dir

    # ------------------------------------------------------------------ connection
    @cached_property
    def state_conn_id(self) -> str:
        if self._state_conn_id:
            return self._state_conn_id
        from airflow_mlops.config import load_settings

        return load_settings().state_conn_id

    @cached_property
    def connection(self) -> Any | None:
        """The Airflow connection, None when it does not exist (the embedded default)."""
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            return BaseHook.get_connection(self.state_conn_id)
        except AirflowNotFoundException:
            return None

    @cached_property
    def url(self) -> URL:
        """The SQLAlchemy URL of the database."""
        from sqlalchemy.engine import URL, make_url

        conn = self.connection
        if conn is None:
            from airflow_mlops.config import load_settings

            settings = load_settings()
            if settings.artifact_scheme != "file":
                # each worker would keep a registry and a cooldown of its own, next to one shared store
                raise MLOpsConfigError(
                    f"the state database connection {self.state_conn_id!r} does not exist, and the artifact "
                    f"store {settings.artifact_root!r} is shared by several machines.",
                    fix=f"create connection {self.state_conn_id!r} pointing at PostgreSQL on every worker, e.g. "
                    f"AIRFLOW_CONN_{self.state_conn_id.upper()}='postgresql://user:pass@host:5432/mlops' "
                    "(docs/scaling.md).",
                )
            folder = Path(self.default_dir) if self.default_dir else settings.state_dir
            folder.mkdir(parents=True, exist_ok=True)
            return make_url(f"sqlite:///{folder / SQLITE_FILE}")
        extra = conn.extra_dejson or {}
        if extra.get("sqlalchemy_url"):
            return make_url(str(extra["sqlalchemy_url"]))
        kind = (conn.conn_type or "").lower()
        if kind == "sqlite":
            return make_url(f"sqlite:///{conn.host or conn.schema}")
        if kind not in ("postgres", "postgresql"):
            raise MLOpsConfigError(
                f"Airflow connection {self.state_conn_id!r} has type {conn.conn_type!r}; the ML lifecycle "
                "state needs PostgreSQL or SQLite.",
                fix=f"point {self.state_conn_id!r} at PostgreSQL, e.g. "
                f"AIRFLOW_CONN_{self.state_conn_id.upper()}='postgresql://user:pass@host:5432/mlops', or "
                'give its extra {"sqlalchemy_url": "..."}.',
            )
        query = {k: str(v) for k, v in extra.items() if k in ("sslmode", "sslrootcert", "options")}
        return URL.create(
            "postgresql+psycopg2",
            username=conn.login or None,
            password=conn.password or None,
            host=conn.host or None,
            port=conn.port or None,
            database=conn.schema or None,
            query=query,
        )

    @property
    def where(self) -> str:
        """The database for messages: its URL without password, and the connection it came from."""
        origin = (
            f"connection {self.state_conn_id!r}"
            if self.connection is not None
            else f"the embedded default (no connection {self.state_conn_id!r})"
        )
        return f"{self.url.render_as_string(hide_password=True)} ({origin})"

    @property
    def engine(self) -> Engine:
        """The process's engine of :attr:`url` (one per process and URL: a forked child builds its own)."""
        key = (os.getpid(), self.url.render_as_string(hide_password=False))
        with _GUARD:
            engine = _ENGINES.get(key)
            if engine is None:
                engine = _ENGINES[key] = self._create_engine()
        if key not in _READY:
            self._create_tables(engine)
            _READY.add(key)
        return engine

    def _create_engine(self) -> Engine:
        from sqlalchemy import create_engine, event

        if self.url.get_backend_name() == "sqlite":
            engine = create_engine(
                self.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False}
            )

            @event.listens_for(engine, "connect")
            def _connect(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.isolation_level = None  # transactions are begun below, not by sqlite3
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
                cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT * 1000)}")
                cursor.close()

            @event.listens_for(engine, "begin")
            def _begin(connection: Connection) -> None:
                # a writer takes the write lock when its transaction starts, so two read-modify-writes
                # never interleave (a deferred BEGIN would let both read, then fail one at its write);
                # a reader never waits (WAL)
                write = connection.get_execution_options().get("mlops_write", False)
                connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        return create_engine(self.url, pool_pre_ping=True, pool_size=2, max_overflow=2)

    def _create_tables(self, engine: Engine) -> None:
        """Create the table when missing; idempotent, and safe when several processes start at once."""
        ddl = (
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            " namespace VARCHAR(64) NOT NULL,"
            " key VARCHAR(255) NOT NULL,"
            " body TEXT,"
            " revision INTEGER NOT NULL DEFAULT 0,"
            " updated_at VARCHAR(40),"
            " PRIMARY KEY (namespace, key))"
        )
        from sqlalchemy import inspect

        with self._reached(engine) as conn:  # a reader never waits for a writer: check first
            if inspect(conn).has_table(TABLE):
                return
        with self._reached(engine, write=True) as conn:
            if engine.dialect.name == "postgresql":
                # CREATE TABLE IF NOT EXISTS races on PostgreSQL's catalog: serialize the creators
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('airflow_mlops.mlops_state'))")
            conn.exec_driver_sql(ddl)

    @contextlib.contextmanager
    def _reached(self, engine: Engine | None = None, *, write: bool = False) -> Iterator[Connection]:
        """A transaction on the database (on SQLite, ``write`` takes the write lock at its start); a
        database that cannot be reached is named in the error."""
        from sqlalchemy.exc import OperationalError

        engine = engine or self.engine
        stack = contextlib.ExitStack()
        try:
            conn = stack.enter_context(engine.connect())
            conn.execution_options(mlops_write=write)
            stack.enter_context(conn.begin())
        except OperationalError as err:
            stack.close()
            if "locked" in str(err.orig):
                raise StateStoreError(
                    f"the ML lifecycle state database {self.where} stayed locked by another writer for more "
                    f"than {SQLITE_BUSY_TIMEOUT:.0f} s.",
                    fix="retry the task; with many concurrent writers, point connection "
                    f"{self.state_conn_id!r} at PostgreSQL (docs/scaling.md), which locks per document.",
                ) from None
            raise StateStoreError(
                f"the ML lifecycle state database {self.where} cannot be reached: {err.orig}",
                fix=f"check that the database runs and that connection {self.state_conn_id!r} (host, port, "
                "user, password, database) is right; the task can be retried once it is reachable.",
            ) from None
        with stack:
            yield conn

    def test_connection(self) -> tuple[bool, str]:
        try:
            with self._reached() as conn:
                conn.exec_driver_sql(f"SELECT COUNT(*) FROM {TABLE}")
        except Exception as err:  # reported to the UI, not raised
            return False, f"state database {self.where} is not usable: {err}"
        return True, f"state database {self.where} is usable"

    def environment(self) -> dict[str, str]:
        """What a process started from a task (the model server) needs to reach this database:
        ``AIRFLOW_CONN_<ID>`` when the connection exists (the embedded default is found through
        ``AIRFLOW__MLOPS__STATE_DIR``), and ``AIRFLOW__MLOPS__STATE_CONN_ID`` when it is not the default."""
        env: dict[str, str] = {}
        if self.state_conn_id != STATE_CONN_ID:
            env["AIRFLOW__MLOPS__STATE_CONN_ID"] = self.state_conn_id
        if self.connection is not None:
            env[f"AIRFLOW_CONN_{self.state_conn_id.upper()}"] = json.dumps(
                {"conn_type": "generic", "extra": {"sqlalchemy_url": self.url.render_as_string(False)}}
            )
        return env

    # ------------------------------------------------------------------ documents
    def _table(self) -> Any:
        return _documents_table()

    def get(
        self, namespace: str, key: str, legacy: Callable[[], dict[str, Any] | None] | None = None
    ) -> dict[str, Any] | None:
        """The document ``namespace/key``, None when there is none.

        :param legacy: reads the document a former release kept as a file (None when there is no file);
            when the store has no such document, what it returns is imported into the store.
        """
        from sqlalchemy import select

        table = self._table()
        with self._reached() as conn:
            row = conn.execute(
                select(table.c.body).where(table.c.namespace == namespace, table.c.key == key)
            ).first()
        if row is not None and row.body is not None:
            return json.loads(row.body)
        found = legacy() if legacy is not None else None
        if found is None:
            return None
        if getattr(_WRITING, "depth", 0):
            # read inside a read-modify-write of this thread: importing would wait for that writer
            # (the row it created, the database on SQLite); that write imports it anyway
            return found
        with self.locked(namespace, key, default=dict, legacy=legacy) as body:
            return json.loads(json.dumps(body))

    def put(self, namespace: str, key: str, body: dict[str, Any]) -> None:
        """Replace the document ``namespace/key`` (create it when missing)."""
        with self.locked(namespace, key, default=dict) as current:
            current.clear()
            current.update(body)

    def keys(self, namespace: str) -> list[str]:
        """The keys of ``namespace`` that hold a document, sorted."""
        from sqlalchemy import select

        table = self._table()
        with self._reached() as conn:
            rows = conn.execute(
                select(table.c.key)
                .where(table.c.namespace == namespace, table.c.body.is_not(None))
                .order_by(table.c.key)
            )
            return [row.key for row in rows]

    def documents(self, namespace: str, prefix: str = "") -> dict[str, dict[str, Any]]:
        """Every document of ``namespace`` whose key starts with ``prefix``, by key, in one query (the UI
        reads a year of drift checks at once)."""
        from sqlalchemy import select

        table = self._table()
        query = select(table.c.key, table.c.body).where(
            table.c.namespace == namespace, table.c.body.is_not(None)
        )
        if prefix:
            escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(table.c.key.like(f"{escaped}%", escape="\\"))
        with self._reached() as conn:
            rows = conn.execute(query.order_by(table.c.key)).all()
        return {row.key: json.loads(row.body) for row in rows}

    def delete(self, namespace: str, key: str) -> None:
        """Remove the document ``namespace/key`` (nothing when there is none)."""
        table = self._table()
        with self._reached(write=True) as conn:
            conn.execute(table.delete().where(table.c.namespace == namespace, table.c.key == key))

    @contextlib.contextmanager
    def locked(
        self,
        namespace: str,
        key: str,
        *,
        default: Callable[[], dict[str, Any]],
        legacy: Callable[[], dict[str, Any] | None] | None = None,
        write_on_error: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Read-modify-write of the document ``namespace/key`` in one transaction.

        The block gets the document (``legacy()`` or ``default()`` when the store has none yet); what it
        leaves in it is written when the block ends, and no other writer of the key (of the database, on
        SQLite) runs in between, whichever host it runs on.

        :param write_on_error: also write (and commit) when the block raises, e.g. so processes a deploy
            started are never forgotten; by default an error leaves the document as it was.
        """
        from sqlalchemy import select

        table = self._table()
        key_match = (table.c.namespace == namespace, table.c.key == key)
        with self._reached(write=True) as conn:
            self._insert_missing(conn, table, namespace, key)
            query = select(table.c.body, table.c.revision).where(*key_match)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            row = conn.execute(query).one()
            if row.body is not None:
                body = json.loads(row.body)
            else:
                body = (legacy() if legacy is not None else None) or default()
            _WRITING.depth = getattr(_WRITING, "depth", 0) + 1
            try:
                yield body
            except BaseException:
                if write_on_error:
                    self._write(conn, table, key_match, body, row.revision)
                    conn.commit()  # the error then leaves a finished transaction, not a rolled-back one
                raise
            finally:
                _WRITING.depth -= 1
            self._write(conn, table, key_match, body, row.revision)

    @staticmethod
    def _insert_missing(conn: Connection, table: Any, namespace: str, key: str) -> None:
        values = {"namespace": namespace, "key": key, "body": None, "revision": 0}
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        conn.execute(insert(table).values(**values).on_conflict_do_nothing())

    @staticmethod
    def _write(
        conn: Connection, table: Any, key_match: tuple[Any, ...], body: dict[str, Any], revision: int
    ) -> None:
        conn.execute(
            table.update()
            .where(*key_match)
            .values(
                body=json.dumps(body, sort_keys=True, default=str),
                revision=revision + 1,
                updated_at=_now().isoformat(),
            )
        )


@functools.cache
def _documents_table() -> Any:
    """The table of documents, one object per process: SQLAlchemy caches the compiled statements per
    table, so a new ``Table`` per call compiled every query again (tens of ms each on a loaded machine,
    for every read of the UI's pages)."""
    from sqlalchemy import Column, Integer, MetaData, String, Table, Text

    return Table(
        TABLE,
        MetaData(),
        Column("namespace", String(64), primary_key=True),
        Column("key", String(255), primary_key=True),
        Column("body", Text),
        Column("revision", Integer, nullable=False),
        Column("updated_at", String(40)),
    )


def read_legacy_json(path: Any) -> Callable[[], dict[str, Any] | None]:
    """A ``legacy`` reader for :meth:`MLOpsStateHook.get`/:meth:`~MLOpsStateHook.locked`: the JSON file
    ``path`` (a local path or an artifact-store path) a former release wrote, None when it does not exist."""

    def read() -> dict[str, Any] | None:
        from airflow_mlops.artifacts import is_unreachable, reaching

        with reaching(path):  # a store that cannot be reached is not a file that does not exist
            try:
                if not path.exists():
                    return None
                return json.loads(path.read_text())
            except (OSError, ValueError) as err:
                if is_unreachable(err):
                    raise
                return None

    return read
