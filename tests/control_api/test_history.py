"""History reads against the real TimescaleDB: buckets, groups, CSV, the replay sandbox.

Aggregates are checked against numpy over the same generated readings; every
test has its own migrated database (``database_url``).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import AsyncConnection, sql

from control_api.errors import (
    HistoryUnavailable,
    InvalidQuery,
    InvalidRange,
    RunNotFound,
    SeriesNotFound,
)
from control_api.history import (
    Bucket,
    GroupBucket,
    GroupSelector,
    HistoryLimits,
    NumericBucket,
    RawPoint,
    SeriesKey,
    StateBucket,
    _group_query,  # white-box: the plan test EXPLAINs the module's own SQL
    _Namespace,
    _series_query,
    choose_bucket,
    group_history,
    series_history,
    stream_csv,
)

Conn = AsyncConnection[Any]
Row = tuple[datetime, float | None, str | None]

T0 = datetime(2026, 3, 2, tzinfo=UTC)  # midnight: aligned to every bucket
WIDTHS = {
    Bucket.MINUTE: timedelta(minutes=1),
    Bucket.QUARTER_HOUR: timedelta(minutes=15),
    Bucket.HOUR: timedelta(hours=1),
    Bucket.DAY: timedelta(days=1),
}


# ------------------------------------------------------------------ helpers


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Conn]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        yield conn


async def add_device(
    conn: Conn,
    device_id: str,
    *,
    domain: str = "traffic",
    district: str = "chuo",
    kind: str | None = "loop",
    period_s: float | None = None,
    replay: bool = False,
) -> None:
    if replay:
        await conn.execute(
            "INSERT INTO replay.devices (id, domain, district) VALUES (%s, %s, %s)",
            (device_id, domain, district),
        )
    else:
        await conn.execute(
            "INSERT INTO devices (id, domain, district, kind, expected_period_s)"
            " VALUES (%s, %s, %s, %s, %s)",
            (device_id, domain, district, kind, period_s),
        )


async def add_series(
    conn: Conn, device_id: str, channel: str, *, unit: str | None = None, replay: bool = False
) -> int:
    table = sql.Identifier("replay", "series") if replay else sql.Identifier("series")
    cur = await conn.execute(
        sql.SQL(
            "INSERT INTO {} (device_id, channel, unit) VALUES (%s, %s, %s) RETURNING id"
        ).format(table),
        (device_id, channel, unit),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def add_readings(
    conn: Conn, series_id: int, rows: Iterable[Row], *, run_id: str | None = None
) -> None:
    cur = conn.cursor()
    if run_id is None:
        statement = "COPY readings (ts, series_id, value, state, received_at) FROM STDIN"
    else:
        statement = (
            "COPY replay.readings (run_id, ts, series_id, value, state, received_at) FROM STDIN"
        )
    async with cur.copy(statement) as copy:
        for ts, value, state in rows:
            head = () if run_id is None else (run_id,)
            await copy.write_row((*head, ts, series_id, value, state, ts))


async def device_with_series(
    conn: Conn, device_id: str, channel: str = "intensity", **device: Any
) -> int:
    await add_device(conn, device_id, **device)
    return await add_series(conn, device_id, channel)


def random_rows(
    seed: int, start: datetime, span: timedelta, n: int
) -> list[tuple[datetime, float | None, str | None]]:
    """``n`` numeric readings at distinct random microseconds in ``[start, start + span)``."""
    rng = np.random.default_rng(seed)
    offsets = rng.choice(span // timedelta(microseconds=1), size=n, replace=False)
    values = rng.normal(50.0, 20.0, size=n)
    return sorted(
        (start + timedelta(microseconds=int(o)), float(v), None)
        for o, v in zip(offsets, values, strict=True)
    )


def expected_buckets(
    rows: Sequence[tuple[datetime, float]], start: datetime, end: datetime, width: timedelta
) -> dict[datetime, tuple[int, float, float, float]]:
    """Per bucket start: (count, min, max, mean), computed with numpy."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    us = timedelta(microseconds=1)
    picked = [(ts, v) for ts, v in rows if start <= ts < end]
    if not picked:
        return {}
    keys = np.array([(ts - epoch) // us // (width // us) for ts, _ in picked])
    values = np.array([v for _, v in picked])
    out: dict[datetime, tuple[int, float, float, float]] = {}
    for key in np.unique(keys):
        group = values[keys == key]
        bucket_start = epoch + int(key) * width
        out[bucket_start] = (len(group), group.min(), group.max(), group.mean())
    return out


def parse_csv(chunks: Sequence[bytes]) -> list[list[str]]:
    return list(csv.reader(io.StringIO(b"".join(chunks).decode())))


async def collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in chunks]


# ------------------------------------------------------------------ choose_bucket (pure)


def test_raw_up_to_max_points_readings_at_the_period() -> None:
    assert choose_bucket(T0, T0 + timedelta(seconds=2000)) is Bucket.RAW
    assert choose_bucket(T0, T0 + timedelta(seconds=2001)) is Bucket.MINUTE
    # A device that reports every minute is served raw for 2000 minutes.
    assert choose_bucket(T0, T0 + timedelta(minutes=2000), period_s=60) is Bucket.RAW
    assert choose_bucket(T0, T0 + timedelta(minutes=2001), period_s=60) is Bucket.QUARTER_HOUR
    assert choose_bucket(T0, T0 + timedelta(seconds=10), allow_raw=False) is Bucket.MINUTE


@pytest.mark.parametrize(
    ("bucket", "coarser"),
    [
        (Bucket.MINUTE, Bucket.QUARTER_HOUR),
        (Bucket.QUARTER_HOUR, Bucket.HOUR),
        (Bucket.HOUR, Bucket.DAY),
    ],
)
def test_each_bucket_up_to_max_points_buckets(bucket: Bucket, coarser: Bucket) -> None:
    width = WIDTHS[bucket]
    end = T0 + 2000 * width
    assert choose_bucket(T0, end, allow_raw=False) is bucket
    assert choose_bucket(T0, end + timedelta(microseconds=1), allow_raw=False) is coarser
    # Buckets are aligned to the epoch: an unaligned range touches one more.
    shifted = T0 + width / 2
    assert choose_bucket(shifted, shifted + 1999 * width, allow_raw=False) is bucket
    assert choose_bucket(shifted, shifted + 2000 * width, allow_raw=False) is coarser
    assert choose_bucket(T0, T0 + 10 * width, max_points=10, allow_raw=False) is bucket
    assert choose_bucket(T0, T0 + 11 * width, max_points=10, allow_raw=False) is coarser


def test_a_range_beyond_max_points_days_is_refused_with_its_numbers() -> None:
    assert choose_bucket(T0, T0 + timedelta(days=2000)) is Bucket.DAY
    with pytest.raises(InvalidRange, match=r"needs 2001 daily buckets, more than the 2000 points"):
        choose_bucket(T0, T0 + timedelta(days=2001))
    with pytest.raises(InvalidRange, match="max_points must be at least 1, not 0"):
        choose_bucket(T0, T0 + timedelta(days=1), max_points=0)


def test_invalid_ranges_are_refused() -> None:
    with pytest.raises(InvalidRange, match="is not after start"):
        choose_bucket(T0, T0)
    with pytest.raises(InvalidRange, match=r"end 2026-03-01T00:00:00\+00:00 is not after"):
        choose_bucket(T0, T0 - timedelta(days=1))
    with pytest.raises(InvalidRange, match="start 2026-03-02T00:00:00 has no UTC offset"):
        choose_bucket(T0.replace(tzinfo=None), T0 + timedelta(hours=1))


def test_limits_reject_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="max_points <= hard_max_points"):
        HistoryLimits(max_points=30_000)
    with pytest.raises(ValueError, match="must be positive"):
        HistoryLimits(statement_timeout_s=0)
    with pytest.raises(ValueError, match="must be positive"):
        HistoryLimits(export_rows_per_chunk=0)


