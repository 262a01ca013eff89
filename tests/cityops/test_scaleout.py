"""Scale-out on one machine: two ingesters on a shared subscription, a rules leader and a standby.

Everything runs as an operator would run it (``cityops ingest --shared-group``,
``cityops rules``) against the session's broker and a fresh database. Mid
stream one ingester is killed with SIGKILL and brought back, and the rules
leader is killed so the standby takes over. Every reading is stored exactly
once, both ingesters did part of the work, and each tripped rule has exactly
one alert.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest

from tests.mqtt_helpers import Publisher, create_session, drop_session

pytestmark = pytest.mark.slow

N = 20_000
TANKS = 6
RULES = """
rules:
  - id: tank-low
    name: Tank low
    subject: {domain: facility, channel: level}
    when: value < 2
    clear_when: value > 3
    severity: major
    message: "Tank {device} low: {value}"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Service:
    """One ``cityops`` service as a child process, its log in a temporary file."""

    def __init__(self, env: dict[str, str], args: list[str], ready: bytes) -> None:
        self.env = env
        self.args = args
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="svc-", suffix=".log")  # noqa: SIM115

    def start(self) -> None:
        self.log.truncate(0)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cityops.cli", "--log-format", "json", *self.args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def logged(self, text: bytes) -> bool:
        return text in Path(self.log.name).read_bytes()

    def wait_logged(self, text: bytes, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.logged(text):
            assert self.proc is not None
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-2000:]
            assert time.monotonic() < deadline, f"{self.args[0]} did not log {text!r}"
            time.sleep(0.05)

    def wait_ready(self) -> None:
        self.wait_logged(self.ready)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def _messages(prefix: str) -> Iterator[tuple[str, bytes]]:
    """N traffic readings; every tank reports a low level four times along the stream."""
    base = time.time() - 30
    for i in range(N):
        ts = base + i * 1e-3
        yield f"city/traffic/chuo/{prefix}-d{i % 50}", orjson.dumps({"ts": ts, "intensity": i})
        if i % (N // 4) == N // 8:
            for k in range(TANKS):
                yield f"city/facility/kita/{prefix}-tank{k}", orjson.dumps({"ts": ts, "level": 1.0})


def _scalar(url: str, query: str, *params: object) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def _stored(url: str, prefix: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (r.series_id, r.ts)) FROM readings r"
            " JOIN series s ON s.id = r.series_id WHERE s.device_id LIKE %s",
            (prefix + "%",),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _until(cond: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _received(metrics_port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    for line in body.decode().splitlines():
        if line.startswith("cityops_ingest_messages_received_total "):
            return float(line.split()[1])
    return 0.0


def test_two_ingesters_and_a_standby_rules_service_survive_kills(
    mqtt_url: str, database_url: str, tmp_path: Path
) -> None:
    prefix = f"s{uuid.uuid4().hex[:6]}"
    group = f"g{prefix}"
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    env = {**os.environ, "CITYOPS_MQTT_URL": mqtt_url, "CITYOPS_DATABASE_URL": database_url}
    ports = [_free_port(), _free_port()]
    ingesters = [
        Service(
            env,
            [
                "ingest",
                "--shared-group",
                group,
                "--client-id",
                f"{group}-{name}",
                "--metrics-port",
                str(port),
                "--no-replay-sandbox",
            ],
            b'"ingesting ',
        )
        for name, port in zip("ab", ports, strict=True)
    ]
    leader, standby = (
        Service(
            env,
            [
                "rules",
                "--rules",
                str(rules),
                "--client-id",
                f"{prefix}-rules-{name}",
                "--no-metrics",
            ],
            b'"ingesting ',
        )
        for name in ("1", "2")
    )
    sessions = [(f"{group}-{n}", f"$share/{group}/city/#") for n in "ab"]
    sessions.append((f"{prefix}-rules-1", "city/#"))
    for client_id, topic_filter in sessions:
        create_session(mqtt_url, client_id, topic_filter)
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            with Publisher(mqtt_url, window=2_000) as pub:
                pub.publish(_messages(prefix))
                pub.wait_acked(timeout_s=180)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    total = N + 4 * TANKS
    try:
        for svc in (*ingesters, leader):
            svc.start()
        for svc in (*ingesters, leader):
            svc.wait_ready()
        standby.start()
        standby.wait_logged(b"standing by")
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()

        _until(lambda: _stored(database_url, prefix)[0] >= N // 4, 60, "the stream did not start")
        ingesters[0].kill()
        time.sleep(1.0)  # its share waits in its session on the broker meanwhile
        ingesters[0].start()
        _until(lambda: _stored(database_url, prefix)[0] >= N // 2, 60, "the stream stalled")
        leader.kill()
        standby.wait_logged(b"leader: evaluating")

        publisher.join(180)
        assert not errors, errors
        _until(lambda: _stored(database_url, prefix)[0] >= total, 120, "not everything stored")
        assert _stored(database_url, prefix) == (total, total)
        assert _received(ports[0]) > 0  # the restarted member took its share again
        assert _received(ports[1]) > 0

        def one_alert_per_tank() -> bool:
            return (
                _scalar(
                    database_url,
                    "SELECT count(DISTINCT device_id) FROM alerts WHERE rule_id = 'tank-low'"
                    " AND device_id LIKE %s",
                    prefix + "%",
                )
                == TANKS
            )

        _until(one_alert_per_tank, 60, "not every tank raised its alert")
        assert (
            _scalar(
                database_url,
                "SELECT count(*) FROM alerts WHERE rule_id = 'tank-low' AND device_id LIKE %s",
                prefix + "%",
            )
            == TANKS
        )
        for svc in (*ingesters, standby):
            assert svc.stop() == 0
    finally:
        for svc in (*ingesters, leader, standby):
            if svc.proc is not None and svc.proc.poll() is None:
                svc.kill()
        for client_id, _ in sessions:
            drop_session(mqtt_url, client_id)
        drop_session(mqtt_url, f"{prefix}-rules-2")
