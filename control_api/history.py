"""History of series and groups from TimescaleDB: time buckets and streamed CSV.

Three reads, all over the ``readings`` hypertable:

* :func:`series_history`: one series, as raw readings or per time bucket
  (number, min, max, avg of numeric readings; the last state of state series).
* :func:`group_history`: every series of one channel in a domain, district or
  device kind, aggregated per bucket across all of them, with the number of
  devices that reported in each bucket.
* :func:`stream_csv`: either of the above, or raw readings over a long
  range, as CSV chunks in constant memory.

Choosing a bucket (:func:`choose_bucket`). The coarsest bucket needed, from
raw, 1 min, 15 min, 1 h and 1 day, so that one answer holds at most
``max_points`` points (2,000 by default: more than any chart is wide). Raw
readings are served when the range, at the series' reporting period, holds
no more than that many readings: the device's ``expected_period_s`` when the
ingester knows it, else one second (the fastest rate cityops expects), which
makes anything up to 33 minutes raw. A device that sends faster than its
period cannot break the bound: raw readings are fetched with a ``LIMIT`` one
above it, and past it the answer falls back to the bucket the range needs.
Counting the rows first would cost an index scan of the whole range for
every request; this costs nothing when the guess is right. A caller may
force a bucket; one that would make more than ``hard_max_points`` points
(20,000) is refused with :class:`~control_api.errors.InvalidRange`.

Query plans (checked with EXPLAIN in ``tests/control_api/test_history.py``).
Every read of the hypertable is bounded by the range and the series, so
TimescaleDB excludes the chunks outside the range and reads each remaining
chunk through ``(series_id, ts DESC)``. Aggregates are never prepared
(``prepare=False``): each is planned with its own times, which excludes
chunks at plan time and sizes the plan for the range asked; planning costs
about a millisecond against hundreds for a long aggregate. Raw reads are
short and frequent (a live chart polls them) and are left to psycopg's
automatic preparation: a generic plan excludes chunks at executor startup
instead, and saves that millisecond on a read of a few. The bucket width
is a literal, not a parameter: TimescaleDB then knows ``time_bucket`` keeps
the index order and aggregates the ordered scan without a sort. The kind
of a series (numeric or state) is looked up only when an aggregate needs
it. Group aggregates read the group's series ids first (one small join),
then the readings with ``series_id = ANY(ids::integer[])`` (psycopg would
send small ids as ``int2[]``, which the planner estimates worse), so the
plan never depends on how the device tables join to the hypertable; they
aggregate per (bucket, series) first and per bucket after, which gives the
number of reporting devices without a ``count(DISTINCT)`` sort.

CSV. Columns by source: raw ``ts,value,state``; numeric buckets
``bucket_start,readings,min,max,avg``; state buckets
``bucket_start,readings,state``; groups
``bucket_start,readings,min,max,avg,devices`` (``readings`` is the number
of readings in the bucket); lines end in LF. Times are ISO 8601 in UTC with
an explicit ``+00:00`` offset, floats in PostgreSQL's shortest exact form,
empty fields for SQL NULL, and RFC 4180 quoting of states. Lines are
formatted by the server and fetched through a server-side cursor, one chunk
of ``export_rows_per_chunk`` lines per ``FETCH``. Why not ``COPY … TO
STDOUT``: psycopg's async COPY hands over one row per read, and the await
per row costs more than the server's formatting: a 7-day 1 Hz export
(604,800 rows) took 2.6 s through COPY against 1.3 s through the cursor on
an idle machine (``bench/history.py`` measures both). Both stream in
constant memory.

Replay sandbox. With ``run_id`` the same reads use ``replay.series``,
``replay.devices`` and ``replay.readings`` filtered on the run (the unique
index there leads with ``run_id``), never a live table; an unknown run is
:class:`~control_api.errors.RunNotFound`.

Roll-ups (``docs/data-lifecycle.md``). Numeric buckets of live data read
the roll-ups the maintenance task keeps: ``readings_1m`` for 1-minute and
15-minute buckets, ``readings_1h`` for hourly and daily ones. A roll-up row
is used when it lies wholly inside the range and before the roll-ups'
``settled_before`` (the watermark minus the lateness window); the rest of
the range, the partial source bucket at its start and the recent tail,
comes from raw readings aggregated per source bucket, and each answer bucket
combines both parts (sums and counts add, minima and maxima combine), so
the answer equals the raw one and stays correct while the roll-ups lag or
after retention has dropped the raw chunks. Before the first roll-up run,
state series, raw reads and the replay sandbox read raw readings as before.

Transactions and deadlines. Every read runs in ``conn.transaction()`` (its
own transaction, or a savepoint inside the caller's) with ``SET LOCAL
statement_timeout`` from :class:`HistoryLimits`; a timeout or any database
failure becomes :class:`~control_api.errors.HistoryUnavailable`, which names
the configured timeout. The connection's row factory does not matter.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Literal, NamedTuple, TypeAlias, TypeVar

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import args_row, tuple_row

from control_api.errors import (
    HistoryUnavailable,
    InvalidQuery,
    InvalidRange,
    RunNotFound,
    SeriesNotFound,
)

__all__ = [
    "DEFAULT_LIMITS",
    "Bucket",
    "GroupBucket",
    "GroupHistory",
    "GroupSelector",
    "HistoryLimits",
    "Kind",
    "NumericBucket",
    "RawPoint",
    "SeriesHistory",
    "SeriesKey",
    "SeriesRef",
    "StateBucket",
    "choose_bucket",
    "group_history",
    "series_history",
    "stream_csv",
]

_T = TypeVar("_T")
_Conn: TypeAlias = AsyncConnection[Any]
_Params: TypeAlias = Mapping[str, object]


class Bucket(StrEnum):
    """The resolution of a history answer: raw readings or a time bucket."""

    RAW = "raw"
    MINUTE = "1m"
    QUARTER_HOUR = "15m"
    HOUR = "1h"
    DAY = "1d"

    @property
    def width(self) -> timedelta | None:
        """The bucket's width; ``None`` for raw readings."""
        return _WIDTHS[self]