# ------------------------------------------------------------------ one series


async def test_numeric_buckets_match_numpy(db: Conn) -> None:
    sid = await device_with_series(db, "loop-1")
    other = await device_with_series(db, "loop-2")
    rows = random_rows(1, T0, timedelta(days=2), 6000)
    await add_readings(db, sid, rows)
    await add_readings(db, other, random_rows(2, T0, timedelta(days=2), 500))
    numeric = [(ts, v) for ts, v, _ in rows if v is not None]
    # Unaligned ends: the first and last buckets are partial.
    start, end = T0 + timedelta(hours=3, seconds=17), T0 + timedelta(days=1, hours=20, minutes=7)
    for bucket, width in WIDTHS.items():
        history = await series_history(db, sid, start, end, bucket, max_points=20_000)
        assert history.bucket is bucket
        assert history.kind == "numeric"
        expected = expected_buckets(numeric, start, end, width)
        points = [p for p in history.points if isinstance(p, NumericBucket)]
        assert len(points) == len(history.points)
        assert [p.start for p in points] == sorted(expected)
        for point in points:
            n, lo, hi, mean = expected[point.start]
            assert point.readings == n
            assert point.min == lo
            assert point.max == hi
            assert point.avg == pytest.approx(mean, rel=1e-12)


async def test_automatic_bucket_and_addressing_by_device_and_channel(db: Conn) -> None:
    await add_device(db, "loop-1")
    sid = await add_series(db, "loop-1", "intensity", unit="1/min")
    rows = random_rows(3, T0, timedelta(days=2), 3000)
    await add_readings(db, sid, rows)
    end = T0 + timedelta(days=2)
    by_id = await series_history(db, sid, T0, end)
    by_key = await series_history(db, SeriesKey("loop-1", "intensity"), T0, end)
    by_tuple = await series_history(db, ("loop-1", "intensity"), T0, end)
    assert by_id.bucket is Bucket.QUARTER_HOUR  # 2880 minutes > 2000 points
    assert by_id.points == by_key.points == by_tuple.points
    assert (by_key.series_id, by_key.device_id, by_key.channel, by_key.unit) == (
        sid,
        "loop-1",
        "intensity",
        "1/min",
    )
    assert sum(p.readings for p in by_id.points if isinstance(p, NumericBucket)) == 3000
    assert len(by_id.points) <= 2000
    finer = await series_history(db, sid, T0, end, max_points=3000)
    assert finer.bucket is Bucket.MINUTE


