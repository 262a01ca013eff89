"""Control API benchmark: history reads through HTTP, live fan-out under a 10,000 msg/s load.

Run: ``.venv/bin/python -m bench.api`` (about 4 minutes; phase lengths and
repetitions are flags). It starts its own embedded Mosquitto and PostgreSQL
(same tuning as ``cityops up``) in a temporary directory, unless
``--mqtt-url`` / ``--database-url`` name a broker and a fresh, empty database.

1. **History, database level**: :mod:`bench.history` as it is (its table:
   7 days of 1 Hz data, cityops queries against naive SQL), with
   ``--history-scale`` times its repetitions; ``--no-history-bench`` only
   fills its data.
2. **History, HTTP level**: the stack below serves the same data. The 1 Hz
   series over 7 days in 1-minute buckets
   (``GET /api/v1/devices/fast/series/intensity/history``) and the district
   aggregate (``GET /api/v1/history/group``), each against the same call on
   a database connection (the baseline), taking turns, the stack idle.
3. **Ingest and live fan-out**: a child process runs what ``cityops up``
   runs in one process (``cityops/commands.py``): the ingest service with the
   default rules feeding the live hub in process, and the control API on
   uvicorn, alert events fanned out to the hub. ``--publishers`` processes
   publish ``--rate`` JSON single readings per second in all
   (``{"ts": <send time>, "occupancy": x}`` on
   ``city/traffic/{district}/{device}``, ``--devices`` devices, QoS 1, in
   5 ms bursts). The publishers write MQTT packets by hand
   (:class:`_RawPublisher`: 10 µs of CPU a message against 86 µs for paho
   here; ``--publisher paho``). After one message per device (devices and
   series get created), two phases of ``--warmup`` + ``--duration`` seconds:

   * no websocket clients: the baseline;
   * ``--clients`` consoles on ``/api/v1/live`` with a bearer token, in
     ``--client-procs`` processes (:mod:`bench.wsclients`: a quarter follow
     everything, half one district, a quarter 50 devices; flow control as
     the console, ``window=4``); one group of four in ``--probe-every``
     records delivery latency, the reading's ``ts`` to the console's
     receive time (one machine, one clock).

   ``--rounds N`` repeats the pair, taking turns, so that a change in the
   machine's load hits both alike. Between phases every device keeps
   reporting every ``--keepalive`` seconds, so that none turns stale.

   Per phase, over the measured window: the publishers' achieved rate;
   messages received and readings committed per second by the ingester;
   publish → commit lag (a sink after the hub takes commit time minus
   ``ts``); how long after the last publish the last commit came (the
   backlog); the server's peak RSS (``VmHWM``, reset per phase); where the
   machine's CPU went (the server, the broker, the database, the publishers,
   the consoles, other processes, from ``/proc``); with consoles, frames/s,
   MB/s, delivery latency, and commit → console latency of one device in 19
   (the hub and the websocket alone, whatever the ingest backlog).
   ``--timeline`` makes the server log its figures and its worst event-loop
   stall every second.

The hub coalesces readings per series (one change per 250 ms epoch): a
console receives the latest value of each series, so delivery latency is
measured on the readings delivered and includes up to one epoch of waiting
by design. The machine is shared: the figures move with its load, printed
with each phase, with the CPU taken by other work.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import os
import random
import select
import socket
import struct
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol, cast

import httpx
import orjson
import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from bench import history as history_bench
from bench.services import bench_services
from bench.wsclients import ConsoleGroup, ConsoleSpec, ConsoleStats, iter_kinds, percentile
from cityops.runtime import rules_path
from cityops.settings import MqttEndpoint, Settings
from control_api import LiveHub, api_config, create_app, embedded_server, ensure_first_admin
from control_api.history import Bucket, group_history, series_history
from ingest import CommittedBatch, IngestConfig, IngestService, MqttOptions
from rules import FanOutPublisher
from tests.mqtt_helpers import drop_session


def _log(text: str) -> None:
    print(f"[bench.api] {text}", file=sys.stderr, flush=True)


async def _sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


# ------------------------------------------------------------------ the load


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


class _LoadClient(Protocol):
    """What a publisher process drives: the raw MQTT writer or paho."""

    def __enter__(self) -> _LoadClient: ...
    def __exit__(self, *exc: object) -> None: ...

    def wait_for_room(self) -> None: ...
    def publish(self, topic: str, payload: bytes, qos: int) -> None: ...
    def flush(self) -> None: ...
    def idle_until(self, deadline: float) -> None: ...
    def wait_acked(self) -> None: ...


class _RawPublisher:
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

    def __enter__(self) -> _RawPublisher:
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


class _PahoPublisher:
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

    def __enter__(self) -> _PahoPublisher:
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


def _paced(
    pub: _LoadClient,
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


def _publisher_main(  # noqa: PLR0917 (a process target)
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
    client: _LoadClient = (
        _RawPublisher(mqtt_url, client_id) if kind == "raw" else _PahoPublisher(mqtt_url, client_id)
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
                stats = _paced(
                    pub, topics, rng, rate=load.rate / load.publishers, run_s=run_s,
                    window=window, qos=load.qos,
                )  # fmt: skip
                conn.send(("done", stats))


class _Children:
    """Child processes (spawn) on pipes; ``with`` joins or terminates them."""

    def __init__(self) -> None:
        self._procs: list[BaseProcess] = []
        self.pipes: list[Connection] = []

    def spawn(self, target: Callable[..., None], *args: object) -> tuple[Connection, int]:
        """Start ``target(pipe, *args)`` in a process; (our end of the pipe, its pid)."""
        parent, child = mp.get_context("spawn").Pipe()
        proc = mp.get_context("spawn").Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        child.close()  # the child's end lives in the child: its exit is our EOFError
        self._procs.append(proc)
        self.pipes.append(parent)
        return parent, proc.pid or 0

    def __enter__(self) -> _Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for proc in self._procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


async def _recv(pipe: Connection) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, pipe.recv)


async def _call(pipe: Connection, *command: object) -> Any:
    pipe.send(command)
    return await _recv(pipe)


# ------------------------------------------------------------------ the server process


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True, slots=True)
class ServerSample:
    wall: float
    received: float
    committed: int
    rss_kib: int
    peak_kib: int
    """``VmHWM`` since the last reset."""


@dataclass(frozen=True, slots=True)
class LagFigures:
    count: int
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    commits: dict[tuple[str, float], float]
    """Commit times of the traced devices' readings."""


