"""Value generators, one per device kind, and the scenario effects they honour.

A generator is a pure function ``(device context, environment, t, draws)``
→ the values of the kind's channels, in the order of
:data:`~simulators.catalogue.GENERATOR_CHANNELS`. Scenario effects (a fire's
smoke, a flood's water, an alarm) reach a generator through its context's
:class:`Effects`, applied to the primary value before derived values (an
alarm flag, a flood status) are computed from it, so they stay consistent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from simulators.environment import Environment, bump
from simulators.model import CityModel, DeviceSpec, Intersection, KindSpec, Site
from simulators.rng import Draws, hash_unit, stable_hash

__all__ = [
    "GENERATORS",
    "DeviceContext",
    "Effect",
    "Effects",
    "Generator",
    "Value",
    "build_contexts",
]

Value = float | int | bool | str
EffectOp = Literal["add", "scale", "set"]

SMOKE_ALARM_PCT: Final = 3.0
GAS_ALARM_LEL: Final = 10.0


@dataclass(frozen=True, slots=True)
class Effect:
    """A scenario's change to one channel of one device.

    Attributes:
        channel: The channel changed.
        start: When the change begins (simulated epoch seconds).
        end: When it stops (``set``) or starts to fade (``add``/``scale``).
        op: ``add`` a number, ``scale`` by a factor, or ``set`` a value.
        value: The number, factor or value.
        rise_s: ``add``/``scale`` ramp in over this long and fade out as long.
        report: The device reports at ``start`` (an event-driven report, as
            fire panels and call buttons do) instead of waiting for its period.
    """

    channel: str
    start: float
    end: float = math.inf
    op: EffectOp = "set"
    value: Value = 0.0
    rise_s: float = 0.0
    report: bool = False

    def apply(self, value: Value, t: float) -> Value:
        """The value at ``t`` with this effect applied."""
        if t < self.start:
            return value
        if self.op == "set":
            return self.value if t < self.end else value
        if self.rise_s > 0:
            up = min(1.0, (t - self.start) / self.rise_s)
            down = 1.0 - min(1.0, max(0.0, (t - self.end) / self.rise_s))
            frac = max(0.0, min(up, down))
        else:
            frac = 1.0 if t < self.end else 0.0
        if frac <= 0.0 or isinstance(value, str | bool) or isinstance(self.value, str | bool):
            return value
        if self.op == "add":
            return value + self.value * frac
        return value * (1.0 + (self.value - 1.0) * frac)


class Effects:
    """The effects on one device, by channel."""

    __slots__ = ("_by_channel",)

    def __init__(self, effects: Iterable[Effect] = ()) -> None:
        self._by_channel: dict[str, list[Effect]] = {}
        for effect in effects:
            self._by_channel.setdefault(effect.channel, []).append(effect)

    def __bool__(self) -> bool:
        return bool(self._by_channel)

    def apply(self, channel: str, value: Value, t: float) -> Value:
        """``value`` with every effect on ``channel`` applied in order."""
        effects = self._by_channel.get(channel)
        if effects:
            for effect in effects:
                value = effect.apply(value, t)
        return value


NO_EFFECTS: Final = Effects()


@dataclass(frozen=True, slots=True)
class DeviceContext:
    """What a generator needs to know about its device, resolved once."""

    device: DeviceSpec
    kind: KindSpec
    site: Site | None
    intersection: Intersection | None
    use: str
    """Building use for building devices, else the district's land use."""
    effects: Effects
    u: float
    """A fixed per-device uniform number for individual character (offsets, thresholds)."""


Generator = Callable[[DeviceContext, Environment, float, Draws], tuple[Value, ...]]


def build_contexts(
    model: CityModel, devices: Iterable[DeviceSpec], effects: Mapping[str, Iterable[Effect]]
) -> dict[str, DeviceContext]:
    """Resolve each device's site, land use and effects."""
    sites = {s.id: s for s in model.sites}
    inters = {x.id: x for x in model.intersections}
    district_use = {d.name: d.use for d in model.districts}
    contexts = {}
    for device in devices:
        site = sites.get(device.site) if device.site else None
        inter = inters.get(device.site) if device.site else None
        use = site.use if site is not None else district_use.get(device.district, "mixed")
        device_effects = effects.get(device.id)
        contexts[device.id] = DeviceContext(
            device=device,
            kind=model.kinds[device.kind],
            site=site,
            intersection=inter,
            use=use,
            effects=Effects(device_effects) if device_effects else NO_EFFECTS,
            u=hash_unit(device.key, 0xC4A2),
        )
    return contexts


