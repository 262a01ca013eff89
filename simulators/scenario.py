"""Scenario files: a timeline of incidents and device faults, compiled against a city.

A scenario (``simulators/scenarios/*.yaml``) lists ``events`` (fire, flood,
accident, outage, earthquake, rain, incident) and ``faults`` (stuck, drift,
noise-burst, dropout, out-of-order, duplicate, clock-skew, malformed,
flapping), each ``at`` an offset from the simulation start. :func:`compile_plan`
turns them into a :class:`ScenarioPlan`: per-device effects, offline windows
and faults, plus the incidents, rain and earthquakes the environment feels.
Targets may be named or ``auto``; ``auto`` and ``count`` picks are
deterministic for a given seed. See ``docs/simulators.md`` for every field.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, cast

import yaml

from simulators.environment import Environment, Incident, Quake, RainEvent
from simulators.errors import ScenarioError
from simulators.generators import Effect
from simulators.model import CityModel, DeviceSpec, Site
from simulators.rng import hash_unit, stable_hash

__all__ = [
    "EVENT_TYPES",
    "FAULT_KINDS",
    "Fault",
    "FaultKind",
    "Scenario",
    "ScenarioPlan",
    "TimelineEntry",
    "available_scenarios",
    "compile_plan",
    "load_scenario",
    "parse_duration",
]

FaultKind = Literal[
    "stuck",
    "drift",
    "noise-burst",
    "dropout",
    "out-of-order",
    "duplicate",
    "clock-skew",
    "malformed",
    "flapping",
]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = (
    "stuck",
    "drift",
    "noise-burst",
    "dropout",
    "out-of-order",
    "duplicate",
    "clock-skew",
    "malformed",
    "flapping",
)
EVENT_TYPES: Final = ("fire", "flood", "accident", "outage", "earthquake", "rain", "incident")
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?")
_EARTH_M_PER_DEG = 111_000.0


def parse_duration(value: object, what: str = "duration") -> float:
    """Seconds from ``90``, ``"90s"``, ``"15m"``, ``"1h30m"`` or ``"1.5h"``.

    Raises:
        ScenarioError: the value is not a non-negative duration.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0 or math.isnan(value):
            msg = f"{what} {value!r} must not be negative"
            raise ScenarioError(msg)
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        match = _DURATION.fullmatch(text)
        if text and match and any(match.groups()):
            hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
            return hours * 3600.0 + minutes * 60.0 + seconds
        try:
            return parse_duration(float(text), what)
        except ValueError:
            pass
    msg = f"{what} {value!r}: expected seconds or a duration like 90s, 15m, 1h30m"
    raise ScenarioError(msg)


@dataclass(frozen=True, slots=True)
class Fault:
    """A device fault active in ``[start, end)``.

    Attributes:
        kind: One of :data:`FAULT_KINDS`.
        start: Simulated epoch seconds.
        end: Simulated epoch seconds.
        magnitude: Drift per hour (relative), noise amplitude (relative),
            clock skew in seconds, or the malformed share of messages.
        period_s: Flapping half-period.
    """

    kind: FaultKind
    start: float
    end: float
    magnitude: float = 0.0
    period_s: float = 20.0

    def active(self, t: float) -> bool:
        """Whether the fault is in force at ``t``."""
        return self.start <= t < self.end


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """What a scenario makes happen, when: for logs, docs and tests."""

    t: float
    event: str
    detail: str


@dataclass(frozen=True, slots=True)
class Scenario:
    """A parsed scenario file (times relative to the simulation start).

    Attributes:
        name: Scenario name.
        description: One paragraph for humans.
        clock: Local time of day ``HH:MM`` to start at when no ``--start`` is given.
        duration_s: Suggested run length.
        events: Raw event mappings, validated at compile time against the city.
        faults: Raw fault mappings.
        source: File name, for messages.
    """

    name: str
    description: str
    clock: str | None
    duration_s: float | None
    events: tuple[Mapping[str, Any], ...]
    faults: tuple[Mapping[str, Any], ...]
    source: str


@dataclass(frozen=True, slots=True)
class ScenarioPlan:
    """A scenario compiled against a city, a start time and a seed."""

    effects: Mapping[str, tuple[Effect, ...]] = field(default_factory=dict)
    offline: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    faults: Mapping[str, tuple[Fault, ...]] = field(default_factory=dict)
    incidents: tuple[Incident, ...] = ()
    rain: tuple[RainEvent, ...] = ()
    quakes: tuple[Quake, ...] = ()
    timeline: tuple[TimelineEntry, ...] = ()