class _LagSink:
    """A batch sink after the hub: publish → commit lag, commit times to trace, a count."""

    def __init__(self, traced: frozenset[str]) -> None:
        self.window = (float("inf"), float("-inf"))
        self.lags: array.array[float] = array.array("d")
        self.traced = traced
        self.commits: dict[tuple[str, float], float] = {}
        """(device, ts) → commit time of the traced devices' readings in the window."""
        self.committed = 0
        self._target: int | None = None
        self._reached = asyncio.Event()

    def on_batch(self, batch: CommittedBatch) -> None:
        self.committed += len(batch.readings)
        lo, hi = self.window
        at = batch.committed_at
        lags, traced, commits = self.lags, self.traced, self.commits
        for r in batch.readings:
            if lo <= r.ts < hi:
                lags.append(at - r.ts)
                if r.device.device_id in traced:
                    commits[r.device.device_id, r.ts] = at
        if self._target is not None and self.committed >= self._target:
            self._reached.set()

    async def wait_committed(self, target: int) -> None:
        self._target = target
        self._reached.clear()
        if self.committed < target:
            await self._reached.wait()

    def take_lags(self) -> LagFigures:
        lags, commits = self.lags, self.commits
        self.lags, self.commits = array.array("d"), {}
        return LagFigures(
            len(lags), percentile(lags, 0.5), percentile(lags, 0.9), percentile(lags, 0.99),
            max(lags, default=float("nan")), commits,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ServerSpec:
    mqtt_url: str
    database_url: str
    scratch: Path
    client_id: str
    traced: frozenset[str]
    """Devices whose commit times are kept, to time the fan-out alone."""
    timeline: bool = False
    """Log ingest figures and event-loop stalls every second (stderr)."""


def _server_main(conn: Connection, spec: ServerSpec) -> None:
    asyncio.run(_serve(conn, spec))


async def _serve(conn: Connection, spec: ServerSpec) -> None:
    """``cityops up``'s composition (``cityops/commands.py`` ``_serve``), driven over a pipe."""
    settings = Settings.from_env()
    config = IngestConfig(
        mqtt=MqttEndpoint.parse(spec.mqtt_url),
        database_url=spec.database_url,
        client_id=spec.client_id,
        mqtt_options=MqttOptions(client_id=spec.client_id, session_expiry_s=600),
        rules_path=rules_path(settings),
    )
    hub = LiveHub()
    lag = _LagSink(spec.traced)
    api = dataclasses.replace(
        api_config(settings, spec.mqtt_url, spec.database_url, client_id=f"{spec.client_id}-api"),
        live_from_broker=False,
        recordings_dir=spec.scratch / "recordings",
    )
    app = create_app(api, hub=hub)
    async with (
        IngestService(config, sinks=(hub, lag)) as ingest,
        embedded_server(app, host="127.0.0.1", port=0) as port,
    ):
        if ingest.alerts is not None:
            ingest.alerts.publisher = FanOutPublisher(ingest.alerts.publisher, hub)
        await ingest.wait_connected(30.0)
        auth = app.state.ctx.auth
        await ensure_first_admin(auth)
        issued = await auth.issue_token("admin", created_by="bench.api")
        conn.send(("ready", port, issued.token))
        async with asyncio.TaskGroup() as tg:
            timeline = tg.create_task(_timeline(ingest, lag)) if spec.timeline else None
            await _server_commands(conn, ingest, lag)
            if timeline is not None:
                timeline.cancel()
    drop_session(spec.mqtt_url, spec.client_id)


async def _timeline(ingest: IngestService, lag: _LagSink) -> None:
    """Every second: received and committed rates, the ingest queue, CPU, the worst loop stall."""
    registry = ingest.metrics.registry
    t0 = last = time.perf_counter()
    received = registry.get_sample_value("cityops_ingest_messages_received_total") or 0.0
    committed, cpu = lag.committed, time.process_time()
    stall = 0.0
    while True:
        before = time.perf_counter()
        await asyncio.sleep(0.02)
        now = time.perf_counter()
        stall = max(stall, now - before - 0.02)
        if now - last < 1.0:
            continue
        got = registry.get_sample_value("cityops_ingest_messages_received_total") or 0.0
        print(
            f"[bench.api server] +{now - t0:5.0f} s"
            f"  received {(got - received) / (now - last):7,.0f}/s"
            f"  committed {(lag.committed - committed) / (now - last):7,.0f}/s"
            f"  queue {registry.get_sample_value('cityops_ingest_queue_depth') or 0:6,.0f}"
            f"  paused {registry.get_sample_value('cityops_ingest_paused') or 0:.0f}"
            f"  CPU {(time.process_time() - cpu) / (now - last) * 100:3.0f}%"
            f"  worst loop stall {stall * 1e3:5,.0f} ms",
            file=sys.stderr,
            flush=True,
        )
        last, received, committed, cpu, stall = now, got, lag.committed, time.process_time(), 0.0


async def _server_commands(conn: Connection, ingest: IngestService, lag: _LagSink) -> None:
    registry = ingest.metrics.registry
    overall_peak_kib = 0

    def sample(*, reset_peak: bool = False) -> ServerSample:
        nonlocal overall_peak_kib
        peak = _proc_kib("VmHWM")
        overall_peak_kib = max(overall_peak_kib, peak)
        if reset_peak:
            with contextlib.suppress(OSError):  # "5" resets VmHWM (Linux 4.0+)
                Path("/proc/self/clear_refs").write_text("5")
        return ServerSample(
            wall=time.time(),
            received=registry.get_sample_value("cityops_ingest_messages_received_total") or 0.0,
            committed=lag.committed,
            rss_kib=_proc_kib("VmRSS"),
            peak_kib=peak,
        )

    while True:
        command = await _recv(conn)
        name = command[0]
        if name == "sample":
            conn.send(sample(reset_peak=command[1]))
        elif name == "measure":
            _, lo, hi = command
            lag.window = (lo, hi)
            await _sleep_until(lo)
            first = sample()
            await _sleep_until(hi)
            conn.send((first, sample()))
        elif name == "drain":
            _, target, timeout_s = command
            reached: float | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await lag.wait_committed(target)
                    reached = time.time()
            conn.send((reached, lag.committed))
        elif name == "lags":
            conn.send(lag.take_lags())
        elif name == "peak":
            sample()
            conn.send(max(overall_peak_kib, _proc_kib("VmHWM")))
        else:
            return


# ------------------------------------------------------------------ history through HTTP


async def _http_history(
    base_url: str, token: str, database_url: str, reps: int
) -> list[history_bench.Timing]:
    """The two 7-day queries through the API against the same calls on a connection."""
    t0, end = history_bench.T0, history_bench.END
    span = {"start": t0.isoformat(), "end": end.isoformat()}
    series_path = "/api/v1/devices/fast/series/intensity/history"
    series_params = {**span, "bucket": "1m"}
    group_params = {**span, "channel": "intensity", "district": "minato"}
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as http,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn,
    ):

        async def get(path: str, params: dict[str, str]) -> int:
            response = await http.get(path, params=params)
            response.raise_for_status()
            return len(response.content)

        for path, params, points in (
            (series_path, series_params, history_bench.DAYS * 1440),
            ("/api/v1/history/group", group_params, history_bench.DAYS * 96),
        ):
            response = await http.get(path, params=params)
            response.raise_for_status()
            got = len(response.json()["points"])
            if got != points:
                msg = f"GET {path}: {got} points, expected {points}"
                raise RuntimeError(msg)
            _log(f"GET {path}: {len(response.content) / 1e6:.2f} MB, {got} points")

        series = ("fast", "intensity")

        def direct_series() -> Awaitable[object]:
            return series_history(conn, series, t0, end, Bucket.MINUTE)

        def direct_group() -> Awaitable[object]:
            return group_history(conn, channel="intensity", district="minato", start=t0, end=end)

        # bench.history's runner: one warm-up each, then turns, so load drifts hit both alike.
        return [
            *await history_bench._compare(
                "series 7 d, 1-min buckets (10,080)",
                [
                    ("direct series_history", reps, direct_series),
                    ("HTTP GET …/series/…/history", reps, lambda: get(series_path, series_params)),
                ],
            ),
            *await history_bench._compare(
                "district 7 d, auto 15-min (672), 20 dev.",
                [
                    ("direct group_history", reps, direct_group),
                    (
                        "HTTP GET /history/group",
                        reps,
                        lambda: get("/api/v1/history/group", group_params),
                    ),
                ],
            ),
        ]


