"""`cityops up` as an operator runs it: embedded services, migrations, ingest; data kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psycopg
import pytest

from tests.mqtt_helpers import publish_all

pytestmark = pytest.mark.slow


def _start_up(data_dir: Path) -> tuple[subprocess.Popen[str], str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    env["CITYOPS_DATA_DIR"] = str(data_dir)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cityops.cli",
            "--log-format",
            "json",
            "up",
            "--no-simulator",
            "--metrics-port",
            "0",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    banner: dict[str, str] = {}
    deadline = time.monotonic() + 90
    while "database" not in banner or "broker" not in banner:
        assert time.monotonic() < deadline, "no banner from cityops up"
        line = proc.stdout.readline()
        assert line, f"cityops up exited with {proc.poll()}"
        key, _, value = line.strip().partition(":")
        if key in ("broker", "database"):
            banner[key] = value.strip()
    return proc, banner["broker"], banner["database"]


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(60)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def test_up_runs_ingest_on_embedded_services_and_keeps_data_across_restarts() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="cityops-up-"))
    data_dir.chmod(0o755)
    proc, broker, database = _start_up(data_dir)
    try:
        password = (data_dir / "postgres" / "password").read_text().strip()
        url = database.replace("***", password)
        publish_all(broker, [("city/facility/kita/up-1", orjson.dumps({"level": 3.5}))])
        deadline = time.monotonic() + 30
        while True:
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*) FROM readings").fetchone()
            if row and row[0] == 1:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        assert _stop(proc) == 0
    proc, broker2, _ = _start_up(data_dir)
    try:
        assert broker2 == broker  # same port reused
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT d.domain, d.district, r.value FROM readings r"
                " JOIN series s ON s.id = r.series_id JOIN devices d ON d.id = s.device_id"
            ).fetchone()
        assert row == ("facility", "kita", 3.5)
    finally:
        assert _stop(proc) == 0
