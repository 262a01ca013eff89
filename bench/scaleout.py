"""Scale-out on one machine: two ingesters on a shared subscription, one rules leader, two APIs.

Run: ``.venv/bin/python -m bench.scaleout`` (5 minutes of load by default,
``--minutes``). It starts its own embedded Mosquitto and PostgreSQL (same
tuning as ``cityops up``) in a temporary directory, then the services as an
operator runs them, each a ``cityops`` process:

* ``cityops ingest --shared-group bench`` twice (members A and B, each with
  its /metrics), storing readings;
* ``cityops rules`` once: the rules engine on its own subscription (the
  shipped rules plus a probe rule);
* ``cityops api`` twice, on two ports, each with its own broker feed.

Load: paced publisher processes (``bench.rules_latency.Load``) send
``--rate`` JSON loop-detector readings per second (QoS 1) to 2,000 devices;
every 2 s one probe device trips the probe rule. At a third of the run,
member A is killed with SIGKILL and started again ``--outage`` seconds later
with the same client id. Printed:

* per phase (before, A dead, A back): published msg/s, received msg/s by A
  and by B;
* what Mosquitto did with A's share while A was dead, from the stored
  readings (each carries its publish time and its receive time): how many
  waited longer than a second, the longest wait, and when the last of them
  arrived after A's return (A caught up);
* exactly once: readings published vs stored vs distinct; probe alerts
  raised vs probes published (duplicates);
* the two APIs: the same open alerts over REST and the same live snapshot
  (alert ids, device count) over the websocket;
* peak RSS of every service.

The baseline of the same run is the "before" phase: both members up.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psycopg
from websockets.asyncio.client import connect

from bench.rules_latency import Load, _rules_dir
from bench.services import bench_services
from cityops.settings import MqttEndpoint
from simulators.mqtt import MqttPublisher

GROUP = "bench"
PROBE_EVERY_S = 2.0


def _log(text: str) -> None:
    print(f"[bench.scaleout] {text}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Service:
    """One ``cityops`` service process; its log in a temporary file."""

    name: str
    args: list[str]
    env: dict[str, str]
    ready: bytes
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))
    peak_rss_kib: int = 0

    def start(self) -> None:
        self.log.write_bytes(b"")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cityops.cli", "--log-format", "json", *self.args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.ready not in self.log.read_bytes():
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text()[-2000:]
                msg = f"{self.name} did not start:\n{tail}"
                raise RuntimeError(msg)
            time.sleep(0.1)

    def sample_rss(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.sample_rss()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.sample_rss()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _received(port: int) -> float | None:
    """Messages received by one ingester since its start (None while it is down)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            body = r.read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith("cityops_ingest_messages_received_total "):
            return float(line.split()[1])
    return None


@dataclass
class Member:
    """An ingester and what it received, summed over its restarts."""

    service: Service
    port: int
    before_restarts: float = 0.0
    last: float = 0.0

    def total(self) -> float:
        now = _received(self.port)
        if now is None:
            return self.before_restarts + self.last
        self.last = now
        return self.before_restarts + now

    def restart(self) -> None:
        """Start the member again: its counter begins at zero."""
        self.total()
        self.before_restarts += self.last
        self.last = 0.0
        self.service.start()
        self.service.wait_ready()


def _run_cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cityops.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout


def _scalar(url: str, query: str, *params: object) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(query, params).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


async def _snapshot(port: int, token: str) -> tuple[set[str], int]:
    """Open alert ids and the number of devices in one API's live snapshot."""
    async with connect(
        f"ws://127.0.0.1:{port}/api/v1/live",
        additional_headers=[("Authorization", f"Bearer {token}")],
        max_size=None,
    ) as ws:
        snapshot = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
    alerts = {a["id"] for a in snapshot.get("alerts", [])}
    return alerts, len(snapshot.get("devices", []))


def _open_alerts_rest(port: int, token: str) -> set[str]:
    ids: set[str] = set()
    cursor = ""
    while True:
        url = f"http://127.0.0.1:{port}/api/v1/alerts?open=true&limit=500{cursor}"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            page = orjson.loads(r.read())
        ids.update(a["id"] for a in page["items"])
        if not page.get("next_cursor"):
            return ids
        cursor = f"&cursor={page['next_cursor']}"


