"""History over REST: bucketed JSON, group aggregates, streamed CSV, errors."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.control_api.conftest import ApiClient, RunningApi

START = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def history(api: RunningApi) -> RunningApi:
    with psycopg.connect(api.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO devices (id, domain, district, kind) VALUES"
            " ('tc-1', 'traffic', 'kita', 'loop'), ('tc-2', 'traffic', 'kita', 'loop')"
        )
        conn.execute(
            "INSERT INTO series (device_id, channel, unit) VALUES"
            " ('tc-1', 'occupancy', '/'), ('tc-2', 'occupancy', '/')"
        )
        # 2 hours of 1-second data for both series: value = seconds since START
        conn.execute(
            "INSERT INTO readings (ts, series_id, value, received_at)"
            " SELECT %s + make_interval(secs => g), s.id, g, now()"
            " FROM series s, generate_series(0, 7199) g",
            (START,),
        )
    return api


def _range(hours: float) -> dict[str, str]:
    return {"start": START.isoformat(), "end": (START + timedelta(hours=hours)).isoformat()}


async def test_a_long_range_is_bucketed_and_a_short_one_is_raw(
    history: RunningApi, clients: dict[str, ApiClient]
) -> None:
    viewer = clients["operator"]
    two_hours = await viewer.get("/api/v1/devices/tc-1/series/occupancy/history", params=_range(2))
    assert two_hours.status_code == 200, two_hours.text
    body = two_hours.json()
    assert body["bucket"] == "1m"
    assert len(body["points"]) == 120
    first = body["points"][0]
    assert (first["readings"], first["min"], first["max"], first["avg"]) == (60, 0, 59, 29.5)
    short = await viewer.get(
        f"/api/v1/series/{body['series_id']}/history",
        params={"start": START.isoformat(), "end": (START + timedelta(minutes=5)).isoformat()},
    )
    assert short.json()["bucket"] == "raw"
    assert [p["value"] for p in short.json()["points"][:3]] == [0, 1, 2]
    forced = await viewer.get(
        "/api/v1/devices/tc-1/series/occupancy/history", params={**_range(2), "bucket": "1h"}
    )
    assert [p["avg"] for p in forced.json()["points"]] == [1799.5, 5399.5]


async def test_group_aggregate(history: RunningApi, clients: dict[str, ApiClient]) -> None:
    response = await clients["engineer"].get(
        "/api/v1/history/group",
        params={**_range(2), "channel": "occupancy", "district": "kita", "bucket": "1h"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["devices"] == 2
    assert [(p["readings"], p["devices"]) for p in body["points"]] == [(7200, 2), (7200, 2)]


async def test_csv_export_streams_every_reading(
    history: RunningApi, clients: dict[str, ApiClient]
) -> None:
    viewer = clients["operator"]
    series = await viewer.get("/api/v1/devices/tc-1/series/occupancy/history", params=_range(1))
    series_id = series.json()["series_id"]
    response = await viewer.get(f"/api/v1/series/{series_id}/history.csv", params=_range(2))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(response.text)))
    assert len(table) == 7200
    assert datetime.fromisoformat(table[0]["ts"]) == START
    assert float(table[-1]["value"]) == 7199
    group = await viewer.get(
        "/api/v1/history/group.csv", params={**_range(2), "channel": "occupancy", "bucket": "1h"}
    )
    assert len(list(csv.DictReader(io.StringIO(group.text)))) == 2


async def test_errors_are_clear(history: RunningApi, clients: dict[str, ApiClient]) -> None:
    viewer = clients["operator"]
    backwards = {"start": _range(2)["end"], "end": _range(2)["start"]}
    bad = await viewer.get("/api/v1/devices/tc-1/series/occupancy/history", params=backwards)
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid"
    missing = await viewer.get("/api/v1/devices/nope/series/occupancy/history", params=_range(1))
    assert missing.status_code == 404
    csv_missing = await viewer.get("/api/v1/series/999999/history.csv", params=_range(1))
    assert csv_missing.status_code == 404
    too_fine = await viewer.get(
        "/api/v1/devices/tc-1/series/occupancy/history",
        params={"start": START.isoformat(), "end": (START + timedelta(days=30)).isoformat(),
                "bucket": "1m"},
    )  # fmt: skip
    assert too_fine.status_code == 422
    assert "20000" in too_fine.json()["error"]["message"].replace(",", "")
