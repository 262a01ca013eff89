"""The live websocket of the real API: auth and origin, broker feed to browsers, acks over it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from control_api.auth import SESSION_COOKIE
from tests.control_api.conftest import ApiClient, RunningApi
from tests.control_api.test_alerts_api import Seeder
from tests.mqtt_helpers import publish_all
from tests.polling import until_async

DEADLINE_S = 20.0


def _ws_url(api: RunningApi, query: str = "") -> str:
    return api.base_url.replace("http://", "ws://") + "/api/v1/live" + query


def _cookie(client: ApiClient) -> dict[str, str]:
    return {"Cookie": client.headers["Cookie"]}


async def _next(ws: ClientConnection, kind: str, pred: Any = None) -> dict[str, Any]:
    """The next frame of ``kind`` (matching ``pred``), skipping others; fails at the deadline."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            while True:
                message = orjson.loads(await ws.recv(decode=False))
                frames = message["frames"] if message["type"] == "batch" else [message]
                for frame in frames:
                    if frame["type"] == kind and (pred is None or pred(frame)):
                        return frame  # type: ignore[no-any-return]
    except TimeoutError:
        pytest.fail(f"no {kind} frame within {DEADLINE_S} s")


@pytest.fixture
async def browser(
    api: RunningApi, clients: dict[str, ApiClient]
) -> AsyncIterator[ClientConnection]:
    async with connect(
        _ws_url(api),
        additional_headers=_cookie(clients["responder"]),
        origin=api.base_url,  # type: ignore[arg-type]
    ) as ws:
        yield ws


async def test_snapshot_then_readings_from_the_broker(
    api: RunningApi, browser: ClientConnection, mqtt_url: str
) -> None:
    snapshot = await _next(browser, "snapshot")
    assert snapshot["source"] == "live"
    assert {"devices", "alerts", "kpis", "seq", "hub"} <= snapshot.keys()
    # /readyz turns 200 once the API's own broker subscription is up
    async with httpx.AsyncClient(base_url=api.base_url) as http:

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await until_async(ready, DEADLINE_S)
    topic = "city/traffic/kita/live-tc-1"
    await asyncio.to_thread(publish_all, mqtt_url, [(topic, orjson.dumps({"occupancy": 0.42}))])
    frame = await _next(browser, "readings", lambda f: any(i[0] == "live-tc-1" for i in f["items"]))
    item = next(i for i in frame["items"] if i[0] == "live-tc-1")
    assert item[1] == "occupancy"
    assert item[3] == 0.42


async def test_handshakes_without_session_or_from_a_foreign_origin_are_refused(
    api: RunningApi, clients: dict[str, ApiClient]
) -> None:
    with pytest.raises(InvalidStatus):
        async with connect(_ws_url(api), origin=api.base_url):  # type: ignore[arg-type]
            pass
    with pytest.raises(InvalidStatus):
        async with connect(
            _ws_url(api), additional_headers=_cookie(clients["operator"]),
            origin="https://evil.example",  # type: ignore[arg-type]
        ):  # fmt: skip
            pass
    # a cookie without any Origin is refused too: only tokens may omit it
    with pytest.raises(InvalidStatus):
        async with connect(_ws_url(api), additional_headers=_cookie(clients["operator"])):
            pass


async def test_a_token_client_needs_no_origin(
    api: RunningApi, clients: dict[str, ApiClient]
) -> None:
    issued = await clients["admin"].post("/api/v1/tokens", json={"user": "operator"})
    headers = {"Authorization": f"Bearer {issued.json()['token']}"}
    async with connect(_ws_url(api), additional_headers=headers) as ws:
        assert (await _next(ws, "snapshot"))["source"] == "live"


async def test_acknowledge_over_the_socket_reaches_a_second_browser(
    api: RunningApi, clients: dict[str, ApiClient], browser: ClientConnection
) -> None:
    seeder = Seeder(api.database_url)
    fire = await seeder.raise_("smoke-detected", "sd-7", "alarm", "ekimae", "emergency")
    await seeder.store.close()
    await _next(browser, "snapshot")
    async with connect(
        _ws_url(api),
        additional_headers=_cookie(clients["operator"]),
        origin=api.base_url,  # type: ignore[arg-type]
    ) as operator:
        await _next(operator, "snapshot")
        # the operator may not acknowledge an emergency alert: same checks as REST
        await operator.send(
            orjson.dumps({"type": "ack", "id": 1, "alert_id": fire, "version": 1}).decode()
        )
        refused = await _next(operator, "result")
        assert (refused["id"], refused["ok"], refused["status"]) == (1, False, 403)
        await browser.send(
            orjson.dumps(
                {"type": "ack", "id": 7, "alert_id": fire, "version": 1, "note": "on my way"}
            ).decode()
        )
        result = await _next(browser, "result")
        assert (result["id"], result["ok"]) == (7, True)
        assert result["alert"]["state"] == "active_acked"
        seen = await _next(operator, "alert", lambda f: f["alert"]["id"] == fire)
        assert seen["event"]["action"] == "acknowledge"
        assert seen["alert"]["acked_by"] == "responder"
        stale = orjson.dumps({"type": "ack", "id": 8, "alert_id": fire, "version": 1})
        await browser.send(stale.decode())
        conflict = await _next(browser, "result")
        assert conflict["status"] == 409
        assert conflict["current"]["acked_by"] == "responder"


async def test_resume_after_a_disconnect(
    api: RunningApi, clients: dict[str, ApiClient], mqtt_url: str
) -> None:
    headers = _cookie(clients["engineer"])
    async with connect(_ws_url(api), additional_headers=headers, origin=api.base_url) as ws:  # type: ignore[arg-type]
        first = await _next(ws, "snapshot")
    query = f"?hub={first['hub']}&seq={first['seq']}"
    async with connect(_ws_url(api, query), additional_headers=headers, origin=api.base_url) as ws:  # type: ignore[arg-type]
        resumed = orjson.loads(await ws.recv(decode=False))
        assert resumed["type"] == "resumed"
        assert resumed["hub"] == first["hub"]
    gone = f"?hub=another-hub&seq={first['seq']}"
    async with connect(_ws_url(api, gone), additional_headers=headers, origin=api.base_url) as ws:  # type: ignore[arg-type]
        assert orjson.loads(await ws.recv(decode=False))["type"] == "snapshot"
    assert SESSION_COOKIE in headers["Cookie"]
