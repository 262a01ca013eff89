"""Rules latency benchmark: a reading's publish → its alert event, under a steady load.

Run: ``.venv/bin/python -m bench.rules_latency`` (about 2 to 3 minutes). It
starts its own embedded Mosquitto and PostgreSQL (same tuning as
``cityops up``) in a temporary directory, unless ``--mqtt-url`` /
``--database-url`` are given.

* The ingester runs in a child process with the rules engine on: the shipped
  rules (``rules/default``) plus one probe rule, ``bench-probe``, that raises
  when a ``probe`` channel reaches 1 and clears below 1.
* Background load: publisher processes (the paced, single-threaded paho
  pattern of ``simulators/mqtt.py``) send flat JSON loop-detector readings
  (QoS 1, ``occupancy`` well below the congestion threshold, so the default
  traffic rules evaluate every reading and raise nothing) at ``--rate``
  msg/s. If the machine cannot sustain that rate alongside the broker, the
  database and the ingester, the rate steps down until it can; the achieved
  publish and ingest rates are printed.
* Probes, one at a time: publish a reading that trips the probe rule on a
  fresh probe device, time until its ``raise`` event arrives on
  ``cityops/alerts/#``; then publish one that clears it and time the
  ``clear`` event. Baseline in the same run: the same probes with no load.

The ingest rate is measured over a window without probes and over the probe
run, from the ingester's own ``messages_received`` counter. Each probe's
latency is split where the ingester hands the decoded reading to the rules
engine (a decoded sink in the ingester records that instant; the reading's
``ts`` is its publish time): publish → decoded is the broker and the
ingester's receive loop, decoded → event the rules engine (evaluation, the
alert's transaction, the MQTT publish) and the broker's delivery. The rules
do not wait for the reading's commit; publish → committed of the same
readings (batching window, COPY, commit) is printed beside, for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from bench.services import bench_services
from cityops.settings import MqttEndpoint
from ingest.batch import CommittedBatch, DecodedBatch
from ingest.mqtt import MqttOptions
from ingest.pipeline import PipelineOptions
from ingest.service import IngestConfig, IngestService
from simulators.mqtt import MqttPublisher

DEFAULT_RULES = Path(__file__).resolve().parents[1] / "rules" / "default"
PROBE_RULE = """\
# The benchmark's probe: trips on a dedicated channel of dedicated devices.
rules:
  - id: bench-probe
    name: Benchmark probe
    subject: {domain: facility, device: "probe-*", channel: probe}
    when: value >= 1
    clear_when: value < 1
    severity: warning
    message: "Probe {device}: {value}"
