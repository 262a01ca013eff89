"""``cityops rules``: the rules engine as a service of its own, for scaled-out deployments.

A member of a shared subscription sees a round-robin share of the stream, so
scaled-out ingesters (``cityops ingest --shared-group``) store readings and
evaluate nothing. One ``cityops rules`` process sees the whole stream on its
own (unshared, persistent) subscription: it decodes each message once,
evaluates the rules on it, keeps the alerts, and tracks device staleness. It
stores no readings; the ingesters do.

Exactly one instance evaluates: each instance first takes a PostgreSQL
advisory lock on a connection of its own. A second instance waits on the lock
as a hot standby and takes over when the first one's connection goes (its
process died or lost the database); on taking over it loads the open alerts
and rebuilds its windows from the readings the ingesters stored, exactly as
after a restart. The leader exits when its lock connection breaks, so two
instances never evaluate at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
from pathlib import Path

import psycopg

from cityops.errors import CityopsError
from cityops.runtime import rules_path, service_urls
from cityops.settings import MqttEndpoint, Settings
from ingest import IngestConfig, IngestService, MqttOptions, PipelineOptions, stop_on_signals
from rules.errors import RulesError

log = logging.getLogger(__name__)

LEADER_LOCK = 0x63_69_74_79_72_75_6C_65  # "cityrule"
"""The advisory lock key held by the one evaluating instance."""
LOCK_CHECK_S = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the rules service (``cityops rules`` without an action)."""
    p.add_argument(
        "--rules",
        type=Path,
        help="rules file or folder (default: CITYOPS_RULES, else the shipped rules)",
    )
    p.add_argument(
        "--client-id",
        help="MQTT client id, stable across restarts so the broker keeps the session "
        "(default: cityops-rules-HOSTNAME)",
    )
    p.add_argument(
        "--sender-property",
        metavar="NAME",
        help="as `cityops ingest --sender-property`: evaluate no reading the ingesters refuse",
    )
    p.add_argument("--trusted-sender", metavar="USER", action="append", default=[])
    p.add_argument("--metrics-port", type=int, default=9465, help="Prometheus /metrics port")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")


def run(args: argparse.Namespace) -> int:
    """Run the rules service until SIGTERM/SIGINT; 2 when it cannot start."""
    try:
        settings = Settings.from_env()
        mqtt_url, database_url = service_urls(settings)
        rules = args.rules or rules_path(settings)
        host = socket.gethostname().split(".")[0].lower()
        client_id = args.client_id or f"cityops-rules-{host}"
        config = IngestConfig(
            mqtt=MqttEndpoint.parse(mqtt_url),
            database_url=database_url,
            client_id=client_id,
            metrics_port=None if args.no_metrics else args.metrics_port,
            metrics_host=args.metrics_host,
            mqtt_options=MqttOptions(client_id=client_id),
            rules_path=rules,
            store_readings=False,
            pipeline=PipelineOptions(
                sender_property=args.sender_property,
                trusted_senders=frozenset(args.trusted_sender),
            ),
        )
        return asyncio.run(run_rules_service(config))
    except (CityopsError, RulesError) as exc:
        print(f"cityops rules: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"cityops rules: cannot reach the database: {exc}", file=sys.stderr)
        return 2


async def run_rules_service(config: IngestConfig) -> int:
    """Wait for the leader lock, then evaluate until a signal (0) or the lock is lost (1)."""
    async with stop_on_signals() as stop:
        lock_conn = await _wait_for_leadership(config.database_url, stop)
        if lock_conn is None:
            return 0
        async with lock_conn:
            log.info("leader: evaluating %s", config.rules_path)
            async with IngestService(config):
                lost = asyncio.create_task(_lock_lost(lock_conn))
                stopped = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait({lost, stopped}, return_when=asyncio.FIRST_COMPLETED)
                for task in (lost, stopped):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if lost in done:
                log.error("leader lock connection lost: stopping so a standby can take over")
                return 1
    return 0


async def _wait_for_leadership(
    database_url: str, stop: asyncio.Event
) -> psycopg.AsyncConnection[tuple[object, ...]] | None:
    """A connection that holds the leader lock, or None when stopped while waiting."""
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    waiting_logged = False
    while not stop.is_set():
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
        row = await cur.fetchone()
        if row is not None and row[0]:
            return conn
        if not waiting_logged:
            log.info("another rules instance leads; standing by")
            waiting_logged = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LOCK_CHECK_S):
                await stop.wait()
    await conn.close()
    return None


async def _lock_lost(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    """Return when the lock's connection stops answering."""
    while True:
        await asyncio.sleep(LOCK_CHECK_S)
        try:
            async with asyncio.timeout(LOCK_CHECK_S * 2):
                await conn.execute("SELECT 1")
        except (psycopg.Error, TimeoutError):
            return
