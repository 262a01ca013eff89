"""Alerts in TimescaleDB: the truth about every alert and its transitions.

Each transition is one transaction: the alert row (inserted, or updated under
an optimistic version check) and its ``alert_events`` row. The partial unique
index ``alerts_one_open`` keeps one open alert per (rule, subject, source,
run); a second instance that races to open the same alert gets
``AlertAlreadyOpen`` with the winner, and counts an occurrence on it instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from rules.alerts import Alert, AlertEvent
from rules.errors import RulesError, VersionConflict

_FIELDS = tuple(f.name for f in dataclasses.fields(Alert))
_TIMES = frozenset(
    {
        "raised_at",
        "updated_at",
        "acked_at",
        "cleared_at",
        "closed_at",
        "unacked_since",
        "shelved_until",
    }
)
_EVENT_COLUMNS = "alert_id, version, action, from_state, to_state, actor, at, note, notify"
_EVENT_VALUES = "%s, %s, %s, %s, %s, %s, %s, %s, %s"
# One statement per transition (one round trip, atomic on its own): the
# alert row and its event are written together or not at all. A conflict on
# ``alerts_one_open`` or a stale version writes nothing, which the returned
# row count tells.
_OPEN = (
    f"WITH opened AS (INSERT INTO alerts ({', '.join(_FIELDS)}, run_id)"
    f" VALUES ({', '.join(['%s'] * len(_FIELDS))}, %s)"
    " ON CONFLICT (rule_id, subject, source, run_id) WHERE state <> 'closed' DO NOTHING"
    " RETURNING id)"
    f" INSERT INTO alert_events ({_EVENT_COLUMNS}) SELECT {_EVENT_VALUES} FROM opened"
)
_CHANGE = (
    "WITH changed AS (UPDATE alerts SET "
    + ", ".join(f"{f} = %s" for f in _FIELDS if f != "id")
    + " WHERE id = %s AND version = %s RETURNING id)"
    + f" INSERT INTO alert_events ({_EVENT_COLUMNS}) SELECT {_EVENT_VALUES} FROM changed"
)


class AlertStoreError(RulesError):
    """The alert store failed (database unreachable or refused the write)."""


class AlertAlreadyOpen(RulesError):
    """Another writer opened the same (rule, subject) alert first."""

    def __init__(self, current: Alert) -> None:
        super().__init__(f"alert for {current.subject!r} is already open as {current.id!r}")
        self.current = current


def _to_db(name: str, value: Any) -> Any:
    if name in _TIMES and value is not None:
        return datetime.fromtimestamp(value, UTC)
    return value


def alert_from_row(row: dict[str, Any]) -> Alert:
    """An alert from a row of `alerts` (extra columns are ignored)."""
    values = {}
    for name in _FIELDS:
        value = row[name]
        if isinstance(value, datetime):
            value = value.timestamp()
        values[name] = value
    return Alert(**values)


class AlertStore:
    """Reads and writes alerts.

    Either over one connection of its own (reopened after failures, one
    operation at a time) or over connections borrowed from a shared pool
    (``AlertStore(pool=...)``: the control API, where many people act at once).
    """

    def __init__(
        self,
        conninfo: str | None = None,
        *,
        pool: AsyncConnectionPool[AsyncConnection[dict[str, Any]]] | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if (conninfo is None) == (pool is None):
            msg = "AlertStore needs a conninfo or a pool, not both"
            raise ValueError(msg)
        self._conninfo = conninfo
        self._pool = pool
        self._connect_timeout_s = connect_timeout_s
        self._conn: AsyncConnection[dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> AsyncConnection[dict[str, Any]]:
        assert self._conninfo is not None
        if self._conn is None or self._conn.closed:
            try:
                self._conn = await AsyncConnection.connect(
                    self._conninfo,
                    row_factory=dict_row,
                    autocommit=True,
                    connect_timeout=max(1, int(self._connect_timeout_s)),
                )
            except psycopg.Error as exc:
                msg = f"cannot connect to the database: {exc}"
                raise AlertStoreError(msg) from exc
        return self._conn

    @contextlib.asynccontextmanager
    async def _borrow(self) -> AsyncIterator[AsyncConnection[dict[str, Any]]]:
        """A connection for one operation; a broken own connection is dropped."""
        if self._pool is not None:
            try:
                async with self._pool.connection(timeout=self._connect_timeout_s) as conn:
                    yield conn
            except PoolTimeout as exc:
                msg = f"no database connection within {self._connect_timeout_s:.1f} s: {exc}"
                raise AlertStoreError(msg) from exc
            return
        async with self._lock:
            conn = await self._connection()
            try:
                yield conn
            finally:
                if conn.broken:
                    self._conn = None

    async def close(self) -> None:
        """Close the own connection (a pool belongs to whoever passed it)."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _query(self, query: str, params: tuple[object, ...]) -> list[dict[str, Any]]:
        async with self._borrow() as conn:
            try:
                cur = await conn.execute(query.encode(), params)
                rows = await cur.fetchall()
                await conn.commit()
            except psycopg.Error as exc:
                msg = f"alert query failed: {exc}"
                raise AlertStoreError(msg) from exc
        return rows

    async def get(self, alert_id: str) -> Alert | None:
        """One alert by id."""
        rows = await self._query("SELECT * FROM alerts WHERE id = %s", (alert_id,))
        return alert_from_row(rows[0]) if rows else None

    async def open_alerts(self) -> list[Alert]:
        """Every alert that is not closed."""
        rows = await self._query(
            "SELECT * FROM alerts WHERE state <> 'closed' ORDER BY raised_at", ()
        )
        return [alert_from_row(r) for r in rows]

    async def out_of_service_devices(self) -> frozenset[str]:
        """Ids of the devices under maintenance."""
        rows = await self._query("SELECT id FROM devices WHERE out_of_service", ())
        return frozenset(str(r["id"]) for r in rows)

    async def events(self, alert_id: str) -> list[dict[str, Any]]:
        """The transitions of one alert, oldest first."""
        return await self._query(
            "SELECT * FROM alert_events WHERE alert_id = %s ORDER BY version", (alert_id,)
        )

    async def save(
        self, before: Alert | None, after: Alert, event: AlertEvent, *, run_id: str | None = None
    ) -> None:
        """Write one transition: the alert row and its event, atomically.

        Raises:
            AlertAlreadyOpen: ``before`` is None and that alert is already open.
            VersionConflict: the stored alert is no longer at ``before.version``.
            AlertStoreError: the database failed.
        """
        async with self._borrow() as conn:
            await self._save_in(conn, before, after, event, run_id)

    async def _save_in(
        self,
        conn: AsyncConnection[dict[str, Any]],
        before: Alert | None,
        after: Alert,
        event: AlertEvent,
        run_id: str | None,
    ) -> None:
        event_values = (
            event.alert_id,
            event.version,
            event.action,
            event.from_state,
            event.to_state,
            event.actor,
            datetime.fromtimestamp(event.at, UTC),
            event.note,
            event.notify,
        )
        try:
            if before is None:
                alert_values = [*(_to_db(f, getattr(after, f)) for f in _FIELDS), run_id]
                cur = await conn.execute(_OPEN, [*alert_values, *event_values])
                if cur.rowcount == 1:
                    return
                cur = await conn.execute(
                    "SELECT * FROM alerts WHERE rule_id = %s AND subject = %s"
                    " AND source = %s AND run_id IS NOT DISTINCT FROM %s"
                    " AND state <> 'closed'",
                    (after.rule_id, after.subject, after.source, run_id),
                )
                row = await cur.fetchone()
                if row is None:  # closed again in between: a plain retry opens it
                    msg = f"alert {after.id!r} not saved: the open alert vanished; retry"
                    raise AlertStoreError(msg)
                raise AlertAlreadyOpen(alert_from_row(row))
            alert_values = [
                *(_to_db(f, getattr(after, f)) for f in _FIELDS if f != "id"),
                after.id,
                before.version,
            ]
            cur = await conn.execute(_CHANGE, [*alert_values, *event_values])
            if cur.rowcount != 1:
                current = await self._get_in(conn, after.id)
                raise VersionConflict(
                    after.id,
                    before.version,
                    current.version if current else -1,
                    current.acked_by if current else None,
                    current.acked_at if current else None,
                )
        except psycopg.Error as exc:
            msg = f"alert {after.id!r} not saved: {exc}"
            raise AlertStoreError(msg) from exc

    async def assign_incident(
        self,
        incident_id: str,
        *,
        district: str,
        opened_at: float,
        source: str,
        alert_ids: list[str],
    ) -> None:
        """Group alerts under an incident (flood control); not a lifecycle transition."""
        async with self._borrow() as conn:
            try:
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO incidents (id, district, opened_at, source)"
                        " VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                        (incident_id, district, datetime.fromtimestamp(opened_at, UTC), source),
                    )
                    await conn.execute(
                        "UPDATE alerts SET incident_id = %s WHERE id = ANY(%s)",
                        (incident_id, alert_ids),
                    )
            except psycopg.Error as exc:
                msg = f"incident {incident_id!r} not saved: {exc}"
                raise AlertStoreError(msg) from exc

    @staticmethod
    async def _get_in(conn: AsyncConnection[dict[str, Any]], alert_id: str) -> Alert | None:
        cur = await conn.execute("SELECT * FROM alerts WHERE id = %s", (alert_id,))
        row = await cur.fetchone()
        return None if row is None else alert_from_row(row)
