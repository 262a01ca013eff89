"""The live hub (pure, fake clock), ``build_snapshot`` on TimescaleDB, and ``serve_live``
over a real uvicorn server with the ``websockets`` client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
import pytest
import uvicorn
from psycopg import AsyncConnection
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from control_api.errors import LiveProtocolError, SnapshotUnavailable
from control_api.live import LiveClient, LiveHub, LiveOptions, Subscription
from control_api.live_ws import BATCH_FROM, ServeOptions, SharedSnapshots, check_origin, serve_live
from control_api.snapshot import Snapshot, build_snapshot, query_kpis
from ingest import BatchSource, CommittedBatch, DeviceRef, Domain, Presence, Reading
from tests.polling import until

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def ref(device: str, *, domain: Domain = "traffic", district: str = "north") -> DeviceRef:
    return DeviceRef(domain, district, device)


def reading(
    device: str,
    value: float | str,
    *,
    ts: float,
    channel: str = "intensity",
    domain: Domain = "traffic",
    district: str = "north",
) -> Reading:
    if isinstance(value, str):
        return Reading(
            ref(device, domain=domain, district=district), channel, ts, None, value, None
        )
    return Reading(ref(device, domain=domain, district=district), channel, ts, value, None, "1/h")


def batch(
    *readings: Reading, presences: tuple[Presence, ...] = (), source: BatchSource = "live"
) -> CommittedBatch:
    return CommittedBatch(
        readings=readings, presences=presences, dead_letters=(), committed_at=T0, source=source
    )


def alert_event(
    alert_id: str, version: int, state: str = "active_unacked", *, source: str = "live"
) -> tuple[dict[str, Any], dict[str, Any]]:
    alert = {
        "id": alert_id,
        "rule_id": "r",
        "subject": f"s-{alert_id}",
        "severity": "major",
        "state": state,
        "version": version,
        "raised_at": T0,
        "source": source,
    }
    event = {"alert_id": alert_id, "version": version, "action": "raise", "to_state": state}
    return alert, event


@dataclass
class Console:
    """A model browser: applies frames the way the console does, checks the protocol."""

    hub: LiveHub
    subscription: Subscription = field(default_factory=Subscription)
    source: BatchSource = "live"
    client: LiveClient = field(init=False)
    values: dict[tuple[str, str], tuple[float, object]] = field(default_factory=dict)
    alert_versions: dict[str, int] = field(default_factory=dict)
    alert_log: list[tuple[str, int]] = field(default_factory=list)
    presence: dict[str, dict[str, Any]] = field(default_factory=dict)
    kpis: list[dict[str, Any]] = field(default_factory=list)
    deliveries: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    seq: int = 0
    woken: int = 0
    resets: int = 0

    def __post_init__(self) -> None:
        self.client = self.new_client()

    def new_client(self) -> LiveClient:
        return LiveClient(
            source=self.source, subscription=self.subscription, wake=self._wake, name="console"
        )

    def _wake(self) -> None:
        self.woken += 1

    def start(self) -> bool:
        attached = self.hub.attach(self.client)
        self.load(self.hub.memory_snapshot(self.source), attached.seq)
        return attached.resumed

    def load(self, snapshot: Snapshot, seq: int) -> None:
        frame = orjson.loads(self.hub.snapshot_frame(snapshot, seq=seq))
        assert frame["type"] == "snapshot"
        self.seq = frame["seq"]
        for device in frame["devices"]:
            for channel, s in device["series"].items():
                value = s["value"] if s["state"] is None else s["state"]
                self.values[(device["id"], channel)] = (s["ts"], value)
        for alert in frame["alerts"]:
            self.alert_versions[alert["id"]] = alert["version"]

    def reconnect(self) -> bool:
        """Disconnect, then connect a new client with the last seq (browser state kept)."""
        self.hub.detach(self.client)
        self.client = self.new_client()
        attached = self.hub.attach(self.client, self.seq, hub_id=self.hub.hub_id)
        if not attached.resumed:
            self.load(self.hub.memory_snapshot(self.source), attached.seq)
        return attached.resumed

    def pump(self) -> list[dict[str, Any]]:
        """Collect until nothing is left; apply every frame."""
        frames: list[dict[str, Any]] = []
        while True:
            self.hub.tick()
            delivery = self.hub.collect(self.client)
            if delivery.reset:
                self.resets += 1
                attached = self.hub.attach(self.client)
                self.load(self.hub.memory_snapshot(self.source), attached.seq)
                continue
            for raw in delivery.frames:
                frame = orjson.loads(raw)
                self.apply(frame)
                frames.append(frame)
            assert delivery.seq >= self.seq
            self.seq = delivery.seq
            if not delivery.more:
                return frames

    def apply(self, frame: dict[str, Any]) -> None:
        assert frame["seq"] >= self.seq, "seq went down"
        self.seq = frame["seq"]
        kind = frame["type"]
        if kind == "readings":
            seen: set[tuple[str, str]] = set()
            for device, channel, ts, value in frame["items"]:
                key = (device, channel)
                assert key not in seen, f"{key} twice in one frame"
                seen.add(key)
                self.values[key] = (ts, value)
                self.deliveries.setdefault(key, []).append(self.hub.now())
        elif kind == "alert":
            alert_id, version = frame["alert"]["id"], frame["event"]["version"]
            if version > self.alert_versions.get(alert_id, 0):
                self.alert_versions[alert_id] = version
                self.alert_log.append((alert_id, version))
        elif kind == "presence":
            self.presence.setdefault(frame["device"], {}).update(frame)
        elif kind == "kpis":
            self.kpis.append(frame["kpis"])
        else:
            msg = f"unexpected frame {frame}"
            raise AssertionError(msg)


def latest_truth(
    hub: LiveHub, source: BatchSource = "live"
) -> dict[tuple[str, str], tuple[float, object]]:
    snap = hub.memory_snapshot(source)
    return {
        (d["id"], channel): (s["ts"], s["value"] if s["state"] is None else s["state"])
        for d in snap.devices
        for channel, s in d["series"].items()
        if s["ts"] is not None
    }


# -- readings: coalescing and filters --------------------------------------------------


def test_a_series_reaches_a_client_at_most_four_times_a_second() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock)
    console = Console(hub)
    console.start()
    for i in range(300):  # 3 s, a reading every 10 ms
        hub.on_batch(batch(reading("d1", float(i), ts=clock.t)))
        console.pump()
        clock.advance(0.01)
    clock.advance(1.0)
    console.pump()
    times = console.deliveries[("d1", "intensity")]
    assert len(times) <= 3 / 0.25 + 2
    assert all(b - a >= 0.25 - 1e-9 for a, b in itertools.pairwise(times))
    assert console.values[("d1", "intensity")][1] == 299.0  # the last value always arrives


def test_first_change_after_a_quiet_spell_goes_out_at_once() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock)
    console = Console(hub)
    console.start()
    hub.on_batch(batch(reading("d1", 1.0, ts=clock.t)))
    assert console.woken == 1
    frames = console.pump()
    assert [f["items"] for f in frames] == [[["d1", "intensity", clock.t, 1.0]]]
    clock.advance(0.05)
    hub.on_batch(batch(reading("d1", 2.0, ts=clock.t)))
    assert console.pump() == []  # inside the interval: held, coalesced
    assert hub.seconds_until_due() == pytest.approx(0.2)
    clock.advance(0.2)
    frames = console.pump()  # the deadline passed: tick seals, the client takes it
    assert frames[0]["items"] == [["d1", "intensity", clock.t - 0.2, 2.0]]


def test_late_reading_never_replaces_a_newer_value() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock)
    console = Console(hub)
    console.start()
    hub.on_batch(batch(reading("d1", 5.0, ts=T0), reading("d1", 4.0, ts=T0 - 60)))
    clock.advance(1)
    hub.on_batch(batch(reading("d1", 3.0, ts=T0 - 30)))
    console.pump()
    assert console.values[("d1", "intensity")] == (T0, 5.0)


def test_state_readings_carry_the_state_string() -> None:
    hub = LiveHub(clock=FakeClock())
    console = Console(hub)
    console.start()
    hub.on_batch(batch(reading("s1", "alarm", ts=T0, channel="status", domain="emergency")))
    frames = console.pump()
    assert frames[0]["items"] == [["s1", "status", T0, "alarm"]]


CITY: list[tuple[str, Domain, str]] = [
    ("n-t1", "traffic", "north"),
    ("n-t2", "traffic", "north"),
    ("n-f1", "facility", "north"),
    ("s-t1", "traffic", "south"),
    ("s-f1", "facility", "south"),
    ("s-e1", "emergency", "south"),
]


def city_batch(clock: FakeClock, value: float) -> CommittedBatch:
    return batch(*(reading(d, value, ts=clock.t, domain=dom, district=dis) for d, dom, dis in CITY))


@pytest.mark.parametrize(
    ("subscription", "expected"),
    [
        (Subscription(), {d for d, _, _ in CITY}),
        (Subscription(districts=frozenset({"north"})), {"n-t1", "n-t2", "n-f1"}),
        (Subscription(domains=frozenset({"traffic"})), {"n-t1", "n-t2", "s-t1"}),
        (
            Subscription(districts=frozenset({"south"}), domains=frozenset({"facility"})),
            {"s-f1"},
        ),
        (Subscription(devices=frozenset({"n-t2", "s-e1", "unknown"})), {"n-t2", "s-e1"}),
        (
            Subscription(districts=frozenset({"north"}), devices=frozenset({"s-e1", "n-t1"})),
            {"n-t1", "n-t2", "n-f1", "s-e1"},
        ),
    ],
)
def test_reading_deltas_follow_the_subscription(
    subscription: Subscription, expected: set[str]
) -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock)
    console = Console(hub, subscription=subscription)
    console.start()
    other = Console(hub)  # another client, subscribed to everything, shares the epochs
    other.start()
    for step in range(3):
        hub.on_batch(city_batch(clock, float(step)))
        clock.advance(0.3)
        other.pump()
        for frame in console.pump():
            assert {item[0] for item in frame["items"]} == expected
    assert {d for d, _ in console.deliveries} == expected
    assert {d for d, _ in other.deliveries} == {d for d, _, _ in CITY}


def test_alerts_and_presence_reach_every_subscription() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock)
    console = Console(hub, subscription=Subscription(devices=frozenset({"nothing-here"})))
    console.start()
    hub.on_alert_event(*alert_event("a1", 1))
    hub.on_batch(batch(presences=(Presence(ref("s-e1", district="south"), "online", 1, T0),)))
    frames = console.pump()
    assert [f["type"] for f in frames] == ["alert", "presence"]


def test_subscribing_sends_the_latest_values_of_what_it_adds() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock)
    console = Console(hub, subscription=Subscription(districts=frozenset({"north"})))
    console.start()
    hub.on_batch(city_batch(clock, 1.0))
    console.pump()
    assert ("s-t1", "intensity") not in console.deliveries
    hub.subscribe(console.client, Subscription(districts=frozenset({"north", "south"})))
    assert console.woken >= 2
    frames = console.pump()
    added = {item[0] for f in frames for item in f["items"]}
    assert added == {"s-t1", "s-f1", "s-e1"}  # only what the subscription added
    hub.subscribe(console.client, Subscription(devices=frozenset({"n-t1"})))
    assert console.pump() == []  # narrowing adds nothing


def test_a_client_behind_several_epochs_gets_each_series_once() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock, options=LiveOptions(max_epochs=8))
    console = Console(hub, subscription=Subscription(domains=frozenset({"traffic"})))
    console.start()
    for step in range(5):  # five sealed epochs the client did not take
        hub.on_batch(city_batch(clock, float(step)))
        clock.advance(0.3)
    frames = console.pump()  # Console.apply asserts each series once per frame
    assert len([f for f in frames if f["type"] == "readings"]) == 1
    assert console.values[("n-t1", "intensity")][1] == 4.0
    assert ("n-f1", "intensity") not in console.values


def test_a_client_behind_every_kept_epoch_catches_up_from_the_latest_values() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock, options=LiveOptions(max_epochs=2))
    console = Console(hub)
    console.start()
    hub.on_batch(city_batch(clock, 0.0))
    console.pump()
    for step in range(1, 6):
        hub.on_batch(batch(reading("n-t1", float(step), ts=clock.t)))
        clock.advance(0.3)
    frames = console.pump()
    assert [item[0] for f in frames for item in f["items"]] == ["n-t1"]  # only what changed
    assert console.values == latest_truth(hub)


# -- alerts, presence, KPIs ------------------------------------------------------------


def test_alert_events_arrive_in_order_and_duplicates_are_dropped() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock)
    console = Console(hub)
    console.start()
    rng = random.Random(7)
    fed: list[tuple[str, int]] = []
    versions = dict.fromkeys(("a1", "a2", "a3", "a4"), 0)
    for i in range(200):
        alert_id = rng.choice(list(versions))
        versions[alert_id] += 1
        hub.on_alert_event(*alert_event(alert_id, versions[alert_id]))
        fed.append((alert_id, versions[alert_id]))
        if rng.random() < 0.2:  # an MQTT redelivery
            hub.on_alert_event(*alert_event(alert_id, versions[alert_id]))
        hub.on_batch(batch(reading(f"d{i % 7}", float(i), ts=clock.t)))
        clock.advance(0.01)
        if rng.random() < 0.3:
            console.pump()
    console.pump()
    assert console.alert_log == fed
    assert hub.stats()["duplicate_alert_events"] > 0


def test_closed_alert_leaves_the_open_set_and_a_late_duplicate_is_dropped() -> None:
    hub = LiveHub(clock=FakeClock())
    hub.on_alert_event(*alert_event("a1", 1))
    hub.on_alert_event(*alert_event("a1", 2, "closed"))
    assert hub.memory_snapshot().alerts == ()
    console = Console(hub)
    console.start()
    hub.on_alert_event(*alert_event("a1", 2, "closed"))
    hub.on_alert_event(*alert_event("a1", 1))
    assert console.pump() == []


def test_alert_message_from_mqtt_is_parsed_and_malformed_ones_are_refused() -> None:
    hub = LiveHub(clock=FakeClock())
    console = Console(hub)
    console.start()
    alert, event = alert_event("a9", 3)
    assert hub.on_alert_message(orjson.dumps({"alert": alert, "event": event}))
    assert not hub.on_alert_message(b"{nope")
    assert not hub.on_alert_message(b'{"alert": {"id": "x"}, "event": {}}')
    with pytest.raises(LiveProtocolError, match="not an integer"):
        hub.on_alert_event(alert, {"version": "3"})
    frames = console.pump()
    assert [(f["alert"]["id"], f["event"]["version"]) for f in frames] == [("a9", 3)]


def test_presence_changes_only_and_older_sessions_are_ignored() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock)
    console = Console(hub)
    console.start()
    d = ref("d1")
    hub.on_batch(
        batch(
            presences=(
                Presence(d, "online", 5, T0),
                Presence(d, "online", 5, T0 + 1),  # retained message seen again
                Presence(d, "offline", 4, T0 + 2),  # an older session's will
                Presence(d, "offline", 5, T0 + 3),
                Presence(d, "online", 6, T0 + 4),
            )
        )
    )
    hub.on_staleness("d1", stale=True, at=T0 + 5)
    hub.on_staleness("d1", stale=True, at=T0 + 6)  # no change
    hub.on_staleness("d1", stale=False, at=T0 + 7)
    frames = console.pump()
    assert [(f.get("presence"), f.get("session"), f.get("stale")) for f in frames] == [
        ("online", 5, None),
        ("offline", 5, None),
        ("online", 6, None),
        (None, None, True),
        (None, None, False),
    ]
    assert frames[0]["domain"] == "traffic"
    assert frames[0]["district"] == "north"


def test_kpis_carry_the_measured_rate_and_freshness_and_only_the_newest_is_sent() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock, options=LiveOptions(kpi_interval_s=1.0))
    console = Console(hub)
    console.start()
    for _ in range(20):  # 10 readings every 0.5 s: 20 readings/s
        hub.on_batch(batch(*(reading(f"d{i}", 1.0, ts=clock.t - 2) for i in range(10))))
        clock.advance(0.5)
    hub.on_kpis({"alerts_open_total": 3, "readings_per_s": 999.0})
    hub.on_kpis({"alerts_open_total": 4, "readings_per_s": 999.0})
    console.pump()
    assert len(console.kpis) == 1  # superseded KPI updates are not sent
    kpis = console.kpis[0]
    assert kpis["alerts_open_total"] == 4
    assert kpis["readings_per_s"] == pytest.approx(20.0, rel=0.1)
    assert kpis["freshness_s"] == pytest.approx(2.5)
    clock.advance(1.0)
    console.pump()  # tick: the periodic KPI update is due
    assert len(console.kpis) == 2


# -- sources -------------------------------------------------------------------------


def test_replay_and_drill_never_reach_live_clients() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock)
    live = Console(hub)
    live.start()
    replay = Console(hub, source="replay")
    replay.start()
    hub.on_batch(batch(reading("d1", 1.0, ts=T0), source="replay"))
    hub.on_batch(batch(reading("d1", 2.0, ts=T0), source="drill"))
    hub.on_alert_event(*alert_event("r1", 1, source="replay"))
    hub.on_alert_event(*alert_event("l1", 1))
    assert [f["type"] for f in live.pump()] == ["alert"]
    assert live.alert_log == [("l1", 1)]
    assert live.values == {}
    replay.pump()
    assert replay.alert_log == [("r1", 1)]
    assert replay.values == {("d1", "intensity"): (T0, 1.0)}


# -- resume and slow clients ---------------------------------------------------------


def test_resume_within_the_ring_delivers_what_was_missed() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock)
    console = Console(hub)
    console.start()
    hub.on_batch(city_batch(clock, 1.0))
    hub.on_alert_event(*alert_event("a1", 1))
    console.pump()
    hub.detach(console.client)  # the browser loses its connection
    clock.advance(1.0)
    hub.on_alert_event(*alert_event("a1", 2, "active_acked"))
    hub.on_alert_event(*alert_event("a2", 1))
    hub.on_batch(batch(reading("n-t1", 2.0, ts=clock.t)))
    hub.on_batch(batch(presences=(Presence(ref("s-e1", district="south"), "offline", 1, clock.t),)))
    clock.advance(1.0)
    hub.on_batch(batch(reading("s-f1", 3.0, ts=clock.t, domain="facility", district="south")))
    assert console.reconnect()  # resumed: no snapshot
    frames = console.pump()
    frames = [f for f in frames if f["type"] != "kpis"]  # a periodic KPI update is due too
    assert [f["type"] for f in frames] == ["alert", "alert", "presence", "readings"]
    assert console.alert_log == [("a1", 1), ("a1", 2), ("a2", 1)]
    assert sorted(item[0] for item in frames[-1]["items"]) == ["n-t1", "s-f1"]  # changed only
    assert console.values == latest_truth(hub)


def test_resume_too_far_behind_or_from_another_hub_gets_a_snapshot() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock, options=LiveOptions(ring_size=8))
    console = Console(hub)
    console.start()
    console.pump()
    last = console.seq
    for version in range(1, 12):  # more events than the ring holds
        hub.on_alert_event(*alert_event("a1", version))
    client = LiveClient()
    assert not hub.attach(client, last, hub_id=hub.hub_id).resumed
    assert hub.attach(client, hub.seq - 3, hub_id=hub.hub_id).resumed
    assert not hub.attach(client, hub.seq - 3, hub_id="another-process").resumed
    assert not hub.attach(client, hub.seq + 1, hub_id=hub.hub_id).resumed
    assert not console.reconnect()  # Console.reconnect loads a fresh snapshot
    assert console.alert_versions == {"a1": 11}


def test_a_client_that_never_reads_does_not_affect_others_nor_grow_memory() -> None:
    clock = FakeClock()
    options = LiveOptions(ring_size=64, max_epochs=4)
    hub = LiveHub(clock=clock, options=options)
    slow = Console(hub)
    slow.start()
    fast = Console(hub, subscription=Subscription(districts=frozenset({"north"})))
    fast.start()
    fed: list[tuple[str, int]] = []
    for step in range(1, 2001):
        hub.on_alert_event(*alert_event(f"a{step % 5}", step))
        fed.append((f"a{step % 5}", step))
        hub.on_batch(city_batch(clock, float(step)))
        clock.advance(0.1)
        fast.pump()
        stats = hub.stats()
        assert stats["ring_events"] <= options.ring_size
        assert stats["sealed_epochs"] <= options.max_epochs * 3
    clock.advance(1.0)
    fast.pump()
    assert fast.alert_log == fed
    assert fast.resets == 0
    assert fast.values == {k: v for k, v in latest_truth(hub).items() if k[0].startswith("n-")}
    delivery = hub.collect(slow.client)
    assert delivery.reset
    assert delivery.frames == []
    assert slow.client.resets == 1
    slow.pump()  # the reset: a fresh snapshot, then the stream again
    assert slow.resets == 1
    assert slow.values == latest_truth(hub)


def test_random_disconnects_and_slow_reads_lose_nothing() -> None:
    rng = random.Random(20240611)
    clock = FakeClock()
    hub = LiveHub(clock=clock, options=LiveOptions(ring_size=200, max_epochs=3))
    console = Console(hub)
    console.start()
    versions: dict[str, int] = {}
    resumed = 0
    for step in range(3000):
        roll = rng.random()
        if roll < 0.3:
            alert_id = f"a{rng.randrange(6)}"
            versions[alert_id] = versions.get(alert_id, 0) + 1
            hub.on_alert_event(*alert_event(alert_id, versions[alert_id]))
        elif roll < 0.35:
            hub.on_batch(
                batch(presences=(Presence(ref(f"d{rng.randrange(4)}"), "online", step, clock.t),))
            )
        else:
            hub.on_batch(
                batch(
                    *(
                        reading(f"d{rng.randrange(40)}", float(step), ts=clock.t)
                        for _ in range(rng.randrange(1, 6))
                    )
                )
            )
        clock.advance(rng.choice((0.001, 0.01, 0.1, 0.3)))
        action = rng.random()
        if action < 0.02:
            resumed += console.reconnect()
        elif action < 0.5:
            console.pump()
    clock.advance(1.0)
    console.pump()
    assert resumed > 10
    assert console.values == latest_truth(hub)
    assert console.alert_versions == versions


def test_held_readings_coalesce_while_alerts_go_on() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock)
    console = Console(hub)
    console.start()
    for step in range(10):
        hub.on_batch(city_batch(clock, float(step)))
        hub.on_alert_event(*alert_event("a1", step + 1))
        clock.advance(0.3)
        delivery = hub.collect(console.client, readings=False)  # window full
        assert not delivery.readings
        assert [orjson.loads(f)["type"] for f in delivery.frames] == ["alert"]
    delivery = hub.collect(console.client)
    assert delivery.readings
    frame = orjson.loads(delivery.frames[-1])
    assert {tuple(item[:2]): item[3] for item in frame["items"]} == {
        (d, "intensity"): 9.0 for d, _, _ in CITY
    }


async def test_shared_snapshots_serve_waiting_clients_with_one_read() -> None:
    hub = LiveHub()
    started = asyncio.Event()
    release = asyncio.Event()

    async def read() -> Snapshot:
        started.set()
        await release.wait()
        return hub.memory_snapshot()

    shared = SharedSnapshots(read)
    first = asyncio.create_task(shared())
    await started.wait()  # a read runs: later callers must wait for the next one
    later = [asyncio.create_task(shared()) for _ in range(5)]
    release.set()
    snapshots = await asyncio.gather(first, *later)
    assert shared.reads == 2
    assert snapshots[1] is snapshots[5]
    assert snapshots[0] is not snapshots[1]
    frames = [hub.snapshot_frame(snapshots[1], seq=n) for n in (1, 2)]
    assert orjson.loads(frames[0])["seq"] == 1
    assert orjson.loads(frames[1])["devices"] == []


async def test_shared_snapshots_pass_a_failure_to_every_waiter() -> None:
    async def read() -> Snapshot:
        msg = "snapshot of the 'live' source failed: down"
        raise SnapshotUnavailable(msg)

    shared = SharedSnapshots(read)
    results = await asyncio.gather(shared(), shared(), return_exceptions=True)
    assert all(isinstance(r, SnapshotUnavailable) for r in results)


# -- frames and helpers --------------------------------------------------------------


def test_snapshot_and_heartbeat_frames_carry_the_resume_point() -> None:
    clock = FakeClock()
    hub = LiveHub(clock=clock, hub_id="h1")
    hub.on_batch(batch(reading("d1", 1.0, ts=T0)))
    hub.on_alert_event(*alert_event("a1", 1))
    client = LiveClient()
    attached = hub.attach(client)
    snap = orjson.loads(hub.snapshot_frame(hub.memory_snapshot(), seq=attached.seq))
    assert snap["seq"] == hub.seq == 2
    assert snap["hub"] == "h1"
    assert snap["devices"][0]["series"]["intensity"]["value"] == 1.0
    assert [a["id"] for a in snap["alerts"]] == ["a1"]
    assert snap["kpis"]["alerts_open"]["major"] == 1
    heartbeat = orjson.loads(hub.heartbeat_frame(client))
    assert heartbeat == {"type": "heartbeat", "seq": 2, "hub": "h1", "ts": T0}


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        ("https://ops.example.org", ["https://ops.example.org"], True),
        ("https://OPS.example.org:443", ["https://ops.example.org/"], True),
        ("http://localhost:8080", ["http://localhost:8080"], True),
        ("http://localhost:8081", ["http://localhost:8080"], False),
        ("https://ops.example.org", ["http://ops.example.org"], False),
        ("https://evil.example.org", ["https://ops.example.org"], False),
        ("null", ["https://ops.example.org"], False),
        ("https://ops.example.org:notaport", ["https://ops.example.org"], False),
        ("https://anything.test", ["*"], True),
        ("http://[::1]:8080", ["http://[::1]:8080"], True),
    ],
)
def test_check_origin(origin: str, allowed: list[str], ok: bool) -> None:
    assert check_origin(origin, allowed) is ok


def test_check_origin_without_header() -> None:
    assert not check_origin(None, ["https://ops.example.org"])
    assert check_origin(None, ["https://ops.example.org"], allow_missing=True)


def test_subscription_messages_are_validated() -> None:
    sub = Subscription.from_message({"districts": "north,south", "devices": ["d1"]})
    assert sub.districts == {"north", "south"}
    assert sub.devices == {"d1"}
    with pytest.raises(LiveProtocolError, match="list of names"):
        Subscription.from_message({"domains": 3})
    with pytest.raises(LiveProtocolError, match="not a name"):
        Subscription.from_message({"devices": ["", "x"]})


# -- build_snapshot against TimescaleDB ----------------------------------------------

_NOW = time.time()


def _seed_live(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO devices (id, domain, district, kind, name, lat, lon, presence,"
            " presence_session, stale_since, out_of_service) VALUES"
            " ('d1', 'traffic', 'north', 'loop', 'Loop 1', 52.1, 4.3, 'online', 3, NULL, false),"
            " ('d2', 'facility', 'south', 'tank', NULL, NULL, NULL, 'offline', 1, NULL, true),"
            " ('d3', 'traffic', 'south', NULL, NULL, NULL, NULL, 'online', 2,"
            "  to_timestamp(%s), false),"
            " ('d4', 'emergency', 'north', NULL, NULL, NULL, NULL, 'unknown', NULL, NULL, false)",
            (_NOW - 100,),
        )
        conn.execute(
            "INSERT INTO series (device_id, channel, unit) VALUES"
            " ('d1', 'intensity', '1/h'), ('d1', 'status', NULL), ('d2', 'level', 'm')"
        )
        ids: dict[str, int] = dict(
            conn.execute("SELECT device_id || '/' || channel, id FROM series").fetchall()
        )
        rows = [
            (ids["d1/intensity"], _NOW - 30 * 86400, 1.0, None),  # an older chunk
            (ids["d1/intensity"], _NOW - 20, 2.0, None),
            (ids["d1/intensity"], _NOW - 10, 3.0, None),
            (ids["d1/status"], _NOW - 50, None, "normal"),
            (ids["d1/status"], _NOW - 40, None, "fault"),
        ]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO readings (ts, series_id, value, state, received_at)"
                " VALUES (to_timestamp(%s), %s, %s, %s, now())",
                [(ts, sid, v, s) for sid, ts, v, s in rows],
            )
        alerts = [
            ("a1", "critical", "active_unacked", False, "live", None),
            ("a2", "major", "active_acked", True, "live", None),
            ("a3", "minor", "closed", True, "live", None),
            ("a4", "warning", "cleared_unacked", False, "live", None),
            ("a5", "major", "active_unacked", False, "drill", None),
            ("a6", "major", "active_unacked", False, "replay", "run-b"),
        ]
        for n, (alert_id, severity, state, acked, source, run_id) in enumerate(alerts):
            conn.execute(
                "INSERT INTO alerts (id, rule_id, subject, severity, state, version, message,"
                " raised_at, updated_at, active, acked, occurrences, unacked_since, device_id,"
                " district, source, run_id) VALUES (%s, 'rule', %s, %s, %s, 2, 'm',"
                " to_timestamp(%s), to_timestamp(%s), true, %s, 1, to_timestamp(%s), 'd1',"
                " 'north', %s, %s)",
                (
                    alert_id,
                    f"subject-{alert_id}",
                    severity,
                    state,
                    _NOW - 100 + n,
                    _NOW - 50,
                    acked,
                    _NOW - 100,
                    source,
                    run_id,
                ),
            )


async def test_build_snapshot_reads_devices_latest_values_open_alerts_and_kpis(
    database_url: str,
) -> None:
    _seed_live(database_url)
    async with await AsyncConnection.connect(database_url) as conn:
        snap = await build_snapshot(conn, clock=lambda: _NOW)
    devices = {d["id"]: d for d in snap.devices}
    assert list(devices) == ["d1", "d2", "d3", "d4"]
    d1 = devices["d1"]
    assert (d1["domain"], d1["district"], d1["kind"], d1["lat"]) == (
        "traffic",
        "north",
        "loop",
        52.1,
    )
    assert d1["presence"] == "online"
    assert d1["session"] == 3
    assert d1["series"]["intensity"] == {
        "ts": pytest.approx(_NOW - 10),
        "value": 3.0,
        "state": None,
        "unit": "1/h",
    }
    assert d1["series"]["status"]["state"] == "fault"
    assert devices["d2"]["series"]["level"]["ts"] is None  # a series without readings
    assert devices["d2"]["out_of_service"]
    assert devices["d3"]["stale_since"] == pytest.approx(_NOW - 100)
    assert devices["d4"]["series"] == {}
    assert [a["id"] for a in snap.alerts] == ["a1", "a2", "a4"]
    assert snap.alerts[0]["raised_at"] == pytest.approx(_NOW - 100)
    assert snap.alerts[0]["severity"] == "critical"
    kpis = snap.kpis
    assert kpis["alerts_open"] == {"critical": 1, "major": 1, "minor": 0, "warning": 1}
    assert kpis["alerts_open_total"] == 3
    assert kpis["alerts_unacked"] == 2
    assert kpis["devices"] == {
        "online": 1,
        "offline": 1,
        "stale": 1,
        "unknown": 1,
        "out_of_service": 1,
        "total": 4,
    }
    assert kpis["freshness_s"] == pytest.approx(10.0, abs=0.01)
    assert kpis["readings_per_s"] >= 0.0
    async with await AsyncConnection.connect(database_url) as conn:
        figures = await query_kpis(conn, clock=lambda: _NOW)
        drill = await build_snapshot(conn, source="drill")
    assert {k: figures[k] for k in ("alerts_open", "alerts_unacked", "devices")} == {
        k: kpis[k] for k in ("alerts_open", "alerts_unacked", "devices")
    }
    assert figures["freshness_s"] == pytest.approx(10.0, abs=0.01)
    assert [a["id"] for a in drill.alerts] == ["a5"]


async def test_build_snapshot_of_a_replay_run(database_url: str) -> None:
    _seed_live(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO replay.runs (run_id, last_seen) VALUES"
            " ('run-a', now() - interval '1 hour'), ('run-b', now())"
        )
        conn.execute(
            "INSERT INTO replay.devices (id, domain, district) VALUES ('d1', 'traffic', 'north')"
        )
        sid = conn.execute(
            "INSERT INTO replay.series (device_id, channel) VALUES ('d1', 'intensity') RETURNING id"
        ).fetchone()
        assert sid is not None
        for run, value in (("run-a", 10.0), ("run-b", 20.0)):
            conn.execute(
                "INSERT INTO replay.readings (run_id, ts, series_id, value, received_at)"
                " VALUES (%s, to_timestamp(%s), %s, %s, now())",
                (run, _NOW - 5, sid[0], value),
            )
    async with await AsyncConnection.connect(database_url) as conn:
        latest = await build_snapshot(conn, source="replay")
        run_a = await build_snapshot(conn, source="replay", run_id="run-a")
    assert latest.run_id == "run-b"
    assert latest.devices[0]["series"]["intensity"]["value"] == 20.0
    assert latest.devices[0]["kind"] == "loop"  # borrowed from the live registry
    assert [a["id"] for a in latest.alerts] == ["a6"]
    assert run_a.devices[0]["series"]["intensity"]["value"] == 10.0
    assert run_a.alerts == ()


async def test_query_kpis_counts_recent_readings(database_url: str) -> None:
    _seed_live(database_url)
    with psycopg.connect(database_url) as conn:
        # Device time ahead of the database clock: inside the window whenever the query runs.
        conn.execute(
            "INSERT INTO readings (ts, series_id, value, received_at)"
            " SELECT now() + make_interval(secs => g), s.id, 1.0, now()"
            " FROM generate_series(1, 5) g, series s WHERE s.channel = 'level'"
        )
    async with await AsyncConnection.connect(database_url) as conn:
        kpis = await query_kpis(conn)
    assert kpis["readings_per_s"] == pytest.approx(0.5)
    assert kpis["freshness_s"] == 0.0


async def test_build_snapshot_failure_names_the_source(database_url: str) -> None:
    async with await AsyncConnection.connect(database_url) as conn:
        await conn.execute("DROP TABLE alert_events, alerts CASCADE")
        with pytest.raises(SnapshotUnavailable, match="'live' source"):
            await build_snapshot(conn)


# -- serve_live over a real server ---------------------------------------------------

ORIGIN = Origin("http://console.test")


@dataclass
class Served:
    url: str
    commands: list[dict[str, Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def live_server(
    hub: LiveHub,
    snapshot_source: Callable[[BatchSource], Awaitable[Snapshot]],
    options: ServeOptions | None = None,
) -> AsyncIterator[Served]:
    served = Served(url="")

    async def on_command(message: dict[str, Any]) -> dict[str, Any]:
        served.commands.append(message)
        if message["type"] != "ack":
            return {"ok": False, "status": 400, "error": f"unknown command {message['type']!r}"}
        return {"ok": True, "alert_id": message["alert_id"], "version": message["version"] + 1}

    async def endpoint(websocket: WebSocket) -> None:
        if not check_origin(websocket.headers.get("origin"), [ORIGIN]):
            await websocket.close(code=1008)
            return
        source: BatchSource = (
            "replay" if websocket.query_params.get("source") == "replay" else "live"
        )
        await serve_live(
            websocket,
            hub,
            user="tester",
            snapshot_source=lambda: snapshot_source(source),
            on_command=on_command,
            source=source,
            options=options,
        )

    app = Starlette(routes=[WebSocketRoute("/api/v1/live", endpoint)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started or task.done())
        served.url = f"ws://127.0.0.1:{sock.getsockname()[1]}/api/v1/live"
        yield served
    finally:
        server.should_exit = True
        await task
        sock.close()


def db_snapshots(url: str) -> Callable[[BatchSource], Awaitable[Snapshot]]:
    async def read(source: BatchSource) -> Snapshot:
        async with await AsyncConnection.connect(url) as conn:
            return await build_snapshot(conn, source=source)

    return read


async def next_frame(ws: ClientConnection, kind: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The next frame of this type (skipping KPI updates and heartbeats of other types)."""
    pending: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s):
        while True:
            if not pending:
                message: dict[str, Any] = orjson.loads(await ws.recv())
                pending = message["frames"] if message["type"] == "batch" else [message]
            frame = pending.pop(0)
            if frame["type"] == kind:
                return frame
            assert frame["type"] in ("kpis", "heartbeat", "readings", "presence"), frame


