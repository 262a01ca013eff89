"""The live hub behind the websocket ``/api/v1/live``: snapshot, then deltas, resumable.

Inputs: committed ingest batches (:meth:`LiveHub.on_batch`, a
:class:`ingest.BatchSink`), alert events (:meth:`LiveHub.on_alert_event`, the
``cityops/alerts/{id}`` payloads), staleness changes and KPI figures. Outputs:
encoded frames per client. The hub is a plain object with an injected clock
and no I/O; :func:`control_api.live_ws.serve_live` is the thin websocket shell
around it, and the frames and client messages are described at the top of
:mod:`control_api.live_ws`. What the hub holds per source (the latest table,
the reading epochs and their shared encoding) is in :mod:`control_api.live_state`.

Sequence numbers
    Every hub event gets the next number of one global counter: an alert
    event, a presence change, a KPI update, and the readings of one committed
    batch (all readings of a batch share its number). A frame's ``seq`` is the
    client's *resume point*: every event up to it that concerns the client has
    been delivered (or superseded by a newer value). Frames may repeat an
    earlier ``seq``; it never goes down. A client that reconnects with
    ``{hub, seq}`` gets what it missed, or a fresh snapshot when the hub no
    longer holds it (the hub id changes when the process restarts).

Readings: coalesced, never queued per client
    The hub keeps the latest reading of every series (by device time: a late
    reading never replaces a newer one) and collects changes in an open
    *epoch* (series → latest reading). The epoch is sealed when the previous
    seal is at least ``reading_interval_s`` (250 ms) old, at the batch that
    finds it due or at the next :meth:`LiveHub.tick`. A client takes whole
    sealed epochs, so a series changes at most once per 250 ms for it (about
    4 per second) and the first change after a quiet spell goes out at once.
    Sealed epochs are shared: grouped by (domain, district) and encoded to JSON
    once, whatever the number of clients. A client more than ``max_epochs``
    behind gets the latest value of every series that changed since its
    resume point instead, from the latest table: a slow browser gets the
    latest state, never a backlog, and never slows the hub.

Alerts, presence, KPIs: one shared ring
    These events are appended, encoded once, to a ring of ``ring_size``
    events; each client's outbox is a cursor into that ring. Alert events are
    never coalesced and keep their order; presence changes keep theirs; of
    several KPI updates waiting for a client only the newest is sent. A client
    whose cursor the ring has overwritten (more than ``ring_size`` events
    behind) is *too far behind*: :meth:`LiveHub.collect` asks the caller to
    reset it with a fresh snapshot. Memory does not depend on how slow any
    client is: the ring, the retained epochs and the latest table are bounded.

Sources
    Batches and alerts are ``live``, ``replay`` (the sandbox) or ``drill``.
    A client follows one source, ``live`` by default. A committed batch does
    not carry its replay run id, so a client follows *all* replay runs;
    separating runs needs the run id in :class:`ingest.CommittedBatch`.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from control_api.errors import LiveProtocolError
from control_api.live_state import (
    SOURCES,
    Area,
    EventKind,
    RingEvent,
    SourceState,
    area_of,
    encode_items,
)
from control_api.snapshot import Snapshot
from ingest import BatchSource, CommittedBatch, Reading
from rules import Alert, AlertEvent

__all__ = [
    "Attach",
    "Delivery",
    "LiveClient",
    "LiveHub",
    "LiveOptions",
    "Subscription",
]

log = logging.getLogger(__name__)

_MAX_FILTER_ITEMS: Final = 10_000
_MAX_NAME_CHARS: Final = 128


# -- subscriptions ------------------------------------------------------------------


def _names(value: object, field: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list | tuple):
        msg = f"subscription field {field!r} must be a list of names, not {type(value).__name__}"
        raise LiveProtocolError(msg)
    if len(value) > _MAX_FILTER_ITEMS:
        msg = f"subscription field {field!r} has {len(value)} names; at most {_MAX_FILTER_ITEMS}"
        raise LiveProtocolError(msg)
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= _MAX_NAME_CHARS:
            msg = f"subscription field {field!r}: {item!r} is not a name"
            raise LiveProtocolError(msg)
    return frozenset(value)


@dataclass(frozen=True, slots=True)
class Subscription:
    """Which readings a client receives as deltas (alerts and presence always go out).

    A reading matches when its device is in ``devices``, or when an area is
    given (``districts`` and/or ``domains``) and the device lies in it: a
    district in ``districts`` (any, when empty) and a domain in ``domains``
    (any, when empty). All three empty means every reading.
    """

    districts: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()

    @classmethod
    def from_message(cls, message: Mapping[str, object]) -> Subscription:
        """The subscription of a ``subscribe`` message or of connect query parameters.

        Lists may also be comma-separated strings (query parameters).

        Raises:
            LiveProtocolError: A field is not a list of names, or too long.
        """
        return cls(
            districts=_names(message.get("districts"), "districts"),
            domains=_names(message.get("domains"), "domains"),
            devices=_names(message.get("devices"), "devices"),
        )

    @property
    def everything(self) -> bool:
        """Whether every reading matches."""
        return not (self.districts or self.domains or self.devices)

    @property
    def has_area(self) -> bool:
        """Whether a district or domain filter is given."""
        return bool(self.districts or self.domains)

    def matches_area(self, area: Area) -> bool:
        """Whether the area filter (not the device list) includes this (domain, district)."""
        if not self.has_area:
            return False
        domain, district = area
        return (not self.domains or domain in self.domains) and (
            not self.districts or district in self.districts
        )

    def matches(self, device_id: str, area: Area) -> bool:
        """Whether readings of this device match."""
        return self.everything or device_id in self.devices or self.matches_area(area)


# -- options and results ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiveOptions:
    """Bounds and pacing of the hub.

    Attributes:
        ring_size: Alert, presence and KPI events kept for resume and for
            slow clients; a client further behind gets a fresh snapshot.
        reading_interval_s: Readings are sealed into epochs at most this often:
            at most one update per series per interval for each client.
        max_epochs: Sealed epochs kept for clients a little behind; beyond,
            they catch up from the latest values.
        kpi_interval_s: While clients follow a source, its KPIs (with the
            hub's own reading rate and freshness) go out this often.
        max_events_per_collect: Ring events per :meth:`LiveHub.collect` call;
            the rest come with the next call (``Delivery.more``).
        closed_alert_memory: Closed alert ids remembered to drop late duplicates.
    """

    ring_size: int = 10_000
    reading_interval_s: float = 0.25
    max_epochs: int = 16
    kpi_interval_s: float = 2.0
    max_events_per_collect: int = 512
    closed_alert_memory: int = 10_000

    def __post_init__(self) -> None:
        for name in ("ring_size", "max_epochs", "max_events_per_collect", "closed_alert_memory"):
            if getattr(self, name) < 1:
                msg = f"LiveOptions.{name} must be at least 1, not {getattr(self, name)}"
                raise ValueError(msg)
        if self.reading_interval_s < 0 or self.kpi_interval_s <= 0:
            msg = (
                f"LiveOptions: reading_interval_s={self.reading_interval_s} must be >= 0 and"
                f" kpi_interval_s={self.kpi_interval_s} > 0"
            )
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Attach:
    """How a client starts: a resumed stream, or a snapshot taken now.

    Attributes:
        resumed: The hub holds everything after the client's ``seq``; no snapshot.
        seq: The ``seq`` to send with the snapshot (or the resume point).
    """

    resumed: bool
    seq: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """What :meth:`LiveHub.collect` has for a client.

    Attributes:
        frames: Encoded JSON frames, in order.
        seq: The client's resume point once the frames are sent.
        reset: Too far behind: attach again and send a fresh snapshot.
        more: More ring events wait; collect again without waiting.
        readings: The last frame is a ``readings`` frame.
    """

    frames: list[bytes]
    seq: int
    reset: bool = False
    more: bool = False
    readings: bool = False


class LiveClient:
    """One console connection as the hub sees it.

    It holds no queue: its outbox is a cursor into the hub's shared ring
    (alerts, presence, KPIs) and a position among the sealed reading epochs,
    so its memory does not grow however slowly it reads.

    Args:
        source: The source followed: ``live`` (default), ``replay`` or ``drill``.
        subscription: Which readings to receive; everything by default.
        wake: Called (at most once between two :meth:`LiveHub.collect` calls)
            when something arrived for the client; it must not block.
        name: For logs.
    """

    __slots__ = (
        "_attached",
        "_catch_up",
        "_epoch_pos",
        "_reading_seq",
        "_reset",
        "_ring_pos",
        "_subscription",
        "name",
        "resets",
        "source",
        "wake",
    )

    def __init__(
        self,
        *,
        source: BatchSource = "live",
        subscription: Subscription | None = None,
        wake: Callable[[], None] | None = None,
        name: str = "client",
    ) -> None:
        if source not in SOURCES:
            msg = f"unknown source {source!r}; one of {', '.join(SOURCES)}"
            raise LiveProtocolError(msg)
        self.source: BatchSource = source
        self._subscription = subscription or Subscription()
        self.wake: Callable[[], None] = wake or (lambda: None)
        self.name = name
        self.resets = 0
        """How many times the client was reset to a snapshot after falling behind."""
        self._attached = False
        self._reset = False
        self._ring_pos = 0
        self._epoch_pos = 0
        """Index of the next sealed epoch to take; -1: catch up from the latest values."""
        self._reading_seq = 0
        """Readings up to this ``seq`` were delivered (used when catching up)."""
        self._catch_up: frozenset[str] | None = None
        """Devices newly subscribed: their latest values go out with the next collect."""

    @property
    def subscription(self) -> Subscription:
        """The current subscription (change it with :meth:`LiveHub.subscribe`)."""
        return self._subscription

    def __repr__(self) -> str:
        return f"LiveClient({self.name!r}, source={self.source!r})"


class LiveHub:
    """Fans committed readings, alert events, presence and KPIs out to console clients.

    Args:
        options: Bounds and pacing.
        clock: Seconds since the epoch (pacing, KPIs, heartbeats). A clock that
            steps back never stalls delivery: a seal is then due at once.
        hub_id: Identifies this hub instance in resume points; random by default.
    """

    def __init__(
        self,
        *,
        options: LiveOptions | None = None,
        clock: Callable[[], float] = time.time,
        hub_id: str | None = None,
    ) -> None:
        self._options = options or LiveOptions()
        self._clock = clock
        self.hub_id: Final = hub_id or secrets.token_hex(6)
        now = clock()
        self._streams: dict[str, SourceState] = {
            s: SourceState(s, self._options, now) for s in SOURCES
        }
        self._seq = 0
        size = self._options.ring_size
        self._ring: list[RingEvent | None] = [None] * size
        self._ring_count = 0
        self._ring_floor_seq = 0
        """``seq`` of the newest event the ring has overwritten."""
        self._duplicates = 0
        self._resets = 0
        self._snapshot_body: tuple[Snapshot, bytes] | None = None

    # -- state ------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """The newest sequence number handed out."""
        return self._seq

    def now(self) -> float:
        """The hub's clock."""
        return self._clock()

    def stats(self) -> dict[str, int]:
        """Counters for metrics and logs."""
        return {
            "seq": self._seq,
            "clients": sum(len(s.clients) for s in self._streams.values()),
            "ring_events": min(self._ring_count, self._options.ring_size),
            "sealed_epochs": sum(len(s.sealed) for s in self._streams.values()),
            "series": sum(
                len(d.series) for s in self._streams.values() for d in s.devices.values()
            ),
            "duplicate_alert_events": self._duplicates,
            "client_resets": self._resets,
        }

    def measured_kpis(self, source: BatchSource = "live") -> dict[str, Any]:
        """The hub's own KPI measures: committed readings per second and data freshness."""
        return self._streams[source].measured(self._clock())

    # -- inputs -----------------------------------------------------------------

    def on_batch(self, batch: CommittedBatch) -> None:
        """Take one committed batch (a :class:`ingest.BatchSink`): O(batch), never blocks."""
        stream = self._streams.get(batch.source)
        if stream is None:
            log.warning("batch of unknown source %r ignored", batch.source)
            return
        now = self._clock()
        readings = batch.readings
        if readings:
            self._seq += 1
            stream.take_readings(readings, self._seq)
            stream.count_readings(now, len(readings))
        for presence in batch.presences:
            payload = stream.update_presence(presence)
            if payload is not None:
                self._append(stream, "presence", payload)
        if stream.open.items and stream.seal_due(now):
            stream.seal(now)

    def on_alert_event(self, alert: Mapping[str, Any], event: Mapping[str, Any]) -> None:
        """Take one alert event (the ``cityops/alerts/{id}`` payload's two halves).

        A repeated or older event of an alert (its ``version`` is not newer
        than the last one seen: an MQTT redelivery) is dropped.

        Raises:
            LiveProtocolError: The alert has no id, state or known source, or
                the event no integer version.
        """
        alert_id, state, source = alert.get("id"), alert.get("state"), alert.get("source", "live")
        version = event.get("version")
        if not isinstance(alert_id, str) or not isinstance(state, str) or source not in SOURCES:
            msg = f"alert event without id, state or a known source: {dict(alert)!r:.200}"
            raise LiveProtocolError(msg)
        if not isinstance(version, int) or isinstance(version, bool):
            msg = f"alert {alert_id!r}: event version {version!r} is not an integer"
            raise LiveProtocolError(msg)
        stream = self._streams[source]
        known = stream.alert_versions.get(alert_id, stream.closed.get(alert_id))
        if known is not None and version <= known:
            self._duplicates += 1
            return
        if state == "closed":
            stream.alerts.pop(alert_id, None)
            stream.alert_versions.pop(alert_id, None)
            stream.closed[alert_id] = version
            if len(stream.closed) > self._options.closed_alert_memory:
                stream.closed.popitem(last=False)
        else:
            stream.alerts[alert_id] = dict(alert)
            stream.alert_versions[alert_id] = version
        self._append(stream, "alert", {"alert": alert, "event": event})

    async def publish(self, alert: Alert, event: AlertEvent) -> None:
        """Take an alert event in process (the rules service's ``AlertPublisher`` protocol)."""
        self.on_alert_event(dataclasses.asdict(alert), dataclasses.asdict(event))

    def on_alert_message(self, payload: bytes) -> bool:
        """Take one ``cityops/alerts/{id}`` MQTT payload; False (logged) when malformed."""
        try:
            data = orjson.loads(payload)
            alert, event = data["alert"], data["event"]
            if not isinstance(alert, dict) or not isinstance(event, dict):
                msg = "'alert' and 'event' must be objects"
                raise LiveProtocolError(msg)
            self.on_alert_event(alert, event)
        except (orjson.JSONDecodeError, KeyError, TypeError, LiveProtocolError) as exc:
            log.warning("alert message ignored: %s", exc)
            return False
        return True

    def on_staleness(
        self, device_id: str, *, stale: bool, at: float, source: BatchSource = "live"
    ) -> None:
        """A device became stale (silent past its expected period) or reported again."""
        stream = self._streams[source]
        dev = stream.devices.get(device_id)
        if dev is not None:
            if (dev.stale_since is not None) == stale:
                return
            dev.stale_since = at if stale else None
        area = dev.area if dev is not None else (None, None)
        self._append(
            stream,
            "presence",
            {
                "device": device_id,
                "domain": area[0],
                "district": area[1],
                "stale": stale,
                "stale_since": at if stale else None,
                "at": at,
            },
        )

    def on_kpis(self, kpis: Mapping[str, Any], *, source: BatchSource = "live") -> None:
        """New KPI figures (e.g. from :func:`control_api.snapshot.query_kpis`); sent at once.

        The hub's own measures (``readings_per_s``, ``freshness_s``) replace
        the given ones: they count committed readings as they arrive.
        """
        stream = self._streams[source]
        stream.kpis = dict(kpis)
        self._emit_kpis(stream, self._clock())

    def tick(self) -> None:
        """Seal reading epochs that are due and send periodic KPIs (call when a deadline passes)."""
        now = self._clock()
        for stream in self._streams.values():
            if stream.open.items and stream.seal_due(now):
                stream.seal(now)
            if stream.clients and (
                now - stream.last_kpi_at >= self._options.kpi_interval_s or now < stream.last_kpi_at
            ):
                self._emit_kpis(stream, now)

    def seconds_until_due(self) -> float | None:
        """Seconds until :meth:`tick` has work (0 when overdue); None when it has none."""
        now = self._clock()
        due: float | None = None
        for stream in self._streams.values():
            if stream.open.items:
                wait = (
                    0.0
                    if stream.seal_due(now)
                    else stream.last_seal_at + stream.reading_interval_s - now
                )
                due = wait if due is None else min(due, wait)
            if stream.clients:
                wait = stream.last_kpi_at + self._options.kpi_interval_s - now
                due = wait if due is None else min(due, wait)
        return None if due is None else max(0.0, due)

    # -- clients ----------------------------------------------------------------

    def attach(
        self, client: LiveClient, last_seq: int | None = None, *, hub_id: str | None = None
    ) -> Attach:
        """Start (or restart) a client's stream: resumed after ``last_seq``, or from now.

        Args:
            client: The client; attaching it again resets its stream.
            last_seq: The client's resume point, ``None`` for a fresh start.
            hub_id: The hub the resume point came from; a different hub (a
                restarted process) cannot resume.

        Returns:
            ``resumed`` when the hub still holds every event after
            ``last_seq``: the next :meth:`collect` delivers the missed alert,
            presence and KPI events in order and the latest value of every
            series that changed. Otherwise the caller sends a snapshot with
            the returned ``seq`` (read *after* this call) before the stream.
        """
        stream = self._streams[client.source]
        stream.clients.add(client)
        stream.armed.add(client)
        client._attached = True
        client._reset = False
        client._catch_up = None
        if last_seq is not None and self._can_resume(last_seq, hub_id):
            client._ring_pos = self._ring_position_after(last_seq)
            client._reading_seq = last_seq
            client._epoch_pos = -1
            return Attach(resumed=True, seq=last_seq)
        client._ring_pos = self._ring_count
        client._reading_seq = self._seq
        client._epoch_pos = stream.open.index
        return Attach(resumed=False, seq=self._seq)

    def detach(self, client: LiveClient) -> None:
        """Forget a client (disconnected)."""
        stream = self._streams[client.source]
        stream.clients.discard(client)
        stream.armed.discard(client)
        client._attached = False

    def subscribe(self, client: LiveClient, subscription: Subscription) -> None:
        """Change which readings a client receives.

        The latest values of devices the new subscription adds go out with
        the next :meth:`collect`: the client's copy of them is stale.
        """
        stream = self._streams[client.source]
        old = {d.device_id for d in stream.matching(client.subscription)}
        added = frozenset(
            d.device_id for d in stream.matching(subscription) if d.device_id not in old
        )
        client._subscription = subscription
        if added:
            pending = client._catch_up or frozenset()
            client._catch_up = pending | added
            stream.wake(client)

    def collect(self, client: LiveClient, *, readings: bool = True) -> Delivery:
        """Everything due for a client, encoded; advances its cursors.

        Call when the client's ``wake`` fired or a deadline passed (after
        :meth:`tick`), and send the frames in order. When ``reset`` is set,
        the client fell more than ``ring_size`` events behind: :meth:`attach`
        it again and send a fresh snapshot.

        Args:
            client: An attached client.
            readings: False holds readings back (the client has too many
                readings frames unconfirmed); they coalesce meanwhile, and the
                next call with True sends the latest values.

        Raises:
            LiveProtocolError: The client is not attached.
        """
        if not client._attached:
            msg = f"{client!r} is not attached to the hub"
            raise LiveProtocolError(msg)
        stream = self._streams[client.source]
        size = self._options.ring_size
        if client._reset or client._ring_pos < self._ring_count - size:
            if not client._reset:
                client._reset = True
                client.resets += 1
                self._resets += 1
            stream.armed.discard(client)
            return Delivery(frames=[], seq=self.watermark(client), reset=True)
        frames: list[bytes] = []
        readings_seq = self._reading_watermark(client, stream)
        start = client._ring_pos
        end = min(self._ring_count, start + self._options.max_events_per_collect)
        last_kpis = -1
        for pos in range(start, end):
            event = self._ring[pos % size]
            if event is not None and event.source == client.source and event.kind == "kpis":
                last_kpis = pos
        for pos in range(start, end):
            event = self._ring[pos % size]
            if event is None or event.source != client.source:
                continue
            if event.kind == "kpis" and pos != last_kpis:
                continue  # superseded by a newer KPI update in this delivery
            frames.append(
                b'{"type":"%b","seq":%d,%b'
                % (event.kind.encode(), min(event.seq, readings_seq), event.body)
            )
        client._ring_pos = end
        parts = [p for p in self._reading_parts(client, stream) if p] if readings else []
        if parts:
            frames.append(
                b'{"type":"readings","seq":%d,"items":[%b]}'
                % (self.watermark(client), b",".join(parts))
            )
        more = end < self._ring_count
        if more:
            stream.armed.discard(client)
        else:
            stream.armed.add(client)
        return Delivery(frames=frames, seq=self.watermark(client), more=more, readings=bool(parts))

    def watermark(self, client: LiveClient) -> int:
        """The client's resume point: every event up to it was delivered or superseded."""
        stream = self._streams[client.source]
        ring_seq = self._seq
        size = self._options.ring_size
        for pos in range(client._ring_pos, self._ring_count):
            event = self._ring[pos % size]
            if event is not None and event.source == client.source:
                ring_seq = event.seq - 1
                break
        return min(ring_seq, self._reading_watermark(client, stream))

    # -- frames -----------------------------------------------------------------

    def snapshot_frame(self, snapshot: Snapshot, *, seq: int) -> bytes:
        """The ``snapshot`` frame: the snapshot with ``seq`` from :meth:`attach`.

        The hub's measured KPIs replace the snapshot's estimates. The encoded
        body of the last snapshot is kept: clients sharing one snapshot
        (:class:`control_api.live_ws.SharedSnapshots`) differ only in ``seq``.
        """
        cached = self._snapshot_body
        if cached is not None and cached[0] is snapshot:
            body = cached[1]
        else:
            kpis: dict[str, Any] = dict(snapshot.kpis)
            kpis.update(self._streams[snapshot.source].measured(self._clock()))
            body = orjson.dumps(
                {
                    "hub": self.hub_id,
                    "source": snapshot.source,
                    "run": snapshot.run_id,
                    "at": snapshot.taken_at,
                    "devices": snapshot.devices,
                    "alerts": snapshot.alerts,
                    "kpis": kpis,
                }
            )[1:]
            self._snapshot_body = (snapshot, body)
        return b'{"type":"snapshot","seq":%d,%b' % (seq, body)

    def resumed_frame(self, attach: Attach) -> bytes:
        """The ``resumed`` frame: the stream continues after ``attach.seq``."""
        return b'{"type":"resumed","seq":%d,"hub":%b}' % (attach.seq, orjson.dumps(self.hub_id))

    def heartbeat_frame(self, client: LiveClient) -> bytes:
        """The ``heartbeat`` frame: the client's resume point and the hub's time."""
        return orjson.dumps(
            {
                "type": "heartbeat",
                "seq": self.watermark(client),
                "hub": self.hub_id,
                "ts": self._clock(),
            }
        )

    def memory_snapshot(self, source: BatchSource = "live") -> Snapshot:
        """A snapshot from what the hub has seen since it started (no device metadata).

        For tests, benchmarks and a database outage; the database snapshot
        (:func:`control_api.snapshot.build_snapshot`) is the real one.
        """
        return self._streams[source].snapshot(self._clock())

    # -- internals --------------------------------------------------------------

    def _emit_kpis(self, stream: SourceState, now: float) -> None:
        kpis = {**stream.kpis, **stream.measured(now), "at": now}
        stream.last_kpi_at = now
        self._append(stream, "kpis", {"kpis": kpis})

    def _append(self, stream: SourceState, kind: EventKind, payload: Mapping[str, Any]) -> None:
        self._seq += 1
        event = RingEvent(self._seq, stream.source, kind, orjson.dumps(payload)[1:])
        slot = self._ring_count % self._options.ring_size
        evicted = self._ring[slot]
        if evicted is not None:
            self._ring_floor_seq = evicted.seq
        self._ring[slot] = event
        self._ring_count += 1
        stream.wake_all()

    def _can_resume(self, last_seq: int, hub_id: str | None) -> bool:
        if hub_id is not None and hub_id != self.hub_id:
            return False
        return self._ring_floor_seq <= last_seq <= self._seq

    def _ring_position_after(self, seq: int) -> int:
        """Absolute ring position of the first held event with a ``seq`` above ``seq``."""
        size = self._options.ring_size
        lo, hi = max(0, self._ring_count - size), self._ring_count
        while lo < hi:
            mid = (lo + hi) // 2
            event = self._ring[mid % size]
            if event is not None and event.seq <= seq:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _reading_watermark(self, client: LiveClient, stream: SourceState) -> int:
        pos = client._epoch_pos
        if pos < 0:
            return client._reading_seq
        if pos < stream.open.index:
            if not stream.sealed or pos < stream.sealed[0].index:
                return client._reading_seq
            return stream.sealed[pos - stream.sealed[0].index].first_seq - 1
        if stream.open.items:
            return stream.open.first_seq - 1
        return self._seq

    def _reading_parts(self, client: LiveClient, stream: SourceState) -> list[bytes]:
        sub = client.subscription
        parts: list[bytes] = []
        pos = client._epoch_pos
        oldest = stream.sealed[0].index if stream.sealed else stream.open.index
        if pos < 0 or pos < oldest:
            # Resumed, or behind the kept epochs: the latest value of every
            # matching series that changed since the resume point.
            since = client._reading_seq
            parts.append(
                encode_items(
                    r
                    for dev in stream.matching(sub)
                    for seq, r in dev.series.values()
                    if seq > since
                )
            )
        elif pos < stream.open.index:
            epochs = [stream.sealed[i - oldest] for i in range(pos, stream.open.index)]
            if len(epochs) == 1:
                parts.extend(epochs[0].parts_for(sub))
            else:
                merged: dict[tuple[str, str], Reading] = {}
                for epoch in epochs:
                    for key, r in epoch.items.items():
                        if sub.matches(key[0], area_of(r.device)):
                            merged[key] = r
                parts.append(encode_items(merged.values()))
        client._epoch_pos = stream.open.index
        client._reading_seq = self._reading_watermark(client, stream)
        if client._catch_up is not None:
            devices = (stream.devices.get(d) for d in client._catch_up)
            parts.append(
                encode_items(
                    r for dev in devices if dev is not None for _, r in dev.series.values()
                )
            )
            client._catch_up = None
        return parts