async def test_raw_readings_in_order(db: Conn) -> None:
    sid = await device_with_series(db, "loop-1")
    rows = random_rows(4, T0, timedelta(minutes=20), 300)
    await add_readings(db, sid, rows)
    history = await series_history(db, sid, T0, T0 + timedelta(minutes=20))
    assert history.bucket is Bucket.RAW
    assert history.points == tuple(RawPoint(*row) for row in rows)
    # End is exclusive, start inclusive.
    first, last = rows[0][0], rows[-1][0]
    inner = await series_history(db, sid, first, last)
    assert inner.points == tuple(RawPoint(*row) for row in rows[:-1])


async def test_raw_follows_the_device_period_and_falls_back_when_it_sends_faster(
    db: Conn,
) -> None:
    steady = await device_with_series(db, "steady", period_s=60.0)
    chatty = await device_with_series(db, "chatty", period_s=60.0)
    span = timedelta(minutes=90)
    await add_readings(db, steady, [(T0 + timedelta(minutes=i), float(i), None) for i in range(90)])
    # Every 10 s although its period says 60 s: 540 readings.
    await add_readings(
        db, chatty, [(T0 + timedelta(seconds=10 * i), float(i), None) for i in range(540)]
    )
    limits = HistoryLimits(max_points=100, hard_max_points=1000)
    raw = await series_history(db, steady, T0, T0 + span, limits=limits)
    assert raw.bucket is Bucket.RAW
    assert len(raw.points) == 90
    fallback = await series_history(db, chatty, T0, T0 + span, limits=limits)
    assert fallback.bucket is Bucket.MINUTE
    assert len(fallback.points) == 90
    assert sum(p.readings for p in fallback.points if isinstance(p, NumericBucket)) == 540