# Finest first: choose_bucket takes the first that fits.
_AGGREGATE_WIDTHS: Final[Mapping[Bucket, timedelta]] = {
    Bucket.MINUTE: timedelta(minutes=1),
    Bucket.QUARTER_HOUR: timedelta(minutes=15),
    Bucket.HOUR: timedelta(hours=1),
    Bucket.DAY: timedelta(days=1),
}
_WIDTHS: Final[Mapping[Bucket, timedelta | None]] = {Bucket.RAW: None, **_AGGREGATE_WIDTHS}
_INTERVALS: Final[Mapping[Bucket, str]] = {
    Bucket.MINUTE: "1 minute",
    Bucket.QUARTER_HOUR: "15 minutes",
    Bucket.HOUR: "1 hour",
    Bucket.DAY: "1 day",
}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


class SeriesKey(NamedTuple):
    """A series addressed by its device and channel instead of its id."""

    device_id: str
    channel: str


SeriesRef: TypeAlias = int | tuple[str, str]
"""A series id, or a ``(device_id, channel)`` pair such as a :class:`SeriesKey`."""

Kind: TypeAlias = Literal["numeric", "state"]
"""What a series holds: numbers (booleans are 1.0 / 0.0) or short state strings."""


@dataclass(frozen=True, slots=True)
class GroupSelector:
    """The series of one channel across the devices of a domain, district or kind.

    Filters left ``None`` match every device.
    """

    channel: str
    domain: str | None = None
    district: str | None = None
    kind: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """Bounds and deadlines of history reads (one per deployment, from settings).

    Attributes:
        max_points: Points per answer that :func:`choose_bucket` aims below.
        hard_max_points: Points a forced bucket (or forced raw) may make at most.
        default_period_s: Reporting period assumed for a series whose device has
            no ``expected_period_s`` (raw readings are served up to
            ``max_points`` of these).
        statement_timeout_s: Server-side deadline of each query; for an export,
            of each chunk's ``FETCH``.
        max_export_range: Longest range a CSV export may cover.
        export_rows_per_chunk: CSV lines fetched and yielded per chunk.
    """

    max_points: int = 2000
    hard_max_points: int = 20_000
    default_period_s: float = 1.0
    statement_timeout_s: float = 10.0
    max_export_range: timedelta = timedelta(days=366)
    export_rows_per_chunk: int = 5000

    def __post_init__(self) -> None:
        if not 1 <= self.max_points <= self.hard_max_points:
            msg = (
                f"need 1 <= max_points <= hard_max_points, got {self.max_points}"
                f" and {self.hard_max_points}"
            )
            raise ValueError(msg)
        if self.default_period_s <= 0 or self.statement_timeout_s <= 0:
            msg = (
                "default_period_s and statement_timeout_s must be positive, got"
                f" {self.default_period_s} and {self.statement_timeout_s}"
            )
            raise ValueError(msg)
        if self.max_export_range <= timedelta(0) or self.export_rows_per_chunk < 1:
            msg = (
                "max_export_range and export_rows_per_chunk must be positive, got"
                f" {self.max_export_range} and {self.export_rows_per_chunk}"
            )
            raise ValueError(msg)


DEFAULT_LIMITS: Final = HistoryLimits()


# Points are named tuples, not dataclasses: an answer holds up to 20,000 of
# them and psycopg builds each one directly from its row.
class RawPoint(NamedTuple):
    """One reading: a number or a state, never both."""

    ts: datetime
    value: float | None
    state: str | None


class NumericBucket(NamedTuple):
    """The numeric readings of one series in one bucket (buckets without any are absent)."""

    start: datetime
    readings: int
    min: float
    max: float
    avg: float


class StateBucket(NamedTuple):
    """The state readings of one series in one bucket: their number and the last state."""

    start: datetime
    readings: int
    state: str


class GroupBucket(NamedTuple):
    """One bucket across a group: readings of all its series and the devices that sent them.

    ``avg`` is the mean of all readings in the bucket (a device that reports
    more often weighs more), not the mean of per-device means.
    """

    start: datetime
    readings: int
    min: float
    max: float
    avg: float
    devices: int


SeriesPoints: TypeAlias = tuple[RawPoint, ...] | tuple[NumericBucket, ...] | tuple[StateBucket, ...]


