"""Database migrations: versioned SQL files applied once, in order.

Each file ``migrations/NNNN_name.sql`` runs in its own transaction and is
recorded in ``schema_migrations`` with its checksum. A session-level advisory
lock serialises concurrent migrators (two services starting at once), so
``migrate`` is safe to call from every process at start-up.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

from cityops.errors import MigrationError

log = logging.getLogger(__name__)

_LOCK_KEY = 0xC17_0B5  # arbitrary, constant: the advisory lock of migrations
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text, to detect an edited applied migration."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    """The migrations shipped with this version of cityops, in order."""
    found = []
    for entry in resources.files("cityops.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    return found


def _ensure_table(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version    integer PRIMARY KEY,
               name       text NOT NULL,
               checksum   text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )


def applied_versions(conn: psycopg.Connection[tuple[object, ...]]) -> dict[int, str]:
    """Version → checksum of what the database has applied."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    return {int(str(v)): str(c) for v, c in rows}


def pending_migrations(conninfo: str) -> list[Migration]:
    """Migrations this version ships that the database has not applied yet."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        applied = applied_versions(conn)
    return [m for m in available_migrations() if m.version not in applied]


def migrate(conninfo: str) -> list[str]:
    """Apply every pending migration; return the names applied (empty if current).

    Raises:
        MigrationError: an applied migration was edited, the database is newer
            than this cityops, or a migration failed (its transaction is rolled back).
    """
    done: list[str] = []
    try:
        conn = psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        msg = f"cannot connect to the database: {exc}"
        raise MigrationError(msg) from exc
    with conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            _ensure_table(conn)
            applied = applied_versions(conn)
            shipped = available_migrations()
            known = {m.version for m in shipped}
            newer = sorted(v for v in applied if v not in known)
            if newer:
                msg = f"database has migrations {newer} that this cityops does not know: upgrade"
                raise MigrationError(msg)
            for migration in shipped:
                label = f"{migration.version:04d}_{migration.name}"
                if migration.version in applied:
                    if applied[migration.version] != migration.checksum:
                        msg = f"migration {label} was changed after it was applied"
                        raise MigrationError(msg)
                    continue
                log.info("applying migration %s", label)
                try:
                    with conn.transaction():
                        conn.execute(migration.sql.encode())
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum)"
                            " VALUES (%s, %s, %s)",
                            (migration.version, migration.name, migration.checksum),
                        )
                except psycopg.Error as exc:
                    msg = f"migration {label} failed: {exc}"
                    raise MigrationError(msg) from exc
                done.append(label)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return done
