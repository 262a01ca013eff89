"""The maintenance task: roll-ups, retention and audit pseudonymisation on a schedule.

TimescaleDB's Apache-2 edition has no job scheduler, so ``cityops up`` and
every ``cityops api`` run :func:`run_maintenance` beside their service.
Several processes may run it at once (scaled out): each piece of work takes
its own PostgreSQL advisory lock with
``pg_try_advisory_xact_lock`` and a process that finds it taken skips that
round, so the work is done once (``docs/data-lifecycle.md``).

Schedule: roll-ups every ``rollup_interval_s`` (60 s); retention and audit
pseudonymisation every ``retention_interval_s`` (1 h), first right after start.
A failed round (database down) is logged and retried at the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import tuple_row

from cityops.settings import LifecycleSettings
from ingest.errors import StorageUnavailable
from ingest.lifecycle import LifecycleOptions, RetentionResult, apply_retention, roll_up

__all__ = [
    "AUDIT_LOCK",
    "REDACTED",
    "AuditResult",
    "MaintenanceOptions",
    "maintenance_options",
    "maintenance_round",
    "maintenance_task",
    "pseudonymise_audit",
    "run_maintenance",
]

log = logging.getLogger(__name__)

AUDIT_LOCK: Final = 0xC17_0B8
REDACTED: Final = "redacted"
"""What replaces the user name of an audit entry past its keep period."""

_PSEUDONYMISE: Final = """
UPDATE audit_log SET actor = %(redacted)s, remote_addr = NULL
WHERE at < %(cutoff)s AND (actor <> %(redacted)s OR remote_addr IS NOT NULL)
"""
_COUNT_PERSONAL: Final = """
SELECT count(*) FROM audit_log
WHERE at < %(cutoff)s AND (actor <> %(redacted)s OR remote_addr IS NOT NULL)
"""


@dataclass(frozen=True, slots=True)
class MaintenanceOptions:
    """What the maintenance task does and how often.

    Attributes:
        lifecycle: Keep periods and roll-up lateness.
        audit_keep: User names and addresses in the audit log are pseudonymised
            once older than this; ``None`` keeps them.
        rollup_interval_s: Seconds between roll-up rounds.
        retention_interval_s: Seconds between retention and pseudonymisation rounds.
        connect_timeout_s: Deadline of each connection attempt.
    """

    lifecycle: LifecycleOptions = field(default_factory=LifecycleOptions)
    audit_keep: timedelta | None = timedelta(days=180)
    rollup_interval_s: float = 60.0
    retention_interval_s: float = 3600.0
    connect_timeout_s: float = 10.0


def maintenance_options(settings: LifecycleSettings) -> MaintenanceOptions:
    """The options of the ``CITYOPS_RETENTION_*`` / ``CITYOPS_AUDIT_KEEP_DAYS`` settings."""

    def days(count: int) -> timedelta | None:
        return timedelta(days=count) if count > 0 else None

    return MaintenanceOptions(
        lifecycle=LifecycleOptions(
            raw_keep=days(settings.raw_days),
            minute_keep=days(settings.minute_days),
            hour_keep=days(settings.hour_days),
        ),
        audit_keep=days(settings.audit_keep_days),
        rollup_interval_s=settings.rollup_interval_s,
        retention_interval_s=settings.retention_interval_s,
    )


@dataclass(frozen=True, slots=True)
class AuditResult:
    """What one pseudonymisation round did (``rows``: entries changed, or that would be)."""

    skipped: bool
    rows: int
    cutoff: datetime | None


async def pseudonymise_audit(
    conn: AsyncConnection[Any],
    keep: timedelta | None,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> AuditResult:
    """Blank user names and addresses of audit entries older than ``keep``.

    The entry itself (time, action, target, outcome, detail) stays forever.

    Raises:
        StorageUnavailable: The database failed.
    """
    if keep is None:
        return AuditResult(skipped=False, rows=0, cutoff=None)
    try:
        async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute("SELECT pg_try_advisory_xact_lock(%s), now()", (AUDIT_LOCK,))
            locked, db_now = await cur.fetchone() or (False, None)
            if not locked:
                return AuditResult(skipped=True, rows=0, cutoff=None)
            cutoff = (now or db_now) - keep
            params = {"cutoff": cutoff, "redacted": REDACTED}
            if dry_run:
                await cur.execute(_COUNT_PERSONAL, params)
                (count,) = await cur.fetchone() or (0,)
                return AuditResult(skipped=False, rows=int(count), cutoff=cutoff)
            await cur.execute(_PSEUDONYMISE, params)
            changed = max(cur.rowcount, 0)
    except psycopg.Error as exc:
        msg = f"audit pseudonymisation failed: {exc}"
        raise StorageUnavailable(msg) from exc
    if changed:
        log.info("audit log: %d entries before %s pseudonymised", changed, cutoff)
    return AuditResult(skipped=False, rows=changed, cutoff=cutoff)


async def maintenance_round(
    conn: AsyncConnection[Any], options: MaintenanceOptions, *, housekeeping: bool
) -> tuple[RetentionResult | None, AuditResult | None]:
    """One round: roll-ups, then (``housekeeping``) retention and pseudonymisation.

    Roll-ups run first so retention sees their latest watermark.

    Raises:
        StorageUnavailable: The database failed.
    """
    await roll_up(conn, options.lifecycle)
    if not housekeeping:
        return None, None
    retention = await apply_retention(conn, options.lifecycle)
    audit = await pseudonymise_audit(conn, options.audit_keep)
    return retention, audit


async def run_maintenance(
    database_url: str, options: MaintenanceOptions = MaintenanceOptions()
) -> None:
    """Run maintenance rounds until cancelled (start it in the process's task group).

    Each round opens its own connection (one every ``rollup_interval_s``: the
    task holds none between rounds) and never raises: a failure is logged
    and the next round retries.

    Args:
        database_url: The database (``postgresql://…``).
        options: Schedule, keep periods and lateness.
    """
    log.info(
        "maintenance: roll-ups every %g s, retention every %g s",
        options.rollup_interval_s,
        options.retention_interval_s,
    )
    next_housekeeping = time.monotonic()
    while True:
        started = time.monotonic()
        housekeeping = started >= next_housekeeping
        try:
            async with await psycopg.AsyncConnection.connect(
                database_url,
                autocommit=True,
                connect_timeout=max(1, round(options.connect_timeout_s)),
            ) as conn:
                await maintenance_round(conn, options, housekeeping=housekeeping)
        except (psycopg.Error, StorageUnavailable, OSError) as exc:
            log.warning(
                "maintenance round failed, retrying in %g s: %s", options.rollup_interval_s, exc
            )
        else:
            if housekeeping:
                next_housekeeping = started + options.retention_interval_s
        # A schedule, not a wait for a condition: nothing to poll.
        await asyncio.sleep(max(0.0, started + options.rollup_interval_s - time.monotonic()))


@contextlib.asynccontextmanager
async def maintenance_task(
    database_url: str, options: MaintenanceOptions = MaintenanceOptions()
) -> AsyncIterator[asyncio.Task[None]]:
    """:func:`run_maintenance` in a task for the body of the ``async with``; cancelled on exit."""
    task = asyncio.create_task(run_maintenance(database_url, options), name="cityops-maintenance")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
