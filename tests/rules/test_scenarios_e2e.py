"""End to end with the simulators: scenarios → broker → ingester with the shipped rules.

The simulator runs the scenario against the session broker, the ingester runs
in-process with ``rules/default``, and the test reads what the rules engine
left in TimescaleDB (``alerts``, ``alert_events``) and published on
``cityops/alerts/#``.

Time. The simulator stamps every payload with *simulated* time, and the
ingester dead-letters readings more than 10 minutes in the future (or 30
days in the past). Each run therefore simulates a window that ends before
now and publishes it as fast as possible: device times are never ahead of
the wall clock, and the run takes a few seconds. The fire ends at now; the
earthquake strikes at a fixed local time (last week's Wednesday 08:00), because
how many alerts it raises depends on the hour (traffic, elevators in use), and
a flood must be there every time. Rules on device time (``for:``, windows,
the correlation's ``within``) see the scenario's real spacing; wall-clock
timers (``no_data``, ``offline()`` with ``for:``, escalation after
``ack_timeout``) are minutes away and stay quiet.

Expected alerts come from the same evaluator fed offline with the same
simulated stream (a clock that follows simulated time): one evaluator for
live data and backtests, so the live run must raise exactly those.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from cityops.settings import MqttEndpoint
from ingest.decode import decode_message
from ingest.model import Presence
from rules import Evaluator, RuleSet
from simulators.model import load_city
from simulators.runner import SimulateOptions, SimulateResult, build_simulation, run_simulate
from tests.ingest.conftest import ServiceFactory
from tests.simulators.conftest import (
    CITIES,
    WEDNESDAY,
    Collector,
    Received,
    clear_retained,
    endpoint,
)

__all__ = ["clear_retained", "endpoint"]  # fixtures used here, defined with the simulators

DEFAULT_RULES = Path(__file__).resolve().parents[2] / "rules" / "default"
FIRE_RULES = ("smoke-detected", "fire-panel-alarm", "fire-confirmed")
FIRE_SPAN_S = 9 * 60.0  # fire at +5 min, panel alarm (and confirmation) at +7.5 min
QUAKE_SPAN_S = 8 * 60.0  # quake at +5 min; elevators and panels report within 3 minutes
QUAKE_CLOCK = WEDNESDAY + 8 * 3600.0  # a weekday 08:00 in the city (JST)
WEEK_S = 7 * 86_400.0
FLOOD_THRESHOLD = 10  # more than this many raises in 10 minutes in a district: one incident
SEED = 1

Row = tuple[Any, ...]


class _SimClock:
    """A clock that follows the simulated stream (for the offline evaluation)."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


def _expected_raises(options: SimulateOptions) -> list[tuple[str, str]]:
    """(rule, subject) of every alert the shipped rules raise on this run, in order."""
    clock = _SimClock()
    evaluator = Evaluator(RuleSet.load(DEFAULT_RULES), clock)
    assert options.duration_s is not None
    raised: list[tuple[str, str]] = []
    for message in build_simulation(options).run(until=options.start + options.duration_s):
        clock.t = message.t
        decoded = decode_message(
            message.topic,
            message.payload,
            received_at=message.t,
            content_type=message.content_type,
        )
        signals = (
            evaluator.on_presence([decoded])
            if isinstance(decoded, Presence)
            else evaluator.on_readings(decoded)
        )
        raised += [(s.rule_id, s.subject) for s in signals if s.kind == "raise"]
    return raised


def _last_week(clock: float, span_s: float) -> float:
    """The latest start at ``clock``'s weekday and time whose run of ``span_s`` is over."""
    return clock + (time.time() - span_s - clock) // WEEK_S * WEEK_S


def _options(
    city: str, scenario: str, span_s: float, mqtt_url: str, *, start: float | None = None
) -> SimulateOptions:
    """A run that ends by now: simulated time never gets ahead of the wall clock."""
    return SimulateOptions(
        city=city,
        devices=None,
        scenarios=(scenario,),
        seed=SEED,
        start=time.time() - span_s if start is None else start,
        duration_s=span_s,
        as_fast_as_possible=True,
        mqtt_url=mqtt_url,
        client_prefix=f"test-sim-{uuid.uuid4().hex[:8]}",
        # One MQTT connection per device (with its will) is for small cities;
        # the bigger one shares the publisher's connection for its statuses.
        device_connections_limit=100,
    )