async def test_forced_resolutions_beyond_the_hard_limit_are_refused(db: Conn) -> None:
    sid = await device_with_series(db, "loop-1")
    await add_readings(db, sid, [(T0 + timedelta(seconds=i), 1.0, None) for i in range(60)])
    limits = HistoryLimits(max_points=10, hard_max_points=50)
    with pytest.raises(InvalidRange, match="more than 50 readings") as raised:
        await series_history(db, sid, T0, T0 + timedelta(hours=1), Bucket.RAW, limits=limits)
    assert "choose a time bucket" in str(raised.value)
    with pytest.raises(InvalidRange, match="make 60 points, more than the limit of 50"):
        await series_history(db, sid, T0, T0 + timedelta(hours=1), Bucket.MINUTE, limits=limits)
    forced = await series_history(
        db, sid, T0, T0 + timedelta(minutes=50), Bucket.MINUTE, limits=limits
    )
    assert len(forced.points) == 1  # beyond max_points is fine when forced
    # The default hard limit: 14 days of minutes is 20,160 points.
    with pytest.raises(InvalidRange, match="make 20160 points, more than the limit of 20000"):
        await series_history(db, sid, T0, T0 + timedelta(days=14), Bucket.MINUTE)
    with pytest.raises(InvalidRange, match="max_points must be between 1 and 20000"):
        await series_history(db, sid, T0, T0 + timedelta(days=1), max_points=20_001)


async def test_state_series_keep_the_last_state_per_bucket(db: Conn) -> None:
    sid = await device_with_series(db, "gate-1", "status")
    states = [
        (T0 + timedelta(seconds=5), None, "normal"),
        (T0 + timedelta(seconds=40), None, "alarm"),
        (T0 + timedelta(minutes=1, seconds=1), None, "fault"),
        (T0 + timedelta(minutes=3, seconds=59), None, "alarm"),
        (T0 + timedelta(minutes=3, seconds=30), None, "normal"),
    ]
    await add_readings(db, sid, states)
    history = await series_history(db, sid, T0, T0 + timedelta(minutes=10), Bucket.MINUTE)
    assert history.kind == "state"
    assert history.points == (
        StateBucket(T0, 2, "alarm"),
        StateBucket(T0 + timedelta(minutes=1), 1, "fault"),
        StateBucket(T0 + timedelta(minutes=3), 2, "alarm"),
    )
    raw = await series_history(db, sid, T0, T0 + timedelta(minutes=10))
    assert raw.bucket is Bucket.RAW
    assert [p.state for p in raw.points if isinstance(p, RawPoint)] == [
        "normal",
        "alarm",
        "fault",
        "normal",
        "alarm",
    ]
    # The kind comes from the latest reading before the end, even outside the range.
    later = await series_history(
        db, sid, T0 + timedelta(hours=1), T0 + timedelta(hours=2), Bucket.MINUTE
    )
    assert (later.kind, later.points) == ("state", ())


async def test_empty_ranges_and_series_without_readings(db: Conn) -> None:
    sid = await device_with_series(db, "loop-1")
    empty = await device_with_series(db, "loop-2")
    await add_readings(db, sid, [(T0, 1.0, None)])
    for series in (sid, empty):
        for bucket in (Bucket.RAW, Bucket.MINUTE):
            history = await series_history(
                db, series, T0 + timedelta(days=1), T0 + timedelta(days=2), bucket
            )
            assert history.points == ()
            assert history.kind == "numeric"


