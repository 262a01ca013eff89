"""The rules engine in the ingest process: decoded readings in, stored alerts out.

``AlertService`` is a decoded sink of the ingest pipeline (decode once: it
evaluates the readings the pipeline already decoded, as they arrive, without
waiting for their batch's commit: a tripping reading becomes an alert in
milliseconds, not after the batching window and the COPY). A reading the
database has not taken yet is not lost: it is held and retried, or after a
crash redelivered by the broker; the restarted evaluator then knows the open
alert (one per rule and subject), so the redelivered reading raises nothing
twice. Signals are applied in order by one task: the alert lifecycle decides the
transition, the ``AlertStore`` commits it (the database is the truth), then
the event is published on ``cityops/alerts/{id}``. A failed write is retried
with backoff and never skipped: an alert is not lost because the database
blinked. Once a second the evaluator's timers (``no_data``, ``offline``) and
the lifecycle's (escalation, re-notify, shelve expiry) are advanced.

On start the open alerts are loaded from the database and the evaluator's
windows are rebuilt from the stored readings of the last hour
(``warm_up``), silently: a ``for: 10m`` that had run 9 minutes keeps
running and a restart raises no storm.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
from psycopg import AsyncConnection

from cityops.backoff import Backoff
from cityops.settings import MqttEndpoint
from ingest import DecodedBatch, DeviceRef, Reading
from rules.alerts import Alert, AlertEvent, AlertSource
from rules.engine import AlertSignal, Evaluator
from rules.errors import LifecycleError, RulesError, VersionConflict
from rules.flood import FloodGrouper
from rules.lifecycle import AlertLifecycle
from rules.loader import RuleSet
from rules.store import AlertAlreadyOpen, AlertStore, AlertStoreError

log = logging.getLogger(__name__)

Transition = Callable[[Alert | None], tuple[Alert, AlertEvent] | None]


class WallClock:
    """The real time."""

    def now(self) -> float:
        """Seconds since the epoch."""
        return time.time()


class AlertPublisher(Protocol):
    """Carries alert events to the console and other consumers."""

    async def publish(self, alert: Alert, event: AlertEvent) -> None:
        """Publish one committed transition."""


class FanOutPublisher:
    """Publishes each alert event to several publishers in turn (the broker, a live hub)."""

    def __init__(self, *publishers: AlertPublisher) -> None:
        self.publishers = publishers

    async def publish(self, alert: Alert, event: AlertEvent) -> None:
        """Hand the event to every publisher."""
        for publisher in self.publishers:
            await publisher.publish(alert, event)

    async def close(self) -> None:
        """Close the publishers that can be closed."""
        for publisher in self.publishers:
            closer = getattr(publisher, "close", None)
            if closer is not None:
                await closer()


class MqttAlertPublisher:
    """Publishes ``cityops/alerts/{id}`` (QoS 1) with aiomqtt; reconnects when needed.

    The database already holds the transition, so a broker that is down costs
    live delivery only: the event is logged and the next publish reconnects.
    """

    def __init__(self, endpoint: MqttEndpoint, *, client_id: str, timeout_s: float = 5.0) -> None:
        self._endpoint = endpoint
        self._tls_context = endpoint.ssl_context()  # bad CA/cert files fail here, at start
        self._client_id = client_id
        self._timeout_s = timeout_s
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: object | None = None

    async def publish(self, alert: Alert, event: AlertEvent) -> None:
        """Publish one event; never raises."""
        import aiomqtt  # noqa: PLC0415 (only the service needs it)

        payload = orjson.dumps({"alert": alert, "event": event})
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._client is None:
                    stack = contextlib.AsyncExitStack()
                    client = aiomqtt.Client(
                        self._endpoint.host,
                        self._endpoint.port,
                        username=self._endpoint.username,
                        password=self._endpoint.password,
                        identifier=self._client_id,
                        protocol=aiomqtt.ProtocolVersion.V5,
                        tls_context=self._tls_context,
                    )
                    self._client = await stack.enter_async_context(client)
                    self._stack = stack
                assert isinstance(self._client, aiomqtt.Client)
                await self._client.publish(f"cityops/alerts/{alert.id}", payload, qos=1)
        except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
            log.warning("alert event %s/%d not published: %s", alert.id, event.version, exc)
            await self.close()

    async def close(self) -> None:
        """Disconnect."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()


@dataclass(frozen=True, slots=True)
class AlertServiceOptions:
    """Timing of the alert service."""

    tick_interval_s: float = 1.0
    warm_up_s: float = 3_600.0
    warm_up_max_rows: int = 2_000_000
    retry_initial_s: float = 0.2
    retry_max_s: float = 5.0