@dataclass(frozen=True, slots=True)
class SeriesHistory:
    """The history of one series over ``[start, end)``.

    Attributes:
        series_id: The series (its id in the replay sandbox when ``run_id`` is set).
        device_id: Its device.
        channel: Its channel.
        unit: Its unit, if known.
        kind: ``"state"`` when its latest reading before ``end`` is a state, else
            ``"numeric"``. Aggregates read only the readings of this kind.
        bucket: The resolution served, chosen or forced.
        start: Start of the range (inclusive).
        end: End of the range (exclusive).
        run_id: The replay run read, or ``None`` for live data.
        points: :class:`RawPoint` for raw, else :class:`NumericBucket` or
            :class:`StateBucket` by ``kind``; in time order.
    """

    series_id: int
    device_id: str
    channel: str
    unit: str | None
    kind: Kind
    bucket: Bucket
    start: datetime
    end: datetime
    run_id: str | None
    points: SeriesPoints


@dataclass(frozen=True, slots=True)
class GroupHistory:
    """A group aggregate over ``[start, end)``.

    Attributes:
        selector: The channel and filters that define the group.
        bucket: The bucket served.
        start: Start of the range (inclusive).
        end: End of the range (exclusive).
        run_id: The replay run read, or ``None`` for live data.
        devices: Devices in the group (one series each, with or without readings).
        points: Buckets with at least one numeric reading, in time order.
    """

    selector: GroupSelector
    bucket: Bucket
    start: datetime
    end: datetime
    run_id: str | None
    devices: int
    points: tuple[GroupBucket, ...]


# ---------------------------------------------------------------- bucket choice


def _check_range(start: datetime, end: datetime) -> None:
    for name, moment in (("start", start), ("end", end)):
        if moment.tzinfo is None or moment.utcoffset() is None:
            msg = f"{name} {moment.isoformat()} has no UTC offset"
            raise InvalidRange(msg)
    if end <= start:
        msg = f"end {end.isoformat()} is not after start {start.isoformat()}"
        raise InvalidRange(msg)