@dataclass
class Phase:
    name: str
    seconds: float
    published: int
    a: float
    b: float


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the load")
    parser.add_argument("--rate", type=float, default=4_000.0, help="total msg/s published")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds member A stays dead")
    args = parser.parse_args()
    duration = args.minutes * 60.0

    with bench_services(None, None) as (mqtt_url, database_url, tmp):
        rules = _rules_dir(tmp)
        env = {
            **os.environ,
            "CITYOPS_MQTT_URL": mqtt_url,
            "CITYOPS_DATABASE_URL": database_url,
            "CITYOPS_RULES": str(rules),
            "CITYOPS_DATA_DIR": str(tmp / "data"),
        }
        members = []
        for name in ("a", "b"):
            port = _free_port()
            svc = Service(
                f"ingest-{name}",
                [
                    "ingest",
                    "--shared-group",
                    GROUP,
                    "--client-id",
                    f"bench-ingest-{name}",
                    "--metrics-port",
                    str(port),
                    "--no-replay-sandbox",
                ],
                env,
                b'"ingesting ',
            )
            members.append(Member(svc, port))
        rules_svc = Service(
            "rules", ["rules", "--client-id", "bench-rules", "--no-metrics"], env, b'"ingesting '
        )
        api_ports = [_free_port(), _free_port()]
        apis = [
            Service(
                f"api-{i + 1}",
                ["api", "--client-id", f"bench-api-{i + 1}"],
                {**env, "CITYOPS_HTTP": f"127.0.0.1:{port}"},
                b"control API ready",
            )
            for i, port in enumerate(api_ports)
        ]
        services = [m.service for m in members] + [rules_svc, *apis]
        load: Load | None = None
        try:
            _log("starting 2 ingesters, the rules service and 2 APIs")
            for svc in services:
                svc.start()
            for svc in services:
                svc.wait_ready()
            _run_cli(env, "users", "add", "bench", "--role", "admin")
            issued = _run_cli(env, "tokens", "issue", "bench")
            token = re.findall(r"cot_\S+", issued)[-1]

            _log(f"load: {args.rate:,.0f} msg/s for {duration:.0f} s; probes every 2 s")
            probe_pub = MqttPublisher(
                MqttEndpoint.parse(mqtt_url), client_id=f"bench-probe-{uuid.uuid4().hex[:6]}"
            )
            probe_pub.__enter__()
            load = Load.start(mqtt_url, args.rate, args.publishers)
            t0 = time.monotonic()
            kill_at, back_at = duration / 3, duration / 3 + args.outage
            marks: dict[str, tuple[float, int, float, float]] = {}
            probes = 0
            next_probe = t0
            a, b = members
            state = "before"
            queued_for_a = 0.0
            returned_wall = 0.0

            def mark(name: str) -> None:
                marks[name] = (time.monotonic(), load.sent if load else 0, a.total(), b.total())

            mark("before")
            while time.monotonic() - t0 < duration:
                now = time.monotonic()
                if now >= next_probe:
                    device = f"probe-{probes:04d}"
                    topic = f"city/facility/bench-{probes % 10}/{device}"
                    probe_pub.publish(topic, orjson.dumps({"ts": time.time(), "probe": 1}), qos=1)
                    probes += 1
                    next_probe += PROBE_EVERY_S
                elapsed = now - t0
                if state == "before" and elapsed >= kill_at:
                    mark("outage")
                    a.service.kill()
                    state = "outage"
                    _log(f"{elapsed:.0f} s: member A killed (SIGKILL)")
                elif state == "outage" and elapsed >= back_at:
                    mark("recovery")
                    _, sent_out, _, b_out = marks["outage"]
                    _, sent_back, _, b_back = marks["recovery"]
                    queued_for_a = (sent_back - sent_out) - (b_back - b_out)
                    a.restart()
                    returned_wall = time.time()
                    state = "recovery"
                    _log(f"{elapsed:.0f} s: member A back; about {queued_for_a:,.0f} waited for it")
                for svc in services:
                    svc.sample_rss()
                time.sleep(0.25)
            mark("end")
            sent = load.stop()
            load = None
            probe_pub.drain(30)
            probe_pub.__exit__(None, None, None)
            _log("load stopped; draining")
            deadline = time.monotonic() + 300
            while a.total() + b.total() < sent and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(2.0)  # the last batches' commits

            stored, distinct = (
                _scalar(database_url, q)
                for q in (
                    "SELECT count(*) FROM readings r JOIN series s ON s.id = r.series_id"
                    " WHERE s.channel = 'occupancy'",
                    "SELECT count(DISTINCT (r.series_id, r.ts)) FROM readings r"
                    " JOIN series s ON s.id = r.series_id WHERE s.channel = 'occupancy'",
                )
            )
            with psycopg.connect(database_url) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE received_at - ts > interval '1 second'),"
                    " extract(epoch FROM max(received_at - ts)),"
                    " extract(epoch FROM max(received_at)"
                    "   FILTER (WHERE received_at - ts > interval '1 second'))"
                    " FROM readings r JOIN series s ON s.id = r.series_id"
                    " WHERE s.channel = 'occupancy'"
                ).fetchone()
            assert row is not None
            delayed, longest_wait, last_delayed = int(row[0]), float(row[1] or 0), row[2]
            deadline = time.monotonic() + 60
            probe_alerts = 0
            while time.monotonic() < deadline:
                probe_alerts = _scalar(
                    database_url, "SELECT count(*) FROM alerts WHERE rule_id = 'bench-probe'"
                )
                if probe_alerts >= probes:
                    break
                time.sleep(0.5)
            probe_devices = _scalar(
                database_url,
                "SELECT count(DISTINCT device_id) FROM alerts WHERE rule_id = 'bench-probe'",
            )
            rest = [_open_alerts_rest(p, token) for p in api_ports]
            live = [asyncio.run(_snapshot(p, token)) for p in api_ports]
        finally:
            if load is not None:
                load.stop()
            for svc in reversed(services):
                svc.stop()

    phases = []
    order = ["before", "outage", "recovery", "end"]
    present = [n for n in order if n in marks]
    for start, end in itertools.pairwise(present):
        t_a, s_a, a_a, b_a = marks[start]
        t_b, s_b, a_b, b_b = marks[end]
        phases.append(Phase(start, t_b - t_a, s_b - s_a, a_b - a_a, b_b - b_a))

    print()
    print(f"{'phase':28} {'seconds':>8} {'published/s':>12} {'A recv/s':>9} {'B recv/s':>9}")
    labels = {
        "before": "both members up",
        "outage": "A dead (SIGKILL)",
        "recovery": "A back",
    }
    for p in phases:
        print(
            f"{labels[p.name]:28} {p.seconds:>8.1f} {p.published / p.seconds:>12,.0f}"
            f" {p.a / p.seconds:>9,.0f} {p.b / p.seconds:>9,.0f}"
        )
    print()
    print(
        f"A's share while dead: about {queued_for_a:,.0f} messages waited in its session;"
        f" {delayed:,} readings were received more than 1 s after their publish,"
        f" the longest after {longest_wait:.1f} s"
    )
    if last_delayed is not None and returned_wall:
        catch_up = float(last_delayed) - returned_wall
        print(f"A caught up {catch_up:.1f} s after its return (outage {args.outage:.0f} s)")
    print(
        f"readings: published {sent:,}, stored {stored:,}, distinct {distinct:,}"
        f" -> lost {sent - distinct:,}, duplicated {stored - distinct:,}"
    )
    print(
        f"probe alerts: {probes} probes published, {probe_alerts} alerts on"
        f" {probe_devices} devices (duplicates {probe_alerts - probe_devices})"
    )
    print(
        f"APIs: open alerts over REST equal: {rest[0] == rest[1]} ({len(rest[0])} alerts);"
        f" live snapshots equal: {live[0] == live[1]}"
        f" ({len(live[0][0])} alerts, {live[0][1]} devices)"
    )
    print("peak RSS: " + ", ".join(f"{s.name} {s.peak_rss_kib / 1024:.0f} MiB" for s in services))
    if sent != distinct or stored != distinct or probe_alerts != probe_devices:
        sys.exit(1)


if __name__ == "__main__":
    main()