# ------------------------------------------------------------------ where the CPU went

SERVER = "server (ingest, hub, API)"
PUBLISHERS = "publishers"
CONSOLES = "consoles"
ORCHESTRATOR = "bench orchestrator"
OTHERS = "other processes"
UNATTRIBUTED = "no process (kernel, short-lived)"
BUSY = "machine, all busy"
_CPU_ROWS = (
    BUSY,
    SERVER,
    "mosquitto",
    "postgres",
    PUBLISHERS,
    CONSOLES,
    ORCHESTRATOR,
    OTHERS,
    UNATTRIBUTED,
    "softirq and irq",
    "steal (hypervisor)",
)

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[str, int, int]]:
    """Every process: pid → (command name, parent pid, CPU ticks used so far)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        close = stat.rindex(")")
        fields = stat[close + 2 :].split()
        # After "pid (comm)": state, ppid, …, utime and stime are the 12th and 13th.
        table[int(entry)] = (
            stat[stat.index("(") + 1 : close],
            int(fields[1]),
            int(fields[11]) + int(fields[12]),
        )
    return table


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class CpuGroups:
    """Which processes are whose: the bench's own, its broker and database, the rest."""

    own: dict[str, tuple[int, ...]]
    scratch: Path

    def classify(self, table: dict[int, tuple[str, int, int]]) -> dict[int, str]:
        groups = {pid: name for name, pids in self.own.items() for pid in pids}
        scratch = str(self.scratch)
        for pid, (comm, _, _) in table.items():
            if comm in ("mosquitto", "postgres") and scratch in _cmdline(pid):
                groups[pid] = comm
        postmasters = {pid for pid, name in groups.items() if name == "postgres"}
        for pid, (_, ppid, _) in table.items():
            if ppid in postmasters:
                groups[pid] = "postgres"  # the backends and workers of our server
        return groups


