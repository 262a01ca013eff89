"""History benchmark: p50/p99 of the history reads over 7 days of 1 Hz data.

Run: ``.venv/bin/python -m bench.history`` (about 1.5 minutes; ``--scale``
multiplies the repetitions). It starts its own embedded PostgreSQL (same
tuning as ``cityops up``) in a temporary directory, unless
``--database-url`` names a fresh, empty database.

Data, written in time order as the ingester writes it (readings of all series
interleaved), 2,217,600 readings over 7 days:

* one series at 1 Hz (604,800 readings): device ``fast``, district ``chuo``;
* district ``minato``: 20 devices, ``intensity`` every 10 s (1,209,600);
* 4 other districts of 10 devices, ``intensity`` every 60 s (403,200).

Each query runs with :mod:`control_api.history` and with the naive way a user
would write it, in the same run, on the same connection, after one warm-up,
taking turns (so a load change on a shared machine hits both alike):

* the 1 Hz series over 7 days in 1-minute buckets (10,080 points):
  ``series_history`` against ``date_trunc('minute')`` with ``GROUP BY`` over a
  join on (device, channel), and against fetching the raw rows and bucketing
  them with numpy;
* the district ``minato`` over 7 days, automatic bucket (15 min, 672
  points), readings and reporting devices per bucket: ``group_history``
  against a join of readings, series and devices grouped on an epoch
  expression with ``count(DISTINCT device)``;
* 15 minutes of the 1 Hz series, raw (900 readings): ``series_history``
  against the same join with dict rows;
* the 1 Hz series over 7 days exported as CSV: ``stream_csv`` against
  ``COPY … TO STDOUT (FORMAT csv)`` read through psycopg.

The results of the 1-minute query are cross-checked against the numpy baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row

from cityops.db import migrate
from cityops.embedded import EmbeddedPostgres
from control_api.history import (
    Bucket,
    NumericBucket,
    group_history,
    series_history,
    stream_csv,
)

T0 = datetime(2026, 1, 5, tzinfo=UTC)
DAYS = 7
END = T0 + timedelta(days=DAYS)
OTHER_DISTRICTS = ("shibuya", "shinjuku", "taito", "koto")

Conn = psycopg.AsyncConnection[Any]


def _log(text: str) -> None:
    print(f"[bench.history] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    """A migrated database: ``url``, or one in an embedded server stopped on exit."""
    if url is not None:
        migrate(url)
        yield url
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with (
        tempfile.TemporaryDirectory(prefix="cityops-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        os.chmod(tmp, 0o755)  # the postgres account must enter it when run as root
        pg = stack.enter_context(EmbeddedPostgres(Path(tmp) / "postgres"))
        pg.ensure_database("bench")
        url = pg.url("bench")
        migrate(url)
        yield url


# ------------------------------------------------------------------ data

_DEVICES = """
INSERT INTO devices (id, domain, district, kind, expected_period_s)
SELECT 'fast', 'traffic', 'chuo', 'loop', 1
UNION ALL
SELECT 'm' || i, 'traffic', 'minato', 'loop', 10 FROM generate_series(1, 20) AS i
UNION ALL
SELECT d || '-' || i, 'traffic', d, 'loop', 60
FROM unnest(%(others)s::text[]) AS d, generate_series(1, 10) AS i
"""
_SERIES = (
    "INSERT INTO series (device_id, channel, unit) SELECT id, 'intensity', '1/min' FROM devices"
)
# One day per statement, every series at its device's period, in time order.
_DAY = """
INSERT INTO readings (ts, series_id, value, received_at)
SELECT t, sid, 50 + 30 * sin(extract(epoch FROM t) / 3600.0 + sid) + 5 * random(), t
FROM (
    SELECT t, s.id AS sid
    FROM series s JOIN devices d ON d.id = s.device_id,
    LATERAL generate_series(
        %(day)s::timestamptz,
        %(day)s::timestamptz + interval '1 day' - make_interval(secs => d.expected_period_s),
        make_interval(secs => d.expected_period_s)
    ) AS t
) AS x
ORDER BY t, sid
"""


async def _fill(conn: Conn) -> int:
    count = await (await conn.execute("SELECT count(*) FROM readings")).fetchone()
    if count != (0,):
        msg = "the database already holds readings: give a fresh one"
        raise SystemExit(msg)
    await conn.execute(_DEVICES, {"others": list(OTHER_DISTRICTS)})
    await conn.execute(_SERIES)
    for day in range(DAYS):
        await conn.execute(_DAY, {"day": T0 + timedelta(days=day)})
        _log(f"filled day {day + 1} of {DAYS}")
    await conn.execute("ANALYZE devices")
    await conn.execute("ANALYZE series")
    await conn.execute("ANALYZE readings")
    row = await (await conn.execute("SELECT count(*) FROM readings")).fetchone()
    assert row is not None
    return int(row[0])


# ------------------------------------------------------------------ naive baselines

_NAIVE_MINUTES = """
SELECT date_trunc('minute', r.ts) AS minute, count(*), min(r.value), max(r.value), avg(r.value)
FROM readings r JOIN series s ON s.id = r.series_id
WHERE s.device_id = %s AND s.channel = %s AND r.ts >= %s AND r.ts < %s
GROUP BY 1 ORDER BY 1
"""
_NAIVE_RAW = """
SELECT r.ts, r.value FROM readings r JOIN series s ON s.id = r.series_id
WHERE s.device_id = %s AND s.channel = %s AND r.ts >= %s AND r.ts < %s
ORDER BY r.ts
"""
_NAIVE_RAW_ALL = """
SELECT r.* FROM readings r JOIN series s ON s.id = r.series_id
WHERE s.device_id = %s AND s.channel = %s AND r.ts >= %s AND r.ts < %s
ORDER BY r.ts
"""
_NAIVE_DISTRICT = """
SELECT to_timestamp(floor(extract(epoch FROM r.ts) / 900) * 900) AS bucket,
       count(*), min(r.value), max(r.value), avg(r.value), count(DISTINCT s.device_id)
