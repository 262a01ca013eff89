"""``cityops users``, ``cityops tokens`` and ``cityops api`` as an administrator runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.polling import until_sync


def _env(database_url: str, mqtt_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    env |= {"CITYOPS_DATABASE_URL": database_url, "CITYOPS_MQTT_URL": mqtt_url, **extra}
    return env


def _cityops(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cityops.cli", *args],
        env=env, input=stdin, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_users_and_tokens_from_the_command_line(database_url: str, mqtt_url: str) -> None:
    env = _env(database_url, mqtt_url)
    added = _cityops(env, "users", "add", "sato", "--role", "responder")
    assert added.returncode == 0, added.stderr
    assert "one-time password: " in added.stdout
    again = _cityops(env, "users", "add", "sato", "--role", "operator")
    assert again.returncode == 1
    assert "already exists" in again.stderr or "exists already" in again.stderr
    bad_role = _cityops(env, "users", "add", "suzuki", "--role", "mayor")
    assert bad_role.returncode == 2
    short = _cityops(env, "users", "add", "kato", "--role", "operator", "--password-stdin",
                     stdin="short\n")  # fmt: skip
    assert short.returncode == 2
    listed = _cityops(env, "users", "list")
    assert "sato" in listed.stdout
    assert "responder" in listed.stdout
    token = _cityops(env, "tokens", "issue", "sato", "--description", "bosai system")
    assert token.returncode == 0, token.stderr
    assert token.stdout.strip().splitlines()[-1].startswith("cot_")
    token_id = token.stdout.split()[1]
    assert _cityops(env, "tokens", "revoke", token_id).returncode == 0
    assert _cityops(env, "tokens", "revoke", token_id).returncode == 1


def test_cityops_api_serves_and_is_ready(database_url: str, mqtt_url: str) -> None:
    port = _free_port()
    env = _env(database_url, mqtt_url, CITYOPS_HTTP=f"127.0.0.1:{port}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cityops.cli", "api"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None

        until_sync(ready, 60, "cityops api ready")
        assert proc.poll() is None
        me = httpx.get(f"http://127.0.0.1:{port}/api/v1/auth/me")
        assert me.status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert proc.wait(30) == 0
        assert time.monotonic() - started < 30