async def _simulate(options: SimulateOptions) -> SimulateResult:
    result, _ = await asyncio.to_thread(run_simulate, options, MqttEndpoint.parse(options.mqtt_url))
    assert result.ok, result.errors
    return result


async def _rows(url: str, query: str, params: tuple[object, ...] = ()) -> list[Row]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(query.encode(), params)
        return await cur.fetchall()


async def _until(
    what: str, cond: Callable[[], Awaitable[bool]], *, timeout_s: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            msg = f"{what}: not seen within {timeout_s:.0f} s"
            raise AssertionError(msg)
        await asyncio.sleep(0.05)


_ALERTS = (
    "SELECT id, rule_id, subject, district, state, occurrences, incident_id, message"
    " FROM alerts ORDER BY raised_at, id"
)


def _events(messages: list[Received]) -> list[dict[str, Any]]:
    return [orjson.loads(m.payload) for m in messages if m.topic.startswith("cityops/alerts/")]


def _raised_ids(messages: list[Received]) -> list[str]:
    """Alert ids in the order their raise events arrived."""
    return [e["alert"]["id"] for e in _events(messages) if e["event"]["action"] == "raise"]


async def _wait_for_events(collector: Collector, ids: set[str], timeout_s: float = 20.0) -> None:
    await asyncio.to_thread(collector.wait_for, lambda ms: ids <= set(_raised_ids(ms)), timeout_s)


@pytest.fixture
def fire_city(tmp_path: Path, clear_retained: Callable[[Iterable[str]], None]) -> tuple[Path, str]:
    """The test city with its districts renamed for this test; (file, district of the fire)."""
    suffix = uuid.uuid4().hex[:6]
    text = (CITIES / "testville.yaml").read_text()
    text = text.replace("kita", f"kita{suffix}").replace("minami", f"minami{suffix}")
    path = tmp_path / "city.yaml"
    path.write_text(text)
    clear_retained(d.status_topic for d in load_city(str(path)).devices)
    return path, f"kita{suffix}"


async def test_fire_raises_smoke_then_fire_alarm_then_fire_confirmed(
    ingest_service: ServiceFactory,
    mqtt_url: str,
    database_url: str,
    endpoint: MqttEndpoint,
    fire_city: tuple[Path, str],
) -> None:
    path, district = fire_city
    options = _options(str(path), "fire", FIRE_SPAN_S, mqtt_url)
    expected = [raised for raised in _expected_raises(options) if raised[0] in FIRE_RULES]
    collector = Collector(endpoint, ("cityops/alerts/#",))
    try:
        async with ingest_service(rules_path=DEFAULT_RULES):
            await _simulate(options)

            async def fire_alerts_stored() -> bool:
                rows = await _rows(database_url, _ALERTS)
                return len([r for r in rows if r[1] in FIRE_RULES]) >= len(expected)

            await _until("the fire alerts", fire_alerts_stored)
            rows = [r for r in await _rows(database_url, _ALERTS) if r[1] in FIRE_RULES]
            await _wait_for_events(collector, {str(r[0]) for r in rows})
        messages = list(collector.messages)
    finally:
        collector.close()

    # Smoke first (every detector of the building), then the panel, then the correlation.
    order = [str(r[1]) for r in rows]
    assert order == ["smoke-detected"] * order.count("smoke-detected") + [
        "fire-panel-alarm",
        "fire-confirmed",
    ]
    assert order.count("smoke-detected") >= 2
    assert [(r[1], r[2]) for r in rows] == expected
    assert {r[3] for r in rows} == {district}
    confirmed = rows[-1]
    assert confirmed[2] == f"fire-confirmed|district:{district}|*"
    assert str(confirmed[7]).startswith(f"FIRE CONFIRMED in {district}")
    assert all(r[4] == "active_unacked" and r[5] == 1 for r in rows)

    # Every alert has its raise row, and its raise event went out in the same order.
    ids = [str(r[0]) for r in rows]
    events = await _rows(
        database_url,
        "SELECT alert_id, version, action, from_state, to_state FROM alert_events"
        " WHERE alert_id = ANY(%s) AND action = 'raise'",
        (ids,),
    )
    assert sorted(events) == sorted((i, 1, "raise", "normal", "active_unacked") for i in ids)
    published = [i for i in _raised_ids(messages) if i in set(ids)]
    assert published == ids
    by_id = {e["alert"]["id"]: e for e in _events(messages) if e["event"]["version"] == 1}
    assert [by_id[i]["alert"]["rule_id"] for i in ids] == order

    # Simulated time stayed inside the ingester's bounds: nothing was dead-lettered.
    assert await _rows(database_url, "SELECT reason FROM dead_letters") == []


@pytest.mark.slow
async def test_earthquake_flood_stores_every_alert_once(
    ingest_service: ServiceFactory,
    mqtt_url: str,
    database_url: str,
    endpoint: MqttEndpoint,
    clear_retained: Callable[[Iterable[str]], None],
) -> None:
    start = _last_week(QUAKE_CLOCK, QUAKE_SPAN_S)
    options = _options("minamikawa", "earthquake", QUAKE_SPAN_S, mqtt_url, start=start)
    simulation = build_simulation(options)
    clear_retained(d.status_topic for d in simulation.devices)
    expected = _expected_raises(options)
    assert len(expected) > 50, "the earthquake should raise an alert flood"
    assert len(set(expected)) == len(expected)
    collector = Collector(endpoint, ("cityops/alerts/#",))
    try:
        async with ingest_service(rules_path=DEFAULT_RULES) as svc:
            result = await _simulate(options)
            published = sum(result.counts.published.values())

            async def all_stored() -> bool:
                received = svc.metrics.received._value.get()
                return received >= published and len(await _rows(database_url, _ALERTS)) >= len(
                    expected
                )

            await _until("every alert of the flood", all_stored, timeout_s=60.0)
            rows = await _rows(database_url, _ALERTS)
            await _wait_for_events(collector, {str(r[0]) for r in rows}, timeout_s=30.0)

            async def flood_grouped() -> bool:
                # An incident is stored right after the raise that completes it.
                counts = Counter(str(r[3]) for r in rows)
                flooded = [d for d, n in counts.items() if n > FLOOD_THRESHOLD]
                [(missing,)] = await _rows(
                    database_url,
                    "SELECT count(*) FROM alerts WHERE incident_id IS NULL AND district = ANY(%s)",
                    (flooded,),
                )
                return int(missing) == 0

            await _until("flood grouping", flood_grouped, timeout_s=10.0)
            rows = await _rows(database_url, _ALERTS)
        messages = list(collector.messages)
    finally:
        collector.close()

    # No loss, no duplicate: exactly the expected (rule, subject) pairs, once each.
    stored = [(str(r[1]), str(r[2])) for r in rows]
    assert sorted(stored) == sorted(expected)
    assert len(set(stored)) == len(stored)
    ids = {str(r[0]) for r in rows}
    raise_rows = await _rows(
        database_url,
        "SELECT alert_id FROM alert_events WHERE action = 'raise' AND version = 1",
    )
    assert {str(r[0]) for r in raise_rows} == ids
    assert set(_raised_ids(messages)) >= ids
    assert await _rows(database_url, "SELECT reason FROM dead_letters") == []  # a week old: kept

    # Flood grouping: the alerts of each district with more than 10 raises share
    # one incident; quieter districts have none.
    incidents: dict[str, set[str | None]] = {}
    for r in rows:
        incidents.setdefault(str(r[3]), set()).add(r[6])
    counts = Counter(str(r[3]) for r in rows)
    flooded = {d for d, n in counts.items() if n > FLOOD_THRESHOLD}
    assert flooded, counts
    for district, ids_of in incidents.items():
        if district in flooded:
            assert len(ids_of) == 1, (district, ids_of)
            assert None not in ids_of, district
        else:
            assert ids_of == {None}, (district, ids_of)
