"""A real control API per test: uvicorn on a free port, a fresh database, the session broker.

The server runs in its own thread with its own event loop, as a deployed API
would run beside its clients. ``users`` holds one signed-in-able user per
role; :class:`ApiClient` signs in over HTTP and sends the session cookie and
CSRF token the way a browser does.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn

from cityops.runtime import DEFAULT_RULES
from cityops.settings import MqttEndpoint
from control_api.app import create_app
from control_api.auth import CSRF_HEADER, SESSION_COOKIE, LoginPolicy, hash_password
from control_api.context import ApiConfig
from rules import ROLES
from tests.polling import until_sync

PASSWORD = "correct horse battery staple"
STARTUP_TIMEOUT_S = 30.0


@dataclass(slots=True)
class RunningApi:
    """A control API serving in a thread."""

    base_url: str
    database_url: str
    config: ApiConfig
    server: uvicorn.Server
    app: Any


@dataclass(slots=True)
class ApiClient:
    """An HTTP client that signs in like the console: cookie plus CSRF header."""

    http: httpx.AsyncClient
    headers: dict[str, str] = field(default_factory=dict)

    async def login(self, name: str, password: str = PASSWORD) -> httpx.Response:
        response = await self.http.post(
            "/api/v1/auth/login", json={"name": name, "password": password}
        )
        if response.status_code == 200:
            # The cookie is Secure: httpx keeps it but will not send it over plain
            # HTTP to 127.0.0.1, so carry it by hand as a browser on localhost does.
            secret = response.cookies[SESSION_COOKIE]
            self.headers = {
                "Cookie": f"{SESSION_COOKIE}={secret}",
                CSRF_HEADER: response.json()["csrf_token"],
            }
        return response

    def use_token(self, token: str) -> None:
        self.headers = {"Authorization": f"Bearer {token}"}

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return await self.http.request(method, url, headers=headers, **kwargs)

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, **kwargs)


@functools.cache
def _password_hash() -> str:
    return hash_password(PASSWORD)  # argon2 takes ~0.3 s here: once per session


def _seed_users(database_url: str) -> None:
    digest = _password_hash()
    with psycopg.connect(database_url, autocommit=True) as conn:
        for role in ROLES:
            conn.execute(
                "INSERT INTO users (name, role, password_hash) VALUES (%s, %s, %s)",
                (role, role, digest),
            )


def start_api(config: ApiConfig) -> tuple[uvicorn.Server, threading.Thread, str]:
    """Serve ``config`` on a free port in a thread; returns when it accepts requests."""
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_config=None,
            lifespan="on",
            ws="websockets-sansio",
            ws_per_message_deflate=False,
        )
    )
    thread = threading.Thread(target=server.run, name="api-under-test", daemon=True)
    thread.start()
    until_sync(lambda: server.started or not thread.is_alive(), STARTUP_TIMEOUT_S, "API start")
    if not server.started:
        pytest.fail("the API did not start (see the log above)")
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture
def api_config(database_url: str, mqtt_url: str) -> ApiConfig:
    _seed_users(database_url)
    return ApiConfig(
        database_url=database_url,
        mqtt=MqttEndpoint.parse(mqtt_url),
        rules_path=DEFAULT_RULES,
        client_id=f"api-test-{uuid.uuid4().hex[:8]}",
        login=LoginPolicy(max_failures_per_user=5, max_failures_per_address=50),
        pool_max_size=24,
    )


@pytest.fixture
def api(api_config: ApiConfig) -> Iterator[RunningApi]:
    server, thread, base_url = start_api(api_config)
    yield RunningApi(base_url, api_config.database_url, api_config, server, server.config.app)
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
async def anonymous(api: RunningApi) -> AsyncIterator[ApiClient]:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as http:
        yield ApiClient(http)


async def signed_in(api: RunningApi, role: str) -> ApiClient:
    """A new client signed in over HTTP as the seeded user of ``role`` (close its ``http``)."""
    client = ApiClient(httpx.AsyncClient(base_url=api.base_url, timeout=30))
    response = await client.login(role)
    assert response.status_code == 200, response.text
    return client


def session_for(api: RunningApi, role: str) -> ApiClient:
    """A client with a session row written directly (what a login stores), without argon2.

    Tests of the login itself use :func:`signed_in`; the rest skip its 0.3 s hash.
    """
    secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with psycopg.connect(api.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sessions (secret_sha256, user_name, csrf_token, expires_at)"
            " VALUES (%s, %s, %s, now() + interval '1 hour')",
            (hashlib.sha256(secret.encode()).digest(), role, csrf),
        )
    client = ApiClient(httpx.AsyncClient(base_url=api.base_url, timeout=30))
    client.headers = {"Cookie": f"{SESSION_COOKIE}={secret}", CSRF_HEADER: csrf}
    return client


@pytest.fixture
async def clients(api: RunningApi) -> AsyncIterator[dict[str, ApiClient]]:
    """One signed-in client per role."""
    made: dict[str, ApiClient] = {role: session_for(api, role) for role in ROLES}
    yield made
    await asyncio.gather(*(c.http.aclose() for c in made.values()))
