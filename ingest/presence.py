"""Staleness: a device that stops reporting for longer than its expected period.

The expected period is the SenML ``ut`` a device sends, or else learned from
the spacing of its readings' device times (an exponential moving average).
A device is stale when nothing arrived for ``factor * period + grace_s``.

After a restart the monitor knows every device's last receive time from the
database, but it reports nobody stale until it has itself been running for
that device's threshold: a restart (or a backlog still draining) must not
report every device stale at once.

The monitor is a batch sink (it sees committed readings) with its own
periodic check; it writes ``devices.last_seen``, ``last_received``,
``expected_period_s`` and ``stale_since`` in bulk every few seconds, off the
hot path, on a connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psycopg
from psycopg import AsyncConnection

from ingest.batch import CommittedBatch
from ingest.metrics import IngestMetrics
from ingest.model import DeviceRef

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StalenessOptions:
    """When a silent device counts as stale, and how often to look."""

    factor: float = 3.0
    grace_s: float = 5.0
    check_interval_s: float = 2.0
    ewma_alpha: float = 0.2


@dataclass(frozen=True, slots=True)
class StalenessChange:
    """A device became stale (``stale=True``) or reported again."""

    device_id: str
    stale: bool
    at: float
    silent_for_s: float


@dataclass(slots=True)
class _Device:
    last_received: float
    last_ts: float | None = None
    period_s: float | None = None
    declared_period_s: float | None = None
    stale_since: float | None = None
    dirty: bool = True

    @property
    def expected_period_s(self) -> float | None:
        return self.declared_period_s or self.period_s


@dataclass(slots=True)
class StalenessMonitor:
    """Tracks when each device last reported and flags the silent ones."""

    options: StalenessOptions = field(default_factory=StalenessOptions)
    clock: Callable[[], float] = time.time
    metrics: IngestMetrics | None = None
    listeners: list[Callable[[StalenessChange], None]] = field(default_factory=list)
    started_at: float = 0.0
    _devices: dict[str, _Device] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.started_at = self.clock()

    def threshold_s(self, period_s: float) -> float:
        """Silence after which a device with this period is stale."""
        return period_s * self.options.factor + self.options.grace_s

    def restore(
        self, device_id: str, *, last_received: float, period_s: float | None, stale: bool
    ) -> None:
        """Seed a device's state from the database at start-up."""
        self._devices[device_id] = _Device(
            last_received=last_received,
            period_s=period_s,
            stale_since=last_received if stale else None,
            dirty=False,
        )

    def on_batch(self, batch: CommittedBatch) -> None:
        """Note the readings of a committed batch (one update per device)."""
        now = batch.committed_at
        alpha = self.options.ewma_alpha
        devices = self._devices
        previous: DeviceRef | None = None
        dev: _Device | None = None
        # Readings of one message are adjacent and share their DeviceRef (and
        # often their time): the device is looked up once per run of them.
        for reading in batch.readings:
            ref = reading.device
            if ref is not previous or dev is None:
                previous = ref
                device_id = ref.device_id
                dev = devices.get(device_id)
                if dev is None:
                    dev = devices[device_id] = _Device(last_received=now)
                dev.last_received = now
                dev.dirty = True
                if dev.stale_since is not None:
                    silent = now - dev.stale_since
                    dev.stale_since = None
                    self._emit(
                        StalenessChange(device_id, stale=False, at=now, silent_for_s=silent)
                    )
            if reading.update_period_s:
                dev.declared_period_s = reading.update_period_s
            ts = reading.ts
            last = dev.last_ts
            if last is None or ts > last:
                if last is not None:
                    delta = ts - last
                    dev.period_s = (
                        delta
                        if dev.period_s is None
                        else (1 - alpha) * dev.period_s + alpha * delta
                    )
                dev.last_ts = ts

    def check(self) -> list[StalenessChange]:
        """Flag devices silent past their threshold; returns the changes."""
        now = self.clock()
        running_for = now - self.started_at
        changes = []
        for device_id, dev in self._devices.items():
            period = dev.expected_period_s
            if dev.stale_since is not None or period is None:
                continue
            limit = self.threshold_s(period)
            silent = now - dev.last_received
            if silent > limit and running_for > limit:
                dev.stale_since = now
                dev.dirty = True
                change = StalenessChange(device_id, stale=True, at=now, silent_for_s=silent)
                changes.append(change)
                self._emit(change)
        if self.metrics is not None:
            self.metrics.stale_devices.set(self.stale_count)
        return changes

    @property
    def stale_count(self) -> int:
        """Devices currently stale."""
        return sum(1 for d in self._devices.values() if d.stale_since is not None)

    def is_stale(self, device_id: str) -> bool:
        """Whether the device is currently stale."""
        dev = self._devices.get(device_id)
        return dev is not None and dev.stale_since is not None

    def take_dirty(self) -> list[tuple[str, float | None, float, float | None, float | None]]:
        """Rows to persist: (id, last device time, last receive, period, stale since)."""
        rows = []
        for device_id, dev in self._devices.items():
            if dev.dirty:
                dev.dirty = False
                rows.append(
                    (
                        device_id,
                        dev.last_ts,
                        dev.last_received,
                        dev.expected_period_s,
                        dev.stale_since,
                    )
                )
        return rows

    def mark_dirty(self, device_ids: Iterable[str]) -> None:
        """Persist these devices again (after a failed write)."""
        for device_id in device_ids:
            dev = self._devices.get(device_id)
            if dev is not None:
                dev.dirty = True

    def _emit(self, change: StalenessChange) -> None:
        if change.stale:
            log.info("device %s is stale (silent %.1f s)", change.device_id, change.silent_for_s)
        for listener in self.listeners:
            try:
                listener(change)
            except Exception:
                log.exception("staleness listener %r failed", listener)