def _microseconds(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _bucket_count(start: datetime, end: datetime, width: timedelta) -> int:
    """Buckets that ``[start, end)`` touches; time_bucket aligns them to the Unix epoch."""
    # time_bucket's default origin, Monday 2000-01-03 00:00 UTC, is a whole
    # number of days after the epoch: every width here divides a day.
    step = width // _MICROSECOND
    return (_microseconds(end) - 1) // step - _microseconds(start) // step + 1


def choose_bucket(
    start: datetime,
    end: datetime,
    *,
    max_points: int = DEFAULT_LIMITS.max_points,
    period_s: float = DEFAULT_LIMITS.default_period_s,
    allow_raw: bool = True,
) -> Bucket:
    """The coarsest resolution needed to show ``[start, end)`` in ``max_points`` points.

    Raw readings when the range holds at most ``max_points`` readings at one
    per ``period_s``; else the finest of 1 min, 15 min, 1 h and 1 day that
    makes at most ``max_points`` buckets.

    Args:
        start: Start of the range, with a UTC offset (inclusive).
        end: End of the range, with a UTC offset (exclusive).
        max_points: The most points the answer may hold.
        period_s: The series' reporting period, in seconds.
        allow_raw: ``False`` for a group aggregate, which always needs a bucket.

    Returns:
        The bucket.

    Raises:
        InvalidRange: A naive or empty range, ``max_points`` below 1, or a range
            that needs more than ``max_points`` daily buckets.
    """
    _check_range(start, end)
    if max_points < 1:
        msg = f"max_points must be at least 1, not {max_points}"
        raise InvalidRange(msg)
    span = end - start
    if allow_raw and period_s > 0 and span.total_seconds() / period_s <= max_points:
        return Bucket.RAW
    for bucket, width in _AGGREGATE_WIDTHS.items():
        if _bucket_count(start, end, width) <= max_points:
            return bucket
    days = _bucket_count(start, end, timedelta(days=1))
    msg = (
        f"the range from {start.isoformat()} to {end.isoformat()} needs {days} daily"
        f" buckets, more than the {max_points} points served: shorten the range"
    )
    raise InvalidRange(msg)


def _check_forced(start: datetime, end: datetime, bucket: Bucket, limits: HistoryLimits) -> None:
    width = bucket.width
    if width is None:
        return
    count = _bucket_count(start, end, width)
    if count > limits.hard_max_points:
        msg = (
            f"{bucket.value} buckets from {start.isoformat()} to {end.isoformat()} make"
            f" {count} points, more than the limit of {limits.hard_max_points}:"
            " choose a coarser bucket or a shorter range"
        )
        raise InvalidRange(msg)


def _target_points(max_points: int | None, limits: HistoryLimits) -> int:
    if max_points is None:
        return limits.max_points
    if not 1 <= max_points <= limits.hard_max_points:
        msg = f"max_points must be between 1 and {limits.hard_max_points}, not {max_points}"
        raise InvalidRange(msg)
    return max_points


# ---------------------------------------------------------------- SQL


@dataclass(frozen=True, slots=True)
class _Namespace:
    """The live tables, or the replay sandbox restricted to one run."""

    run_id: str | None

    def table(self, name: str) -> sql.Composable:
        if self.run_id is None:
            return sql.Identifier(name)
        return sql.Identifier("replay", name)

    def run_filter(self, alias: str = "") -> sql.Composable:
        if self.run_id is None:
            return sql.SQL("")
        column = sql.Identifier(alias, "run_id") if alias else sql.Identifier("run_id")
        return sql.SQL(" AND {} = %(run_id)s").format(column)

    @property
    def where(self) -> str:
        return "the live tables" if self.run_id is None else f"replay run {self.run_id!r}"


_RESOLVE_SERIES: Final = """
SELECT s.id, s.device_id, s.channel, s.unit, {period} AS period_s
FROM {series} s JOIN {devices} d ON d.id = s.device_id
WHERE {match}
"""
# A series' kind is the kind of its latest reading before the end of the range.
_KIND: Final = """
SELECT state IS NOT NULL FROM {readings}
WHERE series_id = %(series_id)s{run} AND ts < %(end)s
ORDER BY ts DESC LIMIT 1
"""
_RAW: Final = """
SELECT ts, value, state FROM {readings}
WHERE series_id = %(series_id)s{run} AND ts >= %(start)s AND ts < %(end)s
ORDER BY ts{limit}
"""
_NUMERIC: Final = """
SELECT time_bucket({width}, ts) AS bucket_start,
       count(*) AS readings, min(value) AS min, max(value) AS max, avg(value) AS avg
FROM {readings}
WHERE series_id = %(series_id)s{run} AND ts >= %(start)s AND ts < %(end)s
  AND value IS NOT NULL
GROUP BY bucket_start ORDER BY bucket_start
"""
_STATE: Final = """
SELECT time_bucket({width}, ts) AS bucket_start, count(*) AS readings, last(state, ts) AS state
FROM {readings}
WHERE series_id = %(series_id)s{run} AND ts >= %(start)s AND ts < %(end)s
  AND state IS NOT NULL
GROUP BY bucket_start ORDER BY bucket_start
"""
_RESOLVE_GROUP: Final = """
SELECT coalesce(array_agg(s.id ORDER BY s.id), '{{}}') FROM {series} s
JOIN {devices} d ON d.id = s.device_id
WHERE s.channel = %(channel)s{filters}
"""
_GROUP: Final = """
SELECT bucket_start, sum(n)::bigint AS readings, min(lo) AS min, max(hi) AS max,
       sum(total) / sum(n)::float8 AS avg, count(*) AS devices
FROM (
    SELECT time_bucket({width}, ts) AS bucket_start, series_id,
           count(*) AS n, min(value) AS lo, max(value) AS hi, sum(value) AS total
    FROM {readings}
    WHERE series_id = ANY(%(series_ids)s::integer[]){run} AND ts >= %(start)s AND ts < %(end)s
      AND value IS NOT NULL
    GROUP BY 1, 2
) AS per_series
GROUP BY bucket_start ORDER BY bucket_start
"""
# Roll-ups (module docstring): whole source buckets in [rollup_from, rollup_to)
# from the roll-up table, the rest of [start, end) from raw readings
# aggregated per source bucket; a display bucket combines the parts.
_ROLLUP_PARTS: Final = """
    SELECT bucket AS b, series_id, readings AS n, min AS lo, max AS hi, sum AS total
    FROM {rollup}
    WHERE {series} AND bucket >= %(rollup_from)s AND bucket < %(rollup_to)s
    UNION ALL
    SELECT time_bucket({source}, ts), series_id, count(*), min(value), max(value), sum(value)
    FROM readings
    WHERE {series} AND ts >= %(start)s AND ts < %(rollup_from)s AND value IS NOT NULL
    GROUP BY 1, 2
    UNION ALL
    SELECT time_bucket({source}, ts), series_id, count(*), min(value), max(value), sum(value)
    FROM readings
    WHERE {series} AND ts >= %(rollup_to)s AND ts < %(end)s AND value IS NOT NULL
    GROUP BY 1, 2
"""
_NUMERIC_ROLLUP: Final = (
    """
SELECT time_bucket({width}, b) AS bucket_start, sum(n)::bigint AS readings,
       min(lo) AS min, max(hi) AS max, sum(total) / sum(n)::float8 AS avg
FROM ("""
    + _ROLLUP_PARTS
    + """) AS parts
GROUP BY bucket_start ORDER BY bucket_start
"""
)
_GROUP_ROLLUP: Final = (
    """
SELECT bucket_start, sum(n)::bigint AS readings, min(lo) AS min, max(hi) AS max,
       sum(total) / sum(n)::float8 AS avg, count(*) AS devices
FROM (
    SELECT time_bucket({width}, b) AS bucket_start, series_id,
           sum(n) AS n, min(lo) AS lo, max(hi) AS hi, sum(total) AS total
    FROM ("""
    + _ROLLUP_PARTS
    + """) AS parts
    GROUP BY 1, 2
) AS per_series
GROUP BY bucket_start ORDER BY bucket_start
"""
)
_SETTLED: Final = "SELECT settled_before FROM rollup_watermarks WHERE rollup = '1m'"
# The roll-up a bucket reads: its table and the width of its rows.
_ROLLUPS: Final[Mapping[Bucket, tuple[str, timedelta]]] = {
    Bucket.MINUTE: ("readings_1m", timedelta(minutes=1)),
    Bucket.QUARTER_HOUR: ("readings_1m", timedelta(minutes=1)),
    Bucket.HOUR: ("readings_1h", timedelta(hours=1)),
    Bucket.DAY: ("readings_1h", timedelta(hours=1)),
}
_RUN_EXISTS: Final = "SELECT EXISTS (SELECT 1 FROM replay.runs WHERE run_id = %(run_id)s)"
_SESSION: Final = (
    "SELECT set_config('statement_timeout', %(timeout)s, true),"
    " set_config('DateStyle', 'ISO, YMD', true)"
)


def _query(template: str, ns: _Namespace, **parts: sql.Composable) -> sql.Composed:
    return sql.SQL(template).format(
        readings=ns.table("readings"),
        series=ns.table("series"),
        devices=ns.table("devices"),
        run=ns.run_filter(),
        **parts,
    )


def _width(bucket: Bucket) -> sql.Composable:
    return sql.SQL("{}::interval").format(sql.Literal(_INTERVALS[bucket]))


def _series_query(
    ns: _Namespace, bucket: Bucket, kind: Kind = "numeric", *, limit: int | None = None
) -> sql.Composed:
    """The query of one series' points (raw, or buckets of ``kind``)."""
    if bucket is Bucket.RAW:
        limit_sql = sql.SQL(" LIMIT {}").format(limit) if limit is not None else sql.SQL("")
        return _query(_RAW, ns, limit=limit_sql)
    template = _STATE if kind == "state" else _NUMERIC
    return _query(template, ns, width=_width(bucket))


def _group_query(ns: _Namespace, bucket: Bucket) -> sql.Composed:
    """The query of a group's buckets (given its series ids)."""
    return _query(_GROUP, ns, width=_width(bucket))


def _rollup_query(bucket: Bucket, *, group: bool) -> sql.Composed:
    """The query of a live series' (or group's) numeric buckets over the roll-ups."""
    table, source = _ROLLUPS[bucket]
    series = "series_id = ANY(%(series_ids)s::integer[])" if group else "series_id = %(series_id)s"
    return sql.SQL(_GROUP_ROLLUP if group else _NUMERIC_ROLLUP).format(
        width=_width(bucket),
        rollup=sql.Identifier(table),
        source=sql.SQL("{}::interval").format(sql.Literal(f"{source.total_seconds():g} seconds")),
        series=sql.SQL(series),
    )


def _floor(moment: datetime, width: timedelta) -> datetime:
    return moment - (moment - _EPOCH) % width


async def _rollup_span(
    conn: _Conn, ns: _Namespace, bucket: Bucket, start: datetime, end: datetime
) -> tuple[datetime, datetime] | None:
    """Where the roll-up serves ``[start, end)``: its whole rows before the settled time."""
    if ns.run_id is not None or bucket is Bucket.RAW:
        return None
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(_SETTLED)
        row = await cur.fetchone()
    if row is None or row[0] is None:
        return None
    _, width = _ROLLUPS[bucket]
    first = _floor(start, width)
    rollup_from = first if first == start else first + width
    rollup_to = _floor(min(end, row[0]), width)
    if rollup_to <= rollup_from:
        return None
    return rollup_from, rollup_to


async def _numeric_query(
    conn: _Conn,
    ns: _Namespace,
    bucket: Bucket,
    params: dict[str, object],
    *,
    start: datetime,
    end: datetime,
    group: bool,
) -> sql.Composed:
    """The numeric bucket query of ``[start, end)``: over the roll-ups where they serve.

    Adds the roll-up's span to ``params`` when it serves.
    """
    span = await _rollup_span(conn, ns, bucket, start, end)
    if span is None:
        return _group_query(ns, bucket) if group else _series_query(ns, bucket)
    params["rollup_from"], params["rollup_to"] = span
    return _rollup_query(bucket, group=group)


# CSV lines are formatted by the server (see the module docstring). Times:
# DateStyle ISO (set per transaction) prints "2026-01-01 00:00:00.25" for a
# timestamp in UTC; the space becomes the ISO 8601 "T" and the offset is added.
def _csv_time(column: str) -> str:
    return f"replace(({column} AT TIME ZONE 'UTC')::text, ' ', 'T') || '+00:00'"


def _csv_number(column: str) -> str:
    return f"coalesce({column}::text, '')"


def _csv_text(column: str) -> str:
    # RFC 4180: quote a field holding a quote, comma or line break, doubling
    # quotes; an empty string is quoted too, to tell it from NULL.
    return (
        f"coalesce(CASE WHEN {column} = '' OR {column} ~ '[\",\\r\\n]'"
        f" THEN '\"' || replace({column}, '\"', '\"\"') || '\"' ELSE {column} END, '')"
    )


_CSV_COLUMNS: Final[Mapping[str, tuple[tuple[str, Callable[[str], str]], ...]]] = {
    "raw": (("ts", _csv_time), ("value", _csv_number), ("state", _csv_text)),
    "numeric": (
        ("bucket_start", _csv_time),
        ("readings", _csv_number),
        ("min", _csv_number),
        ("max", _csv_number),
        ("avg", _csv_number),
    ),
    "state": (("bucket_start", _csv_time), ("readings", _csv_number), ("state", _csv_text)),
    "group": (
        ("bucket_start", _csv_time),
        ("readings", _csv_number),
        ("min", _csv_number),
        ("max", _csv_number),
        ("avg", _csv_number),
        ("devices", _csv_number),
    ),
}


def _csv_query(inner: sql.Composed, layout: str) -> tuple[sql.Composed, bytes]:
    """Wrap ``inner`` so each row is one CSV line; also return the header line."""
    columns = _CSV_COLUMNS[layout]
    line = " || ',' || ".join(fmt(f"q.{name}") for name, fmt in columns)
    order = columns[0][0]
    query = sql.SQL("SELECT {line} || E'\\n' FROM ({inner}) AS q ORDER BY q.{order}").format(
        line=sql.SQL(line), inner=inner, order=sql.Identifier(order)
    )
    header = (",".join(name for name, _ in columns) + "\n").encode()
    return query, header


# ---------------------------------------------------------------- database access


@contextlib.asynccontextmanager
async def _read_transaction(conn: _Conn, limits: HistoryLimits, what: str) -> AsyncIterator[None]:
    """A transaction (or savepoint) with the history deadline; database errors translated."""
    timeout = f"{max(1, round(limits.statement_timeout_s * 1000))}ms"
    try:
        async with conn.transaction():
            # SET LOCAL: both settings end with the transaction, so a pooled
            # connection goes back as it came (inside a caller's transaction,
            # they last until that one ends).
            await conn.execute(_SESSION, {"timeout": timeout})
            yield
    except psycopg.Error as exc:
        # QueryCanceled is also what an administrator's pg_cancel_backend raises.
        if isinstance(exc, psycopg.errors.QueryCanceled) and "statement timeout" in str(exc):
            msg = f"{what} exceeded the statement timeout of {limits.statement_timeout_s:g} s"
        else:
            msg = f"{what} failed: {exc}"
        raise HistoryUnavailable(msg) from exc


async def _fetch(
    conn: _Conn,
    query: sql.Composed,
    params: _Params,
    row: Callable[..., _T],
    *,
    prepare: bool | None = False,
) -> list[_T]:
    # prepare=False by default: planned with its own times (module docstring).
    async with conn.cursor(row_factory=args_row(row)) as cur:
        await cur.execute(query, params, prepare=prepare)
        return await cur.fetchall()


async def _fetch_raw(conn: _Conn, query: sql.Composed, params: _Params) -> list[RawPoint]:
    # tuple rows are built in C; RawPoint._make is one call per row where
    # args_row makes two (this is the path of up to 20,000 rows).
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query, params, prepare=None)
        return list(map(RawPoint._make, await cur.fetchall()))


