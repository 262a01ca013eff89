"""The whole stack for the console's end-to-end tests, once for this package, and a browser.

Package scope, not session: the stack's ingest service runs on the test
session's event loop, which stands still during synchronous tests. Left
running, it could sit in the middle of a COPY while a later test's teardown
drops its database, and DROP DATABASE waits for every backend, that one
included: the suite hung. Torn down after the last console test, nothing of
it outlives the package.

* a broker of their own (the session broker carries other tests' traffic),
* a database of their own, migrated, with one user per role,
* the ingest service with the shipped rules,
* a fire in the last nine minutes, published as fast as possible (its alerts
  are open when the tests start), then the city live at real time from
  ``cityops simulate`` in a subprocess,
* the control API serving the built console (``console/dist``), with the live
  hub, the city model and the rules for every role (:mod:`tests.console.stack`),
* a recording of the fire for the replay test,
* Debian's Chromium driven by Playwright (never downloaded: ``executable_path``).

The console is built with ``npm run build`` when ``console/dist`` is missing
or older than its sources and npm is installed; without a build the tests skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Error,
    Page,
    async_playwright,
    expect,
)
from psycopg import sql

from cityops.embedded import EmbeddedMosquitto
from cityops.runtime import DEFAULT_RULES
from cityops.settings import MqttEndpoint
from control_api.app import create_app
from control_api.auth import LoginPolicy, hash_password
from control_api.context import ApiConfig
from ingest import IngestConfig, IngestService
from ingest.mqtt import MqttOptions
from ingest.pipeline import PipelineOptions
from rules import ROLES
from simulators import RecordedMessage, RecordingWriter, load_city
from simulators.runner import SimulateOptions, build_simulation, run_simulate
from tests.conftest import ADMIN_DATABASE, PostgresServer, _create_from_template
from tests.console.stack import ServedApi, StallingProxy
from tests.polling import until_async

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "console"
DIST = CONSOLE / "dist"
CHROMIUM = Path(os.environ.get("CITYOPS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "correct horse battery staple"
FIRE_SPAN_S = 9 * 60.0
RECORDING = "fire.rec"
EXPECT_TIMEOUT_MS = 30_000
expect.set_options(timeout=EXPECT_TIMEOUT_MS)


# -- the console build ----------------------------------------------------------------------


def _newest_source() -> float:
    files = [
        CONSOLE / n for n in ("index.html", "package.json", "package-lock.json", "vite.config.ts")
    ]
    files += [p for p in (CONSOLE / "src").rglob("*") if p.is_file()]
    return max(p.stat().st_mtime for p in files if p.exists())


@pytest.fixture(scope="session")
def console_dist() -> Path:
    """``console/dist``, rebuilt when older than the sources (and npm is there)."""
    index = DIST / "index.html"
    stale = not index.exists() or index.stat().st_mtime < _newest_source()
    if stale and shutil.which("npm") and (CONSOLE / "node_modules").is_dir():
        subprocess.run(["npm", "run", "build"], cwd=CONSOLE, check=True, capture_output=True)
    if not index.exists():
        pytest.skip("console/dist is not built: run `npm ci && npm run build` in console/")
    return DIST


# -- broker, database, users, recording ---------------------------------------------------------


@pytest.fixture(scope="package")
def console_broker(embedded_root: Path) -> Iterator[EmbeddedMosquitto]:
    broker = EmbeddedMosquitto(embedded_root / "console-mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="package")
def console_database(postgres: PostgresServer, migrated_template: str) -> Iterator[str]:
    name = f"console_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.url(ADMIN_DATABASE), autocommit=True) as admin:
        _create_from_template(admin, name, migrated_template)
    url = postgres.url(name)
    digest = hash_password(PASSWORD)
    with psycopg.connect(url, autocommit=True) as conn:
        for role in ROLES:
            conn.execute(
                "INSERT INTO users (name, role, password_hash) VALUES (%s, %s, %s)",
                (role, role, digest),
            )
    yield url
    with psycopg.connect(postgres.url(ADMIN_DATABASE), autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _fire_options(mqtt_url: str, start: float) -> SimulateOptions:
    return SimulateOptions(
        city="minamikawa",
        devices=None,
        scenarios=("fire",),
        seed=7,
        start=start,
        duration_s=FIRE_SPAN_S,
        as_fast_as_possible=True,
        mqtt_url=mqtt_url,
        client_prefix=f"console-fire-{uuid.uuid4().hex[:6]}",
        device_connections_limit=0,
    )


def _write_recording(path: Path, options: SimulateOptions) -> int:
    """The fire run as a recording (what `cityops record` would have captured)."""
    count = 0
    with RecordingWriter(path, fsync=False) as writer:
        for m in build_simulation(options).run(until=options.start + FIRE_SPAN_S):
            writer.append(RecordedMessage(m.t, m.topic, m.payload, m.qos, m.retain, m.content_type))
            count += 1
    return count


# -- the stack ------------------------------------------------------------------------------------


@dataclass(slots=True)
class ConsoleStack:
    """What the tests reach: the console's URL, the database, the broker, the proxy."""

    base_url: str
    database_url: str
    mqtt_url: str
    proxy: StallingProxy
    recording: str
    city_devices: int
    alerts_at_start: int

    def rows(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url) as conn:
            return conn.execute(query.encode(), params).fetchall()