async def test_unknown_series_and_invalid_ranges(db: Conn) -> None:
    sid = await device_with_series(db, "loop-1")
    end = T0 + timedelta(hours=1)
    with pytest.raises(SeriesNotFound, match="no series 9999 in the live tables"):
        await series_history(db, 9999, T0, end)
    with pytest.raises(SeriesNotFound, match="no series 'loop-1'/'speed' in the live tables"):
        await series_history(db, ("loop-1", "speed"), T0, end)
    with pytest.raises(SeriesNotFound, match="'nobody'/'intensity'"):
        await series_history(db, SeriesKey("nobody", "intensity"), T0, end)
    with pytest.raises(InvalidRange, match="is not after start"):
        await series_history(db, sid, end, T0)
    with pytest.raises(InvalidRange, match="has no UTC offset"):
        await series_history(db, sid, T0, end.replace(tzinfo=None))
    with pytest.raises(InvalidRange, match="needs 2001 daily buckets"):
        await series_history(db, sid, T0, T0 + timedelta(days=2001))


async def test_reads_leave_the_connection_as_they_found_it(db: Conn, database_url: str) -> None:
    sid = await device_with_series(db, "loop-1")
    await add_readings(db, sid, [(T0, 1.0, None)])
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        before = await (await conn.execute("SHOW statement_timeout")).fetchone()
        await conn.commit()
        history = await series_history(conn, sid, T0, T0 + timedelta(hours=1))
        assert len(history.points) == 1
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        after = await (await conn.execute("SHOW statement_timeout")).fetchone()
        assert after == before


async def test_a_statement_timeout_is_reported_with_its_setting(
    db: Conn, database_url: str
) -> None:
    sid = await device_with_series(db, "loop-1")
    async with await psycopg.AsyncConnection.connect(database_url) as locker:
        # A lock held elsewhere makes the read wait until its deadline.
        await locker.execute("LOCK TABLE series IN ACCESS EXCLUSIVE MODE")
        limits = HistoryLimits(statement_timeout_s=0.2)
        with pytest.raises(HistoryUnavailable, match=r"statement timeout of 0\.2 s"):
            await series_history(db, sid, T0, T0 + timedelta(hours=1), limits=limits)
        await locker.rollback()
    history = await series_history(db, sid, T0, T0 + timedelta(hours=1))
    assert history.points == ()


# ------------------------------------------------------------------ groups


async def test_group_aggregate_matches_numpy(db: Conn) -> None:
    members = []
    all_rows: list[tuple[int, list[tuple[datetime, float]]]] = []
    for i in range(3):
        sid = await device_with_series(db, f"loop-{i}", district="minato")
        members.append(sid)
    outsider = await device_with_series(db, "loop-x", district="chuo")
    other_channel = await add_series(db, "loop-0", "occupancy")
    camera = await device_with_series(db, "cam-1", district="minato", kind="camera")
    for seed, sid in enumerate([*members, outsider, other_channel, camera]):
        rows = random_rows(10 + seed, T0, timedelta(hours=6), 400 + 100 * seed)
        await add_readings(db, sid, rows)
        all_rows.append((sid, [(ts, v) for ts, v, _ in rows if v is not None]))
    start, end = T0 + timedelta(minutes=7), T0 + timedelta(hours=5, minutes=3)

    history = await group_history(
        db, channel="intensity", district="minato", kind="loop", start=start, end=end
    )
    assert history.bucket is Bucket.MINUTE  # 297 minutes
    assert history.devices == 3
    assert history.selector == GroupSelector("intensity", district="minato", kind="loop")
    width = WIDTHS[Bucket.MINUTE]
    union = [row for sid, rows in all_rows if sid in members for row in rows]
    expected = expected_buckets(union, start, end, width)
    per_device = [expected_buckets(rows, start, end, width) for sid, rows in all_rows[:3]]
    assert [p.start for p in history.points] == sorted(expected)
    for point in history.points:
        assert isinstance(point, GroupBucket)
        n, lo, hi, mean = expected[point.start]
        assert (point.readings, point.min, point.max) == (n, lo, hi)
        assert point.avg == pytest.approx(mean, rel=1e-12)
        assert point.devices == sum(point.start in d for d in per_device)

    hourly = await group_history(
        db, channel="intensity", domain="traffic", start=start, end=end, bucket=Bucket.HOUR
    )
    assert hourly.devices == 5  # three loops, the outsider and the camera
    assert sum(p.readings for p in hourly.points) == sum(
        1 for sid, rows in all_rows if sid != other_channel for ts, _ in rows if start <= ts < end
    )
    assert max(p.devices for p in hourly.points) == 5


