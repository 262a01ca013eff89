"""The MQTT load of the benchmarks: JSON single readings of many devices, paced, QoS 1.

A publisher process (:func:`publisher_main`, driven over a pipe) publishes
``{"ts": <send time>, "occupancy": x}`` on ``city/traffic/{district}/{device}``
for the devices of a :class:`Load`: one message per device first (devices and
series get created), a keep-alive trickle between runs, and paced runs
(:func:`paced`) that count exactly what they published and wait until the
broker acknowledged all of it. :class:`RawPublisher` writes MQTT 3.1.1 packets
by hand (light); :class:`PahoPublisher` drives paho-mqtt. Shared by
:mod:`bench.api` and :mod:`bench.soak`.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Protocol

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cityops.settings import MqttEndpoint


@dataclass(frozen=True, slots=True)
class Load:
    """The published load: single JSON readings of ``devices`` devices at ``rate`` msg/s."""

    rate: int
    devices: int
    districts: int
    publishers: int
    qos: int

    def district(self, i: int) -> str:
        return f"district-{i % self.districts}"

    def device(self, i: int) -> str:
        return f"bench-{i:05d}"

    def topic(self, i: int) -> str:
        return f"city/traffic/{self.district(i)}/{self.device(i)}"


def _varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining length)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet_end(buf: bytearray, pos: int) -> int | None:
    """Where the MQTT packet starting at ``pos`` ends; None while it is incomplete."""
    length, shift, i = 0, 0, pos + 1
    while i < len(buf):
        byte = buf[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return i + length if i + length <= len(buf) else None
        shift += 7
    return None


class LoadClient(Protocol):
    """What a publisher process drives: the raw MQTT writer or paho."""

    def __enter__(self) -> LoadClient: ...
    def __exit__(self, *exc: object) -> None: ...

    def wait_for_room(self) -> None: ...
    def publish(self, topic: str, payload: bytes, qos: int) -> None: ...
    def flush(self) -> None: ...
    def idle_until(self, deadline: float) -> None: ...
    def wait_acked(self) -> None: ...


class RawPublisher:
    """MQTT 3.1.1 PUBLISH packets written to a socket by hand: a load generator that stays light.

    paho costs 80-150 µs of Python per QoS 1 message here (the message object, a
    send per packet, parsing every PUBACK, callbacks): 10,000 msg/s would take a
    whole core of a 2-core machine away from the system under test, and the
    figures would measure the generator. Here a packet is a few byte
    concatenations, a burst goes out in one ``send``, and PUBACKs are only
    counted. At most ``inflight`` messages are unacknowledged (packet ids wrap
    at 65,535); every wait has the deadline ``timeout_s``.
    """

    def __init__(
        self, url: str, client_id: str, *, inflight: int = 2_000, timeout_s: float = 30.0
    ) -> None:
        ep = MqttEndpoint.parse(url)
        self._address = (ep.host, ep.port)
        self._client_id = client_id
        self._inflight = inflight
        self._timeout_s = timeout_s
        self._keepalive_s = 60
        self._sock: socket.socket | None = None
        self._out = bytearray()
        self._in = bytearray()
        self._sent = self._acked = self._packet_id = 0
        self._last_send = time.monotonic()
        self._headers: dict[str, bytes] = {}

    def __enter__(self) -> RawPublisher:
        sock = socket.create_connection(self._address, timeout=self._timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = self._client_id.encode()
        # Protocol "MQTT" level 4 (3.1.1), clean session: nothing stays on the broker.
        body = b"\x00\x04MQTT\x04\x02" + struct.pack(">HH", self._keepalive_s, len(cid)) + cid
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                break
            connack += chunk
        if connack[:2] != b"\x20\x02" or connack[3:4] != b"\x00":
            sock.close()
            msg = (
                f"broker {self._address[0]}:{self._address[1]} refused us: CONNACK {connack.hex()}"
            )
            raise ConnectionError(msg)
        sock.setblocking(False)
        self._sock = sock
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._out += b"\xe0\x00"  # DISCONNECT
                self.flush()
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            msg = "the publisher is not connected"
            raise ConnectionError(msg)
        return self._sock

    def wait_for_room(self) -> None:
        """Until fewer than ``inflight`` QoS 1 messages are unacknowledged."""
        if self._sent - self._acked >= self._inflight:
            self.flush()
            self._read_until(lambda: self._sent - self._acked < self._inflight, "no PUBACK")

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Queue one PUBLISH; written at the next flush (or at 64 KiB)."""
        header = self._headers.get(topic)
        if header is None:
            encoded = topic.encode()
            header = self._headers[topic] = struct.pack(">H", len(encoded)) + encoded
        if qos:
            self.wait_for_room()
            self._packet_id = self._packet_id % 65_535 + 1
            self._out += (
                b"\x32"
                + _varint(len(header) + 2 + len(payload))
                + header
                + self._packet_id.to_bytes(2, "big")
                + payload
            )
            self._sent += 1
        else:
            self._out += b"\x30" + _varint(len(header) + len(payload)) + header + payload
        if len(self._out) >= 65_536:
            self.flush()

    def flush(self) -> None:
        """Write everything queued (waiting while the socket is full)."""
        sock = self._socket()
        deadline = time.monotonic() + self._timeout_s
        while self._out:
            try:
                del self._out[: sock.send(self._out)]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    msg = f"the broker took not all of a write in {self._timeout_s:.0f} s"
                    raise TimeoutError(msg) from None
                select.select([], [sock], [], 0.05)
        self._last_send = time.monotonic()

    def _read(self) -> None:
        """Take what the broker sent; count PUBACKs (PINGRESP and others are skipped)."""
        sock = self._socket()
        while True:
            try:
                data = sock.recv(65_536)
            except BlockingIOError:
                break
            if not data:
                msg = f"broker {self._address[0]}:{self._address[1]} closed the connection"
                raise ConnectionError(msg)
            self._in += data
        buf, pos = self._in, 0
        while (end := _packet_end(buf, pos)) is not None:
            if buf[pos] >> 4 == 4:  # PUBACK
                self._acked += 1
            pos = end
        del buf[:pos]

    def _read_until(self, done: Callable[[], bool], what: str) -> None:
        sock = self._socket()
        deadline = time.monotonic() + self._timeout_s
        while not done():
            if time.monotonic() > deadline:
                msg = f"{what} within {self._timeout_s:.0f} s"
                raise TimeoutError(msg)
            select.select([sock], [], [], 0.01)
            self._read()

    def idle_until(self, deadline: float) -> None:
        """Flush, then read acks and keep the connection alive until ``deadline`` (perf_counter)."""
        self.flush()
        sock = self._socket()
        while (left := deadline - time.perf_counter()) > 0:
            if select.select([sock], [], [], min(left, 0.05))[0]:
                self._read()
            if time.monotonic() - self._last_send > self._keepalive_s / 2:
                self._out += b"\xc0\x00"  # PINGREQ
                self.flush()

    def wait_acked(self) -> None:
        """Until the broker acknowledged everything published."""
        self.flush()
        self._read_until(lambda: self._acked >= self._sent, "not every publish was acknowledged")


