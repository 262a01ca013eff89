"""``cityops db rollup`` and ``cityops db retention``: the maintenance work, now.

The maintenance task (:mod:`cityops.maintenance`) does the same on a
schedule inside the long-running services; these commands catch up by hand,
backfill the roll-ups after a bulk import (``--from``) and show what
retention would drop (``--dry-run``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import psycopg

from cityops.errors import CityopsError
from cityops.maintenance import maintenance_options, pseudonymise_audit
from cityops.runtime import database_url
from cityops.settings import Settings
from ingest.errors import IngestError
from ingest.lifecycle import apply_retention, roll_up

__all__ = ["register_db_actions"]


def register_db_actions(db_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``rollup`` and ``retention`` under ``cityops db``."""
    rollup = db_sub.add_parser(
        "rollup", help="bring the 1-minute and 1-hour roll-ups up to date now"
    )
    rollup.add_argument(
        "--from",
        dest="since",
        type=_timestamp,
        metavar="TIME",
        help="recompute from this time (RFC 3339, e.g. 2026-01-01T00:00:00Z): a backfill",
    )
    rollup.set_defaults(handler=_rollup)
    retention = db_sub.add_parser(
        "retention",
        help="drop readings and roll-ups past their keep period, pseudonymise old audit entries",
    )
    retention.add_argument(
        "--dry-run", action="store_true", help="list what would be dropped; change nothing"
    )
    retention.set_defaults(handler=_retention)


def _timestamp(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        msg = f"{text!r} is not an RFC 3339 time"
        raise argparse.ArgumentTypeError(msg) from exc
    if moment.tzinfo is None:
        msg = f"{text!r} has no UTC offset (add Z or +09:00)"
        raise argparse.ArgumentTypeError(msg)
    return moment


def _rollup(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    options = maintenance_options(settings.lifecycle)

    async def run(url: str) -> int:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            result = await roll_up(conn, options.lifecycle, since=args.since)
        if result.skipped:
            print("another process is rolling up right now: nothing done", file=sys.stderr)
            return 3
        print(
            f"roll-ups complete before {result.complete_before}: {result.minutes} 1-minute"
            f" and {result.hours} 1-hour rows written ({result.late_minutes} late minutes,"
            f" {result.slices} transactions)"
        )
        return 0

    return _run("rollup", settings, run)


def _retention(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    options = maintenance_options(settings.lifecycle)

    async def run(url: str) -> int:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            result = await apply_retention(conn, options.lifecycle, dry_run=args.dry_run)
            audit = await pseudonymise_audit(conn, options.audit_keep, dry_run=args.dry_run)
        if result.skipped or audit.skipped:
            print("another process is applying retention right now: try again", file=sys.stderr)
            return 3
        verb = "would drop" if args.dry_run else "dropped"
        for table, cutoff in result.cutoffs.items():
            print(f"{table}: chunks ending before {cutoff.isoformat()} go")
        for chunk in result.chunks:
            print(
                f"{verb} {chunk.hypertable} {chunk.chunk}"
                f" [{chunk.range_start.isoformat()}, {chunk.range_end.isoformat()})"
            )
        if not result.chunks:
            print(f"{verb} no chunks")
        if audit.cutoff is not None:
            verb = "would pseudonymise" if args.dry_run else "pseudonymised"
            print(f"audit log: {verb} {audit.rows} entries before {audit.cutoff.isoformat()}")
        return 0

    return _run("retention", settings, run)


def _run(name: str, settings: Settings, work: Callable[[str], Coroutine[Any, Any, int]]) -> int:
    try:
        url = database_url(settings)
        return asyncio.run(work(url))
    except (CityopsError, IngestError, psycopg.Error) as exc:
        print(f"cityops db {name}: {exc}", file=sys.stderr)
        return 1
