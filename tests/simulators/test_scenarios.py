from __future__ import annotations

from collections import defaultdict
from typing import Any

import orjson
import pytest

from simulators import (
    FAULT_KINDS,
    ScenarioError,
    SimMessage,
    Simulation,
    available_scenarios,
    compile_plan,
    load_scenario,
)
from simulators.model import CityModel
from simulators.scenario import Scenario, parse_duration, scenario_from_mapping

from .conftest import WEDNESDAY

START = WEDNESDAY + 14 * 3600.0


def _run(
    model: CityModel, scenarios: list[Scenario], seconds: float, seed: int = 1
) -> list[SimMessage]:
    plan = compile_plan(scenarios, model, start=START, seed=seed)
    sim = Simulation(model, seed=seed, start=START, plan=plan)
    return [*sim.run(START + seconds), *sim.finish()]


def _values(message: SimMessage) -> dict[str, Any]:
    data = orjson.loads(message.payload)
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if k != "ts"}
    return {r["n"]: r.get("v", r.get("vs", r.get("vb"))) for r in data}


def _first(messages: list[SimMessage], kind_prefix: str, test: Any) -> float:
    for m in messages:
        if m.kind == "reading" and f"/{kind_prefix}-" in m.topic and test(_values(m)):
            return m.t
    msg = f"no {kind_prefix} message matched"
    raise AssertionError(msg)


def test_shipped_scenarios_compile_on_both_cities(
    testville: CityModel, minamikawa: CityModel
) -> None:
    assert {"fire", "flood", "accident", "outage", "earthquake", "faults"} <= set(
        available_scenarios()
    )
    for name in available_scenarios():
        scenario = load_scenario(name)
        for city in (testville, minamikawa):
            plan = compile_plan([scenario], city, start=START, seed=1)
            assert plan.timeline or name == "rush-hour"


def test_fire_timeline_smoke_heat_alarm_traffic(minamikawa: CityModel) -> None:
    messages = _run(minamikawa, [load_scenario("fire")], 40 * 60.0)
    fire_at = START + 5 * 60.0
    plan = compile_plan([load_scenario("fire")], minamikawa, start=START, seed=1)
    building = (
        next(e.detail for e in plan.timeline if e.event == "fire.smoke").split("(")[1].split(")")[0]
    )
    on_site = {d.id for d in minamikawa.devices if d.site == building}
    here = [m for m in messages if m.device in on_site]
    smoke = _first(here, "smoke", lambda v: v["alarm"] is True)
    heat = _first(here, "clim", lambda v: v["temperature"] > 29.0)
    alarm = _first(here, "fire", lambda v: v["state"] == "alarm")
    near = {i.origin for i in plan.incidents}
    loops = {d.id for d in minamikawa.devices if d.kind == "loop-detector" and d.site in near}
    before = [
        _values(m)["averageVehicleSpeed"]
        for m in messages
        if m.device in loops and m.t < fire_at and m.kind == "reading"
    ]
    slowed = _first(
        [m for m in messages if m.device in loops and m.t > fire_at],
        "loop",
        lambda v: v["averageVehicleSpeed"] < 0.5 * sum(before) / len(before),
    )
    assert fire_at <= smoke < heat < alarm < slowed
    assert alarm - fire_at <= 150 + 60  # the panel reports on the change, not a period later
    assert {e.event for e in plan.timeline} >= {
        "fire.smoke",
        "fire.heat",
        "fire.alarm",
        "fire.traffic",
    }


def test_flood_rises_through_warning_to_danger_over_an_hour(testville: CityModel) -> None:
    messages = _run(testville, [load_scenario("flood")], 2 * 3600.0)
    gauge = [m for m in messages if "/river-" in m.topic and m.kind == "reading"]
    status = [(m.t, _values(m)["floodLevelStatus"]) for m in gauge]
    levels = [_values(m)["currentLevel"] for m in gauge]
    warning = next(t for t, s in status if s == "warning")
    danger = next(t for t, s in status if s == "danger")
    assert START + 30 * 60 < warning < danger
    assert 20 * 60 < danger - (START + 30 * 60) <= 3600 + 60
    assert max(levels) > 3.5 > levels[0]
    underpass = [
        _values(m)["currentLevel"] for m in messages if "/upass-" in m.topic and m.kind == "reading"
    ]
    assert max(underpass) > 0.2