async def test_serve_live_snapshot_deltas_ack_and_resume(database_url: str) -> None:
    _seed_live(database_url)
    hub = LiveHub()
    async with live_server(hub, db_snapshots(database_url)) as served:
        async with connect(served.url, origin=ORIGIN) as ws:
            snap = await next_frame(ws, "snapshot")
            assert snap["seq"] == 0
            assert snap["hub"] == hub.hub_id
            assert [d["id"] for d in snap["devices"]] == ["d1", "d2", "d3", "d4"]
            assert [a["id"] for a in snap["alerts"]] == ["a1", "a2", "a4"]
            hub.on_batch(batch(reading("d1", 4.0, ts=time.time())))
            frame = await next_frame(ws, "readings")
            assert frame["items"][0][:2] == ["d1", "intensity"]
            assert frame["items"][0][3] == 4.0
            hub.on_alert_event(*alert_event("a1", 3, "active_acked"))
            frame = await next_frame(ws, "alert")
            assert (frame["alert"]["id"], frame["event"]["version"]) == ("a1", 3)
            await ws.send(orjson.dumps({"type": "ack", "id": 7, "alert_id": "a4", "version": 2}))
            result = await next_frame(ws, "result")
            assert result == {"type": "result", "id": 7, "ok": True, "alert_id": "a4", "version": 3}
            assert served.commands[0]["alert_id"] == "a4"
            await ws.send(b"not json")
            error = await next_frame(ws, "error")
            assert "not JSON" in error["error"]
            last_seq = frame["seq"]
        await until(lambda: hub.stats()["clients"] == 0)
        # Missed while disconnected:
        hub.on_alert_event(*alert_event("a2", 3, "closed"))
        hub.on_batch(batch(reading("d1", 5.0, ts=time.time())))
        url = f"{served.url}?hub={hub.hub_id}&seq={last_seq}"
        async with connect(url, origin=ORIGIN) as ws:
            resumed = await next_frame(ws, "resumed")
            assert resumed["seq"] == last_seq
            frame = await next_frame(ws, "alert")
            assert (frame["alert"]["id"], frame["alert"]["state"]) == ("a2", "closed")
            frame = await next_frame(ws, "readings")
            assert frame["items"][0][3] == 5.0
        async with connect(f"{served.url}?hub=old-process&seq=3", origin=ORIGIN) as ws:
            snap = await next_frame(ws, "snapshot")  # another hub's seq: a fresh snapshot
            assert snap["seq"] == hub.seq


