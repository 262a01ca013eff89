"""Fixtures for the simulator tests: a small city, and MQTT collectors on the shared broker.

The broker is the session ``mqtt_url`` of ``tests/conftest.py``. Every test
uses its own run id or topic prefix, so tests never see each other's traffic.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from cityops.settings import MqttEndpoint
from simulators.model import CityModel, load_city
from simulators.mqtt import MqttPublisher

CITIES = Path(__file__).parents[2] / "simulators" / "cities"

WEDNESDAY = 1_780_412_400.0
"""Wednesday 2026-06-03 00:00 JST: a fixed simulated midnight for pattern tests."""


@pytest.fixture(scope="session")
def testville() -> CityModel:
    return load_city("testville")


@pytest.fixture(scope="session")
def minamikawa() -> CityModel:
    return load_city("minamikawa")


@pytest.fixture(scope="session")
def endpoint(mqtt_url: str) -> MqttEndpoint:
    return MqttEndpoint.parse(mqtt_url)


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    user_properties: tuple[tuple[str, str], ...]
    content_type: str | None


class Collector:
    """Subscribes to topic filters and keeps what arrives; waits by condition, with a deadline."""

    def __init__(self, endpoint: MqttEndpoint, topics: tuple[str, ...]) -> None:
        self.messages: list[Received] = []
        self._cv = threading.Condition()
        self._subscribed = threading.Event()
        self._topics = topics
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-collect-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect(endpoint.host, endpoint.port)
        self._client.loop_start()
        if not self._subscribed.wait(10.0):
            msg = f"no SUBACK for {topics}"
            raise TimeoutError(msg)

    def _on_connect(
        self, client: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        client.subscribe([(t, 1) for t in self._topics])

    def _on_subscribe(self, *_args: object) -> None:
        self._subscribed.set()

    def _on_message(self, _c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        props = message.properties
        user = tuple(getattr(props, "UserProperty", []) or []) if props else ()
        ct = getattr(props, "ContentType", None) if props else None
        with self._cv:
            self.messages.append(
                Received(message.topic, bytes(message.payload), bool(message.retain), user, ct)
            )
            self._cv.notify_all()

    def wait_for(
        self, condition: Callable[[list[Received]], bool], timeout_s: float = 20.0
    ) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not condition(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    msg = f"condition not met; {len(self.messages)} messages received"
                    raise TimeoutError(msg)
                self._cv.wait(remaining)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def collect(endpoint: MqttEndpoint) -> Iterator[Callable[..., Collector]]:
    collectors: list[Collector] = []

    def make(*topics: str) -> Collector:
        collector = Collector(endpoint, topics)
        collectors.append(collector)
        return collector

    yield make
    for collector in collectors:
        collector.close()


@pytest.fixture
def city(
    tmp_path: Path, clear_retained: Callable[[Iterable[str]], None]
) -> tuple[Path, tuple[str, str]]:
    """The test city with district names unique to this test (so topics are too).

    The retained statuses of its 50 devices are deleted after the test.
    """
    suffix = uuid.uuid4().hex[:6]
    text = (CITIES / "testville.yaml").read_text()
    text = text.replace("kita", f"kita{suffix}").replace("minami", f"minami{suffix}")
    path = tmp_path / "city.yaml"
    path.write_text(text)
    clear_retained(d.status_topic for d in load_city(str(path)).devices)
    return path, (f"kita{suffix}", f"minami{suffix}")


def json_line(out: str) -> dict[str, Any]:
    """The final JSON line a command printed."""
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    return result


def status_filters(city: tuple[Path, tuple[str, str]]) -> tuple[str, ...]:
    """Topic filters of every status topic of a ``city`` fixture."""
    return tuple(f"city/+/{district}/+/status" for district in city[1])


def presence(messages: Iterable[Received], *, retained_only: bool = False) -> dict[str, Any]:
    """The last ``(state, session)`` per status topic (an empty payload clears it)."""
    latest: dict[str, Any] = {}
    for m in messages:
        if not m.topic.endswith("/status") or (retained_only and not m.retain):
            continue
        if m.payload:
            doc = orjson.loads(m.payload)
            latest[m.topic] = (doc["state"], doc["session"])
        else:
            latest.pop(m.topic, None)
    return latest


@pytest.fixture
def clear_retained(endpoint: MqttEndpoint) -> Iterator[Callable[[Iterable[str]], None]]:
    """Register status topics; their retained messages are deleted after the test."""
    topics: set[str] = set()
    yield topics.update
    if topics:
        with MqttPublisher(endpoint, client_id=f"test-clear-{uuid.uuid4().hex[:8]}") as publisher:
            for topic in sorted(topics):
                publisher.publish(topic, b"", qos=1, retain=True)
