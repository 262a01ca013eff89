"""The lifecycle of stored readings: roll-ups (1 minute, 1 hour) and retention.

The Apache-2 edition of TimescaleDB has no continuous aggregates and no job
policies, so cityops keeps both itself (``docs/data-lifecycle.md``):

* :func:`roll_up` brings ``readings_1m`` and ``readings_1h`` up to date. Per
  (series, bucket) they hold the number, minimum, maximum and sum of the
  *numeric* readings (state strings are not rolled up). Each run recomputes
  the minutes from ``complete_before - lateness`` up to the last whole minute
  by device time, and the hours those minutes fall in from ``readings_1m``,
  with ``INSERT … SELECT … ON CONFLICT DO UPDATE``: a rerun writes the same
  rows (idempotent) and a bucket is rewritten only when it changed.
* Late readings (device time before that window) are found by receive time:
  the readings received since the previous run (minus ``late_scan_margin``,
  for batches still committing and clocks a little apart) whose minute lies
  before the window have their minutes and hours recomputed exactly. A BRIN
  index on ``received_at`` makes that scan skip every block of every chunk
  that received nothing new.
* A long catch-up (first run over existing data, an outage, a backfill with
  ``since``) proceeds in slices of ``max_slice``, one transaction each, so
  progress is kept and no transaction grows without bound.
* :func:`apply_retention` drops whole chunks with ``drop_chunks``: raw
  readings after ``raw_keep``, minute roll-ups after ``minute_keep``, hour
  roll-ups after ``hour_keep`` (``None`` keeps forever). Raw chunks are never
  dropped before the roll-ups have settled them, nor minute chunks before the
  hours (computed in the same transaction) have. The end of what was dropped
  is kept in ``retention_horizons``; no roll-up is ever recomputed from a
  source older than that, so a late reading can never replace a roll-up of
  dropped data with a partial one.

The replay sandbox (``replay.readings``) is not rolled up and not dropped:
runs are short and their reads stay on raw readings.

Concurrency: every transaction of a run first takes a transaction-level
advisory lock with ``pg_try_advisory_xact_lock``; a second process (services
scaled out) that finds it taken skips the run and reports ``skipped``.
Database failures become :class:`~ingest.errors.StorageUnavailable`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import tuple_row

from ingest.errors import StorageUnavailable

__all__ = [
    "RETENTION_LOCK",
    "ROLLUP_LOCK",
    "DroppedChunk",
    "LifecycleOptions",
    "RetentionResult",
    "RollupResult",
    "apply_retention",
    "roll_up",
]

log = logging.getLogger(__name__)

# Arbitrary constants (next to the migrations' 0xC17_0B5): one advisory lock
# per kind of work, so roll-ups and retention never wait for each other.
ROLLUP_LOCK: Final = 0xC17_0B6
RETENTION_LOCK: Final = 0xC17_0B7

_Conn = AsyncConnection[Any]
_MINUTE: Final = timedelta(minutes=1)
_HOUR: Final = timedelta(hours=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class LifecycleOptions:
    """How long data is kept and how roll-ups follow late readings.

    Attributes:
        raw_keep: Raw readings are dropped (whole chunks) once older than this;
            ``None`` keeps them forever.
        minute_keep: Same for the 1-minute roll-up.
        hour_keep: Same for the 1-hour roll-up.
        lateness: Device-time window recomputed by every run; history serves
            roll-ups only before ``complete_before - lateness``.
        late_scan_margin: Overlap of successive late-reading scans, in receive
            time: covers batches still committing and ingester clocks behind
            the database's.
        max_slice: The longest device-time range recomputed in one transaction.
        statement_timeout_s: Server-side deadline of each statement.
    """

    raw_keep: timedelta | None = timedelta(days=90)
    minute_keep: timedelta | None = timedelta(days=365)
    hour_keep: timedelta | None = timedelta(days=3650)
    lateness: timedelta = timedelta(minutes=10)
    late_scan_margin: timedelta = timedelta(minutes=5)
    max_slice: timedelta = timedelta(hours=1)
    statement_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("raw_keep", "minute_keep", "hour_keep"):
            keep = getattr(self, name)
            if keep is not None and keep < timedelta(days=1):
                msg = f"{name} must be at least one day (or None: forever), got {keep}"
                raise ValueError(msg)
        if self.lateness < _MINUTE or self.late_scan_margin < timedelta(0):
            msg = (
                "lateness must be at least a minute and late_scan_margin not negative, got"
                f" {self.lateness} and {self.late_scan_margin}"
            )
            raise ValueError(msg)
        if self.max_slice <= self.lateness:
            msg = f"max_slice ({self.max_slice}) must exceed lateness ({self.lateness})"
            raise ValueError(msg)
        if self.statement_timeout_s <= 0:
            msg = f"statement_timeout_s must be positive, got {self.statement_timeout_s}"
            raise ValueError(msg)


@dataclass(slots=True)
class RollupResult:
    """What one :func:`roll_up` call did.

    Attributes:
        skipped: Another process held the roll-up lock: nothing was done.
        minutes: 1-minute rows inserted or changed.
        hours: 1-hour rows inserted or changed.
        late_minutes: Minutes recomputed because late readings arrived in them.
        slices: Transactions committed.
        complete_before: The 1-minute watermark after the call.
    """

    skipped: bool = False
    minutes: int = 0
    hours: int = 0
    late_minutes: int = 0
    slices: int = 0
    complete_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class DroppedChunk:
    """A chunk dropped (or, in a dry run, that would be)."""

    hypertable: str
    chunk: str
    range_start: datetime
    range_end: datetime


@dataclass(slots=True)
class RetentionResult:
    """What one :func:`apply_retention` call did.

    Attributes:
        skipped: Another process held the retention lock.
        dry_run: Nothing was dropped; ``chunks`` lists what would be.
        chunks: The chunks dropped, oldest first per table.
        cutoffs: Per table, the time before which whole chunks go (absent:
            kept forever). Raw and minute cutoffs are held back to what the
            roll-ups have settled.
    """

    skipped: bool = False
    dry_run: bool = False
    chunks: list[DroppedChunk] = field(default_factory=list)
    cutoffs: dict[str, datetime] = field(default_factory=dict)


# ---------------------------------------------------------------- time helpers


def _floor(moment: datetime, width: timedelta) -> datetime:
    # Minute and hour buckets are epoch-aligned, as time_bucket's are.
    return moment - (moment - _EPOCH) % width


def _ceil(moment: datetime, width: timedelta) -> datetime:
    floor = _floor(moment, width)
    return floor if floor == moment else floor + width


# ---------------------------------------------------------------- SQL

# A bucket is rewritten only when it changed. Readings are only ever added, so
# a change always changes the count; the sum is compared to rounding because
# float addition in another order (another plan) differs in the last bits.
_UPSERT_SET: Final = """
ON CONFLICT (series_id, bucket) DO UPDATE
SET readings = excluded.readings, min = excluded.min, max = excluded.max, sum = excluded.sum
WHERE t.readings <> excluded.readings OR t.min <> excluded.min OR t.max <> excluded.max
   OR abs(t.sum - excluded.sum) > 1e-12 * greatest(abs(t.sum), abs(excluded.sum))