class _SeriesInfo(NamedTuple):
    series_id: int
    device_id: str
    channel: str
    unit: str | None
    period_s: float | None


async def _series_kind(conn: _Conn, ns: _Namespace, series_id: int, end: datetime) -> Kind:
    """Numeric unless the latest reading before ``end`` is a state (no readings: numeric)."""
    params = {"series_id": series_id, "end": end, "run_id": ns.run_id}
    rows = await _fetch(conn, _query(_KIND, ns), params, bool)
    return "state" if rows and rows[0] else "numeric"


def _describe(series: SeriesRef) -> str:
    if isinstance(series, int):
        return f"series {series}"
    device_id, channel = series
    return f"series {device_id!r}/{channel!r}"


async def _check_run(conn: _Conn, ns: _Namespace) -> None:
    if ns.run_id is None:
        return
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(_RUN_EXISTS, {"run_id": ns.run_id})
        row = await cur.fetchone()
    if row is None or not row[0]:
        msg = f"no replay run {ns.run_id!r}"
        raise RunNotFound(msg)


async def _resolve_series(conn: _Conn, ns: _Namespace, series: SeriesRef) -> _SeriesInfo:
    params: dict[str, object] = {}
    if isinstance(series, int):
        match = sql.SQL("s.id = %(series_id)s")
        params["series_id"] = series
    else:
        device_id, channel = series
        match = sql.SQL("s.device_id = %(device_id)s AND s.channel = %(channel)s")
        params.update(device_id=device_id, channel=channel)
    # The replay sandbox does not learn reporting periods.
    period = sql.SQL("d.expected_period_s" if ns.run_id is None else "NULL::float8")
    query = _query(_RESOLVE_SERIES, ns, period=period, match=match)
    rows = await _fetch(conn, query, params, _SeriesInfo, prepare=None)
    if not rows:
        msg = f"no {_describe(series)} in {ns.where}"
        raise SeriesNotFound(msg)
    return rows[0]