FROM readings r JOIN series s ON s.id = r.series_id JOIN devices d ON d.id = s.device_id
WHERE d.district = %s AND s.channel = %s AND r.ts >= %s AND r.ts < %s
GROUP BY 1 ORDER BY 1
"""
_NAIVE_COPY = """
COPY (SELECT r.ts, r.value, r.state FROM readings r JOIN series s ON s.id = r.series_id
      WHERE s.device_id = 'fast' AND s.channel = 'intensity'
        AND r.ts >= '{start}' AND r.ts < '{end}' ORDER BY r.ts)
TO STDOUT (FORMAT csv, HEADER)
"""


async def _naive_numpy_minutes(conn: Conn) -> dict[str, np.ndarray[Any, Any]]:
    """Fetch every raw reading, then bucket by minute with numpy."""
    cur = await conn.execute(_NAIVE_RAW, ("fast", "intensity", T0, END))
    rows = await cur.fetchall()
    ts = np.fromiter((r[0].timestamp() for r in rows), dtype=np.float64, count=len(rows))
    values = np.fromiter((r[1] for r in rows), dtype=np.float64, count=len(rows))
    minutes = (ts // 60).astype(np.int64)
    keys, first, counts = np.unique(minutes, return_index=True, return_counts=True)
    return {
        "minute": keys,
        "count": counts,
        "min": np.minimum.reduceat(values, first),
        "max": np.maximum.reduceat(values, first),
        "avg": np.add.reduceat(values, first) / counts,
    }


async def _fetch_all(conn: Conn, query: str, params: tuple[object, ...]) -> int:
    cur = await conn.execute(query, params)
    return len(await cur.fetchall())


async def _fetch_dicts(conn: Conn, query: str, params: tuple[object, ...]) -> int:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return len(await cur.fetchall())


async def _export_cityops(conn: Conn) -> int:
    size = 0
    async for chunk in stream_csv(conn, ("fast", "intensity"), T0, END):
        size += len(chunk)
    return size


async def _export_copy(conn: Conn) -> int:
    """COPY TO STDOUT through psycopg, gathered into 64 KiB chunks as a server would send."""
    size = 0
    pending = bytearray()
    query = _NAIVE_COPY.format(start=T0.isoformat(), end=END.isoformat())
    async with conn.cursor().copy(query) as copy:
        async for data in copy:
            pending += data
            if len(pending) >= 65536:
                size += len(pending)
                pending = bytearray()
    return size + len(pending)


# ------------------------------------------------------------------ timing


@dataclass(frozen=True, slots=True)
class Timing:
    """Latencies of one implementation of one query."""

    query: str
    impl: str
    seconds: list[float]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.seconds)  # nearest rank
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)] * 1000


Run = Callable[[], Awaitable[object]]


async def _compare(query: str, impls: list[tuple[str, int, Run]]) -> list[Timing]:
    """Time each implementation ``n`` times, taking turns so load drifts hit all alike."""
    for _, _, run in impls:
        await run()  # warm-up: caches, catalog, plans
    seconds: list[list[float]] = [[] for _ in impls]
    for turn in range(max(n for _, n, _ in impls)):
        for (_, n, run), samples in zip(impls, seconds, strict=True):
            if turn < n:
                started = time.perf_counter()
                await run()
                samples.append(time.perf_counter() - started)
    timings = [Timing(query, impl, s) for (impl, _, _), s in zip(impls, seconds, strict=True)]
    for timing in timings:
        _log(f"{query} / {timing.impl}: p50 {timing.p50_ms:.1f} ms")
    return timings


async def _check_minutes(conn: Conn) -> None:
    """The 1-minute answer of cityops equals the numpy baseline."""
    history = await series_history(conn, ("fast", "intensity"), T0, END, Bucket.MINUTE)
    naive = await _naive_numpy_minutes(conn)
    points = [p for p in history.points if isinstance(p, NumericBucket)]
    assert len(points) == len(naive["minute"]) == DAYS * 1440
    assert [p.readings for p in points] == naive["count"].tolist()
    assert np.allclose([p.avg for p in points], naive["avg"], rtol=1e-12)
    assert [p.min for p in points] == naive["min"].tolist()


async def _run(url: str, scale: float) -> None:
    def reps(n: int) -> int:
        return max(1, round(n * scale))

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        total = await _fill(conn)
        fill_s = time.perf_counter() - started
        await _check_minutes(conn)

        series = ("fast", "intensity")
        minutes = "series 7 d, 1-min buckets (10,080)"
        district = "district 7 d, auto 15-min (672), 20 dev."
        raw = "series 15 min, raw (900 readings)"
        export = "CSV export 7 d raw (604,800 rows)"
        short_end = T0 + timedelta(days=3, minutes=15)
        short_start = T0 + timedelta(days=3)
        timings = [
            *await _compare(
                minutes,
                [
                    (
                        "cityops series_history",
                        reps(15),
                        lambda: series_history(conn, series, T0, END, Bucket.MINUTE),
                    ),
                    (
                        "naive SQL date_trunc + join",
                        reps(8),
                        lambda: _fetch_all(conn, _NAIVE_MINUTES, (*series, T0, END)),
                    ),
                    ("naive raw rows + numpy", reps(4), lambda: _naive_numpy_minutes(conn)),
                ],
            ),
            *await _compare(
                district,
                [
                    (
                        "cityops group_history",
                        reps(15),
                        lambda: group_history(
                            conn, channel="intensity", district="minato", start=T0, end=END
                        ),
                    ),
                    (
                        "naive SQL join + DISTINCT",
                        reps(3),
                        lambda: _fetch_all(conn, _NAIVE_DISTRICT, ("minato", "intensity", T0, END)),
                    ),
                ],
            ),
            *await _compare(
                raw,
                [
                    (
                        "cityops series_history",
                        reps(300),
                        lambda: series_history(conn, series, short_start, short_end),
                    ),
                    (
                        "naive join, dict rows",
                        reps(300),
                        lambda: _fetch_dicts(
                            conn, _NAIVE_RAW_ALL, (*series, short_start, short_end)
                        ),
                    ),
                ],
            ),
            *await _compare(
                export,
                [
                    ("cityops stream_csv", reps(3), lambda: _export_cityops(conn)),
                    ("COPY TO STDOUT via psycopg", reps(3), lambda: _export_copy(conn)),
                ],
            ),
        ]
        # Check the group answer once (not timed): 672 buckets of 20 devices.
        group = await group_history(conn, channel="intensity", district="minato", start=T0, end=END)
        assert group.bucket is Bucket.QUARTER_HOUR
        assert len(group.points) == DAYS * 96
        assert {p.devices for p in group.points} == {20}
        size = await _export_cityops(conn)

    print(f"history bench: {total:,} readings over {DAYS} days, filled in {fill_s:.1f} s")
    print(f"{'query':<42} {'implementation':<30} {'n':>4} {'p50 ms':>9} {'p99 ms':>9}")
    last = ""
    for t in timings:
        label = t.query if t.query != last else ""
        last = t.query
        print(f"{label:<42} {t.impl:<30} {len(t.seconds):>4} {t.p50_ms:>9.1f} {t.p99_ms:>9.1f}")
    export_s = next(statistics.median(t.seconds) for t in timings if t.impl == "cityops stream_csv")
    print(
        f"stream_csv: {size / 1e6:.1f} MB, {604_800 / export_s:,.0f} rows/s,"
        f" {size / 1e6 / export_s:.1f} MB/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="a fresh database (default: embedded server)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the repetitions (default 1.0)"
    )
    args = parser.parse_args()
    with _database(args.database_url) as url:
        asyncio.run(_run(url, args.scale))


if __name__ == "__main__":
    main()