"""
_MINUTES_OF_RANGE: Final = (
    """
INSERT INTO readings_1m AS t (series_id, bucket, readings, min, max, sum)
SELECT series_id, time_bucket('1 minute'::interval, ts), count(*), min(value), max(value),
       sum(value)
FROM readings
WHERE ts >= %(lo)s AND ts < %(hi)s AND value IS NOT NULL
GROUP BY 1, 2
"""
    + _UPSERT_SET
)
_HOURS_OF_RANGE: Final = (
    """
INSERT INTO readings_1h AS t (series_id, bucket, readings, min, max, sum)
SELECT series_id, time_bucket('1 hour'::interval, bucket), sum(readings), min(min), max(max),
       sum(sum)
FROM readings_1m
WHERE bucket >= %(lo)s AND bucket < %(hi)s
GROUP BY 1, 2
"""
    + _UPSERT_SET
)
# Late readings: received since the last scan, device time before the window.
# The ts condition is kept off the ts index on purpose (the planner would walk
# every chunk's ts index otherwise): the BRIN index on received_at finds them.
_LATE_MINUTES: Final = """
SELECT DISTINCT series_id, time_bucket('1 minute'::interval, ts)
FROM readings
WHERE received_at >= %(scan_from)s AND value IS NOT NULL
  AND ts + interval '0' < %(before)s AND ts + interval '0' >= %(horizon)s