def _period(info: _SeriesInfo, limits: HistoryLimits) -> float:
    if info.period_s is not None and info.period_s > 0:
        return info.period_s
    return limits.default_period_s


async def _resolve_group(conn: _Conn, ns: _Namespace, selector: GroupSelector) -> list[int]:
    filters: list[sql.Composable] = []
    params: dict[str, object] = {"channel": selector.channel}
    for name in ("domain", "district", "kind"):
        value = getattr(selector, name)
        if value is not None:
            filters.append(
                sql.SQL(" AND {} = {}").format(sql.Identifier("d", name), sql.Placeholder(name))
            )
            params[name] = value
    query = _query(_RESOLVE_GROUP, ns, filters=sql.Composed(filters))
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query, params, prepare=None)
        row = await cur.fetchone()
    return list(row[0]) if row is not None else []


def _check_group(selector: GroupSelector, bucket: Bucket | None, run_id: str | None) -> None:
    if bucket is Bucket.RAW:
        msg = (
            f"a group aggregate of channel {selector.channel!r} needs a time bucket:"
            " raw readings are served per series"
        )
        raise InvalidQuery(msg)
    if run_id is not None and selector.kind is not None:
        msg = (
            f"the replay sandbox records no device kind: filter run {run_id!r}"
            " by domain or district instead"
        )
        raise InvalidQuery(msg)


