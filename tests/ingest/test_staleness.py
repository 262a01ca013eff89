"""Staleness of silent devices: pure monitor with an injected clock, then end to end."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import orjson
import psycopg

from ingest.batch import CommittedBatch
from ingest.model import DeviceRef, Reading
from ingest.presence import StalenessChange, StalenessMonitor, StalenessOptions
from tests.ingest.conftest import ServiceFactory
from tests.mqtt_helpers import publish_all


@dataclass
class Clock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


DEV = DeviceRef("traffic", "chuo", "loop-1")


def _batch(at: float, *ts: float, ut: float | None = None) -> CommittedBatch:
    readings = tuple(Reading(DEV, "occupancy", t, 0.5, None, "/", ut) for t in ts)
    return CommittedBatch(readings=readings, presences=(), dead_letters=(), committed_at=at)


def _monitor(clock: Clock) -> tuple[StalenessMonitor, list[StalenessChange]]:
    changes: list[StalenessChange] = []
    monitor = StalenessMonitor(
        options=StalenessOptions(factor=3.0, grace_s=5.0), clock=clock, listeners=[changes.append]
    )
    return monitor, changes


def test_learned_period_makes_a_silent_device_stale_and_a_report_fresh() -> None:
    clock = Clock()
    monitor, changes = _monitor(clock)
    for k in range(5):
        monitor.on_batch(_batch(clock.now, 990.0 + 10 * k))
    # Period 10 s -> stale after 3 * 10 + 5 = 35 s of silence.
    clock.now += 34
    assert monitor.check() == []
    clock.now += 2
    [change] = monitor.check()
    assert change.stale
    assert change.device_id == "loop-1"
    assert monitor.is_stale("loop-1")
    assert monitor.check() == []  # reported once
    monitor.on_batch(_batch(clock.now, 1_100.0))
    assert changes[-1].stale is False
    assert not monitor.is_stale("loop-1")


def test_senml_ut_overrides_the_learned_period() -> None:
    clock = Clock()
    monitor, _ = _monitor(clock)
    monitor.on_batch(_batch(clock.now, 1.0, 2.0, 3.0, ut=60.0))
    clock.now += 100  # 3 * 1 + 5 would be stale; 3 * 60 + 5 is not
    assert monitor.check() == []
    clock.now += 90
    assert len(monitor.check()) == 1


def test_a_device_with_one_reading_has_no_period_and_is_never_stale() -> None:
    clock = Clock()
    monitor, _ = _monitor(clock)
    monitor.on_batch(_batch(clock.now, 1.0))
    clock.now += 10_000
    assert monitor.check() == []


def test_no_storm_after_restart_until_the_monitor_ran_for_the_threshold() -> None:
    clock = Clock()
    monitor, _ = _monitor(clock)
    # Restored from the database: last heard 1 h ago, period 10 s.
    for i in range(100):
        monitor.restore(f"d{i}", last_received=clock.now - 3_600, period_s=10.0, stale=False)
    clock.now += 30
    assert monitor.check() == []  # running 30 s < 35 s threshold: devices may still report
    monitor.on_batch(
        CommittedBatch(
            readings=tuple(
                Reading(DeviceRef("traffic", "chuo", f"d{i}"), "v", clock.now, 1.0, None, None)
                for i in range(90)
            ),
            presences=(),
            dead_letters=(),
            committed_at=clock.now,
        )
    )
    clock.now += 10
    stale = monitor.check()
    assert sorted(c.device_id for c in stale) == sorted(f"d{i}" for i in range(90, 100))


def test_out_of_order_readings_do_not_shrink_the_period() -> None:
    clock = Clock()
    monitor, _ = _monitor(clock)
    monitor.on_batch(_batch(clock.now, 10.0, 20.0, 30.0, 15.0, 40.0))
    rows = monitor.take_dirty()
    assert rows[0][3] == 10.0  # the late 15.0 was ignored for the period
    assert rows[0][1] == 40.0


async def test_stale_since_is_written_and_cleared(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str
) -> None:
    device = f"s{uuid.uuid4().hex[:6]}"
    topic = f"city/facility/kita/{device}"

    def stale_since() -> tuple[object, ...] | None:
        with psycopg.connect(database_url) as conn:
            return conn.execute(
                "SELECT stale_since, expected_period_s FROM devices WHERE id = %s", (device,)
            ).fetchone()

    now = time.time()
    pack = [{"bn": f"{device}:", "bt": now, "n": "level", "v": 1.0, "ut": 0.2}]
    async with ingest_service(
        staleness=StalenessOptions(factor=2.0, grace_s=0.2, check_interval_s=0.1)
    ) as svc:
        await asyncio.to_thread(publish_all, mqtt_url, [(topic, orjson.dumps(pack))])
        deadline = time.monotonic() + 15
        while not svc.staleness.is_stale(device):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        while (row := stale_since()) is None or row[0] is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert row[1] == 0.2
        await asyncio.to_thread(publish_all, mqtt_url, [(topic, orjson.dumps({"level": 2.0}))])
        while (row := stale_since()) is None or row[0] is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
