"""``cityops ingest``: the ingest service alone, for scaled-out deployments."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path

from cityops.errors import CityopsError
from cityops.runtime import rules_path, service_urls
from cityops.settings import Settings
from ingest.decode import DEFAULT_LIMITS, DecodeLimits
from ingest.mqtt import MqttOptions
from ingest.pipeline import PipelineOptions
from ingest.service import IngestConfig, run_ingest
from rules.errors import RulesError

_PIPELINE = PipelineOptions()
log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cityops ingest``."""
    p = subparsers.add_parser(
        "ingest",
        help="subscribe to city/# and store every reading in TimescaleDB",
        description=(
            "Lossless MQTT → TimescaleDB ingest. Messages are acknowledged to the broker "
            "only after the batch holding them is committed."
        ),
    )
    p.add_argument(
        "--shared-group",
        metavar="NAME",
        help="subscribe through the MQTT 5 shared subscription $share/NAME/city/#",
    )
    p.add_argument(
        "--client-id",
        help="MQTT client id; stable across restarts so the broker keeps the session "
        "(default: cityops-ingest[-GROUP]-HOSTNAME)",
    )
    p.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument("--batch-messages", type=int, default=_PIPELINE.batch_max_messages)
    p.add_argument("--batch-delay-ms", type=float, default=_PIPELINE.batch_max_delay_s * 1e3)
    p.add_argument(
        "--max-buffered",
        type=int,
        default=_PIPELINE.max_buffered_messages,
        help="pause reading above this many uncommitted messages",
    )
    p.add_argument(
        "--no-replay-sandbox",
        action="store_true",
        help="do not subscribe to cityops/replay/# (replays are then not stored)",
    )
    p.add_argument(
        "--rules",
        type=Path,
        help="rules file or folder to evaluate on the stream (default: CITYOPS_RULES, "
        "else the shipped rules for the simulated city)",
    )
    p.add_argument("--no-rules", action="store_true", help="store readings only, raise no alerts")
    add_sender_arguments(p)
    p.add_argument("--max-payload-bytes", type=int, default=DEFAULT_LIMITS.max_payload_bytes)
    p.add_argument(
        "--max-past-s",
        type=float,
        default=DEFAULT_LIMITS.max_past_s,
        help="dead-letter readings older than this before their receive time",
    )
    p.add_argument(
        "--max-future-s",
        type=float,
        default=DEFAULT_LIMITS.max_future_s,
        help="dead-letter readings newer than this after their receive time",
    )
    p.set_defaults(handler=_run)


def add_sender_arguments(p: argparse.ArgumentParser) -> None:
    """``--sender-property`` / ``--trusted-sender``: the check of a broker-stamped sender."""
    p.add_argument(
        "--sender-property",
        metavar="NAME",
        help="MQTT 5 user property in which the broker names the publishing user; a "
        "message whose topic names another device is dead-lettered (not with Mosquitto, "
        "which tells nothing; docs/security.md)",
    )
    p.add_argument(
        "--trusted-sender",
        metavar="USER",
        action="append",
        default=[],
        help="a gateway user that may publish for any device (repeatable)",
    )


def default_client_id(group: str | None) -> str:
    """A client id stable across restarts on one host."""
    host = socket.gethostname().split(".")[0].lower()
    return f"cityops-ingest-{group}-{host}" if group else f"cityops-ingest-{host}"


def _run(args: argparse.Namespace) -> int:
    try:
        return _run_checked(args)
    except (CityopsError, RulesError) as exc:
        print(f"cityops ingest: {exc}", file=sys.stderr)
        return 2


def _run_checked(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    mqtt_url, database_url = service_urls(settings)
    client_id = args.client_id or default_client_id(args.shared_group)
    config = IngestConfig(
        mqtt=settings.mqtt_endpoint(mqtt_url),
        database_url=database_url,
        client_id=client_id,
        shared_group=args.shared_group,
        metrics_port=None if args.no_metrics else args.metrics_port,
        metrics_host=args.metrics_host,
        pipeline=PipelineOptions(
            batch_max_messages=args.batch_messages,
            batch_max_delay_s=args.batch_delay_ms / 1e3,
            max_buffered_messages=args.max_buffered,
            sender_property=args.sender_property,
            trusted_senders=frozenset(args.trusted_sender),
        ),
        limits=DecodeLimits(
            max_payload_bytes=args.max_payload_bytes,
            max_past_s=args.max_past_s,
            max_future_s=args.max_future_s,
        ),
        mqtt_options=MqttOptions(client_id=client_id),
        replay=not args.no_replay_sandbox,
        rules_path=_rules_for(args, settings),
        # A member sees a share of each device's reports: `cityops rules` tracks staleness.
        track_staleness=args.shared_group is None,
    )
    asyncio.run(run_ingest(config))
    return 0


def _rules_for(args: argparse.Namespace, settings: Settings) -> Path | None:
    """The rules this ingester evaluates, if any.

    A member of a shared subscription sees a round-robin share of the
    messages, so its windows would miss readings: it evaluates rules only when
    asked explicitly with ``--rules`` (for a deployment that partitions the
    rules some other way), never by default.
    """
    if args.no_rules:
        return None
    if args.shared_group and args.rules is None:
        log.warning(
            "--shared-group: rules and device staleness are not evaluated by this member "
            "(it sees a share of the stream); run `cityops rules` beside the ingesters"
        )
        return None
    return args.rules or rules_path(settings)

