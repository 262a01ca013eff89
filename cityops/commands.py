"""Subcommands of the shared package: ``up`` and ``db migrate``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

from cityops.db import migrate
from cityops.errors import CityopsError
from cityops.runtime import embedded_broker, embedded_postgres, rules_path, service_urls
from cityops.settings import MqttEndpoint, Settings
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
        _, database_url = service_urls(settings)
        applied = migrate(database_url)
    except CityopsError as exc:
        print(f"cityops db migrate: {exc}", file=sys.stderr)
        return 1
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


@contextlib.contextmanager
def _embedded_services(settings: Settings) -> Iterator[tuple[str, str]]:
    """Start the embedded broker/database for every URL that is not configured."""
    with contextlib.ExitStack() as stack:
        mqtt_url = settings.mqtt_url
        if mqtt_url is None:
            broker = embedded_broker(settings)
            stack.enter_context(broker)
            mqtt_url = broker.url
            log.info("embedded Mosquitto on %s (data in %s)", mqtt_url, broker.data_dir)
        database_url = settings.database_url
        if database_url is None:
            pg = embedded_postgres(settings)
            stack.enter_context(pg)
            pg.ensure_database("cityops")
            database_url = pg.url()
            log.info("embedded PostgreSQL on port %d (data in %s)", pg.port, pg.data_dir)
        yield mqtt_url, database_url


async def _serve(mqtt_url: str, database_url: str, args: argparse.Namespace) -> None:
    """Ingest first (subscribed before anything publishes), then the simulator."""
    from ingest import IngestConfig, IngestService, stop_on_signals  # noqa: PLC0415

    config = IngestConfig(
        mqtt=MqttEndpoint.parse(mqtt_url),
        database_url=database_url,
        client_id="cityops-ingest-up",
        metrics_port=args.metrics_port,
        rules_path=rules_path(Settings.from_env()),
    )
    env = {**os.environ, "CITYOPS_MQTT_URL": mqtt_url, "CITYOPS_DATABASE_URL": database_url}
    async with stop_on_signals() as stop, IngestService(config) as ingest:
        await ingest.wait_connected(30.0)
        simulator = None
        if not args.no_simulator:
            simulator = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cityops.cli", "simulate", env=env
            )
        print(
            "cityops is up\n"
            f"  broker:   {mqtt_url}\n"
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


def _up(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    try:
        with _embedded_services(settings) as (mqtt_url, database_url):
            applied = migrate(database_url)
            if applied:
                log.info("migrations applied: %s", ", ".join(applied))
            asyncio.run(_serve(mqtt_url, database_url, args))
    except (CityopsError, RulesError) as exc:
        print(f"cityops up: {exc}", file=sys.stderr)
        return 1
    return 0