def _clamp(x: float, low: float, high: float) -> float:
    return low if x < low else high if x > high else x


# -- traffic -----------------------------------------------------------------


def loop_detector(
    ctx: DeviceContext, env: Environment, t: float, draws: Draws
) -> tuple[Value, ...]:
    """Per-lane flow: Greenshields speed-density with Poisson-like counts."""
    site = ctx.device.site or ""
    c = env.congestion(site, t)
    fx = ctx.effects
    if fx:
        c = float(fx.apply("congestion", c, t))
        c = _clamp(c, 0.0, 0.97)
    limit = env.speed_limit_kmh.get(site, 40.0)
    lane_factor = 1.0 + 0.04 * (ctx.device.lane - 1)
    free_flow = limit * 1.1 * lane_factor
    speed = free_flow * (1.0 - 0.88 * c) * (1.0 - 0.12 * env.rain(t)) + 2.0 * draws.gauss()
    flow_per_h = 7200.0 * c * (1.0 - c) + 60.0
    expected = flow_per_h * ctx.device.period_s / 3600.0
    count = max(0, round(expected + math.sqrt(expected) * draws.gauss()))
    occupancy = _clamp(0.02 + 0.92 * c + 0.02 * draws.gauss(), 0.0, 1.0)
    return (
        fx.apply("intensity", count, t),
        round(float(fx.apply("occupancy", occupancy, t)), 3),
        round(max(0.0, float(fx.apply("averageVehicleSpeed", speed, t))), 1),
    )


def signal_controller(
    ctx: DeviceContext, env: Environment, t: float, draws: Draws
) -> tuple[Value, ...]:
    """Fixed-time plan: green 45 %, yellow 5 %, red 50 % of a 90 or 120 s cycle."""
    lanes = ctx.intersection.lanes if ctx.intersection else 2
    cycle = 120.0 if lanes >= 4 else 90.0
    pos = ((t + ctx.u * cycle) % cycle) / cycle
    phase = "green" if pos < 0.45 else "yellow" if pos < 0.5 else "red"
    fault = ctx.effects.apply("fault", False, t)
    if fault is True:
        phase = "flashing"
    return (ctx.effects.apply("phase", phase, t), fault)