@pytest.fixture(scope="package")
async def console_stack(
    console_dist: Path,
    console_broker: EmbeddedMosquitto,
    console_database: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ConsoleStack]:
    mqtt_url = console_broker.url
    endpoint = MqttEndpoint.parse(mqtt_url)
    recordings = tmp_path_factory.mktemp("recordings")
    fire = _fire_options(mqtt_url, time.time() - FIRE_SPAN_S - 5)
    await asyncio.to_thread(_write_recording, recordings / RECORDING, fire)

    client_id = f"console-ingest-{uuid.uuid4().hex[:6]}"
    ingest_config = IngestConfig(
        mqtt=endpoint,
        database_url=console_database,
        client_id=client_id,
        pipeline=PipelineOptions(batch_max_delay_s=0.05),
        mqtt_options=MqttOptions(client_id=client_id, session_expiry_s=60),
        rules_path=DEFAULT_RULES,
    )
    env = {**os.environ, "CITYOPS_MQTT_URL": mqtt_url, "CITYOPS_DATABASE_URL": console_database}
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(IngestService(ingest_config))

        # The API first: at start-up it registers the city's devices, which
        # must not race the ingester's presence writes (both update `devices`).
        config = ApiConfig(
            database_url=console_database,
            mqtt=endpoint,
            rules_path=DEFAULT_RULES,
            client_id=f"console-api-{uuid.uuid4().hex[:6]}",
            login=LoginPolicy(max_failures_per_user=50, max_failures_per_address=500),
            recordings_dir=recordings,
            console_dir=console_dist,
        )
        app = create_app(config)
        api = ServedApi(app)
        base_url = await asyncio.to_thread(api.start)
        stack.callback(api.stop)

        # The fire of the last nine minutes: its alerts are open when the tests start.
        result, _ = await asyncio.to_thread(run_simulate, fire, endpoint)
        assert result.ok, result.errors

        async def fire_alerts() -> bool:
            rows = await asyncio.to_thread(
                _rows, console_database, "SELECT count(*) FROM alerts WHERE rule_id LIKE 'fire%'"
            )
            return int(rows[0][0]) >= 1

        await until_async(fire_alerts, 60)

        # The city, live, from here on (real time, like `cityops up`).
        simulator = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cityops.cli", "simulate", "--speed", "1",
            "--device-connections-limit", "0", "--seed", "11",
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

        async def stop_simulator() -> None:
            if simulator.returncode is None:
                simulator.terminate()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(20):
                        await simulator.wait()
                if simulator.returncode is None:
                    simulator.kill()
                    await simulator.wait()

        stack.push_async_callback(stop_simulator)

        proxy = StallingProxy(int(base_url.rsplit(":", 1)[1]))
        await proxy.start()
        stack.push_async_callback(proxy.close)
        alerts = _rows(console_database, "SELECT count(*) FROM alerts WHERE state <> 'closed'")
        yield ConsoleStack(
            base_url=base_url,
            database_url=console_database,
            mqtt_url=mqtt_url,
            proxy=proxy,
            recording=RECORDING,
            city_devices=len(load_city("minamikawa").devices),
            alerts_at_start=int(alerts[0][0]),
        )