def available_scenarios() -> list[str]:
    """Names of the scenario files shipped in ``simulators/scenarios``."""
    folder = resources.files("simulators") / "scenarios"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Load a scenario by shipped name (``fire``) or file path.

    Raises:
        ScenarioError: missing file, bad YAML or a malformed entry.
    """
    text_name = str(name_or_path)
    path = Path(text_name)
    if not path.suffix and not path.exists():
        shipped = resources.files("simulators") / "scenarios" / f"{text_name}.yaml"
        if not shipped.is_file():
            shipped_names = ", ".join(available_scenarios())
            msg = f"no scenario {text_name!r}: shipped scenarios are {shipped_names}"
            raise ScenarioError(msg)
        text, source = shipped.read_text(encoding="utf-8"), f"{text_name}.yaml"
    else:
        try:
            text, source = path.read_text(encoding="utf-8"), path.name
        except OSError as exc:
            msg = f"cannot read scenario {text_name!r}: {exc.strerror}"
            raise ScenarioError(msg) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        msg = f"{source}: not valid YAML: {exc}"
        raise ScenarioError(msg) from exc
    if not isinstance(data, Mapping):
        msg = f"{source}: the top level must be a mapping"
        raise ScenarioError(msg)
    return scenario_from_mapping(cast("Mapping[str, Any]", data), source=source)


def scenario_from_mapping(data: Mapping[str, Any], *, source: str = "<mapping>") -> Scenario:
    """Check the shape of a parsed scenario file.

    Raises:
        ScenarioError: an unknown event type or fault kind, a missing ``at``, a bad duration.
    """
    events = data.get("events") or []
    faults = data.get("faults") or []
    if not isinstance(events, list) or not isinstance(faults, list):
        msg = f"{source}: events and faults must be lists"
        raise ScenarioError(msg)
    for i, event in enumerate(events):
        where = f"{source}: events[{i}]"
        if not isinstance(event, Mapping) or event.get("type") not in EVENT_TYPES:
            kind = event.get("type") if isinstance(event, Mapping) else event
            msg = f"{where}: type {kind!r} must be one of {', '.join(EVENT_TYPES)}"
            raise ScenarioError(msg)
        parse_duration(event.get("at", 0), f"{where}.at")
    for i, fault in enumerate(faults):
        where = f"{source}: faults[{i}]"
        if not isinstance(fault, Mapping) or fault.get("kind") not in FAULT_KINDS:
            kind = fault.get("kind") if isinstance(fault, Mapping) else fault
            msg = f"{where}: kind {kind!r} must be one of {', '.join(FAULT_KINDS)}"
            raise ScenarioError(msg)
        parse_duration(fault.get("at", 0), f"{where}.at")
        parse_duration(fault.get("for", "10m"), f"{where}.for")
    clock = data.get("clock")
    if clock is not None and (
        not isinstance(clock, str) or re.fullmatch(r"\d{1,2}:\d{2}", clock) is None
    ):
        msg = f"{source}: clock {clock!r} must be HH:MM (local time)"
        raise ScenarioError(msg)
    duration = data.get("duration")
    return Scenario(
        name=str(data.get("name", Path(source).stem)),
        description=str(data.get("description", "")),
        clock=clock,
        duration_s=None if duration is None else parse_duration(duration, f"{source}: duration"),
        events=tuple(cast("list[Mapping[str, Any]]", events)),
        faults=tuple(cast("list[Mapping[str, Any]]", faults)),
        source=source,
    )


def _distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    dlat = (lat1 - lat2) * _EARTH_M_PER_DEG
    dlon = (lon1 - lon2) * _EARTH_M_PER_DEG * math.cos(math.radians(lat1))
    return math.hypot(dlat, dlon)


class _Compiler:
    """Accumulates one plan from several scenarios."""

    def __init__(self, model: CityModel, start: float, seed: int) -> None:
        self.model = model
        self.start = start
        self.seed = seed
        self.env = Environment(model, seed=seed)
        self.effects: dict[str, list[Effect]] = defaultdict(list)
        self.offline: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.faults: dict[str, list[Fault]] = defaultdict(list)
        self.incidents: list[Incident] = []
        self.rain: list[RainEvent] = []
        self.quakes: list[Quake] = []
        self.timeline: list[TimelineEntry] = []
        self.by_site: dict[str, list[DeviceSpec]] = defaultdict(list)
        self.by_district: dict[str, list[DeviceSpec]] = defaultdict(list)
        for device in model.devices:
            if device.site:
                self.by_site[device.site].append(device)
            self.by_district[device.district].append(device)
        self.sites = {s.id: s for s in model.sites}
        self.intersections = {x.id: x for x in model.intersections}

    def fail(self, where: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{where}: {problem}")

    def note(self, t: float, event: str, detail: str) -> None:
        self.timeline.append(TimelineEntry(t, event, detail))

    def pick(self, salt: str, items: Sequence[DeviceSpec], share: float) -> list[DeviceSpec]:
        """A deterministic share of ``items`` for this seed."""
        return [d for d in items if hash_unit(self.seed, d.key, stable_hash(salt)) < share]

    def on_site(self, site_id: str, *kinds: str) -> list[DeviceSpec]:
        return [d for d in self.by_site.get(site_id, ()) if d.kind in kinds]

    def nearest_intersections(self, lat: float, lon: float, radius_m: float) -> list[str]:
        ranked = sorted(self.model.intersections, key=lambda x: _distance_m(lat, lon, x.lat, x.lon))
        near = [x.id for x in ranked if _distance_m(lat, lon, x.lat, x.lon) <= radius_m]
        return near or [ranked[0].id] if ranked else []

    # -- targets -------------------------------------------------------------
    def building(self, value: object, where: str) -> Site:
        if value in (None, "auto"):
            ranked = sorted(
                (s for s in self.model.sites if s.type == "building"),
                key=lambda s: (s.use not in ("office", "commercial"), self.model.sites.index(s)),
            )
            for site in ranked:
                if self.on_site(site.id, "fire-panel") and self.on_site(site.id, "smoke-detector"):
                    return site
            raise self.fail(
                where, "no building in this city has both a fire panel and a smoke detector"
            )
        found = self.sites.get(str(value))
        if found is None or found.type != "building":
            raise self.fail(where, f"no building {value!r} in city {self.model.name!r}")
        return found

    def intersection(self, value: object, where: str) -> str:
        if value in (None, "auto"):
            with_loops = [
                x for x in self.model.intersections if self.on_site(x.id, "loop-detector")
            ]
            if not with_loops:
                raise self.fail(where, "no intersection in this city has loop detectors")
            return max(with_loops, key=lambda x: x.lanes).id
        if str(value) not in self.intersections:
            raise self.fail(where, f"no intersection {value!r} in city {self.model.name!r}")
        return str(value)

    def district(self, value: object, where: str) -> str:
        if value in (None, "auto"):
            ranked = sorted(
                self.model.districts,
                key=lambda d: (d.use != "commercial", -len(self.by_district[d.name])),
            )
            return ranked[0].name
        if str(value) not in self.by_district and str(value) not in {
            d.name for d in self.model.districts
        }:
            raise self.fail(where, f"no district {value!r} in city {self.model.name!r}")
        return str(value)

    def devices(self, spec: Mapping[str, Any], where: str, salt: str) -> list[DeviceSpec]:
        if "device" in spec:
            ids = spec["device"] if isinstance(spec["device"], list) else [spec["device"]]
            found = []
            for ident in ids:
                if not self.model.has_device(str(ident)):
                    raise self.fail(where, f"no device {ident!r} in city {self.model.name!r}")
                found.append(self.model.device(str(ident)))
            return found
        select = spec.get("select") or {}
        if not isinstance(select, Mapping):
            raise self.fail(where, "select must be a mapping of kind / district / site")
        pool = [
            d
            for d in self.model.devices
            if all(
                str(getattr(d, key)) == str(val)
                for key, val in select.items()
                if key in ("kind", "district", "site", "domain")
            )
        ]
        if not pool:
            raise self.fail(where, f"no device matches {dict(select)}")
        count = int(spec.get("count", 1))
        ranked = sorted(pool, key=lambda d: hash_unit(self.seed, d.key, stable_hash(salt)))
        return ranked[:count]

    # -- events --------------------------------------------------------------
    def fire(self, ev: Mapping[str, Any], t0: float, where: str) -> None:
        site = self.building(ev.get("building"), where)
        smoke_at = t0 + parse_duration(ev.get("smoke_after", 0), where)
        heat_at = t0 + parse_duration(ev.get("heat_after", "60s"), where)
        alarm_at = t0 + parse_duration(ev.get("alarm_after", "150s"), where)
        traffic_at = t0 + parse_duration(ev.get("traffic_after", "5m"), where)
        end = t0 + parse_duration(ev.get("for", "45m"), where)
        radius = float(ev.get("radius_m", 400))
        label = site.name or site.id
        # Detectors report on a significant change (delta reporting), not only on their period.
        for n, d in enumerate(self.on_site(site.id, "smoke-detector")):
            self.effects[d.id].append(
                Effect("smokeObscuration", smoke_at + 20.0 * n, end, "add", 15.0, 120.0)
            )
            self.effects[d.id].append(
                Effect("smokeObscuration", smoke_at + 20.0 * n + 40.0, end, "add", 0.0, report=True)
            )
        self.note(smoke_at, "fire.smoke", f"smoke detectors in {label} ({site.id}) start to rise")
        for d in self.on_site(site.id, "indoor-climate"):
            self.effects[d.id].append(Effect("temperature", heat_at, end, "add", 35.0, 300.0))
            self.effects[d.id].append(
                Effect("temperature", heat_at + 50.0, end, "add", 0.0, report=True)
            )
        self.note(heat_at, "fire.heat", f"room temperature in {label} starts to rise")
        for d in self.on_site(site.id, "fire-panel"):
            self.effects[d.id].append(Effect("state", alarm_at, end, "set", "alarm", report=True))
        for d in self.on_site(site.id, "elevator"):
            self.effects[d.id].append(Effect("state", alarm_at, end, "set", "stopped", report=True))
        for d in self.on_site(site.id, "pump"):
            self.effects[d.id].append(
                Effect("state", alarm_at + 30.0, end, "set", "running", report=True)
            )
        self.note(
            alarm_at, "fire.alarm", f"fire panel of {label} goes to alarm; elevators recalled"
        )
        for x in self.nearest_intersections(site.lat, site.lon, radius):
            self.incidents.append(
                Incident(x, traffic_at, end, 0.55, rise_s=240.0, hop_delay_s=150.0)
            )
        self.note(
            traffic_at,
            "fire.traffic",
            f"fire engines and onlookers slow traffic within {radius:.0f} m",
        )

    def flood(self, ev: Mapping[str, Any], t0: float, where: str) -> None:
        rise = parse_duration(ev.get("rise", "1h"), where)
        end = t0 + parse_duration(ev.get("for", "3h"), where)
        gauges_raw = ev.get("gauges", "auto")
        if gauges_raw in ("auto", "all", None):
            gauges = [s for s in self.model.sites if s.type == "river-gauge"]
        else:
            ids = gauges_raw if isinstance(gauges_raw, list) else [gauges_raw]
            gauges = [self.sites[str(i)] for i in ids if str(i) in self.sites]
            if len(gauges) != len(ids):
                raise self.fail(where, f"unknown river gauge among {ids!r}")
        if not gauges:
            raise self.fail(where, "this city has no river gauges")
        self.rain.append(RainEvent(t0 - 1800.0, end - 1800.0, 0.9, rise_s=1200.0))
        self.note(t0 - 1800.0, "flood.rain", "torrential rain sets in")
        for n, site in enumerate(gauges):
            peak = site.danger_level_m - site.base_level_m + 0.5 if site.danger_level_m else 3.0
            for d in self.on_site(site.id, "river-gauge"):
                self.effects[d.id].append(
                    Effect("currentLevel", t0 + 300.0 * n, end, "add", peak, rise)
                )
        self.note(
            t0,
            "flood.rise",
            f"{len(gauges)} river gauges rise towards danger over {rise / 60:.0f} min",
        )
        for site in (s for s in self.model.sites if s.type == "underpass"):
            for d in self.on_site(site.id, "underpass-gauge"):
                self.effects[d.id].append(
                    Effect("currentLevel", t0 + rise / 3, end, "add", 0.4, rise / 2)
                )
            for x in self.nearest_intersections(site.lat, site.lon, 250.0):
                self.incidents.append(Incident(x, t0 + rise / 2, end, 0.45))
        self.note(t0 + rise / 3, "flood.underpass", "underpasses flood; roads closed")

    def accident(self, ev: Mapping[str, Any], t0: float, where: str) -> None:
        origin = self.intersection(ev.get("intersection"), where)
        end = t0 + parse_duration(ev.get("for", "40m"), where)
        level = float(ev.get("level", 0.75))
        self.incidents.append(Incident(origin, t0, end, level, rise_s=120.0, hop_delay_s=90.0))
        for d in self.on_site(origin, "loop-detector"):
            if d.lane == 1:  # the crash blocks the first lane outright
                self.effects[d.id].append(
                    Effect("averageVehicleSpeed", t0, end, "scale", 0.05, 60.0)
                )
        self.note(
            t0, "accident", f"collision at {origin}; queues spread to neighbouring intersections"
        )

    def outage(self, ev: Mapping[str, Any], t0: float, where: str) -> None:
        name = self.district(ev.get("district"), where)
        end = t0 + parse_duration(ev.get("for", "20m"), where)
        self._outage(name, t0, end)

    def _outage(self, name: str, t0: float, end: float) -> None:
        dark = 0
        for d in self.by_district.get(name, ()):
            if self.model.kinds[d.kind].battery_backup:
                if d.kind == "fire-panel":  # mains failure is a panel trouble condition
                    self.effects[d.id].append(
                        Effect("state", t0 + 5.0, end, "set", "trouble", report=True)
                    )
                continue
            self.offline[d.id].append((t0, end))
            dark += 1
        for x in self.model.intersections:
            if x.district == name:
                self.incidents.append(Incident(x.id, t0, end, 0.35, hop_delay_s=60.0))
        self.note(t0, "outage", f"power cut in {name}: {dark} devices go offline together")
        self.note(end, "outage.restored", f"power restored in {name}")

    def earthquake(self, ev: Mapping[str, Any], t0: float, where: str) -> None:
        lats = [p[0] for d in self.model.districts for p in d.polygon]
        lons = [p[1] for d in self.model.districts for p in d.polygon]
        quake = Quake(
            t0,
            float(ev.get("lat", (min(lats) + max(lats)) / 2 - 0.15)),
            float(ev.get("lon", (min(lons) + max(lons)) / 2 + 0.1)),
            float(ev.get("magnitude", 6.8)),
            float(ev.get("depth_km", 10.0)),
        )
        self.quakes.append(quake)
        self.env.quakes = (*self.env.quakes, quake)
        end = t0 + parse_duration(ev.get("for", "30m"), where)
        alarms = 0
        for d in self.model.devices:
            arrival, peak = self.env.quake_arrival(quake, d.lat, d.lon)
            if d.kind == "seismometer":
                self.effects[d.id].append(
                    Effect("seismicIntensity", arrival, arrival + 1.0, "add", 0.0, report=True)
                )
                continue
            if peak < 4.0:
                continue
            strong = min(1.0, (peak - 3.5) / 2.5)
            k = d.kind
            salt = f"quake:{t0}"
            if k == "elevator":
                self.effects[d.id].append(
                    Effect("state", arrival, end, "set", "stopped", report=True)
                )
            elif k == "fire-panel" and self.pick(salt, [d], 0.45 * strong):
                state = "alarm" if hash_unit(self.seed, d.key, 0xA1) < 0.2 else "trouble"
                self.effects[d.id].append(
                    Effect("state", arrival + 2.0, end, "set", state, report=True)
                )
            elif k == "gas-detector" and self.pick(salt, [d], 0.25 * strong):
                self.effects[d.id].append(
                    Effect("lel", arrival, end, "add", 22.0, 90.0, report=True)
                )
            elif k == "smoke-detector" and self.pick(salt, [d], 0.05 * strong):
                self.effects[d.id].append(
                    Effect("alarm", arrival + 1.0, arrival + 600.0, "set", True, report=True)
                )
            elif k == "call-button" and self.pick(salt, [d], 0.4 * strong):
                self.effects[d.id].append(
                    Effect("pressed", arrival + 30.0, arrival + 900.0, "set", True, report=True)
                )
            elif k == "signal-controller" and self.pick(salt, [d], 0.2 * strong):
                self.effects[d.id].append(Effect("fault", arrival, end, "set", True, report=True))
            elif k == "pump" and self.pick(salt, [d], 0.15 * strong):
                self.effects[d.id].append(
                    Effect("state", arrival, end, "set", "fault", report=True)
                )
            else:
                continue
            alarms += 1
        self.note(
            t0,
            "earthquake",
            f"M{quake.magnitude} at {quake.lat:.3f},{quake.lon:.3f}: {alarms} devices raise alarms",
        )
        outages = int(ev.get("outage_districts", 1))
        ranked = sorted(
            self.model.districts, key=lambda d: hash_unit(self.seed, stable_hash(d.name), 0xE0)
        )
        for district in ranked[:outages]:
            self._outage(
                district.name, t0 + 20.0, t0 + parse_duration(ev.get("outage_for", "15m"), where)
            )

    def rain_event(self, ev: Mapping[str, Any], t0: float, where: str) -> None:
        end = t0 + parse_duration(ev.get("for", "1h"), where)
        self.rain.append(
            RainEvent(
                t0,
                end,
                float(ev.get("level", 0.7)),
                rise_s=parse_duration(ev.get("rise", "10m"), where),
            )
        )
        self.note(t0, "rain", "heavy rain")

    def incident(self, ev: Mapping[str, Any], t0: float, where: str) -> None:
        origin = self.intersection(ev.get("intersection"), where)
        end = t0 + parse_duration(ev.get("for", "20m"), where)
        self.incidents.append(Incident(origin, t0, end, float(ev.get("level", 0.4))))
        self.note(t0, "incident", f"traffic incident at {origin}")

    def fault(self, spec: Mapping[str, Any], where: str) -> None:
        kind = cast("FaultKind", spec["kind"])
        t0 = self.start + parse_duration(spec.get("at", 0), f"{where}.at")
        end = t0 + parse_duration(spec.get("for", "10m"), f"{where}.for")
        defaults = {"drift": 0.5, "noise-burst": 0.5, "clock-skew": 3600.0, "malformed": 0.5}
        magnitude = float(spec.get("magnitude", defaults.get(kind, 0.0)))
        period = parse_duration(spec.get("period", "20s"), f"{where}.period")
        targets = self.devices(spec, where, f"fault:{where}")
        for d in targets:
            fault = Fault(kind, t0, end, magnitude, max(period, 1.0))
            self.faults[d.id].append(fault)
            if kind == "flapping":
                t = t0
                while t < end:
                    self.offline[d.id].append((t, min(t + fault.period_s, end)))
                    t += 2 * fault.period_s
        self.note(t0, f"fault.{kind}", f"{kind} on {', '.join(d.id for d in targets)}")

    def plan(self) -> ScenarioPlan:
        for device_id, windows in self.offline.items():
            windows.sort()
            merged: list[tuple[float, float]] = []
            for a, b in windows:
                if merged and a <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
                else:
                    merged.append((a, b))
            self.offline[device_id] = merged
        return ScenarioPlan(
            effects={k: tuple(v) for k, v in self.effects.items()},
            offline={k: tuple(v) for k, v in self.offline.items()},
            faults={k: tuple(v) for k, v in self.faults.items()},
            incidents=tuple(self.incidents),
            rain=tuple(self.rain),
            quakes=tuple(self.quakes),
            timeline=tuple(sorted(self.timeline, key=lambda e: e.t)),
        )


def compile_plan(
    scenarios: Iterable[Scenario], model: CityModel, *, start: float, seed: int
) -> ScenarioPlan:
    """Compile scenarios against a city for a run starting at ``start``.

    Raises:
        ScenarioError: a target is missing from the city, or a field is malformed.
    """
    compiler = _Compiler(model, start, seed)
    handlers = {
        "fire": compiler.fire,
        "flood": compiler.flood,
        "accident": compiler.accident,
        "outage": compiler.outage,
        "earthquake": compiler.earthquake,
        "rain": compiler.rain_event,
        "incident": compiler.incident,
    }
    for scenario in scenarios:
        for i, event in enumerate(scenario.events):
            where = f"{scenario.source}: events[{i}] ({event['type']})"
            t0 = start + parse_duration(event.get("at", 0), f"{where}.at")
            handlers[event["type"]](event, t0, where)
        for i, fault in enumerate(scenario.faults):
            compiler.fault(fault, f"{scenario.source}: faults[{i}] ({fault['kind']})")
    return compiler.plan()