_WARM_UP = """
SELECT d.id, d.domain, d.district, s.channel, extract(epoch FROM r.ts), r.value, r.state, s.unit
FROM readings r JOIN series s ON s.id = r.series_id JOIN devices d ON d.id = s.device_id
WHERE r.ts > now() - make_interval(secs => %s)
ORDER BY r.ts
LIMIT %s
"""


class AlertService:
    """Evaluates committed batches and keeps alerts in the database."""

    def __init__(
        self,
        rules: RuleSet,
        *,
        store: AlertStore,
        publisher: AlertPublisher,
        database_url: str,
        clock: WallClock | None = None,
        options: AlertServiceOptions | None = None,
    ) -> None:
        self.clock = clock or WallClock()
        self.options = options or AlertServiceOptions()
        self.rules = rules
        self.evaluator = Evaluator(rules, self.clock)
        # Replays and drills have windows of their own: they never mix with live state.
        self._evaluators: dict[AlertSource, Evaluator] = {
            "live": self.evaluator,
            "replay": Evaluator(rules, self.clock),
            "drill": Evaluator(rules, self.clock),
        }
        self.lifecycle = AlertLifecycle(rules.rules, clock=self.clock)
        self.store = store
        self.publisher = publisher
        self._database_url = database_url
        self._open: dict[tuple[str, AlertSource], Alert] = {}
        # Signals wait here in evaluation order; the rate is that of alert
        # edges, far below readings, and none may be dropped.
        self._pending: collections.deque[tuple[AlertSignal, AlertSource]] = collections.deque()
        self._wake = asyncio.Event()
        self.applied = 0
        self.floods = {"live": FloodGrouper(), "replay": FloodGrouper(), "drill": FloodGrouper()}
        self._reload_error: str | None = None
        self.out_of_service: frozenset[str] = frozenset()
        """Devices under maintenance: their new alerts open as ``out_of_service``."""

    # -- sink (on the event loop, right after decoding) ------------------------

    def on_decoded(self, batch: DecodedBatch) -> None:
        """Evaluate freshly decoded readings; their signals are applied by ``run``."""
        source: AlertSource = batch.source
        signals = self._evaluators[source].on_batch(batch)
        if signals:
            self._pending.extend((s, source) for s in signals)
            self._wake.set()

    @property
    def open_alerts(self) -> list[Alert]:
        """The open alerts as this service knows them."""
        return list(self._open.values())

    # -- start-up --------------------------------------------------------------

    async def start(self) -> None:
        """Load open alerts and rebuild the evaluator's windows from stored readings."""
        for alert in await self.store.open_alerts():
            self._open[(alert.subject, alert.source)] = alert
        readings = await self._recent_readings()
        live_open = [subject for subject, source in self._open if source == "live"]
        signals = self.evaluator.warm_up(readings, open_subjects=live_open)
        self._pending.extend((s, "live") for s in signals)
        log.info(
            "%d rules; %d open alerts; windows rebuilt from %d readings (%d reconciling signals)",
            len(self.rules.rules),
            len(self._open),
            len(readings),
            len(signals),
        )

    async def _recent_readings(self) -> list[Reading]:
        opts = self.options
        async with await AsyncConnection.connect(self._database_url) as conn:
            cur = await conn.execute(_WARM_UP, (opts.warm_up_s, opts.warm_up_max_rows))
            rows = await cur.fetchall()
        return [
            Reading(
                DeviceRef(str(dom), str(dis), str(dev)),  # type: ignore[arg-type]
                str(chan),
                float(str(ts)),
                None if value is None else float(str(value)),
                None if state is None else str(state),
                None if unit is None else str(unit),
            )
            for dev, dom, dis, chan, ts, value, state, unit in rows
        ]

    # -- the worker ------------------------------------------------------------

    async def run(self) -> None:
        """Apply signals in order and advance timers, until cancelled."""
        next_tick = time.monotonic()
        while True:
            while self._pending:
                signal, source = self._pending[0]
                await self._apply_signal(signal, source)
                self._pending.popleft()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.options.tick_interval_s
                await self._reload_if_changed()
                await self._refresh_out_of_service()
                for source, evaluator in self._evaluators.items():
                    self._pending.extend((s, source) for s in evaluator.tick())
                await self._advance_timers()
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_tick - now):
                    await self._wake.wait()

    async def _refresh_out_of_service(self) -> None:
        """Learn which devices people put out of service (the API sets the flag)."""
        try:
            self.out_of_service = await self.store.out_of_service_devices()
        except AlertStoreError as exc:
            log.warning("out-of-service devices not refreshed: %s", exc)

    async def _apply_signal(self, signal: AlertSignal, source: AlertSource) -> None:
        lifecycle = self.lifecycle

        def transition(existing: Alert | None) -> tuple[Alert, AlertEvent] | None:
            if signal.kind == "raise":
                oos = signal.device_id is not None and signal.device_id in self.out_of_service
                return lifecycle.raise_(signal, existing, source=source, out_of_service=oos)
            if existing is None or existing.state == "closed":
                return None  # nothing open to clear
            return lifecycle.clear(existing, signal)

        await self._commit(signal.subject, source, transition)

    async def _advance_timers(self) -> None:
        for (subject, source), alert in list(self._open.items()):
            if alert.source != "live":
                continue

            def transition(existing: Alert | None) -> tuple[Alert, AlertEvent] | None:
                if existing is None:
                    return None
                after, events = self.lifecycle.advance(existing)
                return (after, events[0]) if events else None

            # Each due timer is one transition; repeat until none is due.
            while await self._commit(subject, source, transition):
                pass

    async def _commit(self, subject: str, source: AlertSource, transition: Transition) -> bool:
        """Apply ``transition`` to the open alert of ``subject`` and store it.

        Retries on a database failure (holding the signal), and re-reads the
        alert when another writer changed it first. Returns whether a
        transition was stored.
        """
        backoff = Backoff(self.options.retry_initial_s, self.options.retry_max_s)
        key = (subject, source)
        while True:
            existing = self._open.get(key)
            try:
                step = transition(existing)
            except LifecycleError as exc:
                log.warning("signal for %s not applied: %s", subject, exc)
                return False
            if step is None:
                return False
            after, event = step
            try:
                await self.store.save(existing, after, event)
            except AlertAlreadyOpen as exc:
                self._open[key] = exc.current  # another instance opened it: count on it
                continue
            except VersionConflict:
                try:
                    current = await self.store.get(after.id)
                except AlertStoreError:
                    await asyncio.sleep(backoff.next_delay())
                    continue
                if current is None or current.state == "closed":
                    self._open.pop(key, None)
                else:
                    self._open[key] = current
                continue
            except AlertStoreError as exc:
                delay = backoff.next_delay()
                log.warning("alert store unavailable (%s); retry in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            if after.state == "closed":
                self._open.pop(key, None)
            else:
                self._open[key] = after
            self.applied += 1
            await self.publisher.publish(after, event)
            if existing is None or existing.id != after.id:
                await self._group(after)
            return True

    async def _group(self, alert: Alert) -> None:
        """Flood control: more than 10 raises in 10 minutes in a district → one incident."""
        assignments = self.floods[alert.source].observe(alert.id, alert.district, alert.raised_at)
        if not assignments:
            return
        incident_id = assignments[0][1]
        ids = [alert_id for alert_id, _ in assignments]
        incident = self.floods[alert.source].incident(alert.district)
        opened_at = incident.opened_at if incident is not None else alert.raised_at
        backoff = Backoff(self.options.retry_initial_s, self.options.retry_max_s)
        while True:
            try:
                await self.store.assign_incident(
                    incident_id,
                    district=alert.district,
                    opened_at=opened_at,
                    source=alert.source,
                    alert_ids=ids,
                )
                break
            except AlertStoreError as exc:
                delay = backoff.next_delay()
                log.warning("incident not saved (%s); retry in %.2f s", exc, delay)
                await asyncio.sleep(delay)
        grouped = set(ids)
        for key, cached in self._open.items():
            if cached.id in grouped:
                self._open[key] = dataclasses.replace(cached, incident_id=incident_id)
        if len(ids) > 1:
            log.warning(
                "alert flood in %s: %d alerts grouped as incident %s",
                alert.district,
                len(ids),
                incident_id,
            )

    async def _reload_if_changed(self) -> None:
        """Hot reload: a changed rule file is loaded; a bad one keeps the running rules."""
        if not self.rules.changed():
            return
        try:
            rules = RuleSet.load(self.rules.path)
        except RulesError as exc:
            if str(exc) != self._reload_error:
                self._reload_error = str(exc)
                log.error("rules not reloaded, the previous rules keep running: %s", exc)
            return
        self._reload_error = None
        await self.reload(rules)
        log.info("rules reloaded from %s: %d rules", rules.path, len(rules.rules))

    async def reload(self, rules: RuleSet) -> None:
        """Use a new rule set; state of unchanged rules is kept."""
        self.rules = rules
        for source, evaluator in self._evaluators.items():
            self._pending.extend((s, source) for s in evaluator.replace_rules(rules))
        self.lifecycle.replace_rules(rules.rules)
        self._wake.set()
