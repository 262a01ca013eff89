"""The console's starting picture: devices with their latest values, open alerts, KPIs.

A websocket client of ``/api/v1/live`` receives one :class:`Snapshot` when it
connects (or when it fell too far behind), then deltas from the live hub
(:mod:`control_api.live`). The snapshot is read from TimescaleDB, the source
of truth; the hub's sequence number is attached by the serving loop, which
registers the client with the hub *before* it calls :func:`build_snapshot`
(see the module docstring of :mod:`control_api.live_ws`).

Latest value per series: one ``LATERAL (… ORDER BY ts DESC LIMIT 1)`` probe
per series on the ``(series_id, ts DESC)`` unique index of the ``readings``
hypertable. TimescaleDB runs it as an ordered chunk append that stops at the
first row, so a series that reported recently costs one index probe in the
newest chunk, whatever the retention. A series silent for a long time costs
one probe per chunk.

KPIs are computed from the rows the snapshot already fetched (devices by
presence, open alerts by severity, data freshness), so they agree with the
devices and alerts in the same snapshot; only the reading rate needs a query
of its own. :func:`query_kpis` computes the same figures with aggregate
queries, for a periodic KPI feed (:func:`control_api.live_ws.run_kpi_feed`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, TypedDict

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import tuple_row

from control_api.errors import SnapshotUnavailable
from ingest import BatchSource
from rules import OPEN_STATES, SEVERITIES, Alert

__all__ = [
    "RATE_WINDOW_S",
    "DeviceState",
    "Kpis",
    "SeriesValue",
    "Snapshot",
    "alert_kpis",
    "build_snapshot",
    "device_kpis",
    "query_kpis",
]

RATE_WINDOW_S: Final = 10.0
"""Readings per second are averaged over this many seconds."""

Presence = Literal["online", "offline", "unknown"]
_UNACKED: Final = frozenset({"active_unacked", "cleared_unacked"})
_ALERT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Alert))


class SeriesValue(TypedDict):
    """The latest value of one series; ``ts`` is ``None`` for a series without readings."""

    ts: float | None
    value: float | None
    state: str | None
    unit: str | None


class DeviceState(TypedDict):
    """One device as the console draws it."""

    id: str
    domain: str
    district: str
    kind: str | None
    name: str | None
    lat: float | None
    lon: float | None
    presence: Presence
    session: int | None
    stale_since: float | None
    out_of_service: bool
    series: dict[str, SeriesValue]


class Kpis(TypedDict):
    """The KPI strip of the console."""

    alerts_open: dict[str, int]
    """Open alerts by severity (every severity is present)."""
    alerts_open_total: int
    alerts_unacked: int
    """Open alerts that wait for an acknowledgement (active or cleared, unacked)."""
    devices: dict[str, int]
    """``online``/``offline``/``stale``/``unknown`` (exclusive), ``out_of_service``, ``total``."""
    readings_per_s: float
    freshness_s: float | None
    """Age of the newest reading (device time); ``None`` without readings."""
    at: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a console needs to draw the city before the first delta.

    Attributes:
        source: ``live``, or ``replay``/``drill`` for a client that follows a replay.
        taken_at: When the snapshot was read (seconds since the epoch).
        devices: Every device, with presence and the latest value of each series.
        alerts: Open alerts (``state <> 'closed'``) of the source, as
            :class:`rules.Alert` dicts (times in seconds since the epoch), oldest first.
        kpis: The KPI figures at ``taken_at``.
        run_id: The replay run whose values are shown (replay only).
    """

    source: BatchSource
    taken_at: float
    devices: tuple[DeviceState, ...]
    alerts: tuple[dict[str, Any], ...]
    kpis: Kpis
    run_id: str | None = None