_PERSIST = """
UPDATE devices d SET
    last_seen = greatest(d.last_seen, to_timestamp(v.ts)),
    last_received = to_timestamp(v.recv),
    expected_period_s = coalesce(v.period, d.expected_period_s),
    stale_since = to_timestamp(v.stale)
FROM unnest(%s::text[], %s::float8[], %s::float8[], %s::float8[], %s::float8[])
    AS v(id, ts, recv, period, stale)
WHERE d.id = v.id
"""


class StalenessService:
    """Runs a monitor: restores it from the database, checks and persists periodically."""

    def __init__(self, monitor: StalenessMonitor, conninfo: str) -> None:
        self.monitor = monitor
        self._conninfo = conninfo
        self._conn: AsyncConnection[tuple[object, ...]] | None = None

    async def restore(self) -> int:
        """Load every device's last receive time and period; returns how many."""
        async with await AsyncConnection.connect(self._conninfo) as conn:
            cur = await conn.execute(
                "SELECT id, extract(epoch FROM last_received), expected_period_s,"
                " stale_since IS NOT NULL FROM devices WHERE last_received IS NOT NULL"
            )
            rows = await cur.fetchall()
        for device_id, last, period, stale in rows:
            self.monitor.restore(
                str(device_id),
                last_received=float(str(last)),
                period_s=None if period is None else float(str(period)),
                stale=bool(stale),
            )
        return len(rows)

    async def persist(self) -> None:
        """Write what changed since the last call (retried on the next call if it fails)."""
        rows = self.monitor.take_dirty()
        if not rows:
            return
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await AsyncConnection.connect(self._conninfo, autocommit=True)
            await self._conn.execute(_PERSIST, [list(col) for col in zip(*rows, strict=True)])
        except psycopg.Error as exc:
            log.warning("device status not saved (%s); will retry", exc)
            self.monitor.mark_dirty(row[0] for row in rows)
            if self._conn is not None:
                await self._conn.close()
                self._conn = None

    async def run(self) -> None:
        """Check and persist every ``check_interval_s`` until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.monitor.options.check_interval_s)
                self.monitor.check()
                await self.persist()
        finally:
            with contextlib.suppress(Exception):
                await self.persist()
            if self._conn is not None:
                await self._conn.close()