async def test_group_without_devices_and_invalid_group_requests(db: Conn) -> None:
    await device_with_series(db, "loop-1")
    end = T0 + timedelta(days=1)
    nobody = await group_history(db, channel="intensity", district="nowhere", start=T0, end=end)
    assert (nobody.devices, nobody.points) == (0, ())
    with pytest.raises(InvalidQuery, match="needs a time bucket"):
        await group_history(db, channel="intensity", start=T0, end=end, bucket=Bucket.RAW)
    with pytest.raises(InvalidRange, match="is not after start"):
        await group_history(db, channel="intensity", start=end, end=T0)
    with pytest.raises(InvalidRange, match="make 20160 points"):
        await group_history(
            db, channel="intensity", start=T0, end=T0 + timedelta(days=14), bucket=Bucket.MINUTE
        )


# ------------------------------------------------------------------ query plans


async def test_queries_exclude_chunks_and_use_the_series_index(db: Conn) -> None:
    """One day out of three: one chunk scanned, through (series_id, ts DESC), no sort."""
    ids = [await device_with_series(db, f"loop-{i}") for i in range(20)]
    for sid in ids:
        rows = [(T0 + timedelta(minutes=i), float(i % 7), None) for i in range(3 * 1440)]
        await add_readings(db, sid, rows)
    await db.execute("ANALYZE readings")
    params = {
        "series_id": ids[3],
        "series_ids": ids[:2],
        "start": T0 + timedelta(days=1),
        "end": T0 + timedelta(days=2),
        "run_id": None,
    }
    live = _Namespace(None)
    plans = {
        "buckets": _series_query(live, Bucket.MINUTE, "numeric"),
        "raw": _series_query(live, Bucket.RAW, "numeric", limit=2001),
        "group": _group_query(live, Bucket.QUARTER_HOUR),
    }
    for name, query in plans.items():
        cur = await db.execute(sql.SQL("EXPLAIN ") + query, params, prepare=False)
        plan = "\n".join(row[0] for row in await cur.fetchall())
        scanned = set(re.findall(r"_hyper_\d+_\d+_chunk", plan))
        assert len(scanned) == 1, f"{name}: chunks {scanned} scanned\n{plan}"
        assert "readings_series_ts" in plan, f"{name}: not through the index\n{plan}"
        if name != "group":
            assert "Sort" not in plan, f"{name}: sorts\n{plan}"

    # Raw reads are prepared by psycopg after a few uses: the generic plan
    # excludes chunks when the executor starts instead.
    raw = plans["raw"].as_string(db)
    for number, name in enumerate(("series_id", "start", "end"), 1):
        raw = raw.replace(f"%({name})s", f"${number}")
    await db.execute(
        sql.SQL("PREPARE raw_read(int, timestamptz, timestamptz) AS {}").format(sql.SQL(raw))
    )
    await db.execute("SET plan_cache_mode = force_generic_plan")
    cur = await db.execute(
        sql.SQL("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE raw_read({}, {}, {})").format(
            ids[3], params["start"], params["end"]
        )
    )
    plan = "\n".join(row[0] for row in await cur.fetchall())
    assert "Chunks excluded during startup: 2" in plan, plan
    assert "readings_series_ts" in plan, plan
    assert "Sort" not in plan, plan


# ------------------------------------------------------------------ CSV


async def test_raw_csv_export_round_trips_in_many_chunks(db: Conn) -> None:
    sid = await device_with_series(db, "loop-1")
    rows = random_rows(20, T0, timedelta(hours=2), 2500)
    await add_readings(db, sid, rows)
    # The session time zone must not matter: times are written in UTC.
    await db.execute("SET TimeZone = 'Asia/Tokyo'")
    limits = HistoryLimits(export_rows_per_chunk=100)
    chunks = await collect(stream_csv(db, sid, T0, T0 + timedelta(hours=2), limits=limits))
    assert chunks[0] == b"ts,value,state\n"
    assert len(chunks) == 1 + 25  # streamed: one FETCH per chunk, never all at once
    parsed = parse_csv(chunks)
    assert parsed[0] == ["ts", "value", "state"]
    assert len(parsed) == 1 + len(rows)
    for (ts, value, _), line in zip(rows, parsed[1:], strict=True):
        assert line[0].endswith("+00:00")
        assert "T" in line[0]
        assert datetime.fromisoformat(line[0]) == ts
        assert float(line[1]) == value  # shortest exact form: no digits lost
        assert line[2] == ""