def test_outage_takes_a_district_offline_together_and_back(testville: CityModel) -> None:
    messages = _run(testville, [load_scenario("outage")], 45 * 60.0)
    plan = compile_plan([load_scenario("outage")], testville, start=START, seed=1)
    dark = set(plan.offline)
    assert dark
    assert all(
        testville.device(d).district == testville.device(next(iter(dark))).district for d in dark
    )
    assert not any(testville.kinds[testville.device(d).kind].battery_backup for d in dark)
    offline = [
        m
        for m in messages
        if m.kind == "status" and b"offline" in m.payload and m.t < START + 40 * 60
    ]
    assert {m.device for m in offline} == dark
    assert {m.t for m in offline} == {START + 10 * 60}
    back = [m for m in messages if m.kind == "status" and b"online" in m.payload and m.t > START]
    assert {m.device for m in back} == dark
    assert all(orjson.loads(m.payload)["session"] == int(START) + 1 for m in back)
    silent = [
        m
        for m in messages
        if m.device in dark and m.kind == "reading" and START + 600 <= m.t < START + 1800
    ]
    assert silent == []


def test_earthquake_is_an_alert_flood(minamikawa: CityModel) -> None:
    messages = _run(minamikawa, [load_scenario("earthquake")], 10 * 60.0)
    quake = START + 5 * 60.0
    window = [m for m in messages if quake <= m.t < quake + 60 and m.kind == "reading"]

    def alarming(m: SimMessage) -> bool:
        v = _values(m)
        return (
            v.get("state") in ("alarm", "trouble", "stopped", "fault")
            or v.get("alarm") is True
            or v.get("pressed") is True
            or v.get("fault") is True
        )

    alarms = {m.device for m in window if alarming(m)}
    assert len(alarms) > 30  # an alert flood: far more than 10 in 10 minutes
    peak = max(_values(m)["seismicIntensity"] for m in window if "/seis-" in m.topic)
    assert peak >= 4.0


def test_accident_queue_spreads_from_the_intersection(minamikawa: CityModel) -> None:
    scenario = load_scenario("accident")
    plan = compile_plan([scenario], minamikawa, start=START, seed=1)
    (incident,) = plan.incidents
    sim = Simulation(minamikawa, seed=1, start=START, plan=plan)
    base = Simulation(minamikawa, seed=1, start=START)
    t = incident.start + 600
    assert sim.env.congestion(incident.origin, t) > base.env.congestion(incident.origin, t) + 0.5


def test_scenario_validation() -> None:
    with pytest.raises(ScenarioError, match="type 'tsunami' must be one of"):
        scenario_from_mapping({"events": [{"type": "tsunami"}]}, source="x.yaml")
    with pytest.raises(ScenarioError, match="kind 'gremlins' must be one of"):
        scenario_from_mapping({"faults": [{"kind": "gremlins"}]}, source="x.yaml")
    with pytest.raises(ScenarioError, match="no scenario 'nope'"):
        load_scenario("nope")
    assert parse_duration("1h30m") == 5400.0
    assert parse_duration("90s") == 90.0
    assert parse_duration("15m") == 900.0
    assert parse_duration(12) == 12.0
    with pytest.raises(ScenarioError):
        parse_duration("soon")


def test_missing_target_is_a_clear_error(testville: CityModel) -> None:
    scenario = scenario_from_mapping(
        {"events": [{"type": "fire", "building": "b-nowhere"}]}, source="x.yaml"
    )
    with pytest.raises(ScenarioError, match="no building 'b-nowhere' in city 'testville'"):
        compile_plan([scenario], testville, start=START, seed=1)


# -- faults -------------------------------------------------------------------


def _fault_run(
    testville: CityModel, kind: str, **extra: Any
) -> tuple[list[SimMessage], list[SimMessage], str]:
    device = extra.pop("device", "loop-kita-001")
    spec = {"kind": kind, "at": "2m", "for": "3m", "device": device, **extra}
    scenario = scenario_from_mapping({"faults": [spec]}, source="f.yaml")
    faulty = [m for m in _run(testville, [scenario], 8 * 60.0) if m.device == device]
    clean = [m for m in _run(testville, [], 8 * 60.0) if m.device == device]
    return faulty, clean, device


def _in_window(messages: list[SimMessage]) -> list[SimMessage]:
    return [m for m in messages if m.kind == "reading" and START + 120 <= m.t < START + 300]


def test_fault_stuck(testville: CityModel) -> None:
    faulty, clean, _ = _fault_run(testville, "stuck")
    window = _in_window(faulty)
    assert len({orjson.dumps(_values(m)) for m in window}) == 1
    assert len({orjson.dumps(_values(m)) for m in _in_window(clean)}) > 1
    after = [m for m in faulty if m.kind == "reading" and m.t >= START + 300]
    assert len({orjson.dumps(_values(m)) for m in after}) > 1