def device_kpis(devices: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Devices by status: exclusive ``offline`` > ``stale`` > ``online`` > ``unknown``.

    ``out_of_service`` and ``total`` are counted on top. A device that never
    sent a status but reports on time counts as ``unknown``.
    """
    counts = {"online": 0, "offline": 0, "stale": 0, "unknown": 0, "out_of_service": 0, "total": 0}
    for d in devices:
        counts["total"] += 1
        if d.get("out_of_service"):
            counts["out_of_service"] += 1
        if d.get("presence") == "offline":
            counts["offline"] += 1
        elif d.get("stale_since") is not None:
            counts["stale"] += 1
        elif d.get("presence") == "online":
            counts["online"] += 1
        else:
            counts["unknown"] += 1
    return counts


def alert_kpis(alerts: Iterable[Mapping[str, Any]]) -> tuple[dict[str, int], int, int]:
    """Open alerts by severity, their total, and how many wait for an acknowledgement."""
    by_severity: dict[str, int] = dict.fromkeys(SEVERITIES, 0)
    total = unacked = 0
    for a in alerts:
        if a.get("state") not in OPEN_STATES:
            continue
        total += 1
        severity = str(a.get("severity"))
        by_severity[severity] = by_severity.get(severity, 0) + 1
        if a.get("state") in _UNACKED:
            unacked += 1
    return by_severity, total, unacked


_DEVICES_LIVE: Final = """
SELECT d.id, d.domain, d.district, d.kind, d.name, d.lat, d.lon, d.presence,
       d.presence_session, extract(epoch FROM d.stale_since)::float8, d.out_of_service,
       s.channel, s.unit, extract(epoch FROM r.ts)::float8, r.value, r.state
FROM devices d
LEFT JOIN series s ON s.device_id = d.id
LEFT JOIN LATERAL (
    SELECT x.ts, x.value, x.state FROM readings x
    WHERE x.series_id = s.id ORDER BY x.ts DESC LIMIT 1
) r ON true
"""
# Replayed devices keep their registry entry (kind, name, position) in the
# live table when the recording came from this city: borrow it.
_DEVICES_REPLAY: Final = """
SELECT d.id, d.domain, d.district, l.kind, l.name, l.lat, l.lon, d.presence,
       d.presence_session, NULL::float8, false,
       s.channel, s.unit, extract(epoch FROM r.ts)::float8, r.value, r.state
FROM replay.devices d
LEFT JOIN devices l ON l.id = d.id
LEFT JOIN replay.series s ON s.device_id = d.id
LEFT JOIN LATERAL (
    SELECT x.ts, x.value, x.state FROM replay.readings x
    WHERE x.run_id = %(run)s AND x.series_id = s.id ORDER BY x.ts DESC LIMIT 1
) r ON true
"""
_LATEST_RUN: Final = "SELECT run_id FROM replay.runs ORDER BY last_seen DESC LIMIT 1"
_OPEN_ALERTS: Final = (
    f"SELECT {', '.join(_ALERT_FIELDS)} FROM alerts"
    " WHERE state <> 'closed' AND source = %(source)s"
    " AND (%(run)s::text IS NULL OR run_id = %(run)s)"
    " ORDER BY raised_at, id"
)
_RATE_LIVE: Final = (
    "SELECT count(*) FROM readings WHERE ts > now() - make_interval(secs => %(window)s)"
)
_RATE_REPLAY: Final = (
    "SELECT count(*) FROM replay.readings"
    " WHERE run_id = %(run)s AND ts > now() - make_interval(secs => %(window)s)"
)
_DEVICE_COUNTS: Final = """
SELECT count(*) FILTER (WHERE presence = 'offline'),
       count(*) FILTER (WHERE presence <> 'offline' AND stale_since IS NOT NULL),
       count(*) FILTER (WHERE presence = 'online' AND stale_since IS NULL),
       count(*) FILTER (WHERE presence = 'unknown' AND stale_since IS NULL),
       count(*) FILTER (WHERE out_of_service),
       count(*)
FROM devices
"""
_DEVICE_COUNTS_REPLAY: Final = """
SELECT count(*) FILTER (WHERE presence = 'offline'), 0,
       count(*) FILTER (WHERE presence = 'online'),
       count(*) FILTER (WHERE presence = 'unknown'), 0, count(*)
FROM replay.devices
"""
_ALERT_COUNTS: Final = """
SELECT severity, count(*),
       count(*) FILTER (WHERE state IN ('active_unacked', 'cleared_unacked'))
FROM alerts
WHERE state <> 'closed' AND source = %(source)s AND (%(run)s::text IS NULL OR run_id = %(run)s)
GROUP BY severity
"""
_NEWEST_LIVE: Final = "SELECT extract(epoch FROM max(ts))::float8 FROM readings"
_NEWEST_REPLAY: Final = (
    "SELECT extract(epoch FROM max(ts))::float8 FROM replay.readings WHERE run_id = %(run)s"
)


def _epoch(value: object) -> object:
    return value.timestamp() if isinstance(value, datetime) else value


async def _fetch(
    conn: AsyncConnection[Any], query: str, params: Mapping[str, object]
) -> list[tuple[Any, ...]]:
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query.encode(), params)
        return await cur.fetchall()


async def _replay_run(conn: AsyncConnection[Any], run_id: str | None) -> str | None:
    if run_id is not None:
        return run_id
    rows = await _fetch(conn, _LATEST_RUN, {})
    return str(rows[0][0]) if rows else None


def _devices_from_rows(rows: Iterable[tuple[Any, ...]]) -> tuple[list[DeviceState], float | None]:
    devices: dict[str, DeviceState] = {}
    newest: float | None = None
    for (
        device_id, domain, district, kind, name, lat, lon, presence, session, stale_since,
        out_of_service, channel, unit, ts, value, state,
    ) in rows:  # fmt: skip
        device = devices.get(device_id)
        if device is None:
            device = devices[device_id] = DeviceState(
                id=device_id,
                domain=domain,
                district=district,
                kind=kind,
                name=name,
                lat=lat,
                lon=lon,
                presence=presence,
                session=session,
                stale_since=stale_since,
                out_of_service=bool(out_of_service),
                series={},
            )
        if channel is not None:
            device["series"][channel] = SeriesValue(ts=ts, value=value, state=state, unit=unit)
            if ts is not None and (newest is None or ts > newest):
                newest = ts
    return sorted(devices.values(), key=lambda d: d["id"]), newest


async def build_snapshot(
    conn: AsyncConnection[Any],
    *,
    source: BatchSource = "live",
    run_id: str | None = None,
    clock: Callable[[], float] = time.time,
) -> Snapshot:
    """Read the console's starting picture from TimescaleDB.

    Args:
        conn: An open connection (its row factory does not matter). The
            queries run in the connection's current transaction state; the
            caller commits or rolls back.
        source: ``live`` (the live tables, live alerts), ``drill`` (the live
            tables, drill alerts: a drill is stored in the live namespace) or
            ``replay`` (the replay sandbox).
        run_id: Replay only: the run to show; ``None`` takes the run that was
            active last.
        clock: Seconds since the epoch (``taken_at`` and data freshness).

    Returns:
        The snapshot; its KPIs are computed from the same rows.

    Raises:
        SnapshotUnavailable: A query failed; the message names the source.
    """
    try:
        if source == "replay":
            run_id = await _replay_run(conn, run_id)
            rows = await _fetch(conn, _DEVICES_REPLAY, {"run": run_id})
            rate_query = _RATE_REPLAY
        else:
            run_id = None
            rows = await _fetch(conn, _DEVICES_LIVE, {})
            rate_query = _RATE_LIVE
        alert_rows = await _fetch(conn, _OPEN_ALERTS, {"source": source, "run": run_id})
        rate_rows = await _fetch(conn, rate_query, {"run": run_id, "window": RATE_WINDOW_S})
    except psycopg.Error as exc:
        msg = f"snapshot of the {source!r} source failed: {exc}"
        raise SnapshotUnavailable(msg) from exc
    now = clock()
    devices, newest = _devices_from_rows(rows)
    alerts = tuple(
        {name: _epoch(value) for name, value in zip(_ALERT_FIELDS, row, strict=True)}
        for row in alert_rows
    )
    by_severity, total, unacked = alert_kpis(alerts)
    kpis = Kpis(
        alerts_open=by_severity,
        alerts_open_total=total,
        alerts_unacked=unacked,
        devices=device_kpis(devices),
        readings_per_s=int(rate_rows[0][0]) / RATE_WINDOW_S,
        freshness_s=None if newest is None else max(0.0, now - newest),
        at=now,
    )
    return Snapshot(
        source=source,
        taken_at=now,
        devices=tuple(devices),
        alerts=alerts,
        kpis=kpis,
        run_id=run_id,
    )


async def query_kpis(
    conn: AsyncConnection[Any],
    *,
    source: BatchSource = "live",
    run_id: str | None = None,
    clock: Callable[[], float] = time.time,
) -> Kpis:
    """The KPI figures alone, with aggregate queries (for a periodic KPI feed).

    Args:
        conn: An open connection.
        source: As for :func:`build_snapshot`.
        run_id: As for :func:`build_snapshot`.
        clock: Seconds since the epoch.

    Returns:
        The KPIs; ``readings_per_s`` counts device time over the last
        :data:`RATE_WINDOW_S` seconds (the live hub replaces it with its own
        measure of committed readings).

    Raises:
        SnapshotUnavailable: A query failed.
    """
    try:
        if source == "replay":
            run_id = await _replay_run(conn, run_id)
            device_rows = await _fetch(conn, _DEVICE_COUNTS_REPLAY, {})
            newest_rows = await _fetch(conn, _NEWEST_REPLAY, {"run": run_id})
            rate_query = _RATE_REPLAY
        else:
            run_id = None
            device_rows = await _fetch(conn, _DEVICE_COUNTS, {})
            newest_rows = await _fetch(conn, _NEWEST_LIVE, {})
            rate_query = _RATE_LIVE
        alert_rows = await _fetch(conn, _ALERT_COUNTS, {"source": source, "run": run_id})
        rate_rows = await _fetch(conn, rate_query, {"run": run_id, "window": RATE_WINDOW_S})
    except psycopg.Error as exc:
        msg = f"KPI query of the {source!r} source failed: {exc}"
        raise SnapshotUnavailable(msg) from exc
    now = clock()
    offline, stale, online, unknown, out_of_service, total = (int(n) for n in device_rows[0])
    by_severity: dict[str, int] = dict.fromkeys(SEVERITIES, 0)
    open_total = unacked = 0
    for severity, count, count_unacked in alert_rows:
        by_severity[str(severity)] = int(count)
        open_total += int(count)
        unacked += int(count_unacked)
    newest = newest_rows[0][0]
    return Kpis(
        alerts_open=by_severity,
        alerts_open_total=open_total,
        alerts_unacked=unacked,
        devices={
            "online": online,
            "offline": offline,
            "stale": stale,
            "unknown": unknown,
            "out_of_service": out_of_service,
            "total": total,
        },
        readings_per_s=int(rate_rows[0][0]) / RATE_WINDOW_S,
        freshness_s=None if newest is None else max(0.0, now - float(newest)),
        at=now,
    )
