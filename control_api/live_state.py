"""What the live hub holds for one source: latest values, reading epochs, alerts, rates.

Internal to :class:`control_api.live.LiveHub`, which owns one
:class:`SourceState` per source (``live``, ``replay``, ``drill``) and decides,
per client, what to send from it (the module docstring of
:mod:`control_api.live` tells how clients take readings and events).

The latest table
    Every series' latest reading (by device time: a late reading never
    replaces a newer one), with the ``seq`` of the batch that brought it, per
    device (:class:`DeviceEntry`, which also holds presence and staleness).

Reading epochs and their shared encoding
    Changes collect in the open :class:`Epoch` (series → latest reading) until
    the hub seals it. A sealed epoch builds its views once, on demand: items
    grouped by (domain, district) and encoded to JSON once per area, all of
    them joined, and per device for clients that follow single devices. So
    the encoding costs the same for one client or a thousand. Alert,
    presence and KPI events are encoded once too, as the ring's
    :class:`RingEvent` bodies.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson

from control_api.snapshot import (
    RATE_WINDOW_S,
    DeviceState,
    Kpis,
    SeriesValue,
    Snapshot,
    alert_kpis,
    device_kpis,
)
from ingest import BatchSource, DeviceRef, Presence, Reading

if TYPE_CHECKING:
    from control_api.live import LiveClient, LiveOptions, Subscription

__all__ = [
    "SOURCES",
    "Area",
    "DeviceEntry",
    "Epoch",
    "EventKind",
    "RingEvent",
    "SourceState",
    "area_of",
    "encode_items",
]

SOURCES: Final[tuple[BatchSource, ...]] = ("live", "replay", "drill")
Area = tuple[str, str]
"""(domain, district)."""
EventKind = Literal["alert", "presence", "kpis"]


def _item(r: Reading) -> list[object]:
    return [r.device.device_id, r.channel, r.ts, r.value if r.state is None else r.state]


def encode_items(readings: Iterable[Reading]) -> bytes:
    """``[…],[…]``: the items of a ``readings`` frame, without the brackets."""
    return orjson.dumps([_item(r) for r in readings])[1:-1]


def area_of(ref: DeviceRef) -> Area:
    """The (domain, district) of a device."""
    return (ref.domain, ref.district)


class DeviceEntry:
    """One device: its latest reading per channel (with its ``seq``), presence, staleness."""

    __slots__ = ("area", "device_id", "presence", "presence_at", "series", "session", "stale_since")

    def __init__(self, ref: DeviceRef) -> None:
        self.device_id = ref.device_id
        self.area: Area = (ref.domain, ref.district)
        self.series: dict[str, tuple[int, Reading]] = {}
        self.presence: Literal["online", "offline", "unknown"] = "unknown"
        self.session: int | None = None
        self.presence_at: float | None = None
        self.stale_since: float | None = None


class Epoch:
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
        """The readings grouped by (domain, district)."""
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
        """The encoded items of one area."""
        data = self._area_json.get(area)
        if data is None:
            data = self._area_json[area] = encode_items(self.areas().get(area, ()))
        return data

    def all_json(self) -> bytes:
        """The encoded items of every area."""
        if self._all is None:
            self._all = b",".join(self.area_json(a) for a in self.areas())
        return self._all

    def devices(self) -> dict[str, list[Reading]]:
        """The readings grouped by device."""
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
                    and not sub.matches_area(area_of(readings[0].device))
                ):
                    parts.append(encode_items(readings))
        return parts


class SourceState:
    """Everything the hub holds for one source."""

    def __init__(self, source: BatchSource, options: LiveOptions, now: float) -> None:
        self.source = source
        self.devices: dict[str, DeviceEntry] = {}
        self.areas: dict[Area, set[str]] = {}
        self.open = Epoch(0)
        self.sealed: collections.deque[Epoch] = collections.deque(maxlen=options.max_epochs)
        self.reading_interval_s = options.reading_interval_s
        self.last_seal_at = float("-inf")
        self.clients: set[LiveClient] = set()
        self.armed: set[LiveClient] = set()
        """Clients to wake at the next event (each is woken at most once between collects)."""
        self.alerts: dict[str, dict[str, Any]] = {}
        self.alert_versions: dict[str, int] = {}
        self.closed: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.kpis: dict[str, Any] = {}
        self.last_kpi_at = now
        self.rate: collections.deque[list[int]] = collections.deque()
        self.newest_ts: float | None = None
        self.started_at = now

    def device(self, ref: DeviceRef) -> DeviceEntry:
        """The entry of a device, created on first sight."""
        dev = self.devices.get(ref.device_id)
        if dev is None:
            dev = self.devices[ref.device_id] = DeviceEntry(ref)
            self.areas.setdefault(dev.area, set()).add(ref.device_id)
        return dev

    def matching(self, sub: Subscription) -> Iterator[DeviceEntry]:
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

    # -- readings ---------------------------------------------------------------

    def take_readings(self, readings: Sequence[Reading], seq: int) -> None:
        """Enter one batch's readings (all numbered ``seq``) in the latest table and open epoch."""
        epoch = self.open
        items = epoch.items
        was_empty = not items
        devices = self.devices
        newest = self.newest_ts if self.newest_ts is not None else float("-inf")
        for r in readings:
            device_id = r.device.device_id
            channel = r.channel
            ts = r.ts
            dev = devices.get(device_id)
            if dev is None:
                dev = self.device(r.device)
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
            self.newest_ts = newest

    def seal_due(self, now: float) -> bool:
        """Whether the open epoch may be sealed (a clock that stepped back: at once)."""
        elapsed = now - self.last_seal_at
        return elapsed >= self.reading_interval_s or elapsed < 0

    def seal(self, now: float) -> None:
        """Seal the open epoch, open the next one and wake the armed clients."""
        self.sealed.append(self.open)
        self.open = Epoch(self.open.index + 1)
        self.last_seal_at = now
        self.wake_all()

    # -- presence ---------------------------------------------------------------

    def update_presence(self, p: Presence) -> dict[str, Any] | None:
        """Take a status message; the payload of a ``presence`` event when it changed."""
        dev = self.device(p.device)
        if dev.session is not None and p.session < dev.session:
            return None  # a status of an older session: stale, as in the store
        if dev.presence == p.state:
            dev.session = p.session
            return None
        dev.presence, dev.session, dev.presence_at = p.state, p.session, p.ts
        return {
            "device": dev.device_id,
            "domain": dev.area[0],
            "district": dev.area[1],
            "presence": p.state,
            "session": p.session,
            "at": p.ts,
        }

    # -- wake-ups ---------------------------------------------------------------

    def wake_all(self) -> None:
        """Wake every armed client (something arrived for them all)."""
        armed, self.armed = self.armed, set()
        for client in armed:
            client.wake()

    def wake(self, client: LiveClient) -> None:
        """Wake one client if it is armed."""
        if client in self.armed:
            self.armed.discard(client)
            client.wake()

    # -- measures and the memory snapshot ---------------------------------------

    def count_readings(self, now: float, n: int) -> None:
        """Count ``n`` committed readings for the reading rate."""
        second = int(now)
        if self.rate and self.rate[-1][0] == second:
            self.rate[-1][1] += n
        else:
            self.rate.append([second, n])
        while self.rate and self.rate[0][0] <= now - RATE_WINDOW_S:
            self.rate.popleft()

    def measured(self, now: float) -> dict[str, Any]:
        """The measured KPIs: committed readings per second and data freshness."""
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

    def snapshot(self, now: float) -> Snapshot:
        """A snapshot from what was seen since the hub started (no device metadata)."""
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
            for dev in sorted(self.devices.values(), key=lambda d: d.device_id)
        )
        alerts = tuple(sorted(self.alerts.values(), key=lambda a: (a.get("raised_at", 0), a["id"])))
        by_severity, total, unacked = alert_kpis(alerts)
        measured = self.measured(now)
        kpis = Kpis(
            alerts_open=by_severity,
            alerts_open_total=total,
            alerts_unacked=unacked,
            devices=device_kpis(devices),
            readings_per_s=float(measured.get("readings_per_s", 0.0)),
            freshness_s=measured.get("freshness_s"),
            at=now,
        )
        return Snapshot(source=self.source, taken_at=now, devices=devices, alerts=alerts, kpis=kpis)


@dataclass(frozen=True, slots=True)
class RingEvent:
    """An alert, presence or KPI event in the hub's ring, encoded once."""

    seq: int
    source: BatchSource
    kind: EventKind
    body: bytes
    """The frame after ``"seq":N,``: ``"alert":{…},"event":{…}}``."""
