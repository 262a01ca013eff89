"""The live hub behind the websocket ``/api/v1/live``: snapshot, then deltas, resumable.

Inputs: committed ingest batches (:meth:`LiveHub.on_batch`, a
:class:`ingest.BatchSink`), alert events (:meth:`LiveHub.on_alert_event`, the
``cityops/alerts/{id}`` payloads), staleness changes and KPI figures. Outputs:
websocket frames per client. The hub is a plain object with an injected clock
and no I/O; :func:`serve_live` is the thin websocket shell around it.

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

Snapshot consistency
    The serving loop attaches the client (its cursors start at the hub's
    current ``seq``) *before* it reads the snapshot from the database, and
    sends the snapshot with that ``seq``. Events that arrive during the read
    wait in the ring and go out after the snapshot, even when the snapshot
    already shows them: every update is idempotent (alert events carry the
    alert's ``version``, presence its ``session``, readings their ``ts``), so
    sending a few twice is simpler and safer than trying to drop exactly those
    the snapshot covered. Nothing between the snapshot and the stream is lost.

Sources
    Batches and alerts are ``live``, ``replay`` (the sandbox) or ``drill``.
    A client follows one source, ``live`` by default. A committed batch does
    not carry its replay run id, so a client follows *all* replay runs;
    separating runs needs the run id in :class:`ingest.CommittedBatch`.

Frames (server → client, JSON text; ``seq`` on every frame but ``result``/``error``)::

    {"type": "snapshot", "seq", "hub", "source", "run", "at", "devices", "alerts", "kpis"}
    {"type": "resumed", "seq", "hub"}
    {"type": "readings", "seq", "items": [[device, channel, ts, value_or_state], ...]}
    {"type": "alert", "seq", "alert": {...}, "event": {...}}
    {"type": "presence", "seq", "device", "domain", "district",
        "presence", "session", "at"}                      (a status change)
    {"type": "presence", "seq", "device", "domain", "district",
        "stale", "stale_since", "at"}                     (a staleness change)
    {"type": "kpis", "seq", "kpis": {...}}
    {"type": "heartbeat", "seq", "hub", "ts"}
    {"type": "result", "id", ...}   {"type": "error", "id", "error"}

Client → server: ``{"type": "subscribe", "districts", "domains", "devices"}``,
``{"type": "resume", "hub", "seq"}`` (also as query parameters on connect),
``{"type": "received", "seq"}`` (flow control, below), and commands such as
``{"type": "ack", "id", "alert_id", "version", "note"}``, passed to the
caller's ``on_command``.

Flow control (opt-in, ``?window=N``)
    A browser reads its socket whatever its script is doing, so a busy tab
    never pushes back through TCP: frames pile up in the tab and the kernel
    buffers (megabytes: seconds of data), and the screen lags. A console that
    connects with ``window=N`` confirms each applied ``readings`` frame with
    ``{"type": "received", "seq": <its seq>}``; with N frames unconfirmed the
    server holds readings back (they coalesce in the hub, the next frame
    carries the latest values) while alerts and presence still go out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn
from urllib.parse import urlsplit

import orjson
from starlette.websockets import (
    WebSocket,
    WebSocketDisconnect,
    WebSocketDisconnected,
    WebSocketState,
)

from control_api.errors import ControlApiError
from control_api.snapshot import (
    RATE_WINDOW_S,
    DeviceState,
    Kpis,
    SeriesValue,
    Snapshot,
    SnapshotUnavailable,
    alert_kpis,
    device_kpis,
)
from ingest import BatchSource, CommittedBatch, DeviceRef, Presence, Reading
from rules import Alert, AlertEvent

__all__ = [
    "Attach",
    "Delivery",
    "LiveClient",
    "LiveHub",
    "LiveOptions",
    "LiveProtocolError",
    "ServeOptions",
    "SharedSnapshots",
    "Subscription",
    "check_origin",
    "run_kpi_feed",
    "serve_live",
]

log = logging.getLogger(__name__)

SOURCES: Final[tuple[BatchSource, ...]] = ("live", "replay", "drill")
Area = tuple[str, str]
"""(domain, district)."""
EventKind = Literal["alert", "presence", "kpis"]

_MAX_FILTER_ITEMS: Final = 10_000
_MAX_NAME_CHARS: Final = 128


class LiveProtocolError(ControlApiError, ValueError):
    """A client message or query parameter the live protocol does not accept."""


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


# -- hub internals ------------------------------------------------------------------


def _item(r: Reading) -> list[object]:
    return [r.device.device_id, r.channel, r.ts, r.value if r.state is None else r.state]


def _encode_items(readings: Iterable[Reading]) -> bytes:
    """``[…],[…]``: the items of a ``readings`` frame, without the brackets."""
    return orjson.dumps([_item(r) for r in readings])[1:-1]


def _area_of(ref: DeviceRef) -> Area:
    return (ref.domain, ref.district)


class _Device:
    __slots__ = ("area", "device_id", "presence", "presence_at", "series", "session", "stale_since")

    def __init__(self, ref: DeviceRef) -> None:
        self.device_id = ref.device_id
        self.area: Area = (ref.domain, ref.district)
        self.series: dict[str, tuple[int, Reading]] = {}
        self.presence: Literal["online", "offline", "unknown"] = "unknown"
        self.session: int | None = None
        self.presence_at: float | None = None
        self.stale_since: float | None = None


class _Epoch:
    """Series → latest reading, for one reading interval; views built once, on demand."""

    __slots__ = ("_all", "_area_json", "_areas", "_devices", "first_seq", "index", "items")

    def __init__(self, index: int) -> None:
        self.index = index
        self.first_seq = 0
        self.items: dict[tuple[str, str], Reading] = {}
        self._areas: dict[Area, list[Reading]] | None = None
        self._area_json: dict[Area, bytes] = {}
        self._devices: dict[str, list[Reading]] | None = None
        self._all: bytes | None = None

    def areas(self) -> dict[Area, list[Reading]]:
        if self._areas is None:
            areas: dict[Area, list[Reading]] = {}
            for r in self.items.values():
                key = (r.device.domain, r.device.district)
                group = areas.get(key)
                if group is None:
                    areas[key] = [r]
                else:
                    group.append(r)
            self._areas = areas
        return self._areas

    def area_json(self, area: Area) -> bytes:
        data = self._area_json.get(area)
        if data is None:
            data = self._area_json[area] = _encode_items(self.areas().get(area, ()))
        return data

    def all_json(self) -> bytes:
        if self._all is None:
            self._all = b",".join(self.area_json(a) for a in self.areas())
        return self._all

    def devices(self) -> dict[str, list[Reading]]:
        if self._devices is None:
            devices: dict[str, list[Reading]] = {}
            for (device_id, _), r in self.items.items():
                devices.setdefault(device_id, []).append(r)
            self._devices = devices
        return self._devices

    def parts_for(self, sub: Subscription) -> list[bytes]:
        """Encoded items matching ``sub``: shared per area, per device for devices in view."""
        if sub.everything:
            return [self.all_json()]
        parts = [self.area_json(a) for a in self.areas() if sub.matches_area(a)]
        if sub.devices:
            by_device = self.devices()
            wanted: Iterable[str] = (
                sub.devices if len(sub.devices) <= len(by_device) else by_device.keys()
            )
            for device_id in wanted:
                readings = by_device.get(device_id)
                if (
                    readings
                    and device_id in sub.devices
                    and not sub.matches_area(_area_of(readings[0].device))
                ):
                    parts.append(_encode_items(readings))
        return parts


class _Stream:
    """Everything the hub holds for one source."""

    def __init__(self, source: BatchSource, options: LiveOptions, now: float) -> None:
        self.source = source
        self.devices: dict[str, _Device] = {}
        self.areas: dict[Area, set[str]] = {}
        self.open = _Epoch(0)
        self.sealed: collections.deque[_Epoch] = collections.deque(maxlen=options.max_epochs)
        self.last_seal_at = float("-inf")
        self.clients: set[LiveClient] = set()
        self.armed: set[LiveClient] = set()
        self.alerts: dict[str, dict[str, Any]] = {}
        self.alert_versions: dict[str, int] = {}
        self.closed: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.kpis: dict[str, Any] = {}
        self.last_kpi_at = now
        self.rate: collections.deque[list[int]] = collections.deque()
        self.newest_ts: float | None = None
        self.started_at = now

    def device(self, ref: DeviceRef) -> _Device:
        dev = self.devices.get(ref.device_id)
        if dev is None:
            dev = self.devices[ref.device_id] = _Device(ref)
            self.areas.setdefault(dev.area, set()).add(ref.device_id)
        return dev

    def matching(self, sub: Subscription) -> Iterator[_Device]:
        """Known devices whose readings match ``sub`` (each once)."""
        if sub.everything:
            yield from self.devices.values()
            return
        seen: set[str] = set()
        if sub.has_area:
            for area, ids in self.areas.items():
                if sub.matches_area(area):
                    seen.update(ids)
                    yield from (self.devices[i] for i in ids)
        for device_id in sub.devices:
            dev = self.devices.get(device_id)
            if dev is not None and device_id not in seen:
                yield dev

    def count_readings(self, now: float, n: int) -> None:
        second = int(now)
        if self.rate and self.rate[-1][0] == second:
            self.rate[-1][1] += n
        else:
            self.rate.append([second, n])
        while self.rate and self.rate[0][0] <= now - RATE_WINDOW_S:
            self.rate.popleft()

    def measured(self, now: float) -> dict[str, Any]:
        while self.rate and self.rate[0][0] <= now - RATE_WINDOW_S:
            self.rate.popleft()
        out: dict[str, Any] = {}
        uptime = now - self.started_at
        if uptime >= 1.0:  # before, the database's estimate is the better one
            span = min(RATE_WINDOW_S, uptime)
            out["readings_per_s"] = round(sum(n for _, n in self.rate) / span, 3)
        if self.newest_ts is not None:
            out["freshness_s"] = round(max(0.0, now - self.newest_ts), 3)
        return out


@dataclass(frozen=True, slots=True)
class _Event:
    seq: int
    source: BatchSource
    kind: EventKind
    body: bytes
    """The frame after ``"seq":N,``: ``"alert":{…},"event":{…}}``."""


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
        self._streams: dict[str, _Stream] = {s: _Stream(s, self._options, now) for s in SOURCES}
        self._seq = 0
        size = self._options.ring_size
        self._ring: list[_Event | None] = [None] * size
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
            seq = self._seq
            epoch = stream.open
            items = epoch.items
            was_empty = not items
            devices = stream.devices
            newest = stream.newest_ts if stream.newest_ts is not None else float("-inf")
            for r in readings:
                device_id = r.device.device_id
                channel = r.channel
                ts = r.ts
                dev = devices.get(device_id)
                if dev is None:
                    dev = stream.device(r.device)
                series = dev.series
                current = series.get(channel)
                if current is not None and ts < current[1].ts:
                    continue  # late: the newer value stays
                series[channel] = (seq, r)
                items[device_id, channel] = r
                if ts > newest:  # noqa: PLR1730 (a call to max() costs more in this hot loop)
                    newest = ts
            if was_empty and items:
                epoch.first_seq = seq
            if newest != float("-inf"):
                stream.newest_ts = newest
            stream.count_readings(now, len(readings))
        for presence in batch.presences:
            self._on_presence(stream, presence)
        if stream.open.items and self._seal_due(stream, now):
            self._seal(stream, now)

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
            if stream.open.items and self._seal_due(stream, now):
                self._seal(stream, now)
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
                    if self._seal_due(stream, now)
                    else stream.last_seal_at + self._options.reading_interval_s - now
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
            self._wake(stream, client)

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
        (:class:`SharedSnapshots`) differ only in ``seq``.
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
        stream = self._streams[source]
        now = self._clock()
        devices = tuple(
            DeviceState(
                id=dev.device_id,
                domain=dev.area[0],
                district=dev.area[1],
                kind=None,
                name=None,
                lat=None,
                lon=None,
                presence=dev.presence,
                session=dev.session,
                stale_since=dev.stale_since,
                out_of_service=False,
                series={
                    channel: SeriesValue(ts=r.ts, value=r.value, state=r.state, unit=r.unit)
                    for channel, (_, r) in dev.series.items()
                },
            )
            for dev in sorted(stream.devices.values(), key=lambda d: d.device_id)
        )
        alerts = tuple(
            sorted(stream.alerts.values(), key=lambda a: (a.get("raised_at", 0), a["id"]))
        )
        by_severity, total, unacked = alert_kpis(alerts)
        measured = stream.measured(now)
        kpis = Kpis(
            alerts_open=by_severity,
            alerts_open_total=total,
            alerts_unacked=unacked,
            devices=device_kpis(devices),
            readings_per_s=float(measured.get("readings_per_s", 0.0)),
            freshness_s=measured.get("freshness_s"),
            at=now,
        )
        return Snapshot(source=source, taken_at=now, devices=devices, alerts=alerts, kpis=kpis)

    # -- internals --------------------------------------------------------------

    def _seal_due(self, stream: _Stream, now: float) -> bool:
        elapsed = now - stream.last_seal_at
        return elapsed >= self._options.reading_interval_s or elapsed < 0

    def _seal(self, stream: _Stream, now: float) -> None:
        stream.sealed.append(stream.open)
        stream.open = _Epoch(stream.open.index + 1)
        stream.last_seal_at = now
        self._wake_all(stream)

    def _on_presence(self, stream: _Stream, p: Presence) -> None:
        dev = stream.device(p.device)
        if dev.session is not None and p.session < dev.session:
            return  # a status of an older session: stale, as in the store
        if dev.presence == p.state:
            dev.session = p.session
            return
        dev.presence, dev.session, dev.presence_at = p.state, p.session, p.ts
        self._append(
            stream,
            "presence",
            {
                "device": dev.device_id,
                "domain": dev.area[0],
                "district": dev.area[1],
                "presence": p.state,
                "session": p.session,
                "at": p.ts,
            },
        )

    def _emit_kpis(self, stream: _Stream, now: float) -> None:
        kpis = {**stream.kpis, **stream.measured(now), "at": now}
        stream.last_kpi_at = now
        self._append(stream, "kpis", {"kpis": kpis})

    def _append(self, stream: _Stream, kind: EventKind, payload: Mapping[str, Any]) -> None:
        self._seq += 1
        event = _Event(self._seq, stream.source, kind, orjson.dumps(payload)[1:])
        slot = self._ring_count % self._options.ring_size
        evicted = self._ring[slot]
        if evicted is not None:
            self._ring_floor_seq = evicted.seq
        self._ring[slot] = event
        self._ring_count += 1
        self._wake_all(stream)

    def _wake_all(self, stream: _Stream) -> None:
        armed, stream.armed = stream.armed, set()
        for client in armed:
            client.wake()

    def _wake(self, stream: _Stream, client: LiveClient) -> None:
        if client in stream.armed:
            stream.armed.discard(client)
            client.wake()

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

    def _reading_watermark(self, client: LiveClient, stream: _Stream) -> int:
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

    def _reading_parts(self, client: LiveClient, stream: _Stream) -> list[bytes]:
        sub = client.subscription
        parts: list[bytes] = []
        pos = client._epoch_pos
        oldest = stream.sealed[0].index if stream.sealed else stream.open.index
        if pos < 0 or pos < oldest:
            # Resumed, or behind the kept epochs: the latest value of every
            # matching series that changed since the resume point.
            since = client._reading_seq
            parts.append(
                _encode_items(
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
                        if sub.matches(key[0], _area_of(r.device)):
                            merged[key] = r
                parts.append(_encode_items(merged.values()))
        client._epoch_pos = stream.open.index
        client._reading_seq = self._reading_watermark(client, stream)
        if client._catch_up is not None:
            devices = (stream.devices.get(d) for d in client._catch_up)
            parts.append(
                _encode_items(
                    r for dev in devices if dev is not None for _, r in dev.series.values()
                )
            )
            client._catch_up = None
        return parts


# -- websocket serving --------------------------------------------------------------


def _normalize_origin(value: str) -> str | None:
    value = value.strip()
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == (443 if scheme == "https" else 80):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def check_origin(
    origin_header: str | None, allowed_origins: Iterable[str], *, allow_missing: bool = False
) -> bool:
    """Whether a websocket handshake's ``Origin`` is allowed (cross-site hijacking guard).

    A browser always sends ``Origin`` on a websocket handshake, and sends the
    session cookie whatever page opened the socket: without this check any
    web page could read the live feed with an operator's cookie. Origins are
    compared as scheme, host and port (default ports dropped, case ignored).

    Args:
        origin_header: The ``Origin`` request header, or ``None``.
        allowed_origins: Origins such as ``https://ops.example.org``; ``*`` allows any.
        allow_missing: Accept a handshake without ``Origin`` (a non-browser
            client, e.g. with an API token).

    Returns:
        True when the origin (or its absence) is allowed. ``null`` and
        malformed origins are never allowed.
    """
    if not origin_header:
        return allow_missing
    origin = _normalize_origin(origin_header)
    if origin is None:
        return False
    for allowed in allowed_origins:
        if allowed.strip() == "*" or _normalize_origin(allowed) == origin:
            return True
    return False


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Timing and limits of one websocket connection.

    Attributes:
        heartbeat_s: A heartbeat goes out after this long without a frame.
        send_timeout_s: A frame not taken by the client within this time
            drops the connection (a client that stopped reading).
        snapshot_timeout_s: Deadline of one snapshot read.
        command_timeout_s: Deadline of one ``on_command`` call.
        max_message_bytes: Larger client messages are refused.
        max_pending_results: Command results waiting to be sent; the client's
            further messages wait for room.
    """

    heartbeat_s: float = 5.0
    send_timeout_s: float = 10.0
    snapshot_timeout_s: float = 30.0
    command_timeout_s: float = 10.0
    max_message_bytes: int = 64 * 1024
    max_pending_results: int = 16