def _rows(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query.encode()).fetchall()


# -- the browser ----------------------------------------------------------------------------------


@pytest.fixture(scope="package")
async def browser() -> AsyncIterator[Browser]:
    if not await asyncio.to_thread(CHROMIUM.exists):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    async with async_playwright() as pw:
        # Playwright gives every launch a fresh temporary profile (--user-data-dir).
        launched = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@dataclass
class PageErrors:
    """Errors a page reported; the test fails on any that is not expected."""

    allowed: list[re.Pattern[str]] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def add(self, text: str) -> None:
        self.seen.append(text)

    def unexpected(self) -> list[str]:
        return [e for e in self.seen if not any(p.search(e) for p in self.allowed)]


@dataclass
class Consoles:
    """Opens console pages in fresh browser contexts (each its own cookies and storage)."""

    browser: Browser
    stack: ConsoleStack
    errors: PageErrors
    contexts: list[BrowserContext] = field(default_factory=list)

    async def open(
        self,
        *,
        locale: str = "en-US",
        via_proxy: bool = False,
        storage: dict[str, str] | None = None,
        viewport: tuple[int, int] = (1440, 900),
    ) -> Page:
        context = await self.browser.new_context(
            locale=locale,
            timezone_id="Europe/London",  # not the city's: times must follow the city
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        context.set_default_timeout(EXPECT_TIMEOUT_MS)
        self.contexts.append(context)
        if storage:
            script = "".join(f"localStorage.setItem({k!r}, {v!r});" for k, v in storage.items())
            # Once per tab: a reload keeps what the page itself changed since.
            await context.add_init_script(
                "if (!sessionStorage.getItem('seeded')) {"
                f" {script} sessionStorage.setItem('seeded', '1'); }}"
            )
        page = await context.new_page()
        page.on("pageerror", lambda exc: self.errors.add(f"pageerror: {exc}"))
        page.on("console", self._console)
        base = self.stack.proxy.base_url if via_proxy else self.stack.base_url
        await page.goto(f"{base}/")
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.add(f"console.error: {message.text}")

    async def login(self, page: Page, role: str, password: str = PASSWORD) -> None:
        await page.get_by_label(re.compile("User name|ユーザー名")).fill(role)
        await page.get_by_label(re.compile("^Password$|^パスワード$")).fill(password)
        await page.get_by_role("button", name=re.compile("Sign in|サインイン")).click()
        await page.locator(".conn[data-state='live']").wait_for()

    async def signed_in(self, role: str, **kwargs: Any) -> Page:
        page = await self.open(**kwargs)
        await self.login(page, role)
        return page

    async def close(self) -> None:
        for context in self.contexts:
            with contextlib.suppress(Error):
                await context.close()


@pytest.fixture
async def consoles(browser: Browser, console_stack: ConsoleStack) -> AsyncIterator[Consoles]:
    errors = PageErrors()
    made = Consoles(browser, console_stack, errors)
    yield made
    await made.close()
    unexpected = errors.unexpected()
    assert not unexpected, "the browser reported errors:\n" + "\n".join(unexpected)
