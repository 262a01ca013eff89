"""Alert service behaviours against the real database and broker.

Concurrent acknowledgements, flood grouping into incidents, hot reload of a
broken rule file, escalation of an unacknowledged alert.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import orjson
import psycopg
import pytest

from rules.alerts import Actor, Alert, AlertEvent
from rules.commands import AlertCommands
from rules.errors import VersionConflict
from rules.lifecycle import AlertLifecycle
from rules.loader import RuleSet
from rules.store import AlertStore
from tests.ingest.conftest import ServiceFactory
from tests.mqtt_helpers import publish_all
from tests.polling import rows as _rows
from tests.polling import until as _until

LOW = """
rules:
  - id: tank-low
    name: Tank low
    subject: {{domain: facility, channel: level}}
    when: value < {threshold}
    severity: major
    message: "Tank {{device}} low"
    ack_role: operator
    ack_timeout: {ack_timeout}
    escalation:
      - {{after: 0s, notify: engineer}}
"""


class NullPublisher:
    async def publish(self, alert: Alert, event: AlertEvent) -> None:
        return None


class Clock:
    def now(self) -> float:
        return time.time()


async def test_twenty_simultaneous_acknowledgements_one_succeeds(
    database_url: str, tmp_path: Path
) -> None:
    rules_file = tmp_path / "r.yaml"
    rules_file.write_text(LOW.format(threshold=2, ack_timeout="1h"))
    rules = RuleSet.load(rules_file)
    now = time.time()
    alert = Alert(
        id=uuid.uuid4().hex, rule_id="tank-low", subject="tank-low|t1|level", severity="major",
        state="active_unacked", version=1, message="Tank t1 low", raised_at=now, updated_at=now,
        device_id="t1", channel="level", district="kita", unacked_since=now,
    )  # fmt: skip
    raise_event = AlertEvent(alert.id, 1, "raise", "normal", "active_unacked", "system", now)
    seed = AlertStore(database_url)
    await seed.save(None, alert, raise_event)
    await seed.close()

    stores = [AlertStore(database_url) for _ in range(20)]
    commands = [
        AlertCommands(
            store=s, lifecycle=AlertLifecycle(rules.rules, clock=Clock()), publisher=NullPublisher()
        )
        for s in stores
    ]
    results = await asyncio.gather(
        *(
            c.acknowledge(alert.id, by=Actor(f"op{i}", "operator"), expected_version=1)
            for i, c in enumerate(commands)
        ),
        return_exceptions=True,
    )
    for s in stores:
        await s.close()
    winners = [r for r in results if isinstance(r, Alert)]
    losers = [r for r in results if isinstance(r, VersionConflict)]
    assert len(winners) == 1
    assert len(losers) == 19
    assert all(loser.acked_by == winners[0].acked_by for loser in losers)
    assert all(loser.acked_at == pytest.approx(winners[0].acked_at) for loser in losers)
    assert str(winners[0].acked_by) in str(losers[0])
    events = _rows(
        database_url,
        "SELECT action, actor FROM alert_events WHERE alert_id = %s ORDER BY version",
        alert.id,
    )
    assert events == [("raise", "system"), ("acknowledge", winners[0].acked_by)]


async def test_alert_flood_in_one_district_is_grouped_as_one_incident(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str, tmp_path: Path
) -> None:
    rules_file = tmp_path / "r.yaml"
    rules_file.write_text(LOW.format(threshold=2, ack_timeout="1h"))
    district = f"d{uuid.uuid4().hex[:6]}"
    now = time.time()
    msgs = [
        (f"city/facility/{district}/tank-{i}", orjson.dumps({"ts": now, "level": 1.0}))
        for i in range(12)
    ]
    async with ingest_service(rules_path=rules_file):
        await asyncio.to_thread(publish_all, mqtt_url, msgs)
        query = "SELECT count(*) FROM alerts WHERE district = %s AND incident_id IS NOT NULL"
        await _until(lambda: _rows(database_url, query, district) == [(12,)])
    incidents = _rows(
        database_url, "SELECT DISTINCT incident_id FROM alerts WHERE district = %s", district
    )
    assert len(incidents) == 1
    assert _rows(database_url, "SELECT district FROM incidents WHERE id = %s", incidents[0][0]) == [
        (district,)
    ]


async def test_broken_rule_file_keeps_previous_rules_and_a_fixed_one_is_reloaded(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str, tmp_path: Path
) -> None:
    rules_file = tmp_path / "r.yaml"
    rules_file.write_text(LOW.format(threshold=2, ack_timeout="1h"))
    device = f"tank-{uuid.uuid4().hex[:6]}"
    topic = f"city/facility/kita/{device}"
    async with ingest_service(rules_path=rules_file) as svc:
        assert svc.alerts is not None
        first = svc.alerts.rules
        rules_file.write_text("rules:\n  - id: tank-low\n    when: value <\n")
        await asyncio.sleep(1.5)  # a tick passes: the broken file must not replace the rules
        assert svc.alerts.rules is first
        await asyncio.to_thread(
            publish_all, mqtt_url, [(topic, orjson.dumps({"ts": time.time(), "level": 1.0}))]
        )
        query = "SELECT count(*) FROM alerts WHERE device_id = %s"
        await _until(lambda: _rows(database_url, query, device) == [(1,)])
        rules_file.write_text(LOW.format(threshold=5, ack_timeout="1h"))
        await _until(lambda: svc.alerts is not None and svc.alerts.rules is not first)
        assert "value < 5" in svc.alerts.rules.get("tank-low").when_text


async def test_unacknowledged_alert_escalates_after_ack_timeout(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str, tmp_path: Path
) -> None:
    rules_file = tmp_path / "r.yaml"
    rules_file.write_text(LOW.format(threshold=2, ack_timeout="1s"))
    device = f"tank-{uuid.uuid4().hex[:6]}"
    async with ingest_service(rules_path=rules_file):
        await asyncio.to_thread(
            publish_all,
            mqtt_url,
            [(f"city/facility/kita/{device}", orjson.dumps({"ts": time.time(), "level": 1.0}))],
        )
        query = (
            "SELECT e.action, e.notify FROM alert_events e JOIN alerts a ON a.id = e.alert_id"
            " WHERE a.device_id = %s ORDER BY e.version"
        )
        await _until(lambda: len(_rows(database_url, query, device)) == 2)
    assert _rows(database_url, query, device) == [("raise", "operator"), ("escalate", "engineer")]


async def test_a_drill_is_stored_live_but_its_alerts_never_page(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str, tmp_path: Path
) -> None:
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    from tests.mqtt_helpers import Publisher  # noqa: PLC0415

    rules_file = tmp_path / "r.yaml"
    rules_file.write_text(LOW.format(threshold=2, ack_timeout="1s"))
    device = f"tank-{uuid.uuid4().hex[:6]}"
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = ("cityops-drill", "drill-1")
    async with ingest_service(rules_path=rules_file):
        with Publisher(mqtt_url) as pub:
            pub.publish(
                [(f"city/facility/kita/{device}", orjson.dumps({"ts": time.time(), "level": 1.0}))],
                properties=props,
            )
            pub.wait_acked()
        query = "SELECT source, state FROM alerts WHERE device_id = %s"
        await _until(lambda: len(_rows(database_url, query, device)) == 1)
        await asyncio.sleep(1.5)  # past the ack timeout: a suppressed drill alert never escalates
    assert _rows(database_url, query, device) == [("drill", "suppressed")]
    events = _rows(
        database_url,
        "SELECT e.action, e.notify FROM alert_events e JOIN alerts a ON a.id = e.alert_id"
        " WHERE a.device_id = %s",
        device,
    )
    assert events == [("raise", None)]
    stored = _rows(
        database_url,
        "SELECT count(*) FROM readings r JOIN series s ON s.id = r.series_id"
        " WHERE s.device_id = %s",
        device,
    )
    assert stored == [(1,)]


async def test_every_people_action_is_stored_as_an_event_with_actor_and_note(
    database_url: str, tmp_path: Path
) -> None:
    rules_file = tmp_path / "r.yaml"
    rules_file.write_text(
        LOW.format(threshold=2, ack_timeout="1h") + "    resolve_manually: true\n"
    )
    rules = RuleSet.load(rules_file)
    now = time.time()
    alert = Alert(
        id=uuid.uuid4().hex, rule_id="tank-low", subject="tank-low|t9|level", severity="major",
        state="active_unacked", version=1, message="Tank t9 low", raised_at=now, updated_at=now,
        device_id="t9", channel="level", district="kita", unacked_since=now,
    )  # fmt: skip
    store = AlertStore(database_url)
    await store.save(
        None, alert, AlertEvent(alert.id, 1, "raise", "normal", "active_unacked", "system", now)
    )
    cmd = AlertCommands(
        store=store, lifecycle=AlertLifecycle(rules.rules, clock=Clock()), publisher=NullPublisher()
    )
    ana = Actor("ana", "operator")
    a = await cmd.comment(alert.id, by=ana, note="crew informed", expected_version=1)
    a = await cmd.assign(alert.id, by=ana, to="ken", expected_version=a.version)
    a = await cmd.shelve(
        alert.id, by=ana, until=time.time() + 600, reason="pump swap", expected_version=a.version
    )
    assert a.state == "shelved"
    a = await cmd.unshelve(alert.id, by=ana, expected_version=a.version)
    a = await cmd.acknowledge(alert.id, by=ana, note="on it", expected_version=a.version)
    a = await cmd.put_out_of_service(
        alert.id, by=ana, note="maintenance", expected_version=a.version
    )
    a = await cmd.return_to_service(alert.id, by=ana, expected_version=a.version)
    a = await cmd.resolve(alert.id, by=ana, note="fixed", expected_version=a.version)
    assert a.state == "closed"
    with pytest.raises(VersionConflict):
        await cmd.comment(alert.id, by=ana, note="late", expected_version=1)
    events = [(r["action"], r["actor"], r["note"]) for r in await store.events(alert.id)]
    await store.close()
    assert events[0][0] == "raise"
    assert [e[0] for e in events[1:]] == [
        "comment", "assign", "shelve", "unshelve", "acknowledge",
        "put_out_of_service", "return_to_service", "resolve",
    ]  # fmt: skip
    assert all(actor == "ana" for _, actor, _ in events[1:])
    assert ("comment", "ana", "crew informed") in events
    assert ("shelve", "ana", "pump swap") in events
    assert ("resolve", "ana", "fixed") in events
    assert _rows(database_url, "SELECT state, assignee FROM alerts WHERE id = %s", alert.id) == [
        ("closed", "ken")
    ]


async def test_a_device_put_out_of_service_opens_its_new_alerts_out_of_service(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str, tmp_path: Path
) -> None:
    rules_file = tmp_path / "r.yaml"
    rules_file.write_text(LOW.format(threshold=2, ack_timeout="1s"))
    device = f"tank-{uuid.uuid4().hex[:6]}"
    topic = f"city/facility/kita/{device}"
    async with ingest_service(rules_path=rules_file) as svc:
        assert svc.alerts is not None
        # the device registers on its first (normal) reading; then maintenance starts
        await asyncio.to_thread(
            publish_all, mqtt_url, [(topic, orjson.dumps({"ts": time.time(), "level": 5.0}))]
        )
        await _until(lambda: _rows(database_url, "SELECT 1 FROM devices WHERE id = %s", device))
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE devices SET out_of_service = true WHERE id = %s", (device,))
        await _until(lambda: svc.alerts is not None and device in svc.alerts.out_of_service)
        await asyncio.to_thread(
            publish_all, mqtt_url, [(topic, orjson.dumps({"ts": time.time(), "level": 1.0}))]
        )
        query = (
            "SELECT a.state, e.notify FROM alerts a JOIN alert_events e ON e.alert_id = a.id"
            " WHERE a.device_id = %s ORDER BY e.version"
        )
        await _until(lambda: len(_rows(database_url, query, device)) == 1)
        # past the ack timeout: an out-of-service alert neither pages nor escalates
        await asyncio.sleep(1.5)
    assert _rows(database_url, query, device) == [("out_of_service", None)]