# ---------------------------------------------------------------- public reads


async def series_history(
    conn: _Conn,
    series: SeriesRef,
    start: datetime,
    end: datetime,
    bucket: Bucket | None = None,
    *,
    run_id: str | None = None,
    max_points: int | None = None,
    limits: HistoryLimits = DEFAULT_LIMITS,
) -> SeriesHistory:
    """The history of one series over ``[start, end)``.

    Args:
        conn: An open connection (any row factory), e.g. borrowed from the
            API's pool for this call.
        series: The series id, or a ``(device_id, channel)`` pair.
        start: Start of the range, with a UTC offset (inclusive).
        end: End of the range, with a UTC offset (exclusive).
        bucket: The resolution to serve; ``None`` chooses one (module docstring).
        run_id: Read this replay run in the sandbox instead of live data.
        max_points: Points to aim below when choosing (default
            ``limits.max_points``, at most ``limits.hard_max_points``).
        limits: Bounds and the statement timeout.

    Returns:
        The series, the resolution served and its points (possibly none).

    Raises:
        InvalidRange: A naive or empty range, a range too long for daily
            buckets, or a forced resolution over ``limits.hard_max_points``.
        SeriesNotFound: No such series (``RunNotFound``: no such replay run).
        HistoryUnavailable: The database failed or timed out.
    """
    _check_range(start, end)
    target = _target_points(max_points, limits)
    forced = bucket is not None
    if bucket is not None:
        _check_forced(start, end, bucket, limits)
    ns = _Namespace(run_id)
    params: dict[str, object] = {"start": start, "end": end, "run_id": run_id}
    async with _read_transaction(conn, limits, f"history of {_describe(series)}"):
        await _check_run(conn, ns)
        info = await _resolve_series(conn, ns, series)
        params["series_id"] = info.series_id
        if bucket is None:
            bucket = choose_bucket(start, end, max_points=target, period_s=_period(info, limits))
        kind: Kind | None = None
        points: SeriesPoints | None = None
        if bucket is Bucket.RAW:
            cap = limits.hard_max_points if forced else target
            raw = await _fetch_raw(conn, _series_query(ns, bucket, limit=cap + 1), params)
            if len(raw) <= cap:
                points = tuple(raw)
                if raw:  # the last is the latest reading before the end
                    kind = "numeric" if raw[-1].state is None else "state"
            elif forced:
                msg = (
                    f"{_describe(series)} has more than {cap} readings from"
                    f" {start.isoformat()} to {end.isoformat()}: choose a time bucket"
                )
                raise InvalidRange(msg)
            else:  # the device reports faster than its period: bucket instead
                bucket = choose_bucket(start, end, max_points=target, allow_raw=False)
        if kind is None:
            kind = await _series_kind(conn, ns, info.series_id, end)
        if points is None:
            if kind == "state":
                query = _series_query(ns, bucket, kind)
                points = tuple(await _fetch(conn, query, params, StateBucket))
            else:
                query = await _numeric_query(
                    conn, ns, bucket, params, start=start, end=end, group=False
                )
                points = tuple(await _fetch(conn, query, params, NumericBucket))
    return SeriesHistory(
        series_id=info.series_id,
        device_id=info.device_id,
        channel=info.channel,
        unit=info.unit,
        kind=kind,
        bucket=bucket,
        start=start,
        end=end,
        run_id=run_id,
        points=points,
    )


async def group_history(
    conn: _Conn,
    *,
    channel: str,
    start: datetime,
    end: datetime,
    domain: str | None = None,
    district: str | None = None,
    kind: str | None = None,
    bucket: Bucket | None = None,
    run_id: str | None = None,
    max_points: int | None = None,
    limits: HistoryLimits = DEFAULT_LIMITS,
) -> GroupHistory:
    """Per-bucket aggregate of one channel across a group of devices.

    Every device (of the domain, district and kind given) that has a series
    of ``channel`` belongs to the group; each bucket aggregates the numeric
    readings of all of them and counts the devices that reported in it.

    Args:
        conn: An open connection (any row factory).
        channel: The channel aggregated, e.g. ``"intensity"``.
        start: Start of the range, with a UTC offset (inclusive).
        end: End of the range, with a UTC offset (exclusive).
        domain: Only devices of this domain.
        district: Only devices of this district.
        kind: Only devices of this kind (live data only).
        bucket: The bucket; ``None`` chooses one (never raw).
        run_id: Read this replay run in the sandbox instead of live data.
        max_points: Points to aim below when choosing (default
            ``limits.max_points``, at most ``limits.hard_max_points``).
        limits: Bounds and the statement timeout.

    Returns:
        The aggregate; a group without devices has ``devices == 0`` and no points.

    Raises:
        InvalidRange: A naive or empty range, a range too long for daily
            buckets, or a forced bucket over ``limits.hard_max_points``.
        InvalidQuery: A raw bucket, or ``kind`` with ``run_id``.
        RunNotFound: No such replay run.
        HistoryUnavailable: The database failed or timed out.
    """
    selector = GroupSelector(channel=channel, domain=domain, district=district, kind=kind)
    _check_range(start, end)
    _check_group(selector, bucket, run_id)
    target = _target_points(max_points, limits)
    if bucket is None:
        bucket = choose_bucket(start, end, max_points=target, allow_raw=False)
    else:
        _check_forced(start, end, bucket, limits)
    ns = _Namespace(run_id)
    async with _read_transaction(conn, limits, f"history of channel {channel!r}"):
        await _check_run(conn, ns)
        series_ids = await _resolve_group(conn, ns, selector)
        points: tuple[GroupBucket, ...] = ()
        if series_ids:
            params: dict[str, object] = {
                "series_ids": series_ids,
                "start": start,
                "end": end,
                "run_id": run_id,
            }
            query = await _numeric_query(conn, ns, bucket, params, start=start, end=end, group=True)
            points = tuple(await _fetch(conn, query, params, GroupBucket))
    return GroupHistory(
        selector=selector,
        bucket=bucket,
        start=start,
        end=end,
        run_id=run_id,
        devices=len(series_ids),
        points=points,
    )


