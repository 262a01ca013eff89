"""Replayed traffic lands in the replay sandbox, per run, never in live tables."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import psycopg

from tests.ingest.conftest import ServiceFactory
from tests.mqtt_helpers import publish_all


def _rows(url: str, query: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query.encode(), params).fetchall()


async def _until_count(url: str, query: str, n: int, *params: object) -> None:
    deadline = time.monotonic() + 20
    while _rows(url, query, *params)[0][0] != n:
        assert time.monotonic() < deadline, f"expected {n} from {query}"
        await asyncio.sleep(0.05)


async def test_replayed_readings_are_kept_per_run_and_out_of_live_tables(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str
) -> None:
    device = f"r{uuid.uuid4().hex[:6]}"
    inner = f"city/traffic/chuo/{device}"
    payload = orjson.dumps({"ts": time.time(), "intensity": 12})
    status = orjson.dumps({"state": "online", "session": 1})
    msgs = [
        (f"cityops/replay/run-a/{inner}", payload),
        (f"cityops/replay/run-b/{inner}", payload),  # same reading, another run: kept too
        (f"cityops/replay/run-a/{inner}", payload),  # redelivered: stored once
        (f"cityops/replay/run-a/{inner}/status", status),
        (f"cityops/replay/Bad_Run/{inner}", payload),
    ]
    async with ingest_service():
        await asyncio.to_thread(publish_all, mqtt_url, msgs)
        await _until_count(
            database_url,
            "SELECT count(*) FROM replay.readings r JOIN replay.series s ON s.id = r.series_id"
            " WHERE s.device_id = %s",
            2,
            device,
        )
        await _until_count(
            database_url,
            "SELECT count(*) FROM replay.dead_letters WHERE topic LIKE %s",
            1,
            "%Bad_Run%",
        )
        await _until_count(
            database_url,
            "SELECT count(*) FROM replay.presence_events WHERE device_id = %s AND run_id = %s",
            1,
            device,
            "run-a",
        )
    runs = _rows(
        database_url,
        "SELECT r.run_id FROM replay.readings r JOIN replay.series s ON s.id = r.series_id"
        " WHERE s.device_id = %s ORDER BY 1",
        device,
    )
    assert runs == [("run-a",), ("run-b",)]
    assert {r[0] for r in _rows(database_url, "SELECT run_id FROM replay.runs")} >= {
        "run-a",
        "run-b",
    }
    # Nothing of the replay in the live tables.
    assert _rows(database_url, "SELECT count(*) FROM devices WHERE id = %s", device) == [(0,)]
    assert _rows(
        database_url, "SELECT count(*) FROM dead_letters WHERE topic LIKE 'cityops/%%'"
    ) == [(0,)]
    publish_all(mqtt_url, [(f"cityops/replay/run-a/{inner}/status", b"")])
