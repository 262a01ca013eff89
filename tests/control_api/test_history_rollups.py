"""History over the roll-ups: the same answers as raw readings, and after retention."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pytest

from control_api.history import (
    Bucket,
    GroupBucket,
    NumericBucket,
    StateBucket,
    group_history,
    series_history,
    stream_csv,
)
from ingest.lifecycle import LifecycleOptions, apply_retention, roll_up
from tests.control_api.test_history import (
    T0,
    Conn,
    add_readings,
    collect,
    db,
    device_with_series,
    random_rows,
)

__all__ = ["db"]  # the fixture, shared with test_history

OPTIONS = LifecycleOptions(max_slice=timedelta(days=30))
Points = tuple[NumericBucket, ...] | tuple[GroupBucket, ...]


def assert_same(rolled: Points, raw: Points) -> None:
    assert [p.start for p in rolled] == [p.start for p in raw]
    pairs: list[tuple[NumericBucket | GroupBucket, NumericBucket | GroupBucket]]
    pairs = list(zip(rolled, raw, strict=True))
    for got, want in pairs:
        assert (got.readings, got.min, got.max) == (want.readings, want.min, want.max)
        assert math.isclose(got.avg, want.avg, rel_tol=1e-12)
        if isinstance(got, GroupBucket) and isinstance(want, GroupBucket):
            assert got.devices == want.devices


async def answers(db: Conn, sids: list[int], start: datetime, end: datetime) -> list[Points]:
    out: list[Points] = []
    for bucket in (Bucket.MINUTE, Bucket.QUARTER_HOUR, Bucket.HOUR, Bucket.DAY):
        for sid in sids:
            history = await series_history(db, sid, start, end, bucket, max_points=20_000)
            out.append(history.points)  # type: ignore[arg-type]
        group = await group_history(
            db, channel="intensity", start=start, end=end, bucket=bucket, max_points=20_000
        )
        out.append(group.points)
    return out


async def test_rollup_and_raw_answers_agree_with_late_readings_and_a_raw_tail(db: Conn) -> None:
    a = await device_with_series(db, "loop-1")
    b = await device_with_series(db, "loop-2")
    await add_readings(db, a, random_rows(1, T0, timedelta(days=3), 8000))
    await add_readings(db, b, random_rows(2, T0 + timedelta(hours=7), timedelta(days=2), 3000))
    # Unaligned ends: partial first and last buckets, partial source buckets.
    start = T0 + timedelta(hours=3, minutes=7, seconds=17)
    end = T0 + timedelta(days=2, hours=20, minutes=7, seconds=3)
    raw = await answers(db, [a, b], start, end)  # no roll-up yet: all raw
    # The roll-ups cover the first day and a half; the rest is a raw tail.
    await roll_up(db, OPTIONS, now=T0 + timedelta(days=1, hours=12, minutes=3))
    assert_all(await answers(db, [a, b], start, end), raw)
    assert_all(await raw_answers(db, [a, b], start, end), raw)
    # Late readings: received after that run, device times long before it.
    late_rows = [(T0 + timedelta(hours=h, seconds=11), 1000.0 + h, None) for h in (4, 9, 30)]
    await add_readings(db, a, late_rows)
    raw_late = await raw_answers(db, [a, b], start, end)
    assert raw_late != raw
    # Until the next run, the settled part does not show them yet (one interval).
    assert_all(await answers(db, [a, b], start, end), raw)
    # add_readings sets received_at = ts: mark them received now, as the ingester would.
    await db.execute("UPDATE readings SET received_at = now() WHERE value >= 1000")
    await roll_up(db, OPTIONS)  # database time: everything settled
    assert_all(await answers(db, [a, b], start, end), raw_late)


async def raw_answers(db: Conn, sids: list[int], start: datetime, end: datetime) -> list[Points]:
    """The answers from raw readings alone: the roll-ups hidden in a rolled-back transaction."""
    async with db.transaction(force_rollback=True):
        await db.execute("UPDATE rollup_watermarks SET settled_before = NULL")
        return await answers(db, sids, start, end)


def assert_all(rolled: list[Points], raw: list[Points]) -> None:
    assert len(rolled) == len(raw)
    for got, want in zip(rolled, raw, strict=True):
        assert_same(got, want)


async def test_long_ranges_answer_from_rollups_after_retention_dropped_the_raw_chunks(
    db: Conn,
) -> None:
    sid = await device_with_series(db, "loop-1")
    await add_readings(db, sid, random_rows(3, T0, timedelta(days=4), 4000))
    start, end = T0 - timedelta(days=1), T0 + timedelta(days=5)
    daily = await series_history(db, sid, start, end, Bucket.DAY)
    hourly = await series_history(db, sid, start, end, Bucket.HOUR)
    minutes = await series_history(db, sid, start, end, Bucket.MINUTE, max_points=20_000)
    await roll_up(db, OPTIONS)
    options = LifecycleOptions(raw_keep=timedelta(days=1), minute_keep=timedelta(days=1))
    dropped = await apply_retention(db, options)
    assert {c.hypertable for c in dropped.chunks} == {"readings", "readings_1m"}
    cur = await db.execute("SELECT count(*) FROM readings")
    assert await cur.fetchone() == (0,)
    assert_same(
        (await series_history(db, sid, start, end, Bucket.DAY)).points,  # type: ignore[arg-type]
        daily.points,  # type: ignore[arg-type]
    )
    assert_same(
        (await series_history(db, sid, start, end, Bucket.HOUR)).points,  # type: ignore[arg-type]
        hourly.points,  # type: ignore[arg-type]
    )
    # The automatic choice for these 6 days is 15 minutes: its roll-up is gone.
    assert (await series_history(db, sid, start, end, Bucket.MINUTE)).points == ()
    assert len(minutes.points) > 0
    # CSV of the daily buckets reads the roll-up too.
    lines = b"".join(await collect(stream_csv(db, sid, start, end, Bucket.DAY))).splitlines()
    assert len(lines) == 1 + len(daily.points)


@pytest.mark.parametrize("bucket", [Bucket.MINUTE, Bucket.DAY])
async def test_state_series_stay_on_raw_readings(db: Conn, bucket: Bucket) -> None:
    sid = await device_with_series(db, "valve-1", channel="mode")
    rows = [(T0 + timedelta(minutes=i), None, "open" if i % 2 else "closed") for i in range(90)]
    await add_readings(db, sid, rows)
    before = await series_history(db, sid, T0, T0 + timedelta(days=1), bucket)
    await roll_up(db, OPTIONS)
    after = await series_history(db, sid, T0, T0 + timedelta(days=1), bucket)
    assert after.kind == "state"
    assert after.points == before.points
    assert after.points
    assert all(isinstance(p, StateBucket) and p.readings > 0 for p in after.points)