"""
PROBES_PER_DISTRICT = 10
"""At most 10 probe alerts per district: flood grouping (more than 10 in 10
minutes) is not what the probes measure."""
LOAD_DEVICES = 2_000
LOAD_DISTRICTS = 10
EVENT_TIMEOUT_S = 10.0
SUSTAINED = 0.95
"""A rate is sustained when the publishers reach this share of it and the
ingester this share of what was published, with no growing backlog."""

ctx = mp.get_context("spawn")


def _progress(text: str) -> None:
    print(f"[bench.rules_latency] {text}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the ingester, in a child process -----------------------------------------


@dataclass
class _ProbeTimes:
    """Publish → decoded and publish → committed of each tripping probe reading."""

    decoded: dict[str, float] = field(default_factory=dict)
    committed: dict[str, float] = field(default_factory=dict)

    def on_decoded(self, batch: DecodedBatch) -> None:
        now = time.time()
        for r in batch.readings:
            if r.channel == "probe" and r.value == 1.0:
                # ts is the publish time (wall clock of the same machine)
                self.decoded[r.device.device_id] = now - r.ts

    def on_batch(self, batch: CommittedBatch) -> None:
        for r in batch.readings:
            if r.channel == "probe" and r.value == 1.0:
                self.committed[r.device.device_id] = batch.committed_at - r.ts


def _ingester_child(
    mqtt_url: str, database_url: str, rules: str, batch_delay_s: float | None, conn: Connection
) -> None:
    """Run the ingester with rules; answer ``stats`` on the pipe until ``stop``."""
    logging.basicConfig(level=logging.WARNING, format="ingester %(levelname)s %(message)s")

    async def run() -> None:
        client_id = f"bench-ingest-{uuid.uuid4().hex[:6]}"
        pipeline = PipelineOptions()
        if batch_delay_s is not None:
            pipeline = replace(pipeline, batch_max_delay_s=batch_delay_s)
        config = IngestConfig(
            mqtt=MqttEndpoint.parse(mqtt_url),
            database_url=database_url,
            client_id=client_id,
            mqtt_options=MqttOptions(client_id=client_id, session_expiry_s=60),
            pipeline=pipeline,
            rules_path=Path(rules),
            replay=False,
        )
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[str] = asyncio.Queue()
        probes = _ProbeTimes()
        async with IngestService(config, sinks=(probes,)) as svc:
            svc.pipeline.add_decoded_sink(probes)
            await svc.wait_connected(10.0)
            loop.add_reader(conn.fileno(), lambda: commands.put_nowait(conn.recv()))
            try:
                conn.send("ready")
                while await commands.get() != "stop":
                    times = os.times()
                    conn.send(
                        {
                            "t": time.monotonic(),
                            "received": svc.metrics.received._value.get(),
                            "cpu_s": times.user + times.system,
                        }
                    )
            finally:
                loop.remove_reader(conn.fileno())
        conn.send({"decoded": probes.decoded, "committed": probes.committed})

    asyncio.run(run())


@dataclass
class Ingester:
    """The child process and its pipe."""

    process: Any
    pipe: Connection

    @classmethod
    def start(
        cls, mqtt_url: str, database_url: str, rules: Path, batch_delay_s: float | None
    ) -> Ingester:
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_ingester_child,
            args=(mqtt_url, database_url, str(rules), batch_delay_s, child),
            daemon=True,
        )
        proc.start()
        if not parent.poll(60) or parent.recv() != "ready":
            msg = "the ingester did not start within 60 s"
            raise RuntimeError(msg)
        return cls(proc, parent)

    def stats(self) -> dict[str, float]:
        self.pipe.send("stats")
        if not self.pipe.poll(30):
            msg = "the ingester did not answer within 30 s"
            raise RuntimeError(msg)
        result: dict[str, float] = self.pipe.recv()
        return result

    def stop(self) -> dict[str, dict[str, float]]:
        """Stop; publish → decoded and → committed seconds of each probe device."""
        self.pipe.send("stop")
        commits: dict[str, dict[str, float]] = {"decoded": {}, "committed": {}}
        if self.pipe.poll(60):
            commits = self.pipe.recv()
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
        return commits


# -- background load ----------------------------------------------------------


def _load_worker(  # noqa: PLR0917 (multiprocessing target)
    mqtt_url: str,
    index: int,
    workers: int,
    rate: float,
    stop: MpEvent,
    sent: Synchronized[int],
) -> None:
    """Publish ``rate`` msg/s, paced on the monotonic clock, until ``stop``."""
    devices = [d for d in range(LOAD_DEVICES) if d % workers == index]
    topics = [f"city/traffic/bench-{d % LOAD_DISTRICTS}/loop-bench{index}-{d:05d}" for d in devices]
    endpoint = MqttEndpoint.parse(mqtt_url)
    client_id = f"bench-load-{index}-{uuid.uuid4().hex[:6]}"
    with MqttPublisher(endpoint, client_id=client_id, max_unacked=20_000) as pub:
        t0 = time.monotonic()
        n = 0
        while not stop.is_set():
            due = int((time.monotonic() - t0) * rate)
            while n < due:
                occupancy = 0.1 + 0.02 * (n % 10)  # far below the congestion threshold
                payload = orjson.dumps({"ts": time.time(), "occupancy": occupancy})
                pub.publish(topics[n % len(topics)], payload, qos=1)
                n += 1
            sent.value = n
            pub.wait(0.002)  # services the socket (PUBACKs) while pacing
        sent.value = n
        pub.drain(60)


@dataclass
class Load:
    """Publisher processes at a total rate."""

    rate: float
    stop_event: MpEvent
    counters: list[Synchronized[int]]
    processes: list[Any] = field(default_factory=list)

    @classmethod
    def start(cls, mqtt_url: str, rate: float, workers: int) -> Load:
        stop = ctx.Event()
        counters: list[Synchronized[int]] = [ctx.Value("q", 0) for _ in range(workers)]
        load = cls(rate, stop, counters)
        for i in range(workers):
            proc = ctx.Process(
                target=_load_worker,
                args=(mqtt_url, i, workers, rate / workers, stop, counters[i]),
                daemon=True,
            )
            proc.start()
            load.processes.append(proc)
        return load

    @property
    def sent(self) -> int:
        return sum(c.value for c in self.counters)

    def stop(self) -> int:
        self.stop_event.set()
        for proc in self.processes:
            proc.join(90)
        return self.sent


@dataclass(frozen=True)
class Window:
    """Rates over one measurement window."""

    seconds: float
    published_msg_s: float
    ingested_msg_s: float
    backlog_growth: int
    ingester_cpu: float

    def sustained(self, target: float) -> bool:
        growth_ok = self.backlog_growth <= max(500, 0.02 * target * self.seconds)
        return (
            self.published_msg_s >= SUSTAINED * target
            and self.ingested_msg_s >= SUSTAINED * self.published_msg_s
            and growth_ok
        )


def _window(ingester: Ingester, load: Load | None, seconds: float) -> Window:
    """Measure publish and ingest rates over ``seconds``."""
    a, sent_a = ingester.stats(), load.sent if load else 0
    time.sleep(seconds)  # the measurement window itself
    b, sent_b = ingester.stats(), load.sent if load else 0
    dt = b["t"] - a["t"]
    received = b["received"] - a["received"]
    return Window(
        seconds=dt,
        published_msg_s=(sent_b - sent_a) / dt,
        ingested_msg_s=received / dt,
        backlog_growth=int((sent_b - sent_a) - received),
        ingester_cpu=(b["cpu_s"] - a["cpu_s"]) / dt,
    )


def _wait_drained(ingester: Ingester, total_sent: int, base: float, timeout_s: float) -> bool:
    """Poll until the ingester received everything published since ``base``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ingester.stats()["received"] - base >= total_sent:
            return True
        time.sleep(0.2)
    return False


