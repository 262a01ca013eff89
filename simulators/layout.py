"""Equipping sites with devices, and scaling a city to any number of devices.

:func:`scale_city` makes a city with exactly ``n`` devices:

* fewer than the file has: a deterministic subset (devices ordered by a
  stable hash of their id, the first ``n`` kept, file order preserved);
* more: new districts are laid out on a grid of cells spiralling around the
  city, each with intersections on a street grid, buildings by land use,
  gauges and car parks, equipped from the file's ``equipment`` templates,
  until there are ``n`` devices (the last district is cut short).

Generated districts depend only on their position in the spiral, never on
``n`` or the seed: the city for 20,000 devices contains the one for 10,000,
and a device's feed is the same at any scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace

from simulators.errors import CityModelError
from simulators.model import (
    CityModel,
    DeviceSpec,
    District,
    EquipmentItem,
    Intersection,
    KindSpec,
    Road,
    Site,
    device_encoding,
)
from simulators.rng import Draws, stable_hash

__all__ = ["DeviceFactory", "equip", "scale_city"]

MAX_DEVICES = 1_000_000
_NAME_HEADS = (
    "kita", "minami", "higashi", "nishi", "shin", "kami", "shimo", "naka", "oku", "hon",
    "wakaba", "asahi", "midori", "matsu", "take", "ume", "sakura", "fuji", "ishi", "ta",
)  # fmt: skip
_NAME_TAILS = (
    "machi", "hara", "dai", "no", "zawa", "oka", "bashi", "gaoka", "yama", "kawa",
    "mura", "shima", "da", "saki", "tani",
)  # fmt: skip
_USES = (
    ("residential", 0.50), ("mixed", 0.22), ("commercial", 0.16), ("industrial", 0.12),
)  # fmt: skip
_BUILDINGS_BY_USE: Mapping[str, tuple[str, ...]] = {
    "residential": ("residential", "residential", "school", "commercial"),
    "mixed": ("office", "commercial", "residential", "school"),
    "commercial": ("office", "office", "office", "commercial", "commercial"),
    "industrial": ("factory", "factory", "office"),
}
_FLOORS = {
    "office": 9, "commercial": 5, "residential": 12, "school": 4, "hospital": 7,
    "factory": 2, "city-hall": 8, "station": 4,
}  # fmt: skip


class DeviceFactory:
    """Creates devices with ids ``{prefix}-{district}-{nnn}``, numbered per district."""

    def __init__(self, kinds: Mapping[str, KindSpec], taken: Iterable[str] = ()) -> None:
        self._kinds = kinds
        self._taken = set(taken)
        self._counters: dict[tuple[str, str], int] = {}

    def make(
        self,
        kind_name: str,
        district: str,
        site: str | None,
        *,
        lat: float,
        lon: float,
        lane: int = 0,
    ) -> DeviceSpec:
        """A new device of ``kind_name`` with the next free id in ``district``."""
        kind = self._kinds[kind_name]
        counter_key = (kind.prefix, district)
        while True:
            n = self._counters.get(counter_key, 0) + 1
            self._counters[counter_key] = n
            ident = f"{kind.prefix}-{district}-{n:03d}"
            if ident not in self._taken:
                break
        self._taken.add(ident)
        return DeviceSpec(
            id=ident,
            kind=kind_name,
            domain=kind.domain,
            district=district,
            site=site,
            lat=round(lat, 6),
            lon=round(lon, 6),
            period_s=kind.period_s,
            jitter=kind.jitter,
            encoding=device_encoding(kind, ident),
            qos=kind.qos,
            lane=lane,
            key=stable_hash(ident),
        )


def _offset(ident: str, n: int, radius_deg: float) -> tuple[float, float]:
    draws = Draws(stable_hash(ident), n)
    angle = 2 * math.pi * draws.uniform()
    dist = radius_deg * (0.3 + 0.7 * draws.uniform())
    return dist * math.sin(angle), dist * math.cos(angle) * 1.25


def equip(
    factory: DeviceFactory,
    equipment: Mapping[str, tuple[EquipmentItem, ...]],
    district: District,
    intersections: Iterable[Intersection],
    sites: Iterable[Site],
) -> list[DeviceSpec]:
    """Devices for one district from the equipment templates.

    Template keys: ``intersection``, ``building:<use>`` (falling back to
    ``building``), the other site types, and ``district`` for devices that
    belong to the district as a whole (air quality, seismometers…).
    """
    devices: list[DeviceSpec] = []
    for x in intersections:
        for item in equipment.get("intersection", ()):
            count = x.lanes if item.per_lane else item.count
            for n in range(count):
                if item.per_lane:
                    devices.append(
                        factory.make(item.kind, x.district, x.id, lat=x.lat, lon=x.lon, lane=n + 1)
                    )
                else:
                    dlat, dlon = _offset(x.id + item.kind, n, 0.0006)
                    devices.append(
                        factory.make(
                            item.kind, x.district, x.id, lat=x.lat + dlat, lon=x.lon + dlon
                        )
                    )
    for site in sites:
        key = f"building:{site.use}" if site.type == "building" else site.type
        items = equipment.get(key) or equipment.get(site.type, ())
        for item in items:
            for _ in range(item.count):
                devices.append(
                    factory.make(item.kind, site.district, site.id, lat=site.lat, lon=site.lon)
                )
    lat0, lon0 = district.centroid
    for item in equipment.get("district", ()):
        for n in range(item.count):
            dlat, dlon = _offset(district.name + item.kind, n, 0.003)
            devices.append(
                factory.make(item.kind, district.name, None, lat=lat0 + dlat, lon=lon0 + dlon)
            )
    return devices


def _spiral(ring_start: int) -> Iterator[tuple[int, int]]:
    """Grid cells (row, col) in rings around a block, ring ``ring_start`` first."""
    ring = ring_start
    while True:
        cells = [
            (r, c)
            for r in range(-ring, ring + 1)
            for c in range(-ring, ring + 1)
            if max(abs(r), abs(c)) == ring
        ]
        cells.sort(key=lambda rc: math.atan2(rc[0], rc[1]))
        yield from cells
        ring += 1


def _district_name(k: int, taken: set[str]) -> str:
    head = _NAME_HEADS[k % len(_NAME_HEADS)]
    tail = _NAME_TAILS[(k // len(_NAME_HEADS) + k) % len(_NAME_TAILS)]
    base = head + tail
    name = base
    n = 2
    while name in taken:
        name = f"{base}-{n}"
        n += 1
    taken.add(name)
    return name


def _synthetic_district(
    k: int,
    cell: tuple[int, int],
    origin: tuple[float, float],
    size: tuple[float, float],
    taken_names: set[str],
) -> tuple[District, list[Intersection], list[Road], list[Site]]:
    draws = Draws(0x5CA1E, k)
    name = _district_name(k, taken_names)
    u = draws.uniform()
    use = "residential"
    acc = 0.0
    for candidate, share in _USES:
        acc += share
        if u < acc:
            use = candidate
            break
    dlat, dlon = size
    lat0 = origin[0] + cell[0] * dlat
    lon0 = origin[1] + cell[1] * dlon
    corners = ((lat0, lon0), (lat0, lon0 + dlon), (lat0 + dlat, lon0 + dlon), (lat0 + dlat, lon0))
    polygon = tuple(
        (
            round(a + dlat * 0.04 * (draws.uniform() - 0.5), 6),
            round(b + dlon * 0.04 * (draws.uniform() - 0.5), 6),
        )
        for a, b in corners
    )
    district = District(name, name.replace("-", " ").title(), use, polygon)
    lanes = 4 if use == "commercial" else 3 if use == "mixed" else 2
    grid: list[list[Intersection]] = []
    for i in range(3):
        row = []
        for j in range(3):
            row.append(
                Intersection(
                    f"x-{name}-{i * 3 + j + 1:02d}",
                    name,
                    round(lat0 + dlat * (0.2 + 0.3 * i + 0.04 * (draws.uniform() - 0.5)), 6),
                    round(lon0 + dlon * (0.2 + 0.3 * j + 0.04 * (draws.uniform() - 0.5)), 6),
                    lanes + (1 if (i == 1 or j == 1) else 0),
                )
            )
        grid.append(row)
    roads = [
        Road(
            f"{name}-dori-{i + 1}",
            f"{district.label} {i + 1}-dori",
            40.0,
            tuple(x.id for x in grid[i]),
        )
        for i in range(3)
    ] + [
        Road(
            f"{name}-suji-{j + 1}",
            f"{district.label} {j + 1}-suji",
            30.0,
            tuple(grid[i][j].id for i in range(3)),
        )
        for j in range(3)
    ]
    sites: list[Site] = []
    uses = list(_BUILDINGS_BY_USE[use]) + (["hospital"] if k % 7 == 3 else [])
    for n, building_use in enumerate(uses):
        sites.append(
            Site(
                id=f"b-{name}-{n + 1:02d}",
                type="building",
                use=building_use,
                district=name,
                lat=round(lat0 + dlat * (0.1 + 0.8 * draws.uniform()), 6),
                lon=round(lon0 + dlon * (0.1 + 0.8 * draws.uniform()), 6),
                floors=_FLOORS.get(building_use, 3),
            )
        )
    if k % 5 == 0:
        sites.append(
            Site(
                f"g-{name}-1",
                "river-gauge",
                "river-gauge",
                name,
                round(lat0 + 0.05 * dlat, 6),
                round(lon0 + 0.5 * dlon, 6),
                base_level_m=0.8,
                warning_level_m=2.5,
                danger_level_m=3.4,
            )
        )
    if k % 4 == 1:
        sites.append(
            Site(
                f"u-{name}-1",
                "underpass",
                "underpass",
                name,
                grid[1][1].lat + 0.0004,
                grid[1][1].lon,
                warning_level_m=0.1,
                danger_level_m=0.2,
            )
        )
    if use in ("commercial", "mixed"):
        sites.append(
            Site(
                f"p-{name}-1",
                "parking",
                "parking",
                name,
                grid[0][1].lat - 0.0005,
                grid[0][1].lon,
                capacity=150 + 50 * (k % 5),
            )
        )
    return district, [x for row in grid for x in row], roads, sites


def scale_city(model: CityModel, n: int) -> CityModel:
    """The city with exactly ``n`` devices (see the module docstring).

    Raises:
        CityModelError: ``n`` is not positive or too large, or growing is
            needed and the city file has no ``equipment`` templates.
    """
    if not 0 < n <= MAX_DEVICES:
        msg = f"--devices {n}: must be between 1 and {MAX_DEVICES}"
        raise CityModelError(msg)
    if n == len(model.devices):
        return model
    if n < len(model.devices):
        keep = set(sorted((d.key, d.id) for d in model.devices)[:n])
        devices = tuple(d for d in model.devices if (d.key, d.id) in keep)
        return replace(model, devices=devices)
    if not model.equipment:
        msg = f"{model.source}: cannot grow to {n} devices: the city has no equipment templates"
        raise CityModelError(msg)
    lats = [p[0] for d in model.districts for p in d.polygon]
    lons = [p[1] for d in model.districts for p in d.polygon]
    size = (0.009, 0.011)
    core_rows = math.ceil((max(lats) - min(lats)) / size[0])
    core_cols = math.ceil((max(lons) - min(lons)) / size[1])
    center = ((max(lats) + min(lats)) / 2, (max(lons) + min(lons)) / 2)
    origin = (center[0] - size[0] / 2, center[1] - size[1] / 2)
    ring_start = (max(core_rows, core_cols) + 1) // 2 + 1
    taken_names = {d.name for d in model.districts}
    factory = DeviceFactory(model.kinds, (d.id for d in model.devices))
    districts = list(model.districts)
    intersections = list(model.intersections)
    roads = list(model.roads)
    sites = list(model.sites)
    grown = list(model.devices)
    for k, cell in enumerate(_spiral(ring_start)):
        if len(grown) >= n:
            break
        district, xs, rs, ss = _synthetic_district(k, cell, origin, size, taken_names)
        new = equip(factory, model.equipment, district, xs, ss)
        if not new:
            msg = f"{model.source}: equipment templates produce no devices; cannot grow to {n}"
            raise CityModelError(msg)
        districts.append(district)
        intersections.extend(xs)
        roads.extend(rs)
        sites.extend(ss)
        grown.extend(new[: n - len(grown)])
    return replace(
        model,
        districts=tuple(districts),
        intersections=tuple(intersections),
        roads=tuple(roads),
        sites=tuple(sites),
        devices=tuple(grown),
    )
