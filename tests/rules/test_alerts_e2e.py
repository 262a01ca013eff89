"""Rules in the ingest process: a reading trips a rule, the alert is stored and published."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from cityops.settings import MqttEndpoint
from ingest import PipelineOptions
from tests.ingest.conftest import ServiceFactory
from tests.mqtt_helpers import publish_all
from tests.polling import until as _until

RULES = """
rules:
  - id: tank-low
    name: Tank low
    subject: {domain: facility, channel: level}
    when: value < 2
    clear_when: value > 3
    severity: major
    message: "Tank {device} low: {value}"
    ack_timeout: 1h
"""


class AlertListener:
    """Subscribes to cityops/alerts/# and keeps what arrives."""

    def __init__(self, url: str) -> None:
        ep = MqttEndpoint.parse(url)
        self.events: list[dict[str, Any]] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = lambda c, u, m: self.events.append(orjson.loads(m.payload))
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(ep.host, ep.port)
        self.client.subscribe("cityops/alerts/#", qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _alerts(url: str, device: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT id, state, severity, message, occurrences, version FROM alerts"
            " WHERE device_id = %s ORDER BY raised_at",
            (device,),
        ).fetchall()


async def test_reading_raises_stores_and_publishes_then_clears(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    device = f"tank-{uuid.uuid4().hex[:6]}"
    topic = f"city/facility/kita/{device}"
    listener = AlertListener(mqtt_url)
    try:
        async with ingest_service(rules_path=rules) as svc:
            assert svc.alerts is not None
            now = time.time()
            await asyncio.to_thread(
                publish_all,
                mqtt_url,
                [
                    (topic, orjson.dumps({"ts": now, "level": 5.0})),
                    (topic, orjson.dumps({"ts": now + 1, "level": 1.5})),
                ],
            )
            await _until(lambda: len(_alerts(database_url, device)) == 1)
            [(alert_id, state, severity, message, occurrences, version)] = _alerts(
                database_url, device
            )
            assert (state, severity, occurrences, version) == ("active_unacked", "major", 1, 1)
            assert message == f"Tank {device} low: 1.5"
            await _until(lambda: any(e["alert"]["id"] == alert_id for e in listener.events))
            # Hysteresis: 2.5 is not low any more but not above the clear level.
            await asyncio.to_thread(
                publish_all,
                mqtt_url,
                [
                    (topic, orjson.dumps({"ts": now + 2, "level": 2.5})),
                    (topic, orjson.dumps({"ts": now + 3, "level": 3.5})),
                ],
            )
            await _until(lambda: _alerts(database_url, device)[0][1] == "cleared_unacked")
        with psycopg.connect(database_url) as conn:
            events = conn.execute(
                "SELECT version, action, from_state, to_state FROM alert_events"
                " WHERE alert_id = %s ORDER BY version",
                (alert_id,),
            ).fetchall()
        assert events == [
            (1, "raise", "normal", "active_unacked"),
            (2, "clear", "active_unacked", "cleared_unacked"),
        ]
        await _until(
            lambda: (
                [e["event"]["action"] for e in listener.events if e["alert"]["id"] == alert_id]
                == ["raise", "clear"]
            )
        )
    finally:
        listener.close()


async def test_restart_keeps_the_open_alert_and_raises_no_duplicate(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    device = f"tank-{uuid.uuid4().hex[:6]}"
    topic = f"city/facility/kita/{device}"
    now = time.time()
    async with ingest_service(rules_path=rules):
        await asyncio.to_thread(
            publish_all, mqtt_url, [(topic, orjson.dumps({"ts": now, "level": 1.0}))]
        )
        await _until(lambda: len(_alerts(database_url, device)) == 1)
    async with ingest_service(rules_path=rules) as svc:
        assert svc.alerts is not None
        assert any(a.device_id == device for a in svc.alerts.open_alerts)
        await asyncio.to_thread(
            publish_all, mqtt_url, [(topic, orjson.dumps({"ts": now + 5, "level": 0.5}))]
        )
        await _until(lambda: svc.metrics.stored._value.get() >= 1)
        await asyncio.sleep(0.3)  # let the alert worker apply what it got
    rows = _alerts(database_url, device)
    assert len(rows) == 1  # still one alert: the low level persisted, no second raise
    assert rows[0][1] == "active_unacked"


async def test_alert_does_not_wait_for_its_readings_commit(
    ingest_service: ServiceFactory, mqtt_url: str, database_url: str, tmp_path: Path
) -> None:
    """The rules see readings as decoded: a long batching window delays storage, not alerts."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    device = f"tank-{uuid.uuid4().hex[:6]}"
    topic = f"city/facility/kita/{device}"
    slow_batches = PipelineOptions(batch_max_delay_s=4.0)
    async with ingest_service(rules_path=rules, pipeline=slow_batches) as svc:
        await asyncio.to_thread(
            publish_all, mqtt_url, [(topic, orjson.dumps({"ts": time.time(), "level": 1.0}))]
        )
        await _until(lambda: len(_alerts(database_url, device)) == 1, timeout_s=3.0)
        assert svc.metrics.stored._value.get() == 0  # the reading still waits in its batch
        await _until(lambda: svc.metrics.stored._value.get() == 1, timeout_s=10.0)
    with psycopg.connect(database_url) as conn:
        (stored,) = conn.execute(
            "SELECT count(*) FROM readings r JOIN series s ON s.id = r.series_id"
            " WHERE s.device_id = %s",
            (device,),
        ).fetchone() or (0,)
    assert stored == 1