async def test_serve_live_subscription_resume_message_and_heartbeat() -> None:
    hub = LiveHub()

    async def memory(source: BatchSource) -> Snapshot:
        return hub.memory_snapshot(source)

    options = ServeOptions(heartbeat_s=0.2)
    async with live_server(hub, memory, options) as served:
        url = f"{served.url}?districts=south"
        async with connect(url, origin=ORIGIN) as ws:
            await next_frame(ws, "snapshot")
            heartbeat = await next_frame(ws, "heartbeat")
            assert heartbeat["hub"] == hub.hub_id
            hub.on_batch(
                batch(
                    reading("n1", 1.0, ts=time.time()),
                    reading("s1", 2.0, ts=time.time(), district="south"),
                )
            )
            frame = await next_frame(ws, "readings")
            assert [item[0] for item in frame["items"]] == ["s1"]
            await ws.send(orjson.dumps({"type": "subscribe", "devices": ["n1"]}))
            frame = await next_frame(ws, "readings")  # the catch-up of what was added
            assert [item[0] for item in frame["items"]] == ["n1"]
            await ws.send(orjson.dumps({"type": "subscribe", "devices": 5, "id": "s"}))
            error = await next_frame(ws, "error")
            assert error["id"] == "s"
            await ws.send(orjson.dumps({"type": "resume"}))  # no seq: start over
            snap = await next_frame(ws, "snapshot")
            assert {d["id"] for d in snap["devices"]} == {"n1", "s1"}
            await ws.send(orjson.dumps({"type": "shelve", "id": 1}))
            result = await next_frame(ws, "result")
            assert result["ok"] is False
        assert served.commands == [{"type": "shelve", "id": 1}]