def parking(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """Car park fill following shops and commuters."""
    capacity = ctx.site.capacity if ctx.site and ctx.site.capacity else 100
    h = env.local_hour(t)
    base = env.occupancy(t, "commercial")
    if not env.is_weekend(t):
        base = max(base, 0.1 + 0.75 * bump(h, 12.5, 4.0))
    occ = _clamp(float(ctx.effects.apply("occupancy", base + 0.03 * draws.gauss(), t)), 0.0, 1.0)
    occupied = round(occ * capacity)
    return (round(occupied / capacity, 3), capacity - occupied)


# -- facility ----------------------------------------------------------------


def power_meter(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """Building load: base + occupancy + heating/cooling."""
    floors = ctx.site.floors if ctx.site and ctx.site.floors else 3
    size_kw = 18.0 * floors * (0.8 + 0.4 * ctx.u)
    occ = env.occupancy(t, ctx.use)
    hvac = 0.025 * abs(env.outdoor_temp(t) - 20.0) * (0.3 + 0.7 * occ)
    kw = size_kw * (0.22 + 0.55 * occ + hvac) * (1.0 + 0.03 * draws.gauss())
    return (round(max(0.0, float(ctx.effects.apply("activePower", kw, t))), 2),)


def indoor_climate(
    ctx: DeviceContext, env: Environment, t: float, draws: Draws
) -> tuple[Value, ...]:
    """Air-conditioned when occupied; drifts toward outdoor air otherwise."""
    occ = env.occupancy(t, ctx.use)
    outdoor = env.outdoor_temp(t)
    setpoint = 25.5 if outdoor > 18.0 else 21.5
    conditioned = occ > 0.3
    temp = setpoint if conditioned else setpoint + 0.35 * (outdoor - setpoint)
    temp += 0.4 * draws.gauss() + (ctx.u - 0.5)
    temp = float(ctx.effects.apply("temperature", temp, t))
    rh = _clamp(
        50.0 + 8.0 * (env.rain(t) - 0.1) + 3.0 * draws.gauss() - 0.8 * max(0.0, temp - 30.0),
        5.0,
        100.0,
    )
    return (round(temp, 2), round(float(ctx.effects.apply("relativeHumidity", rh, t)), 1))


def _tank_phase(ctx: DeviceContext, t: float) -> tuple[float, bool]:
    """Level and refilling flag of the building's tank (shared by tank and pump)."""
    key = ctx.site.id if ctx.site else ctx.device.id
    u = hash_unit(stable_hash(key), 0x7A9)
    period = 5.0 * 3600.0 + 3.0 * 3600.0 * u
    pos = ((t + u * period) % period) / period
    if pos < 0.85:
        return 0.92 - 0.57 * pos / 0.85, False
    return 0.35 + 0.57 * (pos - 0.85) / 0.15, True


def water_tank(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """Roof tank: slow draw-down, then the pump refills it."""
    level, _ = _tank_phase(ctx, t)
    level = _clamp(
        float(ctx.effects.apply("fillingLevel", level + 0.004 * draws.gauss(), t)), 0.0, 1.0
    )
    return (round(level, 3),)


def pump(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """Booster pump: runs while its building's tank refills."""
    _, refilling = _tank_phase(ctx, t)
    state = ctx.effects.apply("state", "running" if refilling else "stopped", t)
    flow = 4.0 * (0.9 + 0.2 * ctx.u) + 0.15 * draws.gauss() if state == "running" else 0.0
    return (state, round(max(0.0, float(ctx.effects.apply("flow", flow, t))), 2))


def elevator(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """A car that moves more the busier its building is."""
    floors = ctx.site.floors if ctx.site and ctx.site.floors else 5
    occ = env.occupancy(t, ctx.use)
    moving = draws.uniform() < 0.15 + 0.6 * occ
    floor = 1 + draws.below(floors) if moving or draws.uniform() < 0.3 else 1
    state = ctx.effects.apply("state", "moving" if moving else "idle", t)
    if state == "stopped":
        floor = 1 + int(ctx.u * floors)
    return (state, floor)


def streetlight(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """On between dusk and dawn (each photocell a little different), dimmed after midnight."""
    threshold = -2.0 + 4.0 * ctx.u
    on = env.sun_elevation(t, ctx.device.lat, ctx.device.lon) < threshold
    h = env.local_hour(t)
    faulty = hash_unit(ctx.device.key, env.day_number(t), 0x11) < 0.004
    state = "fault" if faulty else "on" if on else "off"
    state = str(ctx.effects.apply("powerState", state, t))
    level = 0.0 if state != "on" else 0.6 if 0.0 <= h < 5.0 else 1.0
    return (state, level)


def air_quality(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """PM2.5 and NO2 following traffic, washed out by rain."""
    demand = env.traffic_demand(t)
    rain = env.rain(t)
    urban = 1.3 if ctx.use in ("commercial", "industrial") else 1.0
    pm25 = (9.0 + 10.0 * demand * urban) * (1.0 - 0.6 * rain) + 1.5 * draws.gauss() + 4.0 * ctx.u
    no2 = (12.0 + 38.0 * demand * urban) * (1.0 - 0.3 * rain) + 3.0 * draws.gauss()
    temp = env.outdoor_temp(t) + 0.3 * draws.gauss()
    fx = ctx.effects
    return (
        round(max(0.0, float(fx.apply("pm25", pm25, t))), 1),
        round(max(0.0, float(fx.apply("no2", no2, t))), 1),
        round(float(fx.apply("temperature", temp, t)), 1),
    )


# -- emergency ---------------------------------------------------------------


def fire_panel(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """Panel state: normal, with a rare short ``trouble`` (a detector fault)."""
    hour = int(t // 3600)
    trouble = hash_unit(ctx.device.key, hour, 0xF1) < 0.0008 and (t % 3600.0) < 900.0
    return (ctx.effects.apply("state", "trouble" if trouble else "normal", t),)


def smoke_detector(
    ctx: DeviceContext, env: Environment, t: float, draws: Draws
) -> tuple[Value, ...]:
    """Obscuration in %/m; the detector alarms above 3 %/m."""
    obscuration = max(0.0, 0.05 + 0.02 * draws.gauss())
    obscuration = max(0.0, float(ctx.effects.apply("smokeObscuration", obscuration, t)))
    alarm = ctx.effects.apply("alarm", obscuration >= SMOKE_ALARM_PCT, t)
    return (round(obscuration, 3), alarm)


def gas_detector(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """Combustible gas in % of the lower explosive limit; alarms at 10 %LEL."""
    lel = max(0.0, 0.3 + 0.15 * draws.gauss())
    lel = max(0.0, float(ctx.effects.apply("lel", lel, t)))
    return (round(lel, 2), ctx.effects.apply("alarm", lel >= GAS_ALARM_LEL, t))


def _flood_status(level: float, site: Site | None) -> str:
    if site is None or site.danger_level_m <= 0:
        return "normal"
    if level >= site.danger_level_m:
        return "danger"
    if level >= site.warning_level_m:
        return "warning"
    return "normal"


def river_gauge(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """River stage: base flow, a little daily swing, swollen by the last hours of rain."""
    base = ctx.site.base_level_m if ctx.site else 1.0
    level = (
        base + 0.04 * math.sin(2 * math.pi * env.local_hour(t) / 24.0) + 1.6 * env.recent_rain(t)
    )
    level = max(0.0, float(ctx.effects.apply("currentLevel", level + 0.01 * draws.gauss(), t)))
    return (
        round(level, 3),
        ctx.effects.apply("floodLevelStatus", _flood_status(level, ctx.site), t),
    )


def underpass_gauge(
    ctx: DeviceContext, env: Environment, t: float, draws: Draws
) -> tuple[Value, ...]:
    """Water on an underpass road: dry unless it pours."""
    rain = env.rain(t)
    level = max(0.0, 0.3 * (rain - 0.5)) + max(0.0, 0.003 * draws.gauss())
    level = max(0.0, float(ctx.effects.apply("currentLevel", level, t)))
    return (
        round(level, 3),
        ctx.effects.apply("floodLevelStatus", _flood_status(level, ctx.site), t),
    )


def call_button(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """Emergency call post: very rarely pressed."""
    slot = int(t // 600)
    pressed = hash_unit(ctx.device.key, slot, 0xCA11) < 0.0005
    return (ctx.effects.apply("pressed", pressed, t),)


def seismometer(ctx: DeviceContext, env: Environment, t: float, draws: Draws) -> tuple[Value, ...]:
    """JMA intensity and peak ground acceleration; microseismic noise at rest."""
    intensity = env.shaking(t, ctx.device.lat, ctx.device.lon)
    intensity = max(intensity, 0.2 * abs(draws.gauss()))
    intensity = float(ctx.effects.apply("seismicIntensity", intensity, t))
    pga = 10.0 ** ((intensity - 0.94) / 2.0) / 100.0  # JMA: I ≈ 2 log10(a [gal]) + 0.94
    return (round(intensity, 2), round(pga, 4))


GENERATORS: Final[dict[str, Generator]] = {
    "loop-detector": loop_detector,
    "signal-controller": signal_controller,
    "parking": parking,
    "power-meter": power_meter,
    "indoor-climate": indoor_climate,
    "water-tank": water_tank,
    "pump": pump,
    "elevator": elevator,
    "streetlight": streetlight,
    "air-quality": air_quality,
    "fire-panel": fire_panel,
    "smoke-detector": smoke_detector,
    "gas-detector": gas_detector,
    "river-gauge": river_gauge,
    "underpass-gauge": underpass_gauge,
    "call-button": call_button,
    "seismometer": seismometer,
}
"""Generator name → function."""