async def test_state_csv_quotes_like_rfc_4180(db: Conn) -> None:
    sid = await device_with_series(db, "gate-1", "status")
    awkward = ["normal", 'door "B", left', "two\nlines", ""]
    await add_readings(
        db, sid, [(T0 + timedelta(seconds=i), None, s) for i, s in enumerate(awkward)]
    )
    chunks = await collect(stream_csv(db, ("gate-1", "status"), T0, T0 + timedelta(minutes=1)))
    parsed = parse_csv(chunks)
    assert [line[2] for line in parsed[1:]] == awkward
    assert all(line[1] == "" for line in parsed[1:])
    assert b'""\n' in chunks[-1]  # the empty state is quoted, unlike a missing one
    states = parse_csv(
        await collect(stream_csv(db, sid, T0, T0 + timedelta(minutes=1), Bucket.MINUTE))
    )
    assert states == [["bucket_start", "readings", "state"], ["2026-03-02T00:00:00+00:00", "4", ""]]


async def test_bucketed_and_group_csv_match_the_reads(db: Conn) -> None:
    ids = [await device_with_series(db, f"loop-{i}", district="minato") for i in range(2)]
    for seed, sid in enumerate(ids):
        await add_readings(db, sid, random_rows(30 + seed, T0, timedelta(hours=3), 700))
    end = T0 + timedelta(hours=3)
    history = await series_history(db, ids[0], T0, end, Bucket.QUARTER_HOUR)
    parsed = parse_csv(await collect(stream_csv(db, ids[0], T0, end, Bucket.QUARTER_HOUR)))
    assert parsed[0] == ["bucket_start", "readings", "min", "max", "avg"]
    assert len(parsed) == 1 + len(history.points) == 13
    for point, line in zip(history.points, parsed[1:], strict=True):
        assert isinstance(point, NumericBucket)
        assert datetime.fromisoformat(line[0]) == point.start
        assert (int(line[1]), float(line[2]), float(line[3]), float(line[4])) == point[1:]

    selector = GroupSelector("intensity", district="minato")
    group = await group_history(db, channel="intensity", district="minato", start=T0, end=end)
    parsed = parse_csv(await collect(stream_csv(db, selector, T0, end)))
    assert parsed[0] == ["bucket_start", "readings", "min", "max", "avg", "devices"]
    assert group.bucket is Bucket.MINUTE  # auto: 180 minutes
    assert len(parsed) == 1 + len(group.points)
    for gpoint, line in zip(group.points, parsed[1:], strict=True):
        assert datetime.fromisoformat(line[0]) == gpoint.start
        assert [float(x) for x in line[1:]] == [float(x) for x in gpoint[1:]]


async def test_csv_errors_surface_early(db: Conn) -> None:
    sid = await device_with_series(db, "loop-1")
    end = T0 + timedelta(days=1)
    with pytest.raises(InvalidRange, match="export of 400 days exceeds the limit of 366 days"):
        stream_csv(db, sid, T0, T0 + timedelta(days=400))
    with pytest.raises(InvalidRange, match="is not after start"):
        stream_csv(db, sid, end, T0)
    with pytest.raises(InvalidQuery, match="needs a time bucket"):
        stream_csv(db, GroupSelector("intensity"), T0, end, Bucket.RAW)
    chunks = stream_csv(db, 4242, T0, end)
    with pytest.raises(SeriesNotFound, match="no series 4242"):
        await anext(chunks)
    assert db.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