async def test_serve_live_replay_client_follows_the_replay_source() -> None:
    hub = LiveHub()

    async def memory(source: BatchSource) -> Snapshot:
        return hub.memory_snapshot(source)

    async with (
        live_server(hub, memory) as served,
        connect(f"{served.url}?source=replay", origin=ORIGIN) as replay,
        connect(served.url, origin=ORIGIN) as live,
    ):
        assert (await next_frame(replay, "snapshot"))["source"] == "replay"
        assert (await next_frame(live, "snapshot"))["source"] == "live"
        hub.on_batch(batch(reading("d1", 1.0, ts=time.time()), source="replay"))
        hub.on_batch(batch(reading("d1", 2.0, ts=time.time())))
        assert (await next_frame(replay, "readings"))["items"][0][3] == 1.0
        assert (await next_frame(live, "readings"))["items"][0][3] == 2.0


async def test_serve_live_flow_control_holds_readings_until_received() -> None:
    hub = LiveHub(options=LiveOptions(reading_interval_s=0.0))

    async def memory(source: BatchSource) -> Snapshot:
        return hub.memory_snapshot(source)

    async with (
        live_server(hub, memory) as served,
        connect(f"{served.url}?window=1", origin=ORIGIN) as ws,
    ):
        await next_frame(ws, "snapshot")
        hub.on_batch(batch(reading("d1", 1.0, ts=time.time())))
        first = await next_frame(ws, "readings")
        for value in (2.0, 3.0, 4.0):  # the window is full: these wait and coalesce
            hub.on_batch(batch(reading("d1", value, ts=time.time())))
        hub.on_alert_event(*alert_event("a1", 1))
        assert (await next_frame(ws, "alert"))["alert"]["id"] == "a1"  # alerts go on
        await ws.send(orjson.dumps({"type": "received", "seq": first["seq"]}))
        frame = await next_frame(ws, "readings")
        assert [item[3] for item in frame["items"]] == [4.0]