def test_fault_drift(testville: CityModel) -> None:
    faulty, clean, _ = _fault_run(testville, "drift", device="pwr-kita-001", magnitude=2.0)
    f = [_values(m)["activePower"] for m in _in_window(faulty)]
    c = [_values(m)["activePower"] for m in _in_window(clean)]
    ratios = [a / b for a, b in zip(f, c, strict=True)]
    assert ratios[0] < ratios[-1]
    assert ratios[-1] > 1.05


def test_fault_noise_burst(testville: CityModel) -> None:
    faulty, clean, _ = _fault_run(testville, "noise-burst", device="clim-kita-001", magnitude=1.0)
    f = [_values(m)["temperature"] for m in _in_window(faulty)]
    c = [_values(m)["temperature"] for m in _in_window(clean)]
    assert max(abs(a - b) for a, b in zip(f, c, strict=True)) > 5.0


def test_fault_dropout(testville: CityModel) -> None:
    faulty, clean, _ = _fault_run(testville, "dropout")
    assert _in_window(faulty) == []
    assert len(_in_window(clean)) >= 15
    assert not [
        m for m in faulty if m.kind == "status" and b"offline" in m.payload and m.t < START + 480
    ]


def test_fault_out_of_order(testville: CityModel) -> None:
    faulty, _clean, _ = _fault_run(testville, "out-of-order")
    stamps = [orjson.loads(m.payload)[0]["bt"] for m in faulty if m.kind == "reading"]
    assert stamps != sorted(stamps)
    assert sorted(stamps) == sorted(set(stamps))  # nothing lost, nothing doubled


def test_fault_duplicate(testville: CityModel) -> None:
    faulty, clean, _ = _fault_run(testville, "duplicate")
    window = _in_window(faulty)
    assert len(window) == 2 * len(_in_window(clean))
    assert all(a.payload == b.payload for a, b in zip(window[::2], window[1::2], strict=True))


def test_fault_clock_skew(testville: CityModel) -> None:
    faulty, _clean, _ = _fault_run(testville, "clock-skew", magnitude=3600)
    for m in _in_window(faulty):
        assert orjson.loads(m.payload)[0]["bt"] == pytest.approx(m.t + 3600, abs=0.01)


def test_fault_malformed(testville: CityModel) -> None:
    faulty, _clean, _ = _fault_run(testville, "malformed", magnitude=1.0)
    broken = 0
    for m in _in_window(faulty):
        try:
            data = orjson.loads(m.payload)
            ok = isinstance(data, list) and all(
                isinstance(r, dict)
                and not any(k.endswith("_") for k in r)
                and isinstance(r.get("bt", 0.0), float | int)
                and sum(k in r for k in ("v", "vs", "vb")) == 1
                for r in data
            )
        except orjson.JSONDecodeError:
            ok = False
        broken += not ok
    assert broken == len(_in_window(faulty)) > 5


def test_fault_flapping(testville: CityModel) -> None:
    faulty, _clean, _ = _fault_run(testville, "flapping", period="20s")
    statuses = [orjson.loads(m.payload) for m in faulty if m.kind == "status"]
    states = [s["state"] for s in statuses]
    assert states[:3] == ["online", "offline", "online"]
    assert states.count("offline") >= 4
    sessions = [s["session"] for s in statuses if s["state"] == "online"]
    assert sessions == sorted(sessions)
    assert len(set(sessions)) == len(sessions)


def test_every_fault_kind_has_a_test() -> None:
    tested = {
        name.removeprefix("test_fault_").replace("_", "-")
        for name in globals()
        if name.startswith("test_fault_")
    }
    assert tested == set(FAULT_KINDS)


def test_picked_fault_targets_are_deterministic_per_seed(testville: CityModel) -> None:
    scenario = load_scenario("faults")
    a = compile_plan([scenario], testville, start=START, seed=1)
    b = compile_plan([scenario], testville, start=START, seed=1)
    c = compile_plan([scenario], testville, start=START, seed=99)
    assert a.faults == b.faults
    assert set(a.faults) != set(c.faults) or a.faults != c.faults
    assert {f.kind for fs in a.faults.values() for f in fs} == set(FAULT_KINDS)
    defaults: dict[str, list[str]] = defaultdict(list)
    for device, faults in a.faults.items():
        for fault in faults:
            defaults[fault.kind].append(device)
    assert all(len(v) == 1 for v in defaults.values())
