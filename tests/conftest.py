"""Shared fixtures: the embedded broker and database, and a migrated database per test.

* ``embedded_root``: a session temporary directory the ``postgres`` account can enter.
* ``broker`` / ``mqtt_url``: one Mosquitto for the session. A test that stops or
  restarts it asks for ``running_broker``, which starts it again afterwards.
* ``postgres``: one TimescaleDB-enabled PostgreSQL for the session, or the server of
  ``CITYOPS_TEST_DATABASE_URL`` when that is set.
* ``database_url``: a fresh database per test, cloned from ``cityops_template``,
  which is migrated once per session with ``cityops.db.migrate``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from cityops.embedded import EmbeddedMosquitto, EmbeddedPostgres

TEMPLATE_DATABASE = "cityops_template"
ADMIN_DATABASE = "postgres"
CREATE_DATABASE_TIMEOUT_S = 30.0


class PostgresServer(Protocol):
    """What tests need of a PostgreSQL server, embedded or external."""

    @property
    def port(self) -> int: ...

    def url(self, dbname: str = ...) -> str: ...

    def ensure_database(self, name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ExternalPostgres:
    """The server named by ``CITYOPS_TEST_DATABASE_URL``; its URL with another dbname."""

    base_url: str

    @property
    def port(self) -> int:
        return urlsplit(self.base_url).port or 5432

    def url(self, dbname: str | None = None) -> str:
        if dbname is None:
            return self.base_url
        return urlunsplit(urlsplit(self.base_url)._replace(path="/" + quote(dbname, safe="")))

    def ensure_database(self, name: str) -> None:
        with psycopg.connect(self.url(ADMIN_DATABASE), autocommit=True) as admin:
            if not _database_exists(admin, name):
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _database_exists(admin: psycopg.Connection[tuple[object, ...]], name: str) -> bool:
    row = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Undo ``configure_logging`` of in-process ``cityops`` commands.

    It binds a handler to the ``sys.stderr`` of that moment: pytest's capture
    of one test, closed afterwards. Server threads of later tests logging to it
    print "Logging error" tracebacks.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def embedded_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="cityops-test-"))
    # mkdtemp makes it 0700; run as root, PostgreSQL runs as `postgres` and must
    # enter it to reach its cluster.
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def broker(embedded_root: Path) -> Iterator[EmbeddedMosquitto]:
    server = EmbeddedMosquitto(embedded_root / "mosquitto")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def running_broker(broker: EmbeddedMosquitto) -> Iterator[EmbeddedMosquitto]:
    """The session broker, for a test that may stop it: running again afterwards."""
    broker.start()
    yield broker
    broker.start()


@pytest.fixture(scope="session")
def mqtt_url(broker: EmbeddedMosquitto) -> str:
    return broker.url


@pytest.fixture(scope="session")
def postgres(embedded_root: Path) -> Iterator[PostgresServer]:
    external = os.environ.get("CITYOPS_TEST_DATABASE_URL")
    if external:
        yield ExternalPostgres(external)
        return
    server = EmbeddedPostgres(embedded_root / "postgres")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def migrated_template(postgres: PostgresServer) -> str:
    """``cityops_template``, rebuilt and migrated once per session.

    Rebuilt rather than reused: migrations change while they are being written,
    and ``migrate`` refuses a database where an applied one was edited.
    """
    from cityops.db import migrate  # noqa: PLC0415 - only database tests need it

    template = sql.Identifier(TEMPLATE_DATABASE)
    with psycopg.connect(postgres.url(ADMIN_DATABASE), autocommit=True) as admin:
        if _database_exists(admin, TEMPLATE_DATABASE):
            admin.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(template))
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(template))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(template))
        migrate(postgres.url(TEMPLATE_DATABASE))
        # CREATE DATABASE ... TEMPLATE fails while anyone is connected to the
        # template, and TimescaleDB's scheduler connects to every database that
        # allows connections. Refuse them, then end the scheduler already there.
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                template
            )
        )
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (TEMPLATE_DATABASE,),
        )
    return TEMPLATE_DATABASE


def _create_from_template(
    admin: psycopg.Connection[tuple[object, ...]], name: str, template: str
) -> None:
    """CREATE DATABASE from the template, retrying while a backend still holds it."""
    statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(name), sql.Identifier(template)
    )
    deadline = time.monotonic() + CREATE_DATABASE_TIMEOUT_S
    while True:
        try:
            admin.execute(statement)
        except psycopg.errors.ObjectInUse:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)  # a terminated backend is still leaving: poll again
        else:
            return


@pytest.fixture
def database_url(postgres: PostgresServer, migrated_template: str) -> Iterator[str]:
    """URL of a fresh, fully migrated database of this test alone (dropped after)."""
    name = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(postgres.url(ADMIN_DATABASE), autocommit=True) as admin:
        _create_from_template(admin, name, migrated_template)
    yield postgres.url(name)
    with psycopg.connect(postgres.url(ADMIN_DATABASE), autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
