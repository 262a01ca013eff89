"""The world the devices sense: clock, sun, weather, traffic demand, congestion, shaking.

Everything here is a pure function of simulated time, the seed and the
scenario's events, so any device can be sampled at any instant in any order
and gets the same answer: that is what makes the feeds reproducible and
lets a city be split over worker processes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from simulators.model import CityModel
from simulators.rng import Draws

__all__ = ["Environment", "Incident", "Quake", "RainEvent", "bump"]

_DAY = 86_400.0
_SLOT_S = 1800.0  # background incidents are drawn per half hour
_MAX_HOPS = 3
_HOP_DECAY = 0.6


def bump(x: float, mu: float, sigma: float) -> float:
    """A Gaussian bump of height 1 centred on ``mu``."""
    z = (x - mu) / sigma
    return math.exp(-0.5 * z * z)


def _ramp(x: float) -> float:
    return 0.0 if x <= 0.0 else 1.0 if x >= 1.0 else x


@dataclass(frozen=True, slots=True)
class Incident:
    """A traffic incident: congestion at an intersection that spreads to its neighbours.

    Attributes:
        origin: Intersection id where it starts.
        start: Simulated time it starts (epoch seconds).
        end: When it clears (the queue then dissolves over ``rise_s``).
        level: Added congestion (0..1) at the origin; each hop away gets
            60 % of the previous one, up to three hops.
        rise_s: Time for the queue to build up (and to dissolve).
        hop_delay_s: Delay before each further hop is affected.
    """

    origin: str
    start: float
    end: float
    level: float
    rise_s: float = 180.0
    hop_delay_s: float = 120.0


@dataclass(frozen=True, slots=True)
class RainEvent:
    """Heavy rain over the whole city, ramping up and down over ``rise_s``."""

    start: float
    end: float
    level: float
    rise_s: float = 600.0


@dataclass(frozen=True, slots=True)
class Quake:
    """An earthquake: epicentre, magnitude and origin time."""

    start: float
    lat: float
    lon: float
    magnitude: float
    depth_km: float = 10.0


class Environment:
    """City-wide conditions at any simulated instant.

    Args:
        model: The city (for the road graph, land use and time zone).
        seed: The run's seed; background weather and incidents derive from it.
        incidents: Scenario incidents, on top of the seeded background ones.
        rain_events: Scenario rain, on top of the seeded showers.
        quakes: Scenario earthquakes.
    """

    def __init__(
        self,
        model: CityModel,
        *,
        seed: int,
        incidents: Iterable[Incident] = (),
        rain_events: Iterable[RainEvent] = (),
        quakes: Iterable[Quake] = (),
    ) -> None:
        self.seed = seed
        self.utc_offset_s = model.utc_offset_h * 3600.0
        self._use = {d.name: d.use for d in model.districts}
        self._inter_ids = [x.id for x in model.intersections]
        self._inter_use = {x.id: self._use.get(x.district, "mixed") for x in model.intersections}
        self._inter_lanes = {x.id: x.lanes for x in model.intersections}
        self._neighbours: dict[str, set[str]] = {x: set() for x in self._inter_ids}
        for road in model.roads:
            for a, b in zip(road.intersections, road.intersections[1:], strict=False):
                self._neighbours[a].add(b)
                self._neighbours[b].add(a)
        self.speed_limit_kmh: dict[str, float] = {}
        for road in model.roads:
            for x in road.intersections:
                self.speed_limit_kmh[x] = max(
                    self.speed_limit_kmh.get(x, 0.0), road.speed_limit_kmh
                )
        self.scenario_incidents = tuple(incidents)
        self.rain_events = tuple(rain_events)
        self.quakes = tuple(quakes)
        self._hops: dict[str, dict[str, int]] = {}
        self._slot_incidents: dict[int, tuple[Incident, ...]] = {}

    # -- clock -------------------------------------------------------------
    def local_hour(self, t: float) -> float:
        """Local wall-clock hour in [0, 24)."""
        return ((t + self.utc_offset_s) % _DAY) / 3600.0

    def weekday(self, t: float) -> int:
        """Local day of week, Monday = 0 (1970-01-01 was a Thursday)."""
        return int((t + self.utc_offset_s) // _DAY + 3) % 7

    def is_weekend(self, t: float) -> bool:
        """Saturday or Sunday, local time."""
        return self.weekday(t) >= 5

    def day_number(self, t: float) -> int:
        """Local days since the epoch."""
        return int((t + self.utc_offset_s) // _DAY)

    # -- people ----------------------------------------------------------------
    def traffic_demand(self, t: float) -> float:
        """Road demand 0..1: morning and evening rush on weekdays, one broad hump at weekends."""
        h = self.local_hour(t)
        if self.is_weekend(t):
            return 0.05 + 0.45 * bump(h, 14.0, 3.2) + 0.04 * bump(h, 20.0, 1.5)
        return min(
            1.0,
            0.06 + 0.62 * bump(h, 7.9, 0.8) + 0.55 * bump(h, 18.0, 1.1) + 0.32 * bump(h, 12.5, 3.0),
        )

    def occupancy(self, t: float, use: str) -> float:
        """How busy a building of ``use`` is, 0..1."""
        h = self.local_hour(t)
        weekend = self.is_weekend(t)
        if use in ("office", "city-hall", "factory"):
            return (
                0.08 if weekend else 0.05 + 0.9 * _ramp((h - 7.0) / 2.0) * _ramp((19.5 - h) / 2.0)
            )
        if use == "school":
            return (
                0.03 if weekend else 0.03 + 0.95 * _ramp((h - 7.5) / 1.0) * _ramp((16.5 - h) / 1.5)
            )
        if use in ("commercial", "station"):
            peak = 0.95 if weekend else 0.75
            return 0.05 + peak * _ramp((h - 9.5) / 1.5) * _ramp((21.0 - h) / 1.5)
        if use == "hospital":
            return 0.45 + 0.4 * bump(h, 11.0, 3.0)
        # residential: mornings and evenings
        return 0.35 + 0.45 * bump(h, 7.0, 1.3) + 0.55 * bump(h, 20.0, 2.2)

    # -- weather -----------------------------------------------------------------
    def _hour_rain(self, hour: int) -> float:
        draws = Draws(self.seed, 0x7A1, hour)
        return 0.25 + 0.55 * draws.uniform() if draws.uniform() < 0.10 else 0.0

    def rain(self, t: float) -> float:
        """Rain intensity 0..1 (1 ≈ 50 mm/h): seeded showers plus scenario rain."""
        x = t / 3600.0
        hour = math.floor(x)
        frac = x - hour
        level = (1.0 - frac) * self._hour_rain(hour) + frac * self._hour_rain(hour + 1)
        for event in self.rain_events:
            if event.start <= t < event.end + event.rise_s:
                up = _ramp((t - event.start) / event.rise_s)
                down = 1.0 - _ramp((t - event.end) / event.rise_s)
                level += event.level * min(up, down)
        return min(level, 1.0)

    def recent_rain(self, t: float) -> float:
        """Mean rain over the past three hours (what swells the rivers)."""
        return sum(self.rain(t - k * 2700.0) for k in range(5)) / 5.0

    def outdoor_temp(self, t: float) -> float:
        """Outdoor air temperature in °C (inland Honshu climate)."""
        day_of_year = (self.day_number(t) % 365.25) - 0.0
        seasonal = 13.5 - 11.0 * math.cos(2 * math.pi * (day_of_year - 20.0) / 365.25)
        daily = 4.5 * math.cos(2 * math.pi * (self.local_hour(t) - 14.5) / 24.0)
        return seasonal + daily - 3.0 * self.rain(t)

    @staticmethod
    def sun_elevation(t: float, lat: float, lon: float) -> float:
        """Solar elevation in degrees at a place (low-precision almanac, ±0.1°)."""
        d = t / _DAY - 10957.5  # days since J2000.0
        g = math.radians((357.529 + 0.98560028 * d) % 360.0)
        q = (280.459 + 0.98564736 * d) % 360.0
        ecl_lon = math.radians(q + 1.915 * math.sin(g) + 0.020 * math.sin(2 * g))
        obliquity = math.radians(23.439 - 0.00000036 * d)
        ra = math.atan2(math.cos(obliquity) * math.sin(ecl_lon), math.cos(ecl_lon))
        dec = math.asin(math.sin(obliquity) * math.sin(ecl_lon))
        gmst_deg = (280.46061837 + 360.98564736629 * d) % 360.0
        hour_angle = math.radians(gmst_deg + lon) - ra
        phi = math.radians(lat)
        sin_elev = math.sin(phi) * math.sin(dec) + math.cos(phi) * math.cos(dec) * math.cos(
            hour_angle
        )
        return math.degrees(math.asin(max(-1.0, min(1.0, sin_elev))))

    # -- traffic -----------------------------------------------------------------
    def _hops_from(self, origin: str) -> dict[str, int]:
        cached = self._hops.get(origin)
        if cached is not None:
            return cached
        hops = {origin: 0}
        queue = deque([origin])
        while queue:
            here = queue.popleft()
            if hops[here] >= _MAX_HOPS:
                continue
            for nxt in self._neighbours.get(here, ()):
                if nxt not in hops:
                    hops[nxt] = hops[here] + 1
                    queue.append(nxt)
        self._hops[origin] = hops
        return hops

    def _background(self, slot: int) -> tuple[Incident, ...]:
        cached = self._slot_incidents.get(slot)
        if cached is not None:
            return cached
        incidents: list[Incident] = []
        if self._inter_ids:
            draws = Draws(self.seed, 0x1AC, slot)
            expected = len(self._inter_ids) / 60.0  # about one per 60 intersections per half hour
            count = int(expected) + (1 if draws.uniform() < expected - int(expected) else 0)
            for _ in range(count):
                origin = self._inter_ids[draws.below(len(self._inter_ids))]
                start = slot * _SLOT_S + draws.uniform() * _SLOT_S
                duration = 600.0 + 1800.0 * draws.uniform()
                incidents.append(
                    Incident(origin, start, start + duration, 0.2 + 0.35 * draws.uniform())
                )
        result = tuple(incidents)
        if len(self._slot_incidents) > 64:
            self._slot_incidents.clear()
        self._slot_incidents[slot] = result
        return result

    def _incident_level(self, incident: Incident, intersection: str, t: float) -> float:
        if t < incident.start:
            return 0.0
        hops = self._hops_from(incident.origin).get(intersection)
        if hops is None:
            return 0.0
        delay = hops * incident.hop_delay_s
        up = _ramp((t - incident.start - delay) / incident.rise_s)
        down = 1.0 - _ramp((t - incident.end - delay) / incident.rise_s)
        return incident.level * (_HOP_DECAY**hops) * min(up, down)

    def congestion(self, intersection: str, t: float) -> float:
        """Congestion 0..0.97 at an intersection: demand, rain and incidents nearby."""
        use = self._inter_use.get(intersection, "mixed")
        weight = 0.95 if use in ("commercial", "mixed") else 0.8 if use == "industrial" else 0.7
        level = self.traffic_demand(t) * weight * (1.0 + 0.3 * self.rain(t))
        slot = int(t // _SLOT_S)
        for s in (slot - 2, slot - 1, slot):
            for incident in self._background(s):
                level += self._incident_level(incident, intersection, t)
        for incident in self.scenario_incidents:
            level += self._incident_level(incident, intersection, t)
        return min(level, 0.97)

    # -- ground ------------------------------------------------------------------
    def shaking(self, t: float, lat: float, lon: float) -> float:
        """JMA seismic intensity felt at a place (0 when nothing is shaking)."""
        intensity = 0.0
        for quake in self.quakes:
            if t < quake.start:
                continue
            dlat = (lat - quake.lat) * 111.0
            dlon = (lon - quake.lon) * 111.0 * math.cos(math.radians(lat))
            r = math.sqrt(dlat * dlat + dlon * dlon + quake.depth_km * quake.depth_km)
            arrival = quake.start + r / 3.5  # S waves
            if t < arrival:
                continue
            peak = max(0.0, min(7.0, 1.0 + quake.magnitude - 2.2 * math.log10(r + 10.0)))
            age = t - arrival
            envelope = _ramp(age / 3.0) * math.exp(-max(0.0, age - 3.0) / 25.0)
            intensity = max(intensity, peak * envelope)
        return intensity

    def quake_arrival(self, quake: Quake, lat: float, lon: float) -> tuple[float, float]:
        """When S waves reach a place, and the peak intensity there."""
        dlat = (lat - quake.lat) * 111.0
        dlon = (lon - quake.lon) * 111.0 * math.cos(math.radians(lat))
        r = math.sqrt(dlat * dlat + dlon * dlon + quake.depth_km * quake.depth_km)
        peak = max(0.0, min(7.0, 1.0 + quake.magnitude - 2.2 * math.log10(r + 10.0)))
        return quake.start + r / 3.5, peak
