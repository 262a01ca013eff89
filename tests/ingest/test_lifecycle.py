"""Roll-ups, retention, audit pseudonymisation and the maintenance task, on real TimescaleDB."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection

from cityops.cli import main
from cityops.maintenance import (
    REDACTED,
    MaintenanceOptions,
    maintenance_task,
    pseudonymise_audit,
)
from cityops.settings import LifecycleSettings, Settings
from ingest.lifecycle import (
    RETENTION_LOCK,
    ROLLUP_LOCK,
    LifecycleOptions,
    apply_retention,
    roll_up,
)
from tests.polling import until_async

Conn = AsyncConnection[Any]
T0 = datetime(2026, 3, 2, tzinfo=UTC)
NOW = T0 + timedelta(days=2)
# Big slices: the tests' data spans months with few readings.
OPTIONS = LifecycleOptions(max_slice=timedelta(days=30))


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Conn]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        yield conn


async def series(conn: Conn, device_id: str) -> int:
    await conn.execute(
        "INSERT INTO devices (id, domain, district) VALUES (%s, 'traffic', 'chuo')", (device_id,)
    )
    cur = await conn.execute(
        "INSERT INTO series (device_id, channel) VALUES (%s, 'intensity') RETURNING id",
        (device_id,),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def insert(
    conn: Conn,
    series_id: int,
    start: datetime,
    count: int,
    step: timedelta,
    *,
    received_at: datetime | None = None,
    value0: float = 0.0,
) -> None:
    """``count`` readings every ``step`` from ``start``, value i * 0.37 + value0."""
    await conn.execute(
        "INSERT INTO readings (ts, series_id, value, received_at)"
        " SELECT %(start)s + g * %(step)s, %(sid)s, g * 0.37 + %(v0)s,"
        "        coalesce(%(received)s, %(start)s + g * %(step)s)"
        " FROM generate_series(0, %(n)s - 1) g",
        {
            "start": start,
            "step": step,
            "sid": series_id,
            "v0": value0,
            "received": received_at,
            "n": count,
        },
    )


async def rows_of(conn: Conn, query: str, *params: object) -> list[tuple[Any, ...]]:
    cur = await conn.execute(query, params)
    return await cur.fetchall()


RAW_MINUTES = """
SELECT series_id, time_bucket('1 minute', ts) b, count(*), min(value), max(value), sum(value)
FROM readings WHERE value IS NOT NULL AND ts < %s GROUP BY 1, 2 ORDER BY 1, 2
"""
RAW_HOURS = RAW_MINUTES.replace("'1 minute'", "'1 hour'")


def same(rollup: list[tuple[Any, ...]], raw: list[tuple[Any, ...]]) -> None:
    """Identical keys, counts, minima and maxima; sums equal to rounding."""
    assert [r[:5] for r in rollup] == [r[:5] for r in raw]
    for got, want in zip(rollup, raw, strict=True):
        assert math.isclose(got[5], want[5], rel_tol=1e-12, abs_tol=1e-9)


async def assert_rollups_match_raw(conn: Conn, before: datetime) -> None:
    minutes = await rows_of(
        conn, "SELECT * FROM readings_1m WHERE bucket < %s ORDER BY 1, 2", before
    )
    same(minutes, await rows_of(conn, RAW_MINUTES, before))
    hours = await rows_of(conn, "SELECT * FROM readings_1h WHERE bucket < %s ORDER BY 1, 2", before)
    same(hours, await rows_of(conn, RAW_HOURS, before))


# ------------------------------------------------------------------ roll-ups


async def test_rollups_match_raw_and_a_rerun_changes_nothing(db: Conn) -> None:
    a, b = await series(db, "loop-a"), await series(db, "loop-b")
    await insert(db, a, T0, 2 * 86_400 // 7, timedelta(seconds=7))
    await insert(db, b, T0 + timedelta(hours=5, seconds=3), 900, timedelta(seconds=61))
    await db.execute(  # state readings are not rolled up
        "INSERT INTO readings (ts, series_id, state, received_at) VALUES (%s, %s, 'alarm', %s)",
        (T0 + timedelta(seconds=30), b, T0),
    )
    first = await roll_up(db, OPTIONS, now=NOW)
    assert not first.skipped
    assert first.complete_before == NOW
    assert first.minutes > 0
    await assert_rollups_match_raw(db, NOW)
    snapshot = await rows_of(db, "SELECT * FROM readings_1m ORDER BY 1, 2")
    again = await roll_up(db, OPTIONS, now=NOW)
    assert (again.minutes, again.hours) == (0, 0)
    assert await rows_of(db, "SELECT * FROM readings_1m ORDER BY 1, 2") == snapshot
    # A backfill of the whole range rewrites nothing either.
    backfill = await roll_up(db, OPTIONS, since=T0, now=NOW)
    assert (backfill.minutes, backfill.hours) == (0, 0)


async def test_rollups_catch_up_incrementally_with_late_readings(db: Conn) -> None:
    sid = await series(db, "loop-a")
    await insert(db, sid, T0, 86_400 // 10, timedelta(seconds=10))
    end_of_day = T0 + timedelta(days=1)
    await roll_up(db, OPTIONS, now=end_of_day)
    # Five more minutes arrive on time, one reading a little late (inside the
    # lateness window) and three very late (hours old, received now).
    await insert(db, sid, end_of_day, 30, timedelta(seconds=10))
    later = end_of_day + timedelta(minutes=6)
    await insert(db, sid, end_of_day - timedelta(seconds=95), 1, timedelta(0), value0=1e6)
    await insert(
        db, sid, T0 + timedelta(hours=3, seconds=1), 3, timedelta(minutes=20),
        received_at=later - timedelta(seconds=20), value0=-5.0,
    )  # fmt: skip
    result = await roll_up(db, OPTIONS, now=later)
    assert result.late_minutes == 3
    # Only what changed is written: 5 new minutes, the late ones, their hours.
    assert result.minutes == 5 + 1 + 3
    await assert_rollups_match_raw(db, later)


async def test_readings_received_long_ago_are_not_rescanned(db: Conn) -> None:
    sid = await series(db, "loop-a")
    await roll_up(db, OPTIONS, now=NOW)  # nothing yet: the watermark starts at NOW
    # A bulk import with an old receive time is not "late": `--from` backfills it.
    await insert(db, sid, T0, 60, timedelta(seconds=1), received_at=T0)
    result = await roll_up(db, OPTIONS, now=NOW + timedelta(minutes=1))
    assert result.late_minutes == 0
    assert await rows_of(db, "SELECT count(*) FROM readings_1m") == [(0,)]
    await roll_up(db, OPTIONS, since=T0, now=NOW + timedelta(minutes=1))
    await assert_rollups_match_raw(db, NOW)


async def test_a_second_runner_skips_while_the_lock_is_held(db: Conn, database_url: str) -> None:
    sid = await series(db, "loop-a")
    await insert(db, sid, T0, 100, timedelta(seconds=1))
    async with await psycopg.AsyncConnection.connect(database_url) as other, other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock(%s), pg_advisory_xact_lock(%s)",
                            (ROLLUP_LOCK, RETENTION_LOCK))  # fmt: skip
        assert (await roll_up(db, OPTIONS, now=NOW)).skipped
        assert (await apply_retention(db, OPTIONS, now=NOW)).skipped
        assert await rows_of(db, "SELECT count(*) FROM readings_1m") == [(0,)]
    # Two runners at once: one does the work, the other skips or finds it done.
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as second:
        results = await asyncio.gather(
            roll_up(db, OPTIONS, now=NOW), roll_up(second, OPTIONS, now=NOW)
        )
    assert sum(r.minutes for r in results) == 2  # 100 s of readings: 2 minutes, written once
    await assert_rollups_match_raw(db, NOW)


# ------------------------------------------------------------------ retention


async def seed_alerts_and_audit(conn: Conn, at: datetime) -> None:
    await conn.execute(
        "INSERT INTO alerts (id, rule_id, subject, severity, state, version, message, raised_at,"
        " updated_at, active, acked, occurrences, unacked_since, source)"
        " VALUES ('a-1', 'r', 's', 'major', 'closed', 2, 'm', %s, %s, false, true, 1, %s, 'live')",
        (at, at, at),
    )
    await conn.execute(
        "INSERT INTO alert_events (alert_id, version, action, from_state, to_state, actor, at)"
        " VALUES ('a-1', 1, 'raise', 'normal', 'active_unacked', 'rules', %s)",
        (at,),
    )
    await conn.execute(
        "INSERT INTO audit_log (at, actor, action, target, remote_addr)"
        " VALUES (%s, 'hanako', 'alert.ack', 'a-1', '192.0.2.7')",
        (at,),
    )


async def counts(conn: Conn) -> dict[str, int]:
    out = {}
    for table in ("readings", "readings_1m", "readings_1h", "alerts", "alert_events", "audit_log"):
        rows = await rows_of(conn, f"SELECT count(*) FROM {table}")
        out[table] = int(rows[0][0])
    return out


async def test_retention_drops_only_old_chunks_and_never_alerts_or_audit(db: Conn) -> None:
    sid = await series(db, "loop-a")
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    for days_ago in (400, 200, 91, 89, 1):
        await insert(db, sid, now - timedelta(days=days_ago), 120, timedelta(seconds=1))
    await seed_alerts_and_audit(db, now - timedelta(days=500))
    options = LifecycleOptions(max_slice=timedelta(days=30), minute_keep=timedelta(days=300))
    # Before any roll-up, nothing is dropped: raw data not rolled up stays.
    held = await apply_retention(db, options, now=now)
    assert held.chunks == []
    await roll_up(db, options, now=now)
    before = await counts(db)
    dry = await apply_retention(db, options, dry_run=True, now=now)
    assert await counts(db) == before
    raw_dropped = [c for c in dry.chunks if c.hypertable == "readings"]
    assert len(raw_dropped) == 3  # 400, 200 and 91 days ago; 89 days ago stays
    assert all(c.range_end <= now - timedelta(days=90) for c in raw_dropped)
    assert [c.hypertable for c in dry.chunks if c.hypertable != "readings"] == ["readings_1m"]
    done = await apply_retention(db, options, now=now)
    assert done.chunks == dry.chunks
    after = await counts(db)
    assert after["readings"] == 2 * 120
    assert after["readings_1m"] == before["readings_1m"] - 2  # the 400-day-old minutes
    assert after["readings_1h"] == before["readings_1h"]
    for table in ("alerts", "alert_events", "audit_log"):
        assert after[table] == before[table]
    # The roll-ups of dropped raw data survive a late reading in a dropped day
    # (it cannot replace them with a partial aggregate) and a backfill.
    hour = await rows_of(db, "SELECT * FROM readings_1h ORDER BY bucket LIMIT 1")
    await insert(db, sid, now - timedelta(days=400), 1, timedelta(0), received_at=now, value0=9.0)
    await roll_up(db, options, since=now - timedelta(days=500), now=now + timedelta(minutes=1))
    assert await rows_of(db, "SELECT * FROM readings_1h ORDER BY bucket LIMIT 1") == hour
    # The chunk the late reading re-created goes at the next round.
    again = await apply_retention(db, options, now=now)
    assert [c.hypertable for c in again.chunks] == ["readings"]
    assert (await counts(db))["readings"] == 2 * 120


# ------------------------------------------------------------------ audit


async def test_audit_entries_are_pseudonymised_after_the_keep_period(db: Conn) -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    await seed_alerts_and_audit(db, now - timedelta(days=181))
    await db.execute(
        "INSERT INTO audit_log (at, actor, action, remote_addr)"
        " VALUES (%s, 'taro', 'login', '198.51.100.1')",
        (now - timedelta(days=179),),
    )
    keep = timedelta(days=180)
    dry = await pseudonymise_audit(db, keep, dry_run=True, now=now)
    assert (dry.rows, dry.cutoff) == (1, now - keep)
    assert (await pseudonymise_audit(db, keep, now=now)).rows == 1
    rows = await rows_of(db, "SELECT actor, remote_addr, action, target FROM audit_log ORDER BY at")
    assert rows == [(REDACTED, None, "alert.ack", "a-1"), ("taro", "198.51.100.1", "login", "")]
    assert (await pseudonymise_audit(db, keep, now=now)).rows == 0
    assert (await pseudonymise_audit(db, None, now=now)).cutoff is None


# ------------------------------------------------------------------ the task and the commands


async def test_the_maintenance_task_rolls_up_and_stops_when_cancelled(
    db: Conn, database_url: str
) -> None:
    sid = await series(db, "loop-a")
    await insert(db, sid, T0, 100, timedelta(seconds=1))
    options = MaintenanceOptions(lifecycle=OPTIONS, rollup_interval_s=0.2)

    async def rolled_up() -> bool:
        return await rows_of(db, "SELECT count(*) FROM readings_1m") == [(2,)]

    async with maintenance_task(database_url, options) as task:
        await until_async(rolled_up, timeout_s=20)
    assert task.cancelled()


def test_lifecycle_settings_from_the_environment() -> None:
    lifecycle = Settings.from_env({"CITYOPS_RETENTION_RAW_DAYS": "30"}).lifecycle
    assert lifecycle == LifecycleSettings(raw_days=30)
    with pytest.raises(Exception, match="CITYOPS_AUDIT_KEEP_DAYS"):
        LifecycleSettings.from_env({"CITYOPS_AUDIT_KEEP_DAYS": "ten"})
    with pytest.raises(Exception, match="coarser"):
        LifecycleSettings.from_env({"CITYOPS_RETENTION_1M_DAYS": "30"})


def test_db_rollup_and_retention_commands(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO devices (id, domain, district) VALUES ('d', 'traffic', 'x')")
        conn.execute("INSERT INTO series (device_id, channel) VALUES ('d', 'c')")
        conn.execute(
            "INSERT INTO readings (ts, series_id, value, received_at)"
            " SELECT now() - make_interval(days => g), 1, g, now() FROM generate_series(1, 120) g"
        )
    monkeypatch.setenv("CITYOPS_DATABASE_URL", database_url)
    assert main(["db", "rollup", "--from", "2000-01-01T00:00:00Z"]) == 0
    assert "120 1-minute" in capsys.readouterr().out
    assert main(["db", "retention", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would drop readings" in out
    assert "audit log: would pseudonymise 0 entries" in out
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (120,)
    assert main(["db", "retention"]) == 0
    assert "dropped readings" in capsys.readouterr().out
    with psycopg.connect(database_url) as conn:
        left = conn.execute("SELECT count(*) FROM readings").fetchone()
        assert left is not None
        assert 89 <= left[0] <= 90
        assert conn.execute("SELECT count(*) FROM readings_1m").fetchone() == (120,)