class SharedSnapshots:
    """A snapshot source that serves every client waiting at once with one read.

    After an API restart every console reconnects at the same moment. A
    client may only use a read that *started* after it attached (an earlier
    read can miss an event), so callers that arrive while a read runs wait for
    the next read, which starts when the running one ends and serves them all.

    Args:
        read: Reads one snapshot (e.g. :func:`control_api.snapshot.build_snapshot`
            on a pooled connection).
    """

    def __init__(self, read: Callable[[], Awaitable[Snapshot]]) -> None:
        self._read = read
        self._next: asyncio.Future[Snapshot] | None = None
        self._runner: asyncio.Task[None] | None = None
        self.reads = 0
        """Reads done so far."""

    async def __call__(self) -> Snapshot:
        """A snapshot read that started after this call."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        future = self._next
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="live-shared-snapshots")
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while self._next is not None:
            future, self._next = self._next, None
            try:
                snapshot = await self._read()
            except Exception as exc:  # every waiter of this read gets it
                future.set_exception(exc)
                future.add_done_callback(_retrieve_exception)
            else:
                future.set_result(snapshot)
            finally:
                self.reads += 1


def _retrieve_exception(future: asyncio.Future[Snapshot]) -> None:
    # Waiters may all have gone (cancelled): mark the exception as seen.
    future.exception()


class _Closed(Exception):
    """The connection is over (closed by either side, or dropped)."""


def _resume_point(message: Mapping[str, object]) -> tuple[str | None, int] | None:
    """``(hub, seq)`` from a resume message or query parameters; None when absent."""
    seq = message.get("seq")
    if seq is None or seq == "":
        return None
    try:
        number = int(seq) if isinstance(seq, str | int) and not isinstance(seq, bool) else None
    except ValueError:
        number = None
    if number is None or number < 0:
        msg = f"resume seq {seq!r} is not a non-negative integer"
        raise LiveProtocolError(msg)
    hub = message.get("hub")
    if hub is not None and not isinstance(hub, str):
        msg = f"resume hub {hub!r} is not a string"
        raise LiveProtocolError(msg)
    return (hub, number)


def _window(message: Mapping[str, object]) -> int | None:
    """The flow-control window (``readings`` frames unconfirmed); None: no flow control."""
    raw = message.get("window")
    if raw is None or raw == "":
        return None
    try:
        window = int(raw) if isinstance(raw, str | int) and not isinstance(raw, bool) else 0
    except ValueError:
        window = 0
    if not 1 <= window <= _MAX_WINDOW:
        msg = f"window {raw!r} must be an integer from 1 to {_MAX_WINDOW}"
        raise LiveProtocolError(msg)
    return window


def _seq_of(message: Mapping[str, object]) -> int:
    seq = message.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        msg = f"seq {seq!r} is not an integer"
        raise LiveProtocolError(msg)
    return seq


_MAX_WINDOW: Final = 64


class _LiveSession:
    """One connection: a sender (the only writer) and a receiver, in a task group."""

    def __init__(
        self,
        websocket: WebSocket,
        hub: LiveHub,
        client: LiveClient,
        *,
        snapshot_source: Callable[[], Awaitable[Snapshot]],
        on_command: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        options: ServeOptions,
        window: int | None,
    ) -> None:
        self.window = window
        self.in_flight: collections.deque[int] = collections.deque()
        """``seq`` of the ``readings`` frames sent and not yet confirmed."""
        self.ws = websocket
        self.hub = hub
        self.client = client
        self.snapshot_source = snapshot_source
        self.on_command = on_command
        self.options = options
        self.wake = asyncio.Event()
        client.wake = self.wake.set
        self.results: asyncio.Queue[bytes] = asyncio.Queue(options.max_pending_results)
        self.pending_resume: tuple[str | None, int] | Literal[False] | None = False
        self.last_sent = asyncio.get_running_loop().time()

    async def run(self, resume: tuple[str | None, int] | None) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._send_loop(resume), name=f"live-send-{self.client.name}")
                tg.create_task(self._receive_loop(), name=f"live-receive-{self.client.name}")
        except* _Closed:
            pass

    async def _send(self, frame: bytes) -> None:
        try:
            async with asyncio.timeout(self.options.send_timeout_s):
                await self.ws.send_text(frame.decode())
        except TimeoutError:
            log.warning(
                "live client %s took no frame for %.1f s: dropped",
                self.client.name,
                self.options.send_timeout_s,
            )
            raise _Closed from None
        except (WebSocketDisconnect, WebSocketDisconnected) as exc:
            raise _Closed from exc
        self.last_sent = asyncio.get_running_loop().time()

    async def _close(self, code: int, reason: str) -> NoReturn:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.options.send_timeout_s):
                await self.ws.close(code=code, reason=reason)
        raise _Closed

    async def _start(self, resume: tuple[str | None, int] | None) -> None:
        """Attach, then resume or send a snapshot read after attaching."""
        hub_id, last_seq = resume if resume is not None else (None, None)
        if resume is not None and hub_id is None:
            last_seq = None  # a resume point without its hub cannot be trusted
        attach = self.hub.attach(self.client, last_seq, hub_id=hub_id)
        self.in_flight.clear()
        if attach.resumed:
            await self._send(self.hub.resumed_frame(attach))
            self.wake.set()
            return
        try:
            async with asyncio.timeout(self.options.snapshot_timeout_s):
                snapshot = await self.snapshot_source()
        except (SnapshotUnavailable, TimeoutError) as exc:
            log.warning(
                "live client %s: no snapshot: %s",
                self.client.name,
                exc or f"timed out after {self.options.snapshot_timeout_s} s",
            )
            await self._snapshot_failed()
        except Exception:
            # The caller's snapshot source failed in an unforeseen way (e.g. a
            # connection error before build_snapshot): this client only.
            log.exception("live client %s: snapshot source failed", self.client.name)
            await self._snapshot_failed()
        await self._send(self.hub.snapshot_frame(snapshot, seq=attach.seq))
        self.wake.set()

    async def _snapshot_failed(self) -> NoReturn:
        await self._send(
            orjson.dumps({"type": "error", "id": None, "error": "snapshot unavailable"})
        )
        await self._close(1013, "snapshot unavailable, retry later")

    async def _wait(self) -> None:
        if self.wake.is_set():
            return
        loop = asyncio.get_running_loop()
        timeout = self.last_sent + self.options.heartbeat_s - loop.time()
        due = self.hub.seconds_until_due()
        if due is not None:
            timeout = min(timeout, due)
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.wake.wait()

    async def _send_loop(self, resume: tuple[str | None, int] | None) -> None:
        await self._start(resume)
        loop = asyncio.get_running_loop()
        while True:
            await self._wait()
            self.wake.clear()
            while not self.results.empty():
                await self._send(self.results.get_nowait())
            if self.pending_resume is not False:
                resume, self.pending_resume = self.pending_resume, False
                await self._start(resume)
                continue
            self.hub.tick()
            # With flow control, readings wait (and coalesce in the hub) while
            # the client has `window` readings frames unconfirmed; alerts go on.
            delivery = self.hub.collect(
                self.client, readings=self.window is None or len(self.in_flight) < self.window
            )
            if delivery.reset:
                log.info("live client %s fell too far behind: fresh snapshot", self.client.name)
                await self._start(None)
                continue
            for frame in delivery.frames:
                await self._send(frame)
            if delivery.readings and self.window is not None:
                self.in_flight.append(delivery.seq)
            if delivery.more:
                self.wake.set()
            elif loop.time() - self.last_sent >= self.options.heartbeat_s:
                await self._send(self.hub.heartbeat_frame(self.client))

    async def _reply(self, frame: dict[str, Any]) -> None:
        await self.results.put(orjson.dumps(frame))
        self.wake.set()

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise _Closed
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
            if data is None:
                continue
            if len(data) > self.options.max_message_bytes:
                await self._reply(
                    {
                        "type": "error",
                        "id": None,
                        "error": f"message of {len(data)} bytes; at most"
                        f" {self.options.max_message_bytes}",
                    }
                )
                continue
            try:
                request = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                await self._reply({"type": "error", "id": None, "error": f"not JSON: {exc}"})
                continue
            if not isinstance(request, dict) or not isinstance(request.get("type"), str):
                await self._reply(
                    {"type": "error", "id": None, "error": "a message is an object with a 'type'"}
                )
                continue
            await self._handle(request)

    async def _handle(self, request: dict[str, Any]) -> None:
        kind = request["type"]
        request_id = request.get("id")
        try:
            if kind == "subscribe":
                self.hub.subscribe(self.client, Subscription.from_message(request))
                return
            if kind == "resume":
                self.pending_resume = _resume_point(request)  # None: a fresh snapshot
                self.wake.set()
                return
            if kind == "received":
                seq = _seq_of(request)
                while self.in_flight and self.in_flight[0] <= seq:
                    self.in_flight.popleft()
                self.wake.set()
                return
        except LiveProtocolError as exc:
            await self._reply({"type": "error", "id": request_id, "error": str(exc)})
            return
        await self._reply({**(await self._command(request)), "type": "result", "id": request_id})

    async def _command(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.options.command_timeout_s):
                result = await self.on_command(request)
            orjson.dumps(result)  # fail here, not in the sender
        except TimeoutError:
            log.warning("live command %r timed out", request.get("type"))
            return {"ok": False, "error": f"timed out after {self.options.command_timeout_s} s"}
        except Exception:
            log.exception("live command %r failed", request.get("type"))
            return {"ok": False, "error": "internal error"}
        return result


async def serve_live(
    websocket: WebSocket,
    hub: LiveHub,
    *,
    user: object,
    snapshot_source: Callable[[], Awaitable[Snapshot]],
    on_command: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    source: BatchSource = "live",
    options: ServeOptions | None = None,
) -> None:
    """Serve one ``/api/v1/live`` websocket until it closes.

    The caller authenticates the user and checks the origin
    (:func:`check_origin`) first; this function accepts the socket if the
    caller did not. Query parameters: ``hub`` and ``seq`` (resume; both are
    needed), ``districts``, ``domains``, ``devices`` (comma-separated: the
    initial subscription; resume with the subscription you had), ``window``
    (flow control: ``readings`` frames in flight before ``received``).

    A sender and a receiver run in a task group. The sender is the only
    writer: the snapshot (or ``resumed``), then deltas as the hub wakes it,
    command results, and a heartbeat after ``heartbeat_s`` of silence. A
    client that falls too far behind gets a fresh snapshot; one that takes no
    frame for ``send_timeout_s`` is dropped. Neither ever blocks the hub or
    another client.

    Args:
        websocket: The connection.
        hub: The live hub.
        user: The authenticated caller (for logs).
        snapshot_source: Reads a fresh snapshot of ``source`` (called after the
            client is attached; again after a reset).
        on_command: Runs a client command (``ack`` and the like: any message
            but ``subscribe`` and ``resume``) with the same checks as REST; its
            result goes back as ``{"type": "result", "id": <the message's id>, …}``.
        source: The source the client follows.
        options: Timing and limits.
    """
    opts = options or ServeOptions()
    if websocket.application_state is WebSocketState.CONNECTING:
        await websocket.accept()
    name = f"{getattr(user, 'name', user)}@{websocket.client.host if websocket.client else '?'}"
    try:
        params = websocket.query_params
        subscription = Subscription.from_message(params)
        resume = _resume_point(params)
        window = _window(params)
        client = LiveClient(source=source, subscription=subscription, name=name)
    except LiveProtocolError as exc:
        with contextlib.suppress(Exception):
            await websocket.close(code=1008, reason=str(exc)[:120])
        return
    session = _LiveSession(
        websocket,
        hub,
        client,
        snapshot_source=snapshot_source,
        on_command=on_command,
        options=opts,
        window=window,
    )
    log.info("live client %s connected (source %s)", name, source)
    try:
        await session.run(resume)
    finally:
        hub.detach(client)
        log.info("live client %s disconnected", name)


async def run_kpi_feed(
    hub: LiveHub,
    query: Callable[[], Awaitable[Mapping[str, Any]]],
    *,
    source: BatchSource = "live",
    interval_s: float = 5.0,
) -> None:
    """Feed the hub KPI figures from ``query`` every ``interval_s`` until cancelled.

    A failed query (:class:`control_api.errors.ControlApiError`) is logged;
    the next interval tries again.
    """
    while True:
        try:
            kpis = await query()
        except ControlApiError as exc:
            log.warning("KPI query failed: %s", exc)
        else:
            hub.on_kpis(kpis, source=source)
        await asyncio.sleep(interval_s)