"""
_MINUTES_OF_LIST: Final = (
    """
INSERT INTO readings_1m AS t (series_id, bucket, readings, min, max, sum)
SELECT r.series_id, d.bucket, count(*), min(r.value), max(r.value), sum(r.value)
FROM unnest(%(series)s::integer[], %(buckets)s::timestamptz[]) AS d (series_id, bucket)
JOIN readings r ON r.series_id = d.series_id
     AND r.ts >= d.bucket AND r.ts < d.bucket + interval '1 minute'
WHERE r.value IS NOT NULL
GROUP BY 1, 2
"""
    + _UPSERT_SET
)
_HOURS_OF_LIST: Final = (
    """
INSERT INTO readings_1h AS t (series_id, bucket, readings, min, max, sum)
SELECT m.series_id, d.bucket, sum(m.readings), min(m.min), max(m.max), sum(m.sum)
FROM unnest(%(series)s::integer[], %(buckets)s::timestamptz[]) AS d (series_id, bucket)
JOIN readings_1m m ON m.series_id = d.series_id
     AND m.bucket >= d.bucket AND m.bucket < d.bucket + interval '1 hour'
GROUP BY 1, 2
"""
    + _UPSERT_SET
)
_WATERMARK: Final = """
SELECT complete_before, late_scan_from FROM rollup_watermarks WHERE rollup = '1m' FOR UPDATE
"""
_SET_WATERMARK: Final = """
UPDATE rollup_watermarks
SET complete_before = %(complete_before)s, late_scan_from = %(scan_from)s,
    settled_before = %(settled)s, updated_at = now()
