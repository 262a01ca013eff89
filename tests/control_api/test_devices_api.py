"""Devices over REST, the health probes and the metrics endpoint."""

from __future__ import annotations

import dataclasses

import psycopg
import pytest

from cityops.runtime import DEFAULT_RULES
from cityops.settings import MqttEndpoint
from control_api.context import ApiConfig
from tests.control_api.conftest import ApiClient, RunningApi
from tests.control_api.test_alerts_api import Seeder
from tests.polling import rows


def _seed_devices(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO devices (id, domain, district, kind, presence, stale_since) VALUES"
            " ('tc-1', 'traffic', 'kita', 'loop', 'online', NULL),"
            " ('tc-2', 'traffic', 'minami', 'loop', 'offline', NULL),"
            " ('pump-1', 'facility', 'kita', 'pump', 'online', now()),"
            " ('sd-1', 'emergency', 'kita', 'smoke', 'unknown', NULL)"
        )
        conn.execute(
            "INSERT INTO series (device_id, channel, unit) VALUES"
            " ('tc-1', 'occupancy', '/'), ('tc-1', 'intensity', '1/min'),"
            " ('pump-1', 'state', NULL)"
        )
        conn.execute(
            "INSERT INTO readings (ts, series_id, value, state, received_at)"
            " SELECT now() - make_interval(secs => g), s.id,"
            "  CASE WHEN s.channel = 'state' THEN NULL ELSE g END,"
            "  CASE WHEN s.channel = 'state' THEN 'running' ELSE NULL END, now()"
            " FROM series s, generate_series(0, 9) g"
        )


@pytest.fixture
def api_config(api_config: ApiConfig) -> ApiConfig:
    """No city model: only the devices seeded here exist."""
    return dataclasses.replace(api_config, city=None)


@pytest.fixture
def devices(api: RunningApi) -> RunningApi:
    _seed_devices(api.database_url)
    return api


async def test_list_with_filters_and_cursor(
    devices: RunningApi, clients: dict[str, ApiClient]
) -> None:
    viewer = clients["operator"]

    async def ids(**params: str | int) -> list[str]:
        response = await viewer.get("/api/v1/devices", params=params)
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()["items"]]

    assert await ids() == ["pump-1", "sd-1", "tc-1", "tc-2"]
    assert await ids(domain="traffic") == ["tc-1", "tc-2"]
    assert await ids(district="kita", kind="loop") == ["tc-1"]
    assert await ids(presence="offline") == ["tc-2"]
    assert await ids(presence="stale") == ["pump-1"]
    page = (await viewer.get("/api/v1/devices", params={"limit": 3})).json()
    assert page["next_cursor"] == "tc-1"
    assert await ids(cursor=page["next_cursor"]) == ["tc-2"]
    assert (await viewer.get("/api/v1/devices", params={"domain": "water"})).status_code == 422


async def test_detail_and_latest_values(devices: RunningApi, clients: dict[str, ApiClient]) -> None:
    viewer = clients["engineer"]
    detail = (await viewer.get("/api/v1/devices/tc-1")).json()
    assert detail["domain"] == "traffic"
    latest = {s["channel"]: s["value"] for s in detail["series"]}
    assert latest == {"intensity": 0.0, "occupancy": 0.0}
    pump = (await viewer.get("/api/v1/devices/pump-1/latest")).json()
    assert [(s["channel"], s["state"]) for s in pump] == [("state", "running")]
    missing = await viewer.get("/api/v1/devices/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


async def test_out_of_service_moves_open_alerts_and_is_admin_only(
    devices: RunningApi, clients: dict[str, ApiClient]
) -> None:
    seeder = Seeder(devices.database_url)
    alert_id = await seeder.raise_("pump-fault", "pump-1", "state", "kita", "facility")
    await seeder.store.close()
    refused = await clients["operator"].post(
        "/api/v1/devices/pump-1/out-of-service", json={"note": "repair"}
    )
    assert refused.status_code == 403
    ok = await clients["admin"].post(
        "/api/v1/devices/pump-1/out-of-service", json={"note": "repair"}
    )
    assert ok.status_code == 200
    assert ok.json()["out_of_service"] is True
    alert = (await clients["admin"].get(f"/api/v1/alerts/{alert_id}")).json()
    assert alert["state"] == "out_of_service"
    back = await clients["admin"].post("/api/v1/devices/pump-1/return-to-service", json={})
    assert back.json()["out_of_service"] is False
    alert = (await clients["admin"].get(f"/api/v1/alerts/{alert_id}")).json()
    assert alert["state"] == "active_unacked"
    audited = rows(
        devices.database_url,
        "SELECT action, outcome FROM audit_log WHERE target = 'pump-1' ORDER BY id",
    )
    assert audited == [("device.out_of_service", "ok"), ("device.return_to_service", "ok")]


async def test_probes_and_metrics(
    api: RunningApi, anonymous: ApiClient, clients: dict[str, ApiClient]
) -> None:
    assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
    ready = await anonymous.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["database"] is True
    assert ready.json()["migrations_current"] is True
    assert (await anonymous.get("/metrics")).status_code == 401
    metrics = await clients["operator"].get("/metrics")
    assert metrics.status_code == 200
    assert "cityops_api_requests_total" in metrics.text


async def test_readiness_reports_an_old_schema(api: RunningApi, anonymous: ApiClient) -> None:
    with psycopg.connect(api.database_url, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM schema_migrations"
            " WHERE version = (SELECT max(version) FROM schema_migrations)"
        )
    ready = await anonymous.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["migrations_current"] is False
    assert "schema" in ready.json()["detail"][0]


async def test_the_city_model_registers_devices_and_draws_districts(
    database_url: str, mqtt_url: str
) -> None:
    """With a city model, its devices appear with kind and position before they report."""
    from tests.control_api.conftest import _seed_users, session_for, start_api  # noqa: PLC0415

    _seed_users(database_url)
    config = ApiConfig(
        database_url=database_url, mqtt=MqttEndpoint.parse(mqtt_url), rules_path=DEFAULT_RULES,
        city="testville", client_id="api-test-city",
    )  # fmt: skip
    server, thread, base_url = start_api(config)
    try:
        running = RunningApi(base_url, database_url, config, server, server.config.app)
        client = session_for(running, "operator")
        city = (await client.get("/api/v1/city")).json()
        assert city["name"] == "testville"
        assert city["districts"]
        south, west, north, east = city["bounds"]
        assert south < north
        assert west < east
        listed = (await client.get("/api/v1/devices", params={"limit": 5000})).json()["items"]
        assert len(listed) == city["devices"]
        assert all(d["kind"] and d["lat"] is not None for d in listed)
        assert {d["presence"] for d in listed} == {"unknown"}
        await client.http.aclose()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