# -- probes -------------------------------------------------------------------


class ProbeClient:
    """One MQTT 5 connection that publishes probe readings and receives alert events."""

    def __init__(self, mqtt_url: str) -> None:
        ep = MqttEndpoint.parse(mqtt_url)
        self._cv = threading.Condition()
        self._arrived: dict[tuple[str, str], float] = {}
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-probe-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(ep.host, ep.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            msg = "no SUBACK for cityops/alerts/#"
            raise RuntimeError(msg)

    def _on_connect(
        self, client: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        sock = client.socket()
        if isinstance(sock, socket.socket):  # paho leaves Nagle on
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe("cityops/alerts/#", qos=1)

    def _on_message(self, _c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        at = time.perf_counter()
        doc = orjson.loads(message.payload)
        alert, event = doc["alert"], doc["event"]
        if alert.get("rule_id") != "bench-probe":
            return
        with self._cv:
            self._arrived[(str(alert["device_id"]), str(event["action"]))] = at
            self._cv.notify_all()

    def probe(self, district: str, device: str, value: float, action: str) -> float | None:
        """Publish ``value`` for ``device``; seconds until its ``action`` event (None: lost)."""
        topic = f"city/facility/{district}/{device}"
        payload = orjson.dumps({"ts": time.time(), "probe": value})
        t0 = time.perf_counter()
        self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        key = (device, action)
        with self._cv:
            while key not in self._arrived:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cv.wait(remaining)
            return self._arrived[key] - t0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class ProbeRun:
    """Latencies of one run of probes."""

    raise_s: dict[str, float] = field(default_factory=dict)
    """Per probe device: its tripping reading's publish → the raise event."""
    clear_s: dict[str, float] = field(default_factory=dict)
    """Per probe device: its clearing reading's publish → the clear event."""
    lost: int = 0


def run_probes(client: ProbeClient, prefix: str, count: int) -> ProbeRun:
    """``count`` probes, each a fresh device: trip, wait for the raise; clear, wait."""
    run = ProbeRun()
    for i in range(count):
        device = f"probe-{prefix}-{i:04d}"
        district = f"probe-{prefix}-{i // PROBES_PER_DISTRICT}"
        raised = client.probe(district, device, 1.0, "raise")
        if raised is None:
            run.lost += 1
            continue
        run.raise_s[device] = raised
        cleared = client.probe(district, device, 0.0, "clear")
        if cleared is None:
            run.lost += 1
        else:
            run.clear_s[device] = cleared
    return run


# -- the benchmark ------------------------------------------------------------


def _rules_dir(root: Path) -> Path:
    rules = root / "rules"
    rules.mkdir()
    for path in sorted(DEFAULT_RULES.glob("*.yaml")):
        shutil.copy(path, rules / path.name)
    (rules / "zz-bench-probe.yaml").write_text(PROBE_RULE)
    return rules


def _find_rate(
    mqtt_url: str, ingester: Ingester, target: float, workers: int, window_s: float
) -> tuple[Load, Window, list[tuple[float, Window]]]:
    """Start the load at ``target``, stepping down until a window shows it sustained."""
    tried: list[tuple[float, Window]] = []
    rate = target
    while True:
        _progress(f"background load at {rate:,.0f} msg/s")
        base = ingester.stats()["received"]
        load = Load.start(mqtt_url, rate, workers)
        time.sleep(2.0)  # warm-up before the measurement window
        window = _window(ingester, load, window_s)
        tried.append((rate, window))
        _progress(
            f"  published {window.published_msg_s:,.0f} msg/s, ingested "
            f"{window.ingested_msg_s:,.0f} msg/s, backlog +{window.backlog_growth:,}, "
            f"ingester CPU {window.ingester_cpu:.0%}"
        )
        if window.sustained(rate) or rate <= 1_000:
            return load, window, tried
        sent = load.stop()
        _progress("  not sustained; draining the backlog before a lower rate")
        if not _wait_drained(ingester, sent, base, 300.0):
            msg = "the ingester did not drain the backlog within 300 s"
            raise RuntimeError(msg)
        rate = max(1_000.0, round(rate * 0.8 / 500) * 500)


HEADER = (
    f"{'probes':22} {'load msg/s':>10} {'ingest msg/s':>12} {'n':>4} {'lost':>4} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} │ {'decode p50':>10} {'p99':>6} "
    f"│ {'alert p50':>9} {'p99':>6} │ {'clear p50':>9} {'p99':>6} │ {'commit p50':>10} {'p99':>6}"
)


def _row(
    label: str, load: str, ingest: str, run: ProbeRun, times: dict[str, dict[str, float]]
) -> str:
    decoded, committed = times["decoded"], times["committed"]
    ms = [v * 1e3 for v in run.raise_s.values()]
    de = [decoded[d] * 1e3 for d in run.raise_s if d in decoded]
    after = [(v - decoded[d]) * 1e3 for d, v in run.raise_s.items() if d in decoded]
    cl = [v * 1e3 for v in run.clear_s.values()]
    co = [committed[d] * 1e3 for d in run.raise_s if d in committed]
    return (
        f"{label:22} {load:>10} {ingest:>12} {len(ms):>4} {run.lost:>4} "
        f"{_pct(ms, 0.5):>7.1f} {_pct(ms, 0.99):>7.1f} {max(ms, default=float('nan')):>7.1f} │ "
        f"{_pct(de, 0.5):>10.1f} {_pct(de, 0.99):>6.1f} │ "
        f"{_pct(after, 0.5):>9.1f} {_pct(after, 0.99):>6.1f} │ "
        f"{_pct(cl, 0.5):>9.1f} {_pct(cl, 0.99):>6.1f} │ "
        f"{_pct(co, 0.5):>10.1f} {_pct(co, 0.99):>6.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mqtt-url")
    parser.add_argument("--database-url")
    parser.add_argument("--rate", type=float, default=10_000.0, help="target load, msg/s")
    parser.add_argument("--publishers", type=int, default=2, help="load publisher processes")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--window", type=float, default=8.0, help="rate window, seconds")
    parser.add_argument(
        "--batch-delay-ms",
        type=float,
        default=None,
        help="the ingester's batch_max_delay (default: its own, 50 ms)",
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON too")
    args = parser.parse_args()

    with bench_services(args.mqtt_url, args.database_url) as (mqtt_url, database_url, tmp):
        rules = _rules_dir(tmp)
        batch_delay_s = None if args.batch_delay_ms is None else args.batch_delay_ms / 1e3
        ingester = Ingester.start(mqtt_url, database_url, rules, batch_delay_s)
        client = ProbeClient(mqtt_url)
        load: Load | None = None
        try:
            _progress("warm-up probes (connections, first alerts)")
            run_probes(client, "warm", 5)
            _progress(f"baseline: {args.probes} probes, no load")
            baseline = run_probes(client, "base", args.probes)
            load, quiet, tried = _find_rate(
                mqtt_url, ingester, args.rate, args.publishers, args.window
            )
            _progress(f"under load: {args.probes} probes")
            a, sent_a = ingester.stats(), load.sent
            loaded = run_probes(client, "load", args.probes)
            b, sent_b = ingester.stats(), load.sent
            dt = b["t"] - a["t"]
            during = Window(
                seconds=dt,
                published_msg_s=(sent_b - sent_a) / dt,
                ingested_msg_s=(b["received"] - a["received"]) / dt,
                backlog_growth=int((sent_b - sent_a) - (b["received"] - a["received"])),
                ingester_cpu=(b["cpu_s"] - a["cpu_s"]) / dt,
            )
            sent = load.stop()
            load = None
            drained = _wait_drained(ingester, sent, a["received"] - sent_a, 120.0)
        finally:
            if load is not None:
                load.stop()
            client.close()
            commits = ingester.stop()

    rate = tried[-1][0]
    print()
    print(
        "p50/p99/max: a tripping reading's publish → its raise event on cityops/alerts/#;"
        " split into publish → decoded in the ingester (decode) and decoded → event received"
        " (alert: evaluation, alert transaction, MQTT publish); clear: the clearing"
        " reading → its clear event; commit: the tripping reading's publish → its batch"
        " committed (the rules do not wait for it)"
    )
    print(HEADER)
    print(_row("baseline (no load)", "0", "-", baseline, commits))
    print(
        _row(
            f"under load ({rate:,.0f}/s)",
            f"{during.published_msg_s:,.0f}",
            f"{during.ingested_msg_s:,.0f}",
            loaded,
            commits,
        )
    )
    delay_ms = 1e3 * (
        PipelineOptions().batch_max_delay_s if batch_delay_s is None else batch_delay_s
    )
    print(f"ingester batch_max_delay: {delay_ms:g} ms")
    print()
    print("load steps (target → published / ingested msg/s, backlog growth, ingester CPU):")
    for target, w in tried:
        verdict = "sustained" if w.sustained(target) else "not sustained"
        print(
            f"  {target:>8,.0f} → {w.published_msg_s:>8,.0f} / {w.ingested_msg_s:>8,.0f}"
            f"  +{w.backlog_growth:<8,} CPU {w.ingester_cpu:>4.0%}  {verdict}"
        )
    print(
        f"ingest rate without probes {quiet.ingested_msg_s:,.0f} msg/s"
        f" (CPU {quiet.ingester_cpu:.0%}); with probes {during.ingested_msg_s:,.0f} msg/s"
        f" (CPU {during.ingester_cpu:.0%}); backlog drained after the load: {drained}"
    )
    if args.json:
        doc = {
            "rate": rate,
            "baseline": asdict(baseline),
            "loaded": asdict(loaded),
            "quiet": asdict(quiet),
            "during": asdict(during),
            "tried": [(t, asdict(w)) for t, w in tried],
            "commit_s": commits,
        }
        print(json.dumps(doc))


if __name__ == "__main__":
    main()