class PahoPublisher:
    """paho driven from the publishing thread: publish, read acks, in turn (``--publisher paho``).

    The helper of the tests (``tests/mqtt_helpers.Publisher``) runs paho's network
    thread: every message and every ack then crosses threads under the GIL, and it
    published 2,700 QoS 1 msg/s here against 6,000-12,000 for this loop. At most
    ``inflight`` messages are unacknowledged and paho is allowed as many, so a message
    never waits in paho's queue: its ``ts`` is taken as it goes to the socket.
    """

    def __init__(
        self, url: str, client_id: str, *, inflight: int = 2_000, timeout_s: float = 30.0
    ) -> None:
        ep = MqttEndpoint.parse(url)
        self._host, self._port = ep.host, ep.port
        self._inflight = inflight
        self._timeout_s = timeout_s
        self._sent = 0
        self._acked = 0
        self._connected = False
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self._client.max_inflight_messages_set(inflight)
        self._client.max_queued_messages_set(0)
        self._client.on_publish = self._on_publish
        self._client.on_connect = self._on_connect

    def _on_publish(self, *_: object) -> None:
        self._acked += 1

    def _on_connect(self, *_: object) -> None:
        self._connected = True

    def _loop(self, timeout_s: float) -> None:
        rc = self._client.loop(timeout_s)
        if rc != paho.MQTT_ERR_SUCCESS:
            msg = f"publisher connection to {self._host}:{self._port}: {paho.error_string(rc)}"
            raise ConnectionError(msg)

    def _loop_until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self._timeout_s
        while not done():
            if time.monotonic() > deadline:
                msg = f"{what} within {self._timeout_s:.0f} s"
                raise TimeoutError(msg)
            self._loop(0.01)

    def __enter__(self) -> PahoPublisher:
        # A clean session that ends with the connection: nothing left on the broker.
        self._client.connect(self._host, self._port, keepalive=30, clean_start=True)
        self._loop_until(lambda: self._connected, "no CONNACK")
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop(0.1)  # sends the DISCONNECT

    def wait_for_room(self) -> None:
        """Until fewer than ``inflight`` QoS 1 messages are unacknowledged."""
        if self._sent - self._acked >= self._inflight:
            self._loop_until(lambda: self._sent - self._acked < self._inflight, "no PUBACK came")

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish one message, first reading acks while ``inflight`` are unacknowledged."""
        if qos:
            self.wait_for_room()
            self._sent += 1
        self._client.publish(topic, payload, qos=qos)

    def flush(self) -> None:
        """Read the acks that came (paho writes as it publishes)."""
        self._loop(0)

    def idle_until(self, deadline: float) -> None:
        """Serve the connection (acks, keepalive) until ``deadline`` (perf_counter)."""
        while (left := deadline - time.perf_counter()) > 0:
            self._loop(min(left, 0.05))

    def wait_acked(self) -> None:
        """Until the broker acknowledged everything published."""
        self._loop_until(lambda: self._acked >= self._sent, "not every publish was acknowledged")


@dataclass(frozen=True, slots=True)
class PublishStats:
    published: int
    in_window: int
    """Published with a ``ts`` inside the measured window."""
    ended_at: float
    """Wall time of the last publish."""
    behind_s: float
    """How far behind schedule the publisher was at worst (0: it kept the rate)."""


def paced(
    pub: LoadClient,
    topics: list[str],
    rng: random.Random,
    *,
    rate: float,
    run_s: float,
    window: tuple[float, float],
    qos: int,
) -> PublishStats:
    """Publish ``rate`` msg/s for ``run_s`` seconds in 5 ms bursts, catching up when late."""
    lo, hi = window
    total = int(rate * run_s)
    burst = max(1, round(rate * 0.005))
    sent = in_window = 0
    behind_s = 0.0
    t0 = time.perf_counter()
    while sent < total:
        elapsed = time.perf_counter() - t0
        due = min(total, int(elapsed * rate))
        if due - sent < burst and due < total:
            pub.idle_until(t0 + (sent + burst) / rate)
            continue
        behind_s = max(behind_s, elapsed - (sent + burst) / rate)
        for n in range(sent, due):
            if qos:
                pub.wait_for_room()  # before the timestamp: a message carries its send time
            ts = time.time()
            in_window += lo <= ts < hi
            payload = orjson.dumps({"ts": ts, "occupancy": rng.random()})
            pub.publish(topics[n % len(topics)], payload, qos)
        pub.flush()
        sent = due
    ended_at = time.time()
    pub.wait_acked()
    return PublishStats(sent, in_window, ended_at, max(0.0, behind_s))


def publisher_main(  # noqa: PLR0917 (a process target)
    conn: Connection, mqtt_url: str, load: Load, index: int, keepalive_s: float, kind: str
) -> None:
    """A publisher process, driven by commands on ``conn``.

    ``prime``: one message per device, then the keep-alive trickle; ``quiet``:
    the trickle stops (the reply says how many it published); ``trickle``: it
    starts again; ``go``: a paced run (trickle off). The trickle sends every
    device a reading every ``keepalive_s`` between phases, so that no device
    goes stale: a city never falls silent, and thousands of devices turning
    stale and back at once between phases would measure something else.
    """
    topics = [load.topic(i) for i in range(index, load.devices, load.publishers)]
    rng = random.Random(index)
    trickle_rate = len(topics) / keepalive_s
    trickle_from: float | None = None
    trickle_sent = unreported = 0
    client_id = f"bench-api-pub-{index}-{uuid.uuid4().hex[:6]}"
    client: LoadClient = (
        RawPublisher(mqtt_url, client_id) if kind == "raw" else PahoPublisher(mqtt_url, client_id)
    )
    with client as pub:
        conn.send(("ready",))
        while True:
            while not conn.poll(0):  # serve the connection (pings, acks) between commands
                if trickle_from is not None:
                    due = int((time.perf_counter() - trickle_from) * trickle_rate)
                    for n in range(trickle_sent, due):
                        payload = orjson.dumps({"ts": time.time(), "occupancy": rng.random()})
                        pub.publish(topics[n % len(topics)], payload, load.qos)
                    unreported += max(0, due - trickle_sent)
                    trickle_sent = max(due, trickle_sent)
                pub.idle_until(time.perf_counter() + 0.02)
            command = conn.recv()
            if command[0] == "stop":
                break
            if command[0] == "prime":
                now = time.time()
                for topic in topics:
                    pub.publish(topic, orjson.dumps({"ts": now, "occupancy": 0.0}), load.qos)
                pub.wait_acked()
                conn.send(("primed", len(topics)))
                trickle_from, trickle_sent = time.perf_counter(), 0
            elif command[0] == "trickle":
                trickle_from, trickle_sent = time.perf_counter(), 0
            elif command[0] == "quiet":
                trickle_from = None
                pub.wait_acked()
                conn.send(("quiet", unreported))
                unreported = 0
            else:
                _, start_at, run_s, window = command
                trickle_from = None
                pub.idle_until(time.perf_counter() + start_at - time.time())
                stats = paced(
                    pub, topics, rng, rate=load.rate / load.publishers, run_s=run_s,
                    window=window, qos=load.qos,
                )  # fmt: skip
                conn.send(("done", stats))