async def test_an_abandoned_export_cancels_and_frees_the_connection(db: Conn) -> None:
    sid = await device_with_series(db, "loop-1")
    await add_readings(db, sid, [(T0 + timedelta(seconds=i), 1.0, None) for i in range(5000)])
    limits = HistoryLimits(export_rows_per_chunk=100)
    seen = 0
    async with contextlib.aclosing(
        stream_csv(db, sid, T0, T0 + timedelta(hours=2), limits=limits)
    ) as chunks:
        async for _ in chunks:
            seen += 1
            if seen == 3:
                break
    assert db.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    cur = await db.execute("SELECT count(*) FROM pg_cursors")
    assert await cur.fetchone() == (0,)
    history = await series_history(db, sid, T0, T0 + timedelta(hours=2), Bucket.HOUR)
    assert sum(p.readings for p in history.points if isinstance(p, NumericBucket)) == 5000


async def test_exports_of_two_connections_interleave(database_url: str, db: Conn) -> None:
    sid = await device_with_series(db, "loop-1")
    await add_readings(db, sid, [(T0 + timedelta(seconds=i), float(i), None) for i in range(900)])
    limits = HistoryLimits(export_rows_per_chunk=50)
    async with await psycopg.AsyncConnection.connect(database_url) as other:
        first, second = await asyncio.gather(
            collect(stream_csv(db, sid, T0, T0 + timedelta(hours=1), limits=limits)),
            collect(stream_csv(other, sid, T0, T0 + timedelta(hours=1), limits=limits)),
        )
    assert first == second
    assert len(parse_csv(first)) == 901


# ------------------------------------------------------------------ replay sandbox


async def test_replay_runs_are_isolated_from_each_other_and_from_live_data(db: Conn) -> None:
    live = await device_with_series(db, "loop-1", district="minato")
    await add_readings(db, live, [(T0 + timedelta(seconds=i), 100.0, None) for i in range(10)])
    await db.execute("INSERT INTO replay.runs (run_id) VALUES ('run-a'), ('run-b')")
    await add_device(db, "loop-1", district="minato", replay=True)
    sandbox = await add_series(db, "loop-1", "intensity", replay=True)
    run_a = [(T0 + timedelta(seconds=i), 1.0, None) for i in range(5)]
    run_b = [(T0 + timedelta(seconds=i), 2.0, None) for i in range(7)]
    await add_readings(db, sandbox, run_a, run_id="run-a")
    await add_readings(db, sandbox, run_b, run_id="run-b")
    end = T0 + timedelta(minutes=1)

    a = await series_history(db, ("loop-1", "intensity"), T0, end, run_id="run-a")
    b = await series_history(db, sandbox, T0, end, run_id="run-b")
    real = await series_history(db, ("loop-1", "intensity"), T0, end)
    assert (a.series_id, a.run_id, a.points) == (
        sandbox,
        "run-a",
        tuple(map(RawPoint._make, run_a)),
    )
    assert b.points == tuple(RawPoint(*row) for row in run_b)
    assert {p.value for p in real.points if isinstance(p, RawPoint)} == {100.0}
    assert len(real.points) == 10

    group = await group_history(
        db, channel="intensity", district="minato", start=T0, end=end, run_id="run-b"
    )
    assert [(p.readings, p.avg, p.devices) for p in group.points] == [(7, 2.0, 1)]
    parsed = parse_csv(await collect(stream_csv(db, sandbox, T0, end, run_id="run-a")))
    assert [line[1] for line in parsed[1:]] == ["1"] * 5

    with pytest.raises(RunNotFound, match="no replay run 'run-z'"):
        await series_history(db, sandbox, T0, end, run_id="run-z")
    with pytest.raises(RunNotFound):
        await anext(stream_csv(db, sandbox, T0, end, run_id="run-z"))
    with pytest.raises(SeriesNotFound, match="in replay run 'run-a'"):
        await series_history(db, ("loop-9", "intensity"), T0, end, run_id="run-a")
    with pytest.raises(InvalidQuery, match="records no device kind"):
        await group_history(db, channel="intensity", kind="loop", start=T0, end=end, run_id="run-a")