def stream_csv(
    conn: _Conn,
    source: SeriesRef | GroupSelector,
    start: datetime,
    end: datetime,
    bucket: Bucket | None = None,
    *,
    run_id: str | None = None,
    limits: HistoryLimits = DEFAULT_LIMITS,
) -> AsyncGenerator[bytes, None]:
    """Export a series or a group over ``[start, end)`` as CSV, in constant memory.

    The range is checked now; the source is looked up when iteration starts.
    The first chunk is the header line alone and comes after that lookup, so
    ``await anext(chunks)`` before sending a response surfaces every error
    but a failure mid-stream. Each further chunk holds up to
    ``limits.export_rows_per_chunk`` lines. The export holds a transaction on
    ``conn`` until it ends: iterate it to the end or close it
    (``contextlib.aclosing``), which cancels the rest.

    Args:
        conn: An open connection (any row factory), held for the whole export.
        source: A series id, a ``(device_id, channel)`` pair or a
            :class:`GroupSelector`.
        start: Start of the range, with a UTC offset (inclusive).
        end: End of the range, with a UTC offset (exclusive).
        bucket: ``None`` exports a series' raw readings and a group in the
            bucket :func:`choose_bucket` picks; no point limit applies.
        run_id: Read this replay run in the sandbox instead of live data.
        limits: Export range limit, chunk size and the per-chunk timeout.

    Returns:
        The CSV as chunks of UTF-8 bytes, every line ending in LF.

    Raises:
        InvalidRange: A naive or empty range, or one longer than
            ``limits.max_export_range`` (raised by this call).
        InvalidQuery: A raw group export, or ``kind`` with ``run_id`` (raised
            by this call).
        SeriesNotFound: No such series or run (raised by the first chunk).
        HistoryUnavailable: The database failed or timed out (from any chunk).
    """
    _check_range(start, end)
    if end - start > limits.max_export_range:
        days = (end - start) / timedelta(days=1)
        limit_days = limits.max_export_range / timedelta(days=1)
        msg = f"an export of {days:g} days exceeds the limit of {limit_days:g} days"
        raise InvalidRange(msg)
    if isinstance(source, GroupSelector):
        _check_group(source, bucket, run_id)
        if bucket is None:
            bucket = choose_bucket(start, end, max_points=limits.max_points, allow_raw=False)
    return _stream_csv(conn, source, start, end, bucket or Bucket.RAW, run_id, limits)


async def _stream_csv(  # noqa: PLR0917 (private, called once)
    conn: _Conn,
    source: SeriesRef | GroupSelector,
    start: datetime,
    end: datetime,
    bucket: Bucket,
    run_id: str | None,
    limits: HistoryLimits,
) -> AsyncGenerator[bytes, None]:
    ns = _Namespace(run_id)
    params: dict[str, object] = {"start": start, "end": end, "run_id": run_id}
    what = (
        f"export of channel {source.channel!r}"
        if isinstance(source, GroupSelector)
        else f"export of {_describe(source)}"
    )
    async with _read_transaction(conn, limits, what):
        await _check_run(conn, ns)
        if isinstance(source, GroupSelector):
            params["series_ids"] = await _resolve_group(conn, ns, source)
            inner = await _numeric_query(conn, ns, bucket, params, start=start, end=end, group=True)
            query, header = _csv_query(inner, "group")
        else:
            info = await _resolve_series(conn, ns, source)
            params["series_id"] = info.series_id
            if bucket is Bucket.RAW:
                query, header = _csv_query(_series_query(ns, bucket), "raw")
            else:
                kind = await _series_kind(conn, ns, info.series_id, end)
                if kind == "state":
                    inner = _series_query(ns, bucket, kind)
                else:
                    inner = await _numeric_query(
                        conn, ns, bucket, params, start=start, end=end, group=False
                    )
                query, header = _csv_query(inner, kind)
        yield header
        # A server-side cursor: the server keeps the result, each FETCH brings
        # one chunk; the name only has to be unique on this connection.
        name = f"cityops_history_{uuid.uuid4().hex}"
        async with conn.cursor(name=name, row_factory=tuple_row) as cursor:
            await cursor.execute(query, params)
            while rows := await cursor.fetchmany(limits.export_rows_per_chunk):
                yield "".join([row[0] for row in rows]).encode()
