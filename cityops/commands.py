"""Subcommands of the shared package: ``up`` and ``db migrate``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cityops.broker_security import ServiceUser
from cityops.db import migrate
from cityops.errors import CityopsError
from cityops.lifecycle_commands import register_db_actions
from cityops.maintenance import maintenance_options, maintenance_task
from cityops.runtime import database_url as runtime_database_url
from cityops.runtime import embedded_broker, embedded_postgres, rules_path
from cityops.settings import Settings
from control_api.errors import ControlApiError
from rules.errors import RulesError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cityops up`` and ``cityops db``."""
    up = subparsers.add_parser(
        "up",
        help="run the whole stack (embedded broker and database unless URLs are set)",
    )
    up.add_argument("--no-simulator", action="store_true", help="do not start the simulated city")
    up.add_argument("--metrics-port", type=int, default=9464)
    up.set_defaults(handler=_up)

    db = subparsers.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    mig = db_sub.add_parser("migrate", help="bring the schema up to date (idempotent)")
    mig.set_defaults(handler=_migrate)
    register_db_actions(db_sub)  # rollup, retention (cityops/lifecycle_commands.py)


def redact(url: str) -> str:
    """A URL with its password replaced, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _migrate(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    try:
        applied = migrate(runtime_database_url(settings))
    except CityopsError as exc:
        print(f"cityops db migrate: {exc}", file=sys.stderr)
        return 1
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerUrls:
    """The broker as each service started by ``cityops up`` connects to it.

    A configured ``CITYOPS_MQTT_URL`` serves every service; the embedded broker
    gives each its own user (docs/security.md), on the plain local listener.
    """

    shown: str  # for the banner: no credentials
    by_user: dict[ServiceUser, str]
    devices: str | None = None  # the TLS listener devices connect to
    ca_file: Path | None = None

    @classmethod
    def single(cls, url: str) -> BrokerUrls:
        """One URL for every service (a configured broker)."""
        return cls(shown=redact(url), by_user=dict.fromkeys(ServiceUser, url))

    def __getitem__(self, user: ServiceUser) -> str:
        return self.by_user[user]


@contextlib.contextmanager
def _embedded_services(settings: Settings) -> Iterator[tuple[BrokerUrls, str]]:
    """Start the embedded broker/database for every URL that is not configured."""
    with contextlib.ExitStack() as stack:
        if settings.mqtt_url is None:
            broker = embedded_broker(settings)
            stack.enter_context(broker)
            mqtt = BrokerUrls(
                shown=broker.url,
                by_user={user: broker.service_url(user) for user in ServiceUser},
                devices=broker.tls_url,
                ca_file=broker.ca_file,
            )
            log.info("embedded Mosquitto on %s (data in %s)", broker.url, broker.data_dir)
        else:
            mqtt = BrokerUrls.single(settings.mqtt_url)
        database_url = settings.database_url
        if database_url is None:
            pg = embedded_postgres(settings)
            stack.enter_context(pg)
            pg.ensure_database("cityops")
            database_url = pg.url()
            log.info("embedded PostgreSQL on port %d (data in %s)", pg.port, pg.data_dir)
        yield mqtt, database_url


def _console_url(host: str, port: int) -> str:
    # Browsers keep Secure cookies on http://localhost (a secure context) only.
    shown = "localhost" if host in ("127.0.0.1", "::1", "localhost") else host
    return f"http://{shown}:{port}/"


async def _serve(mqtt: BrokerUrls, database_url: str, args: argparse.Namespace) -> None:
    """Ingest and rules, then the API and console in the same process, then the simulator.

    The live hub is fed in process: committed batches from the ingest
    pipeline and alert events from the rules service, so nothing is parsed
    twice. The first start creates the first admin and prints its one-time
    password.
    """
    from control_api import (  # noqa: PLC0415 (the API is loaded only by the commands that serve it)
        LiveHub,
        api_config,
        create_app,
        embedded_server,
        ensure_first_admin,
    )
    from ingest import IngestConfig, IngestService, stop_on_signals  # noqa: PLC0415
    from rules import FanOutPublisher, MqttAlertPublisher  # noqa: PLC0415

    settings = Settings.from_env()
    config = IngestConfig(
        mqtt=settings.mqtt_endpoint(mqtt[ServiceUser.INGEST]),
        database_url=database_url,
        client_id="cityops-ingest-up",
        metrics_port=args.metrics_port,
        rules_path=rules_path(settings),
    )
    hub = LiveHub()
    api = dataclasses.replace(
        api_config(settings, mqtt[ServiceUser.API], database_url, client_id="cityops-api-up"),
        live_from_broker=False,
    )
    app = create_app(api, hub=hub)
    simulator_url = mqtt[ServiceUser.SIMULATOR]
    env = {**os.environ, "CITYOPS_MQTT_URL": simulator_url, "CITYOPS_DATABASE_URL": database_url}
    async with (
        stop_on_signals() as stop,
        IngestService(config, sinks=(hub,)) as ingest,
        embedded_server(app, host=settings.http_host, port=settings.http_port) as port,
        maintenance_task(database_url, maintenance_options(settings.lifecycle)),
    ):
        if ingest.alerts is not None:
            # The rules engine publishes alert events as its own broker user; the
            # ingester's publisher (lazy: never connected yet) is replaced unused.
            alerts_endpoint = settings.mqtt_endpoint(mqtt[ServiceUser.ALERTS])
            ingest.alerts.publisher = FanOutPublisher(
                MqttAlertPublisher(alerts_endpoint, client_id="cityops-alerts-up"), hub
            )
        await ingest.wait_connected(30.0)
        password = await ensure_first_admin(app.state.ctx.auth)
        simulator = None
        if not args.no_simulator:
            simulator = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cityops.cli", "simulate", env=env
            )
        login = (
            f"admin / {password}   (one-time: shown this once, change it after signing in)"
            if password
            else "your account (first admin created earlier; `cityops users add` for more)"
        )
        print(
            "cityops is up\n"
            f"  console:  {_console_url(settings.http_host, port)}"
            f"{'' if api.console_dir else '   (console not built: API only)'}\n"
            f"  login:    {login}\n"
            f"  api:      {_console_url(settings.http_host, port)}docs\n"
            f"  broker:   {mqtt.shown}\n"
            f"{_devices_line(mqtt)}"
            f"  database: {redact(database_url)}\n"
            f"  metrics:  http://127.0.0.1:{args.metrics_port}/metrics\n"
            f"  simulator: {'off' if simulator is None else 'the default city, real time'}\n"
            "  stop with Ctrl-C",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            if simulator is not None and simulator.returncode is None:
                simulator.terminate()
                await simulator.wait()


def _devices_line(mqtt: BrokerUrls) -> str:
    if mqtt.devices is None:
        return ""
    return f"  devices:  {mqtt.devices}  (CA {mqtt.ca_file}; `cityops devices provision`)\n"


def _up(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    try:
        with _embedded_services(settings) as (mqtt, database_url):
            applied = migrate(database_url)
            if applied:
                log.info("migrations applied: %s", ", ".join(applied))
            asyncio.run(_serve(mqtt, database_url, args))
    except (CityopsError, RulesError, ControlApiError) as exc:
        print(f"cityops up: {exc}", file=sys.stderr)
        return 1
    return 0