WHERE rollup IN ('1m', '1h')
"""
_NEXT_READING: Final = "SELECT min(ts) FROM readings WHERE ts >= %(lo)s"
_HORIZONS: Final = "SELECT hypertable, dropped_before FROM retention_horizons"
_RAISE_HORIZON: Final = """
INSERT INTO retention_horizons AS h (hypertable, dropped_before) VALUES (%s, %s)
ON CONFLICT (hypertable) DO UPDATE
SET dropped_before = greatest(h.dropped_before, excluded.dropped_before)
"""
_CHUNKS_BEFORE: Final = """
SELECT chunk_schema || '.' || chunk_name, range_start, range_end
FROM timescaledb_information.chunks
WHERE hypertable_schema = 'public' AND hypertable_name = %s AND range_end <= %s
ORDER BY range_start
"""


# ---------------------------------------------------------------- database access


@asynccontextmanager
async def _locked_transaction(
    conn: _Conn, lock: int, options: LifecycleOptions, what: str
) -> AsyncIterator[bool]:
    """A transaction holding ``lock`` (yields ``False`` when another process holds it)."""
    timeout = f"{max(1, round(options.statement_timeout_s * 1000))}ms"
    try:
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s), set_config('statement_timeout', %s, true)",
                (lock, timeout),
            )
            row = await cur.fetchone()
            yield bool(row and _first(row))
    except psycopg.Error as exc:
        msg = f"{what} failed: {exc}"
        raise StorageUnavailable(msg) from exc


def _first(row: Any) -> Any:
    """The first column of a row of any row factory."""
    if isinstance(row, dict):
        return next(iter(row.values()))
    return row[0]


async def _rows(conn: _Conn, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def _execute(conn: _Conn, query: str, params: Any) -> int:
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query, params)
        return max(cur.rowcount, 0)


async def _db_now(conn: _Conn) -> datetime:
    rows = await _rows(conn, "SELECT now()")
    return rows[0][0]  # type: ignore[no-any-return]


async def _horizons(conn: _Conn) -> dict[str, datetime]:
    return {str(name): when for name, when in await _rows(conn, _HORIZONS)}


# ---------------------------------------------------------------- roll-ups


async def roll_up(
    conn: _Conn,
    options: LifecycleOptions = LifecycleOptions(),
    *,
    since: datetime | None = None,
    now: datetime | None = None,
) -> RollupResult:
    """Bring the 1-minute and 1-hour roll-ups up to date (module docstring).

    Args:
        conn: An open connection not inside a transaction (any row factory).
        options: Lateness window, slice size and deadline.
        since: Recompute from this device time on (a backfill) instead of from
            the watermark; the watermark never moves back.
        now: The current time (default: the database's); buckets up to the
            last whole minute before it are computed.

    Returns:
        What was done; ``skipped`` when another process holds the lock.

    Raises:
        StorageUnavailable: The database failed or timed out.
    """
    result = RollupResult()
    try:
        current = now if now is not None else await _db_now(conn)
    except psycopg.Error as exc:
        msg = f"roll-up failed: {exc}"
        raise StorageUnavailable(msg) from exc
    upper = _floor(current, _MINUTE)
    start = _floor(since, _MINUTE) if since is not None else None
    late_scanned = False
    while True:
        async with _locked_transaction(conn, ROLLUP_LOCK, options, "roll-up") as locked:
            if not locked:
                result.skipped = True
                return result
            rows = await _rows(conn, _WATERMARK)
            watermark, scan_from = rows[0] if rows else (None, None)
            horizons = await _horizons(conn)
            if start is not None:
                lo = start
            elif watermark is not None:
                lo = watermark - options.lateness
            else:  # the first run: from the oldest reading
                lo = _EPOCH
            raw_horizon = horizons.get("readings")
            if raw_horizon is not None:
                lo = max(lo, _ceil(raw_horizon, _MINUTE))
            # Skip a stretch without readings (a backfill from long ago, a gap).
            following = await _rows(conn, _NEXT_READING, {"lo": lo})
            lo = min(upper, _floor(following[0][0], _MINUTE) if following[0][0] else upper)
            hi = min(upper, lo + options.max_slice)
            if not late_scanned:
                late_scanned = True
                if watermark is not None and scan_from is not None:
                    await _late_readings(
                        conn, result, scan_from=scan_from, before=lo, horizons=horizons
                    )
                scan_from = current - options.late_scan_margin
            if hi > lo:
                result.minutes += await _execute(conn, _MINUTES_OF_RANGE, {"lo": lo, "hi": hi})
                hour_lo = _floor(lo, _HOUR)
                minute_horizon = horizons.get("readings_1m")
                if minute_horizon is not None:
                    hour_lo = max(hour_lo, _ceil(minute_horizon, _HOUR))
                hour_hi = _ceil(hi, _HOUR)
                if hour_hi > hour_lo:
                    result.hours += await _execute(
                        conn, _HOURS_OF_RANGE, {"lo": hour_lo, "hi": hour_hi}
                    )
            complete = hi if watermark is None else max(watermark, hi)
            await _execute(
                conn,
                _SET_WATERMARK,
                {
                    "complete_before": complete,
                    "scan_from": scan_from,
                    "settled": complete - options.lateness,
                },
            )
            result.slices += 1
            result.complete_before = complete
            start = hi if start is not None else None
        if hi >= upper:
            break
    if result.minutes or result.late_minutes:
        log.info(
            "roll-up: %d minute and %d hour rows written (%d late minutes), complete before %s",
            result.minutes,
            result.hours,
            result.late_minutes,
            result.complete_before,
        )
    return result


async def _late_readings(
    conn: _Conn,
    result: RollupResult,
    *,
    scan_from: datetime,
    before: datetime,
    horizons: dict[str, datetime],
) -> None:
    """Recompute the minutes, and their hours, that readings received late fell in."""
    raw_horizon = horizons.get("readings", _EPOCH)
    # Only the bitmap scan of the BRIN index for this statement (see _LATE_MINUTES).
    await conn.execute("SET LOCAL enable_seqscan = off")
    await conn.execute("SET LOCAL enable_indexscan = off")
    dirty = await _rows(
        conn, _LATE_MINUTES, {"scan_from": scan_from, "before": before, "horizon": raw_horizon}
    )
    await conn.execute("SET LOCAL enable_seqscan = on")
    await conn.execute("SET LOCAL enable_indexscan = on")
    if not dirty:
        return
    result.late_minutes += len(dirty)
    series = [int(s) for s, _ in dirty]
    minutes = [b for _, b in dirty]
    result.minutes += await _execute(conn, _MINUTES_OF_LIST, {"series": series, "buckets": minutes})
    minute_horizon = horizons.get("readings_1m", _EPOCH)
    hours = sorted({(s, _floor(b, _HOUR)) for s, b in dirty if _floor(b, _HOUR) >= minute_horizon})
    if hours:
        result.hours += await _execute(
            conn,
            _HOURS_OF_LIST,
            {"series": [s for s, _ in hours], "buckets": [h for _, h in hours]},
        )
    log.info("roll-up: %d minutes recomputed for late readings", len(dirty))


# ---------------------------------------------------------------- retention


async def apply_retention(
    conn: _Conn,
    options: LifecycleOptions = LifecycleOptions(),
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> RetentionResult:
    """Drop the chunks of raw readings and roll-ups older than their keep period.

    Alerts, alert events and the audit log are not touched (they have no
    retention); neither is the replay sandbox.

    Args:
        conn: An open connection not inside a transaction (any row factory).
        options: The keep periods.
        dry_run: List the chunks that would go; drop nothing.
        now: The current time (default: the database's).

    Returns:
        The chunks dropped (or that would be) and the cutoffs applied.

    Raises:
        StorageUnavailable: The database failed or timed out.
    """
    result = RetentionResult(dry_run=dry_run)
    async with _locked_transaction(conn, RETENTION_LOCK, options, "retention") as locked:
        if not locked:
            result.skipped = True
            return result
        current = now if now is not None else await _db_now(conn)
        settled_rows = await _rows(
            conn, "SELECT settled_before FROM rollup_watermarks WHERE rollup = '1m'"
        )
        # Nothing the roll-ups have not settled is dropped (never ran: nothing).
        settled: datetime = (
            settled_rows[0][0] if settled_rows and settled_rows[0][0] is not None else _EPOCH
        )
        plan = (
            ("readings", options.raw_keep, True),
            ("readings_1m", options.minute_keep, True),
            ("readings_1h", options.hour_keep, False),
        )
        for table, keep, held_back in plan:
            if keep is None:
                continue
            cutoff = current - keep
            if held_back and settled < cutoff:
                log.warning(
                    "retention: %s kept back to %s, what the roll-ups have settled"
                    " (is the maintenance task running?)",
                    table,
                    settled,
                )
                cutoff = settled
            result.cutoffs[table] = cutoff
            chunks = [
                DroppedChunk(table, str(name), start, end)
                for name, start, end in await _rows(conn, _CHUNKS_BEFORE, (table, cutoff))
            ]
            result.chunks.extend(chunks)
            if dry_run or not chunks:
                continue
            await _rows(conn, "SELECT drop_chunks(%s::regclass, older_than => %s)", (table, cutoff))
            await _execute(conn, _RAISE_HORIZON, (table, max(c.range_end for c in chunks)))
            log.info("retention: dropped %d chunks of %s before %s", len(chunks), table, cutoff)
    return result
