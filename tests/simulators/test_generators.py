from __future__ import annotations

from collections.abc import Iterator

import pytest

from simulators.environment import Environment, Incident
from simulators.generators import GENERATORS, DeviceContext, Value, build_contexts
from simulators.model import CityModel
from simulators.rng import Draws

from .conftest import WEDNESDAY

HOUR = 3600.0
SATURDAY = WEDNESDAY + 3 * 24 * HOUR


def _values(
    model: CityModel, env: Environment, kind: str, t: float
) -> Iterator[tuple[DeviceContext, dict[str, Value]]]:
    contexts = build_contexts(model, [d for d in model.devices if d.kind == kind], {})
    for n, ctx in enumerate(contexts.values()):
        values = GENERATORS[ctx.kind.generator](ctx, env, t, Draws(1, ctx.device.key, n))
        yield ctx, dict(zip([c.name for c in ctx.kind.channels], values, strict=True))


RANGES: dict[str, dict[str, tuple[float, float] | set[object]]] = {
    "loop-detector": {"intensity": (0, 40), "occupancy": (0, 1), "averageVehicleSpeed": (0, 90)},
    "signal-controller": {"phase": {"green", "yellow", "red"}, "fault": {False}},
    "parking": {"occupancy": (0, 1), "availableSpotNumber": (0, 120)},
    "power-meter": {"activePower": (1, 800)},
    "indoor-climate": {"temperature": (5, 35), "relativeHumidity": (5, 100)},
    "water-tank": {"fillingLevel": (0.3, 0.95)},
    "pump": {"state": {"running", "stopped"}, "flow": (0, 6)},
    "elevator": {"state": {"moving", "idle"}, "floor": (1, 10)},
    "streetlight": {"powerState": {"on", "off", "fault"}, "illuminanceLevel": (0, 1)},
    "air-quality": {"pm25": (0, 60), "no2": (0, 120), "temperature": (-10, 40)},
    "fire-panel": {"state": {"normal", "trouble"}},
    "smoke-detector": {"smokeObscuration": (0, 0.5), "alarm": {False}},
    "gas-detector": {"lel": (0, 2), "alarm": {False}},
    "river-gauge": {"currentLevel": (0.5, 3.0), "floodLevelStatus": {"normal", "warning"}},
    "underpass-gauge": {"currentLevel": (0, 0.2), "floodLevelStatus": {"normal", "warning"}},
    "call-button": {"pressed": {False, True}},
    "seismometer": {"seismicIntensity": (0, 1.5), "pga": (0, 0.02)},
}


@pytest.mark.parametrize("kind", sorted(RANGES))
def test_values_stay_in_range_over_a_week(testville: CityModel, kind: str) -> None:
    env = Environment(testville, seed=1)
    for step in range(0, 7 * 24, 5):  # every 5 h for a week
        for _ctx, values in _values(testville, env, kind, WEDNESDAY + step * HOUR):
            for channel, expected in RANGES[kind].items():
                value = values[channel]
                if isinstance(expected, set):
                    assert value in expected, (channel, value)
                else:
                    assert isinstance(value, int | float)
                    assert expected[0] <= value <= expected[1], (channel, value)


def _mean_speed(model: CityModel, env: Environment, t: float) -> float:
    speeds = [float(v["averageVehicleSpeed"]) for _c, v in _values(model, env, "loop-detector", t)]
    return sum(speeds) / len(speeds)


def test_traffic_rush_hours_and_weekends(minamikawa: CityModel) -> None:
    env = Environment(minamikawa, seed=1)
    night = _mean_speed(minamikawa, env, WEDNESDAY + 3 * HOUR)
    morning = _mean_speed(minamikawa, env, WEDNESDAY + 8 * HOUR)
    evening = _mean_speed(minamikawa, env, WEDNESDAY + 18 * HOUR)
    saturday_morning = _mean_speed(minamikawa, env, SATURDAY + 8 * HOUR)
    assert morning < 0.75 * night
    assert evening < 0.8 * night
    assert saturday_morning > morning * 1.2
    assert env.traffic_demand(WEDNESDAY + 8 * HOUR) > 2 * env.traffic_demand(SATURDAY + 8 * HOUR)


def test_congestion_propagates_to_neighbours_with_delay(testville: CityModel) -> None:
    t0 = WEDNESDAY + 3 * HOUR
    incident = Incident("x-kita-01", t0, t0 + 1800, 0.6, rise_s=60, hop_delay_s=120)
    calm = Environment(testville, seed=1)
    env = Environment(testville, seed=1, incidents=[incident])

    def extra(x: str, t: float) -> float:
        return env.congestion(x, t) - calm.congestion(x, t)

    assert extra("x-kita-01", t0 + 60) == pytest.approx(0.6)
    assert extra("x-kita-02", t0 + 60) == pytest.approx(0.0)  # not reached yet
    assert extra("x-kita-02", t0 + 200) == pytest.approx(0.36)  # one hop: 60 %
    assert extra("x-minami-02", t0 + 400) == pytest.approx(0.216)  # two hops
    assert extra("x-kita-01", t0 + 1800 + 60) == pytest.approx(0.0)


def test_streetlights_follow_dusk_and_dawn(testville: CityModel) -> None:
    env = Environment(testville, seed=1)

    def share_on(t: float) -> float:
        states = [v["powerState"] for _c, v in _values(testville, env, "streetlight", t)]
        return states.count("on") / len(states)

    assert share_on(WEDNESDAY + 12 * HOUR) == 0.0
    assert share_on(WEDNESDAY + 23 * HOUR) == 1.0
    # Tokyo, early June: sunset about 18:55, sunrise about 04:25 JST.
    assert env.sun_elevation(WEDNESDAY + 18.5 * HOUR, 35.68, 139.70) > 0
    assert env.sun_elevation(WEDNESDAY + 19.3 * HOUR, 35.68, 139.70) < 0
    assert env.sun_elevation(WEDNESDAY + 4.0 * HOUR, 35.68, 139.70) < 0
    assert env.sun_elevation(WEDNESDAY + 4.8 * HOUR, 35.68, 139.70) > 0


def test_pump_runs_while_its_tank_refills(minamikawa: CityModel) -> None:
    env = Environment(minamikawa, seed=1)
    running = 0
    for step in range(0, 12 * 60, 7):
        t = WEDNESDAY + step * 60.0
        now = {c.device.site: v for c, v in _values(minamikawa, env, "water-tank", t)}
        later = {c.device.site: v for c, v in _values(minamikawa, env, "water-tank", t + 300.0)}
        for ctx, values in _values(minamikawa, env, "pump", t):
            if ctx.device.site not in now or values["state"] != "running":
                continue
            running += 1
            level, level_later = (float(x[ctx.device.site]["fillingLevel"]) for x in (now, later))
            assert level_later > level or level_later < 0.45 or level > 0.8
    assert running > 10


def test_office_power_follows_working_hours(minamikawa: CityModel) -> None:
    env = Environment(minamikawa, seed=1)

    def office_kw(t: float) -> float:
        return sum(
            float(v["activePower"])
            for c, v in _values(minamikawa, env, "power-meter", t)
            if c.use == "office"
        )

    assert office_kw(WEDNESDAY + 11 * HOUR) > 2 * office_kw(WEDNESDAY + 3 * HOUR)
    assert office_kw(SATURDAY + 11 * HOUR) < 0.6 * office_kw(WEDNESDAY + 11 * HOUR)
