"""Per-device connections with a Last Will, against the real broker.

Each test deletes the retained statuses it leaves behind (``clear_retained``,
and the ``city`` fixture for its 50 devices).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cityops.settings import MqttEndpoint
from simulators.presence import DeviceConnections, PresenceOptions, ensure_fd_limit

from .conftest import Collector, Received, presence, status_filters

KEEPALIVE_S = 2


def _states(messages: list[Received]) -> list[tuple[str, int]]:
    return [next(iter(presence([m]).values())) for m in messages if m.payload]


def test_fd_limit_is_enough_for_a_small_city() -> None:
    assert ensure_fd_limit(100)


def test_outage_disconnects_with_will_and_returns_with_the_next_session(
    endpoint: MqttEndpoint,
    collect: Callable[..., Collector],
    clear_retained: Callable[[Iterable[str]], None],
) -> None:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    topic = f"city/facility/t{uuid.uuid4().hex[:6]}/{device}/status"
    clear_retained([topic])
    live = collect(topic)
    with DeviceConnections(endpoint, options=PresenceOptions(keepalive_s=5)) as devices:
        devices.online(device, topic, 100)
        live.wait_for(lambda ms: _states(ms) == [("online", 100)])
        # DISCONNECT 0x04: the broker publishes the will (a normal one would discard it).
        devices.offline(device, topic, 100, will=True)
        live.wait_for(lambda ms: _states(ms)[-1:] == [("offline", 100)])
        devices.online(device, topic, 101)
        live.wait_for(lambda ms: _states(ms)[-1:] == [("online", 101)])
        devices.offline(device, topic, 101, will=False)  # clean stop
    assert devices.close()
    live.wait_for(lambda ms: len(_states(ms)) == 4)
    assert _states(live.messages) == [
        ("online", 100),
        ("offline", 100),
        ("online", 101),
        ("offline", 101),
    ]
    assert all(m.retain is False for m in live.messages)  # live delivery, retained on the broker
    assert devices.wills == 1
    assert devices.statuses == 3  # the will is the broker's, not ours
    assert devices.counts.published[1] == devices.counts.acked[1] == 3


def test_an_error_in_the_publisher_leaves_devices_offline_by_their_wills(
    endpoint: MqttEndpoint,
    collect: Callable[..., Collector],
    clear_retained: Callable[[Iterable[str]], None],
) -> None:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    topic = f"city/facility/t{uuid.uuid4().hex[:6]}/{device}/status"
    clear_retained([topic])
    live = collect(topic)
    devices = DeviceConnections(endpoint, options=PresenceOptions(keepalive_s=5))

    def publisher_fails() -> None:
        with devices:
            devices.online(device, topic, 5)
            live.wait_for(lambda ms: _states(ms) == [("online", 5)])
            raise RuntimeError

    with pytest.raises(RuntimeError):
        publisher_fails()
    live.wait_for(lambda ms: _states(ms) == [("online", 5), ("offline", 5)], timeout_s=5.0)
    assert devices.statuses == 1


def test_a_lost_connection_comes_back_with_the_next_session(
    endpoint: MqttEndpoint,
    collect: Callable[..., Collector],
    clear_retained: Callable[[Iterable[str]], None],
) -> None:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    topic = f"city/facility/t{uuid.uuid4().hex[:6]}/{device}/status"
    clear_retained([topic])
    live = collect(topic)
    options = PresenceOptions(keepalive_s=5, backoff_initial_s=0.2)
    with DeviceConnections(endpoint, options=options) as devices:
        devices.online(device, topic, 7)
        live.wait_for(lambda ms: _states(ms) == [("online", 7)])
        # Another client with the same id takes the session over: the broker
        # drops ours (publishing its will); the device reconnects as session 8.
        intruder = paho.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5)
        intruder.connect(endpoint.host, endpoint.port)
        deadline = time.monotonic() + 10.0
        while not intruder.is_connected() and time.monotonic() < deadline:
            intruder.loop(0.05)  # until its CONNACK; then it is left silent, never reconnecting
        try:
            live.wait_for(lambda ms: _states(ms)[-2:] == [("offline", 7), ("online", 8)])
        finally:
            sock = intruder.socket()
            if sock is not None:
                sock.close()
        devices.offline(device, topic, 7, will=False)  # the engine's session is behind: ours wins
    live.wait_for(lambda ms: _states(ms)[-1:] == [("offline", 8)])
    assert devices.reconnects == 1


def test_kill_9_leaves_every_device_offline_by_its_will(
    mqtt_url: str,
    endpoint: MqttEndpoint,
    city: tuple[Path, tuple[str, str]],
    collect: Callable[..., Collector],
    tmp_path: Path,
) -> None:
    path, _ = city
    filters = status_filters(city)
    live = collect(*filters)
    log = (tmp_path / "simulate.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "cityops.cli", "simulate",
            "--mqtt-url", mqtt_url,
            "--city", str(path),
            "--seed", "3",
            "--device-keepalive", str(KEEPALIVE_S),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )  # fmt: skip
    try:
        live.wait_for(lambda ms: len(presence(ms)) == 50, timeout_s=30.0)
        online = presence(live.messages)
        assert {state for state, _ in online.values()} == {"online"}
        retained = collect(*filters)  # a fresh subscriber sees what the broker retained
        retained.wait_for(lambda ms: presence(ms, retained_only=True) == online)
        proc.kill()
        killed = time.monotonic()
        expected = {topic: ("offline", session) for topic, (_, session) in online.items()}
        live.wait_for(lambda ms: presence(ms) == expected, timeout_s=KEEPALIVE_S * 1.5)
        assert time.monotonic() - killed <= KEEPALIVE_S * 1.5
        after = collect(*filters)
        after.wait_for(lambda ms: presence(ms, retained_only=True) == expected)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()
    assert proc.returncode == -9


@pytest.mark.parametrize("limit", ["10"])
def test_above_the_limit_presence_is_shared_and_says_so(
    mqtt_url: str,
    city: tuple[Path, tuple[str, str]],
    limit: str,
) -> None:
    path, _ = city
    proc = subprocess.run(
        [
            sys.executable, "-m", "simulators", "simulate",
            "--mqtt-url", mqtt_url,
            "--city", str(path),
            "--seed", "3",
            "--start", "2026-06-03T08:00:00+09:00",
            "--as-fast-as-possible",
            "--duration", "1m",
            "--device-connections-limit", limit,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exceed --device-connections-limit 10" in proc.stderr
    assert "without a Last Will" in proc.stderr
    assert '"presence":"shared"' in proc.stdout
    assert '"statuses":100' in proc.stdout
