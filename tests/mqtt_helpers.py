"""A test publisher: publishes QoS 1 messages and waits until the broker has them all.

paho overwrites in-flight entries when more than 65,535 messages are queued on
one client (packet ids wrap), so the number of unacknowledged publishes is
bounded here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityops.settings import MqttEndpoint

Message = tuple[str, bytes]


class Publisher:
    """A paho client with a persistent session that survives broker restarts."""

    def __init__(self, url: str, *, window: int = 5_000, client_id: str | None = None) -> None:
        ep = MqttEndpoint.parse(url)
        self._window = window
        self._cv = threading.Condition()
        self._acked = 0
        self._sent = 0
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-pub-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.max_inflight_messages_set(1_000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_publish = self._on_publish
        if ep.username is not None:
            self.client.username_pw_set(ep.username, ep.password)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 600
        self.client.connect(ep.host, ep.port, keepalive=10, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._cv:
            self._acked += 1
            self._cv.notify_all()

    def publish(
        self, messages: Iterable[Message], *, qos: int = 1, properties: Properties | None = None
    ) -> int:
        """Publish and return how many were handed to paho."""
        n = 0
        for topic, payload in messages:
            with self._cv:
                while self._sent - self._acked >= self._window:
                    self._cv.wait(1.0)
                self._sent += 1
            self.client.publish(topic, payload, qos=qos, properties=properties)
            n += 1
        return n

    def wait_acked(self, timeout_s: float = 60.0) -> None:
        """Block until the broker acknowledged everything published."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._acked < self._sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    msg = f"only {self._acked} of {self._sent} publishes acknowledged"
                    raise TimeoutError(msg)
                self._cv.wait(min(left, 0.5))

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def publish_all(url: str, messages: Iterable[Message], *, qos: int = 1) -> int:
    """Publish ``messages`` and wait until the broker acknowledged all."""
    with Publisher(url) as pub:
        n = pub.publish(messages, qos=qos)
        if qos:
            pub.wait_acked()
        return n


def drop_session(url: str, client_id: str) -> None:
    """Remove a persistent session (and its queue) from the broker."""
    ep = MqttEndpoint.parse(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.connect(ep.host, ep.port, clean_start=True, properties=props)
    client.loop(timeout=1.0)
    client.disconnect()


def create_session(url: str, client_id: str, topic_filter: str = "city/#") -> None:
    """Subscribe as ``client_id`` and leave, so the broker queues for it from now on.

    The session is created with ``clean_start=False``: Mosquitto 2.0.11 keeps a
    session across its own restart only then.
    """
    ep = MqttEndpoint.parse(url)
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.on_subscribe = lambda *args: done.set()
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    client.connect(ep.host, ep.port, clean_start=False, properties=props)
    client.loop_start()
    client.subscribe(topic_filter, qos=1)
    if not done.wait(10):
        msg = f"no SUBACK for {client_id}"
        raise TimeoutError(msg)
    client.disconnect()
    client.loop_stop()
