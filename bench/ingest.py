"""Ingest benchmark: end-to-end stored msg/s, readings/s, latency, peak RSS.

Run: ``.venv/bin/python -m bench.ingest`` (about 3 minutes). It starts its own
embedded Mosquitto and PostgreSQL (same tuning as ``cityops up``) in a
temporary directory, unless ``--mqtt-url`` / ``--database-url`` are given.

Per payload kind (single-reading JSON; SenML packs of 20 records):

* generator alone: the publisher's rate into the broker with no subscriber;
* throughput: the load is published while the ingester is away (its
  persistent session queues it), then the ingester starts and drains it; the
  figure is messages committed per second, so the generator cannot be the
  bottleneck;
* latency: a steady publish rate with the ingester live, publish → committed
  p50/p99 (each payload carries its publish time);
* peak RSS of the ingester process (VmHWM);
* baseline, same run: aiomqtt per-message loop + one INSERT per message.

Every run also checks losslessness: the stored row count equals what was published.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg

from bench.services import bench_services
from cityops.settings import MqttEndpoint
from ingest.batch import CommittedBatch
from ingest.mqtt import MqttOptions
from ingest.service import IngestConfig, IngestService
from tests.mqtt_helpers import Publisher, create_session, drop_session

SENML_RECORDS = 20


def _payload(kind: str, i: int, ts: float) -> bytes:
    if kind == "json":
        return orjson.dumps({"ts": ts, "intensity": float(i % 97)})
    pack: list[dict[str, Any]] = [
        {"bn": f"lane{i % 4}:", "bt": ts, "bu": "m/s", "n": "c0", "v": 1.0}
    ]
    pack += [{"n": f"c{k}", "v": float((i + k) % 89)} for k in range(1, SENML_RECORDS)]
    return orjson.dumps(pack)


def _messages(kind: str, prefix: str, n: int, devices: int = 1000) -> Iterator[tuple[str, bytes]]:
    base = time.time() - 3600
    for i in range(n):
        # A distinct timestamp per message per device: every reading is unique.
        yield (
            f"city/traffic/d{i % devices % 16}/{prefix}-{i % devices}",
            _payload(kind, i, base + i * 1e-3),
        )


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@dataclass
class _LatencySink:
    """Records publish → committed latency of live readings (ts = publish time)."""

    live_after: float
    latencies: list[float]
    expected: int
    done: asyncio.Event
    readings: int = 0
    first_commit: float | None = None
    first_batch_readings: int = 0
    last_commit: float = 0.0

    def on_batch(self, batch: CommittedBatch) -> None:
        if self.first_commit is None:
            self.first_commit = batch.committed_at
            self.first_batch_readings = len(batch.readings)
        self.last_commit = batch.committed_at
        self.readings += len(batch.readings)
        if self.readings >= self.expected:
            self.done.set()
        now = batch.committed_at
        for r in batch.readings:
            if r.ts >= self.live_after:
                self.latencies.append(now - r.ts)


def _ingester_child(  # noqa: PLR0917 (multiprocessing target)
    mqtt_url: str,
    database_url: str,
    client_id: str,
    expect_readings: int,
    live_after: float,
    conn: Any,
) -> None:
    async def run() -> dict[str, Any]:
        sink = _LatencySink(
            live_after=live_after, latencies=[], expected=expect_readings, done=asyncio.Event()
        )
        config = IngestConfig(
            mqtt=MqttEndpoint.parse(mqtt_url),
            database_url=database_url,
            client_id=client_id,
            mqtt_options=MqttOptions(client_id=client_id, session_expiry_s=3600),
        )
        async with IngestService(config, sinks=(sink,)) as svc:
            conn.send("ready")
            # The load is queued on the broker already: the clock runs from the
            # ingester's start (connect and subscribe included) to the last commit.
            started = time.perf_counter()
            await sink.done.wait()
            elapsed = time.perf_counter() - started
            msgs = svc.metrics.received._value.get()
            stored = svc.metrics.stored._value.get()
        steady_s = sink.last_commit - (sink.first_commit or sink.last_commit)
        return {
            "elapsed_s": elapsed,
            # After the first commit: the drain rate without start-up (connect,
            # subscribe, the broker starting to send the backlog, a first batch).
            "steady_readings_s": (stored - sink.first_batch_readings) / steady_s
            if steady_s > 0
            else float("nan"),
            "messages": msgs,
            "stored": stored,
            "latencies": sink.latencies,
            "rss_kib": _vm_hwm_kib(),
        }

    conn.send(asyncio.run(run()))


def _start_ingester(
    mqtt_url: str, database_url: str, client_id: str, expect: int, live_after: float
) -> tuple[mp.Process, Any]:
    parent, child = mp.Pipe()
    proc = mp.Process(
        target=_ingester_child,
        args=(mqtt_url, database_url, client_id, expect, live_after, child),
    )
    proc.start()
    if not parent.poll(30) or parent.recv() != "ready":
        msg = "ingester did not start"
        raise RuntimeError(msg)
    return proc, parent


def _count(database_url: str, prefix: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM readings r JOIN series s ON s.id = r.series_id"
            " WHERE s.device_id LIKE %s",
            (prefix + "-%",),
        ).fetchone()
    return int(row[0]) if row else 0


def _progress(text: str) -> None:
    print(f"[bench.ingest] {text}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def generator_alone(mqtt_url: str, kind: str, n: int) -> float:
    t = time.perf_counter()
    with Publisher(mqtt_url, window=5_000) as pub:
        pub.publish((f"bench/null/{k}", p) for k, p in _messages(kind, "null", n))
        pub.wait_acked(300)
    return n / (time.perf_counter() - t)


def cityops_drain(mqtt_url: str, database_url: str, kind: str, n: int) -> dict[str, Any]:
    prefix = f"x{uuid.uuid4().hex[:6]}"
    client_id = f"bench-{prefix}"
    create_session(mqtt_url, client_id)
    with Publisher(mqtt_url, window=5_000) as pub:
        pub.publish(_messages(kind, prefix, n))
        pub.wait_acked(600)
    per = 1 if kind == "json" else SENML_RECORDS
    proc, pipe = _start_ingester(mqtt_url, database_url, client_id, n * per, float("inf"))
    result = pipe.recv()
    proc.join(30)
    drop_session(mqtt_url, client_id)
    stored = _count(database_url, prefix)
    return {
        "msg_s": result["messages"] / result["elapsed_s"],
        "readings_s": result["stored"] / result["elapsed_s"],
        "steady_readings_s": result["steady_readings_s"],
        "rss_mib": result["rss_kib"] / 1024,
        "lossless": stored == n * per,
        "stored": stored,
    }


def cityops_latency(
    mqtt_url: str, database_url: str, kind: str, rate: int, seconds: float
) -> dict[str, Any]:
    prefix = f"l{uuid.uuid4().hex[:6]}"
    client_id = f"bench-{prefix}"
    n = int(rate * seconds)
    per = 1 if kind == "json" else SENML_RECORDS
    create_session(mqtt_url, client_id)  # subscribed before the first publish
    start = time.time()
    proc, pipe = _start_ingester(mqtt_url, database_url, client_id, n * per, start - 1)
    with Publisher(mqtt_url, window=5_000) as pub:
        t0 = time.perf_counter()
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pub.publish(
                [
                    (
                        f"city/traffic/d{i % 1000 % 16}/{prefix}-{i % 1000}",
                        _payload(kind, i, time.time()),
                    )
                ]
            )
        pub.wait_acked(120)
    result = pipe.recv()
    proc.join(30)
    drop_session(mqtt_url, client_id)
    lat = result["latencies"]
    return {
        "p50_ms": _pct(lat, 0.5) * 1e3,
        "p99_ms": _pct(lat, 0.99) * 1e3,
        "lossless": _count(database_url, prefix) == n * per,
    }


def baseline_drain(mqtt_url: str, database_url: str, kind: str, n: int) -> dict[str, Any]:
    """Naive: aiomqtt message loop, one INSERT (autocommit) per message."""
    import aiomqtt  # noqa: PLC0415

    prefix = f"n{uuid.uuid4().hex[:6]}"
    client_id = f"bench-{prefix}"
    create_session(mqtt_url, client_id)
    with Publisher(mqtt_url, window=5_000) as pub:
        pub.publish(_messages(kind, prefix, n))
        pub.wait_acked(600)
    ep = MqttEndpoint.parse(mqtt_url)

    async def run() -> tuple[float, int]:
        got = 0
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS naive"
                " (topic text, ts float8, channel text, value float8)"
            )
            async with aiomqtt.Client(
                ep.host,
                ep.port,
                identifier=client_id,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,
            ) as client:
                await client.subscribe("city/#", qos=1)
                t = None
                async for message in client.messages:
                    if t is None:
                        t = time.perf_counter()
                    data = orjson.loads(message.payload)
                    records = data if isinstance(data, list) else [data]
                    for rec in records:
                        await db.execute(
                            "INSERT INTO naive VALUES (%s, %s, %s, %s)",
                            (
                                str(message.topic),
                                rec.get("ts", rec.get("bt", 0)),
                                rec.get("n", "v"),
                                rec.get("v", rec.get("intensity")),
                            ),
                        )
                    got += 1
                    if got >= n:
                        break
                return time.perf_counter() - (t or time.perf_counter()), got

    elapsed, got = asyncio.run(run())
    drop_session(mqtt_url, client_id)
    per = 1 if kind == "json" else SENML_RECORDS
    return {"msg_s": got / elapsed, "readings_s": got * per / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mqtt-url")
    parser.add_argument("--database-url")
    parser.add_argument("--messages", type=int, default=200_000, help="single-reading JSON load")
    parser.add_argument(
        "--senml-messages", type=int, default=50_000, help="SenML load (x20 readings)"
    )
    parser.add_argument("--baseline-messages", type=int, default=10_000)
    parser.add_argument("--latency-rate", type=int, default=5_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="print results as JSON too")
    args = parser.parse_args()

    with bench_services(args.mqtt_url, args.database_url) as (mqtt_url, database_url, _):
        rows = []
        for kind, n in (("json", args.messages), ("senml20", args.senml_messages)):
            _progress(f"{kind}: generator alone")
            gen = generator_alone(mqtt_url, kind, min(n, 50_000))
            _progress(f"{kind}: cityops drain of {n} messages")
            drain = cityops_drain(mqtt_url, database_url, kind, n)
            _progress(f"{kind}: cityops latency at a steady rate")
            lat = cityops_latency(
                mqtt_url,
                database_url,
                kind,
                args.latency_rate if kind == "json" else args.latency_rate // 5,
                args.latency_seconds,
            )
            _progress(f"{kind}: naive baseline")
            base = baseline_drain(mqtt_url, database_url, kind, min(n, args.baseline_messages))
            rows.append(
                {
                    "kind": kind,
                    "messages": n,
                    "generator_msg_s": gen,
                    **drain,
                    "latency_rate": args.latency_rate if kind == "json" else args.latency_rate // 5,
                    **lat,
                    "baseline_msg_s": base["msg_s"],
                    "baseline_readings_s": base["readings_s"],
                    "speedup": drain["msg_s"] / base["msg_s"],
                }
            )

    print()
    print(
        f"{'payload':9} {'msgs':>7} {'gen msg/s':>10} {'msg/s':>8} {'readings/s':>11} "
        f"{'steady r/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'@rate':>6} {'RSS MiB':>8} "
        f"{'lossless':>8} {'naive msg/s':>11} {'x naive':>7}"
    )
    for r in rows:
        print(
            f"{r['kind']:9} {r['messages']:>7} {r['generator_msg_s']:>10.0f} {r['msg_s']:>8.0f} "
            f"{r['readings_s']:>11.0f} {r['steady_readings_s']:>11.0f} "
            f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
            f"{r['latency_rate']:>6} {r['rss_mib']:>8.1f} {r['lossless'] and r['lossless']!s:>8} "
            f"{r['baseline_msg_s']:>11.0f} {r['speedup']:>7.1f}"
        )
    print(
        "msg/s and readings/s: from the ingester's start to the last commit;"
        " steady r/s: after the first commit (no start-up)."
    )
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
