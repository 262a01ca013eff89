"""`cityops up` as an operator runs it: embedded services, migrations, ingest; data kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import psycopg
import pytest

from tests.mqtt_helpers import publish_all

pytestmark = pytest.mark.slow


def _start_up(data_dir: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    env["CITYOPS_DATA_DIR"] = str(data_dir)
    env["CITYOPS_HTTP"] = "127.0.0.1:0"
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
    while not {"database", "broker", "console", "login"} <= banner.keys():
        assert time.monotonic() < deadline, "no banner from cityops up"
        line = proc.stdout.readline()
        assert line, f"cityops up exited with {proc.poll()}"
        key, _, value = line.strip().partition(":")
        banner[key] = value.strip()
    return proc, banner


def _as_simulator(broker: str, data_dir: Path) -> str:
    """The broker URL with the credentials `cityops up` generated for its simulator."""
    registry = json.loads((data_dir / "mosquitto" / "security" / "registry.json").read_text())
    password = registry["services"]["cityops-simulator"]["password"]
    return broker.replace("mqtt://", f"mqtt://cityops-simulator:{quote(password, safe='')}@")


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
    proc, banner = _start_up(data_dir)
    broker, database = banner["broker"], banner["database"]
    try:
        # the first start creates the first admin and prints a one-time password
        assert banner["login"].startswith("admin / ")
        password_admin = banner["login"].split()[2]
        console = banner["console"].split()[0]
        assert console.startswith("http://localhost:")
        api = console.replace("localhost", "127.0.0.1")
        login = httpx.post(
            f"{api}api/v1/auth/login", json={"name": "admin", "password": password_admin}
        )
        assert login.status_code == 200, login.text
        assert login.json()["role"] == "admin"
        password = (data_dir / "postgres" / "password").read_text().strip()
        url = database.replace("***", password)
        # the embedded broker refuses anonymous clients: publish as the simulator gateway
        publisher_url = _as_simulator(broker, data_dir)
        publish_all(publisher_url, [("city/facility/kita/up-1", orjson.dumps({"level": 3.5}))])
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
    proc, banner2 = _start_up(data_dir)
    try:
        assert banner2["broker"] == broker  # same port reused
        assert banner2["login"].startswith("your account")  # no second admin, no password
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT d.domain, d.district, r.value FROM readings r"
                " JOIN series s ON s.id = r.series_id JOIN devices d ON d.id = s.device_id"
            ).fetchone()
        assert row == ("facility", "kita", 3.5)
    finally:
        assert _stop(proc) == 0