def _machine_ticks() -> dict[str, int]:
    """The machine's CPU ticks so far, all cores, by kind (``/proc/stat``)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return {
        BUSY: user + nice + system + irq + softirq + steal,
        "softirq and irq": irq + softirq,
        "steal (hypervisor)": steal,
    }


async def _cpu_window(groups: CpuGroups, window: tuple[float, float]) -> dict[str, float]:
    """CPU used in ``window`` (wall clock) per process group and kind, in cores (1.0: one core)."""
    await _sleep_until(window[0])
    first, first_machine = _process_table(), _machine_ticks()
    await _sleep_until(window[1])
    last, last_machine = _process_table(), _machine_ticks()
    names = groups.classify(last)
    ticks: dict[str, int] = {}
    others: dict[str, int] = {}
    for pid, (comm, _, used) in last.items():
        if pid in first:
            name = names.get(pid, OTHERS)
            ticks[name] = ticks.get(name, 0) + used - first[pid][2]
            if name == OTHERS:
                others[comm] = others.get(comm, 0) + used - first[pid][2]
    for kind, value in last_machine.items():
        ticks[kind] = value - first_machine[kind]
    # Kernel work outside any process, and processes that started or ended in the window.
    attributed = sum(v for k, v in ticks.items() if k not in last_machine)
    ticks[UNATTRIBUTED] = ticks[BUSY] - attributed
    span = window[1] - window[0]
    top = sorted(others.items(), key=lambda kv: -kv[1])[:4]
    _log("other processes: " + ", ".join(f"{c} {t / _TICKS_PER_S / span:.2f}" for c, t in top))
    return {name: value / _TICKS_PER_S / span for name, value in ticks.items()}


# ------------------------------------------------------------------ ingest phases


@dataclass(frozen=True, slots=True)
class PhaseResult:
    name: str
    load_average: float
    duration_s: float
    published: list[PublishStats]
    first: ServerSample
    last: ServerSample
    peak_kib: int
    drained_after_s: float | None
    """Last commit after the last publish; None: not all committed within the timeout."""
    committed_total: int
    published_total: int
    lags: LagFigures
    cpu: dict[str, float]
    """Cores used in the window, by process group."""
    consoles: ConsoleStats | None = None
    connected: tuple[int, float] | None = None

    def per_s(self, attr: str) -> float:
        delta = float(getattr(self.last, attr)) - float(getattr(self.first, attr))
        return delta / (self.last.wall - self.first.wall)


class _Publishers:
    """The publisher processes, and how many messages they published in all."""

    def __init__(self, pipes: list[Connection]) -> None:
        self.pipes = pipes
        self.published = 0

    async def prime(self) -> int:
        """One message per device (devices and series get created); the trickle starts."""
        primed = sum([int((await _call(pipe, "prime"))[1]) for pipe in self.pipes])
        self.published += primed
        return primed

    async def quiet(self) -> None:
        """Stop the keep-alive trickle and count what it published."""
        self.published += sum([int((await _call(pipe, "quiet"))[1]) for pipe in self.pipes])

    def trickle(self) -> None:
        for pipe in self.pipes:
            pipe.send(("trickle",))

    async def run(
        self, start_at: float, run_s: float, window: tuple[float, float]
    ) -> list[PublishStats]:
        for pipe in self.pipes:
            pipe.send(("go", start_at, run_s, window))
        done = await asyncio.gather(*(_recv(pipe) for pipe in self.pipes))
        stats = [s for _, s in done]
        self.published += sum(s.published for s in stats)
        return stats


async def _drain(server: Connection, publishers: _Publishers, timeout_s: float) -> float | None:
    """Wait until all that was published is committed; when (wall), or None at the timeout."""
    reached, _ = await _call(server, "drain", publishers.published, timeout_s)
    return cast("float | None", reached)


async def _ingest_phase(  # noqa: PLR0917
    name: str,
    server: Connection,
    publishers: _Publishers,
    groups: CpuGroups,
    args: argparse.Namespace,
    consoles: ConsoleGroup | None = None,
    *,
    reset_peak: bool = True,
) -> PhaseResult:
    await publishers.quiet()
    if await _drain(server, publishers, args.drain_timeout) is None:
        _log(f"{name}: the keep-alive trickle was not all committed in {args.drain_timeout} s")
    load_average = os.getloadavg()[0]
    _log(f"{name}: {args.warmup:.0f} s warm-up + {args.duration:.0f} s (load {load_average:.2f})")
    before: ServerSample = await _call(server, "sample", reset_peak)
    start_at = time.time() + 0.5
    window = (start_at + args.warmup, start_at + args.warmup + args.duration)
    if consoles is not None:
        consoles.count(*window)
    (first, last), published, cpu = await asyncio.gather(
        _call(server, "measure", *window),
        publishers.run(start_at, args.warmup + args.duration + 1.0, window),
        _cpu_window(groups, window),
    )
    reached = await _drain(server, publishers, args.drain_timeout)
    lags = await _call(server, "lags")
    end = await _call(server, "sample", False)
    publishers.trickle()
    stats = None
    if consoles is not None:
        await asyncio.sleep(1.0)  # frames already on their way
        stats = await consoles.stop()
    return PhaseResult(
        name=name,
        load_average=load_average,
        duration_s=args.duration,
        published=published,
        first=first,
        last=last,
        peak_kib=end.peak_kib,
        drained_after_s=reached - max(p.ended_at for p in published) if reached else None,
        committed_total=end.committed - before.committed,
        published_total=sum(p.published for p in published),
        lags=lags,
        cpu=cpu,
        consoles=stats,
    )


# ------------------------------------------------------------------ report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}"


def _rows(result: PhaseResult) -> dict[str, str]:
    window_s = result.duration_s
    published = sum(p.in_window for p in result.published) / window_s
    behind = max(p.behind_s for p in result.published)
    last = result.last
    lag = result.lags
    rows = {
        "load average at start": f"{result.load_average:.2f}",
        "published msg/s (in window)": f"{published:,.0f}",
        "publisher worst behind schedule": f"{behind:.2f} s",
        "ingest received msg/s": f"{result.per_s('received'):,.0f}",
        "ingest committed readings/s": f"{result.per_s('committed'):,.0f}",
        "kept up with the load": (
            "yes"
            if result.per_s("committed") >= 0.97 * published
            else f"no, {published - result.per_s('committed'):,.0f} msg/s short"
        ),
        "publish → commit p50 / p99 ms": f"{_ms(lag.p50_s)} / {_ms(lag.p99_s)}",
        "publish → commit max ms": _ms(lag.max_s),
        "last commit after last publish": (
            f"{result.drained_after_s:.2f} s" if result.drained_after_s is not None else "timeout"
        ),
        "committed / published (phase)": f"{result.committed_total:,} / {result.published_total:,}",
        f"CPU, cores of {os.cpu_count()}:": "",
        **{
            f"  {name}": f"{max(0.0, result.cpu[name]):.2f}" if name in result.cpu else "-"
            for name in _CPU_ROWS
        },
        "server RSS at end / peak MiB": f"{last.rss_kib / 1024:.0f} / {result.peak_kib / 1024:.0f}",
    }
    stats = result.consoles
    if stats is None:
        return rows
    latencies = stats.all_latencies()
    commits = lag.commits
    fan_out = [
        received - commits[device, ts]
        for device, ts, received in stats.traced
        if (device, ts) in commits
    ]
    rows |= {
        "consoles connected (snapshots in)": (
            f"{result.connected[0]} in {result.connected[1]:.1f} s" if result.connected else "?"
        ),
        "snapshot frame size": f"{stats.snapshot_bytes / 1e3:,.0f} kB",
        "frames/s to all consoles": f"{stats.frames / window_s:,.0f}",
        **{
            f"  {name} frames/s": f"{count / window_s:,.0f}"
            for name, count in sorted(stats.frame_types.items())
        },
        "MB/s to all consoles": f"{stats.bytes / window_s / 1e6:,.1f}",
        "probe consoles, items/s": f"{stats.probes}, {stats.probe_items / window_s:,.0f}",
        "delivery p50 / p90 / p99 ms": " / ".join(
            _ms(percentile(latencies, q)) for q in (0.5, 0.9, 0.99)
        ),
        **{
            f"  p99 ms, {kind}": _ms(percentile(values, 0.99)) for kind, values in iter_kinds(stats)
        },
        "delivery max ms": _ms(max(latencies, default=float("nan"))),
        "commit → console p50 / p90 / p99 ms": " / ".join(
            _ms(percentile(fan_out, q)) for q in (0.5, 0.9, 0.99)
        ),
        "  traced readings matched": f"{len(fan_out):,}",
        "consoles dropped during the phase": str(stats.closed_early),
    }
    return rows


def _print_http(timings: list[history_bench.Timing]) -> None:
    print("\n== history through the HTTP API (same data and run, the stack idle)")
    print(f"{'query':<42} {'path':<30} {'n':>4} {'p50 ms':>9} {'p99 ms':>9}")
    last = ""
    for t in timings:
        label = t.query if t.query != last else ""
        last = t.query
        print(f"{label:<42} {t.impl:<30} {len(t.seconds):>4} {t.p50_ms:>9.1f} {t.p99_ms:>9.1f}")
    for direct, http in zip(timings[::2], timings[1::2], strict=True):
        print(
            f"  HTTP overhead, {direct.query}: p50 +{http.p50_ms - direct.p50_ms:,.0f} ms"
            f" (x{http.p50_ms / direct.p50_ms:.2f})"
        )


def _print_phases(load: Load, args: argparse.Namespace, phases: list[PhaseResult]) -> None:
    print(
        f"\n== ingest and live fan-out: {load.rate:,} msg/s offered, {load.devices:,} devices"
        f" in {load.districts} districts, JSON single readings, QoS {load.qos},"
        f" {load.publishers} {args.publisher} publisher processes; {args.duration:.0f} s"
        f" windows after {args.warmup:.0f} s warm-up"
    )
    table = [_rows(p) for p in phases]
    labels = list(dict.fromkeys(k for rows in table for k in rows))
    print(f"{'':<36}" + "".join(f"{p.name:>26}" for p in phases))
    for label in labels:
        print(f"{label:<36}" + "".join(f"{rows.get(label, ''):>26}" for rows in table))
    print(
        "publish → commit: the reading's ts (send time) to its batch's commit; delivery:"
        " ts to a probe console's receive time;\ncommit → console: the hub (readings wait"
        " up to one 250 ms epoch), encoding and the websocket, for one device in 19."
    )


# ------------------------------------------------------------------ orchestration


async def _run(args: argparse.Namespace, mqtt_url: str, database_url: str, scratch: Path) -> None:
    if args.history_bench:
        await history_bench._run(database_url, args.history_scale)
    else:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            _log(f"filled {await history_bench._fill(conn):,} readings of history")
    load = Load(args.rate, args.devices, args.districts, args.publishers, args.qos)
    # One device in 19 (all districts) is traced: commit → console, the fan-out alone.
    traced = frozenset(load.device(i) for i in range(0, load.devices, 19))
    spec = ServerSpec(
        mqtt_url, database_url, scratch, f"bench-api-{uuid.uuid4().hex[:6]}", traced,
        args.timeline,
    )  # fmt: skip
    with _Children() as children:
        server, server_pid = children.spawn(_server_main, spec)
        spawned = [
            children.spawn(_publisher_main, mqtt_url, load, k, args.keepalive, args.publisher)
            for k in range(args.publishers)
        ]
        publishers = _Publishers([pipe for pipe, _ in spawned])
        groups = CpuGroups(
            {
                SERVER: (server_pid,),
                PUBLISHERS: tuple(pid for _, pid in spawned),
                ORCHESTRATOR: (os.getpid(),),
            },
            scratch,
        )
        _, port, token = await _recv(server)
        for pipe in publishers.pipes:
            await _recv(pipe)
        base = f"http://127.0.0.1:{port}"
        _log(f"stack up on {base}")
        timings = await _http_history(base, token, database_url, args.http_reps)
        _print_http(timings)

        primed = await publishers.prime()
        await _drain(server, publishers, args.drain_timeout)
        _log(f"{primed} devices primed")

        console_spec = ConsoleSpec(
            url=f"ws://127.0.0.1:{port}/api/v1/live",
            headers=(("Authorization", f"Bearer {token}"),),
            clients=args.clients,
            districts=tuple(load.district(i) for i in range(load.districts)),
            devices=tuple(load.device(i) for i in range(load.devices)),
            window=args.window,
            probe_every=args.probe_every,
            traced=traced,
        )
        phases: list[PhaseResult] = []
        for round_ in range(1, args.rounds + 1):
            # Rounds take turns, so that a change of the machine's load hits both alike.
            suffix = f" #{round_}" if args.rounds > 1 else ""
            phases.append(
                await _ingest_phase(f"no clients{suffix}", server, publishers, groups, args)
            )
            await _call(server, "sample", True)  # the peak includes the consoles' snapshots
            with ConsoleGroup(console_spec, procs=args.client_procs) as consoles:
                connected = await consoles.wait_connected()
                _log(f"{connected[0]} consoles connected in {connected[1]:.1f} s")
                with_consoles = CpuGroups({**groups.own, CONSOLES: consoles.pids}, scratch)
                result = await _ingest_phase(
                    f"{args.clients} clients{suffix}", server, publishers, with_consoles, args,
                    consoles, reset_peak=False,
                )  # fmt: skip
                phases.append(dataclasses.replace(result, connected=connected))
        peak = await _call(server, "peak")
    _print_phases(load, args, phases)
    print(f"server process peak RSS over the whole run (VmHWM): {peak / 1024:,.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mqtt-url")
    parser.add_argument("--database-url", help="a fresh database (default: embedded server)")
    parser.add_argument("--rate", type=int, default=10_000, help="messages/s, all publishers")
    parser.add_argument("--devices", type=int, default=2_000)
    parser.add_argument("--districts", type=int, default=10)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument(
        "--publisher",
        choices=("raw", "paho"),
        default="raw",
        help="raw: MQTT 3.1.1 packets written by hand (light); paho: paho-mqtt (MQTT 5)",
    )
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the window")
    parser.add_argument(
        "--keepalive",
        type=float,
        default=2.0,
        help="between phases every device reports every this many seconds",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="take turns: no clients, clients, N times"
    )
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--probe-every", type=int, default=10, help="1 in N groups of 4 measure")
    parser.add_argument("--window", type=int, default=4, help="console flow control; 0: off")
    parser.add_argument(
        "--timeline", action="store_true", help="the server logs its figures every second"
    )
    parser.add_argument("--http-reps", type=int, default=10)
    parser.add_argument(
        "--history-scale", type=float, default=0.5, help="bench.history's repetitions x this"
    )
    parser.add_argument(
        "--no-history-bench",
        dest="history_bench",
        action="store_false",
        help="only fill bench.history's data, do not run its comparisons",
    )
    args = parser.parse_args()
    with bench_services(args.mqtt_url, args.database_url) as (mqtt_url, database_url, scratch):
        asyncio.run(_run(args, mqtt_url, database_url, scratch))


if __name__ == "__main__":
    main()