async def test_serve_live_refuses_a_foreign_origin_and_reports_a_missing_snapshot() -> None:
    hub = LiveHub()

    async def broken(source: BatchSource) -> Snapshot:
        msg = f"snapshot of the {source!r} source failed: database down"
        raise SnapshotUnavailable(msg)

    async with live_server(hub, broken) as served:
        with pytest.raises(InvalidStatus):
            async with connect(served.url, origin=Origin("https://evil.test")):
                pass
        async with connect(served.url, origin=ORIGIN) as ws:
            error = await next_frame(ws, "error")
            assert error["error"] == "snapshot unavailable"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1013
        await until(lambda: hub.stats()["clients"] == 0)


async def test_serve_live_drops_a_client_that_stops_reading_and_others_go_on() -> None:
    hub = LiveHub(options=LiveOptions(reading_interval_s=0.0))

    async def memory(source: BatchSource) -> Snapshot:
        return hub.memory_snapshot(source)

    options = ServeOptions(send_timeout_s=0.5)
    # max_queue=1: the stalled client's library stops reading the socket after
    # one frame, so the server's sends fill the socket buffers (uncompressed:
    # with permessage-deflate these frames shrink tenfold and take long to fill).
    async with (
        live_server(hub, memory, options) as served,
        connect(
            served.url,
            origin=ORIGIN,
            max_queue=1,
            max_size=None,
            close_timeout=1,
            compression=None,
        ) as stalled,
        connect(served.url, origin=ORIGIN, max_size=None, compression=None) as reader,
    ):
        await next_frame(stalled, "snapshot")
        await next_frame(reader, "snapshot")
        value = 0.0
        while hub.stats()["clients"] > 1:
            value += 1
            now = time.time()
            hub.on_batch(batch(*(reading(f"d{i}", value, ts=now) for i in range(20_000))))
            frame = await next_frame(reader, "readings", timeout_s=30)
            assert len(frame["items"]) == 20_000
            assert value < 200, "the stalled client was never dropped"
        hub.on_alert_event(*alert_event("a1", 1))
        assert (await next_frame(reader, "alert"))["alert"]["id"] == "a1"


async def test_serve_live_sends_a_burst_of_events_as_one_batch_message() -> None:
    """An outage ends: many presence changes at once go out as one message, in order."""
    hub = LiveHub()

    async def memory(source: BatchSource) -> Snapshot:
        return hub.memory_snapshot(source)

    async with live_server(hub, memory) as served, connect(served.url, origin=ORIGIN) as ws:
        await next_frame(ws, "snapshot")
        at = time.time()
        for i in range(50):
            hub.on_staleness(f"dev-{i}", stale=True, at=at)
        async with asyncio.timeout(10):
            while True:
                message = orjson.loads(await ws.recv())
                if message["type"] == "batch":
                    break
        frames = message["frames"]
        assert len(frames) >= BATCH_FROM
        presence = [f["device"] for f in frames if f["type"] == "presence"]
        assert presence == [f"dev-{i}" for i in range(len(presence))]
