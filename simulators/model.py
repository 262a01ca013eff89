"""The city model: districts, roads, intersections, sites and the devices on them.

A city is described by a YAML file (``simulators/cities/*.yaml``); see
``docs/simulators.md`` for the format. :func:`load_city` parses and validates
it into a :class:`CityModel`, a tree of frozen values that the generators,
scenarios and the engine read. Every problem found while loading raises
:class:`~simulators.errors.CityModelError` naming the file, the entry and the
offending value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from simulators.catalogue import GENERATOR_CHANNELS, SITE_TYPES, ChannelType
from simulators.errors import CityModelError
from simulators.rng import stable_hash

__all__ = [
    "DOMAINS",
    "ENCODINGS",
    "ChannelSpec",
    "CityModel",
    "DeviceSpec",
    "District",
    "Domain",
    "Encoding",
    "EquipmentItem",
    "Intersection",
    "KindSpec",
    "Road",
    "Site",
    "available_cities",
    "city_from_mapping",
    "load_city",
]

Domain = Literal["traffic", "facility", "emergency"]
Encoding = Literal["senml", "json"]
DOMAINS: tuple[Domain, ...] = ("traffic", "facility", "emergency")
ENCODINGS: tuple[Encoding, ...] = ("senml", "json")
_KIND_ENCODINGS = ("senml", "json", "mixed")
_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
LatLon = tuple[float, float]


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One channel a device kind publishes."""

    name: str
    unit: str | None
    type: ChannelType


@dataclass(frozen=True, slots=True)
class KindSpec:
    """A device kind: what it measures and how it reports.

    Attributes:
        name: The kind's name in the city file, e.g. ``loop-detector``.
        domain: The topic domain of its devices.
        generator: The value generator (a key of ``GENERATOR_CHANNELS``).
        prefix: Device id prefix used when devices are generated.
        channels: Channels in publishing order, with units.
        period_s: Nominal reporting period in seconds.
        jitter: Each period varies uniformly by ± this fraction.
        encoding: ``senml``, ``json`` or ``mixed`` (per device, by id hash).
        senml_share: With ``mixed``, the share of devices that use SenML.
        qos: MQTT QoS of its readings.
        battery_backup: Stays online during a district power outage.
    """

    name: str
    domain: Domain
    generator: str
    prefix: str
    channels: tuple[ChannelSpec, ...]
    period_s: float
    jitter: float
    encoding: str
    senml_share: float
    qos: int
    battery_backup: bool


@dataclass(frozen=True, slots=True)
class District:
    """A district: a name in romaji, a land use and a lat/lon polygon."""

    name: str
    label: str
    use: str
    polygon: tuple[LatLon, ...]

    @property
    def centroid(self) -> LatLon:
        """The mean of the polygon's vertices (good enough for convex shapes)."""
        lats = [p[0] for p in self.polygon]
        lons = [p[1] for p in self.polygon]
        return (sum(lats) / len(lats), sum(lons) / len(lons))


@dataclass(frozen=True, slots=True)
class Intersection:
    """A signalised intersection with loop detectors on its approach lanes."""

    id: str
    district: str
    lat: float
    lon: float
    lanes: int
    name: str = ""


@dataclass(frozen=True, slots=True)
class Road:
    """A road as the ordered intersections it passes; consecutive ones are adjacent."""

    id: str
    name: str
    speed_limit_kmh: float
    intersections: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Site:
    """A point site: a building, a river gauge, an underpass or a car park.

    Attributes:
        use: For buildings, ``office``, ``hospital``, ``school``…; else the type.
        floors: Building floors (elevators serve them).
        capacity: Car park spaces.
        base_level_m: Normal water level of a gauge.
        warning_level_m: Level at which a gauge reports ``warning``.
        danger_level_m: Level at which a gauge reports ``danger``.
    """

    id: str
    type: str
    use: str
    district: str
    lat: float
    lon: float
    name: str = ""
    floors: int = 0
    capacity: int = 0
    base_level_m: float = 0.0
    warning_level_m: float = 0.0
    danger_level_m: float = 0.0


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device of the city, with everything needed to simulate it.

    Attributes:
        id: Device id, ``[a-z0-9-]+``, unique in the city.
        kind: Name of its :class:`KindSpec`.
        domain: Topic domain.
        district: Topic district.
        site: Id of the intersection or site it is mounted on, if any.
        lat: Latitude in degrees.
        lon: Longitude in degrees.
        period_s: Reporting period in seconds.
        jitter: Period jitter as a fraction.
        encoding: ``senml`` or ``json``.
        qos: MQTT QoS of its readings.
        lane: Lane number for loop detectors (1-based), else 0.
        key: Stable 64-bit key of the id; keys the device's random streams.
    """

    id: str
    kind: str
    domain: Domain
    district: str
    site: str | None
    lat: float
    lon: float
    period_s: float
    jitter: float
    encoding: Encoding
    qos: int
    lane: int = 0
    key: int = 0

    @property
    def topic(self) -> str:
        """The readings topic ``city/{domain}/{district}/{id}``."""
        return f"city/{self.domain}/{self.district}/{self.id}"

    @property
    def status_topic(self) -> str:
        """The retained presence topic."""
        return f"city/{self.domain}/{self.district}/{self.id}/status"


@dataclass(frozen=True, slots=True)
class EquipmentItem:
    """One line of an equipment template: ``count`` devices of ``kind`` per site."""

    kind: str
    count: int = 1
    per_lane: bool = False


@dataclass(frozen=True, slots=True)
class CityModel:
    """A validated city.

    Attributes:
        name: Short name (the file stem), e.g. ``minamikawa``.
        label: Display name, e.g. ``Minamikawa-shi``.
        utc_offset_h: Local time offset (Japan: 9).
        kinds: Device kinds by name.
        districts: Districts in file order.
        intersections: Intersections in file order.
        roads: Roads in file order.
        sites: Buildings, gauges, underpasses and car parks.
        devices: Devices in file order.
        equipment: Templates used to equip generated districts when scaling:
            ``intersection``, ``district``, ``building:<use>`` and the site types.
        source: Where the model came from, for messages.
    """

    name: str
    label: str
    utc_offset_h: float
    kinds: Mapping[str, KindSpec]
    districts: tuple[District, ...]
    intersections: tuple[Intersection, ...]
    roads: tuple[Road, ...]
    sites: tuple[Site, ...]
    devices: tuple[DeviceSpec, ...]
    equipment: Mapping[str, tuple[EquipmentItem, ...]]
    source: str = ""
    _by_id: dict[str, DeviceSpec] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._by_id.update((d.id, d) for d in self.devices)

    def device(self, device_id: str) -> DeviceSpec:
        """The device with ``device_id``.

        Raises:
            KeyError: no such device in this city.
        """
        return self._by_id[device_id]

    def has_device(self, device_id: str) -> bool:
        """Whether the city has a device ``device_id``."""
        return device_id in self._by_id


def available_cities() -> list[str]:
    """Names of the city files shipped in ``simulators/cities``."""
    folder = resources.files("simulators") / "cities"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_city(name_or_path: str | Path) -> CityModel:
    """Load and validate a city by shipped name (``minamikawa``) or file path.

    Raises:
        CityModelError: the file is missing, not YAML, or inconsistent.
    """
    text_name = str(name_or_path)
    path = Path(text_name)
    if not path.suffix and not path.exists():
        shipped = resources.files("simulators") / "cities" / f"{text_name}.yaml"
        if not shipped.is_file():
            msg = f"no city {text_name!r}: shipped cities are {', '.join(available_cities())}"
            raise CityModelError(msg)
        text = shipped.read_text(encoding="utf-8")
        source = f"{text_name}.yaml"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            msg = f"cannot read city file {text_name!r}: {exc.strerror}"
            raise CityModelError(msg) from exc
        source = path.name
    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        msg = f"{source}: not valid YAML: {exc}"
        raise CityModelError(msg) from exc
    if not isinstance(data, Mapping):
        msg = f"{source}: the top level must be a mapping"
        raise CityModelError(msg)
    return city_from_mapping(cast("Mapping[str, Any]", data), source=source)


class _Reader:
    """Field access with errors that name the file and the entry."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> CityModelError:
        return CityModelError(f"{self.source}: {where}: {problem}")

    def mapping(self, value: object, where: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        return cast("Mapping[str, Any]", value)

    def seq(self, value: object, where: str) -> Sequence[Any]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {type(value).__name__}")
        return value

    def ident(self, entry: Mapping[str, Any], key: str, where: str) -> str:
        value = entry.get(key)
        if not isinstance(value, str) or _ID.fullmatch(value) is None:
            raise self.fail(where, f"{key} {value!r} must match [a-z0-9-]+ (at most 64 chars)")
        return value

    def text(self, entry: Mapping[str, Any], key: str, where: str, default: str = "") -> str:
        value = entry.get(key, default)
        if not isinstance(value, str):
            raise self.fail(where, f"{key} must be a string, got {value!r}")
        return value

    def number(
        self,
        entry: Mapping[str, Any],
        key: str,
        where: str,
        *,
        default: float | None = None,
        low: float = -math.inf,
        high: float = math.inf,
    ) -> float:
        value = entry.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"{key} must be a number, got {value!r}")
        number = float(value)
        if not low <= number <= high or math.isnan(number):
            raise self.fail(where, f"{key} {number!r} is outside [{low}, {high}]")
        return number

    def lat_lon(self, entry: Mapping[str, Any], where: str) -> LatLon:
        return (
            self.number(entry, "lat", where, low=-90.0, high=90.0),
            self.number(entry, "lon", where, low=-180.0, high=180.0),
        )


def _parse_kinds(r: _Reader, raw: object) -> dict[str, KindSpec]:
    kinds: dict[str, KindSpec] = {}
    for name, entry_raw in r.mapping(raw, "kinds").items():
        where = f"kinds.{name}"
        entry = r.mapping(entry_raw, where)
        domain = entry.get("domain")
        if domain not in DOMAINS:
            raise r.fail(where, f"domain {domain!r} must be one of {', '.join(DOMAINS)}")
        generator = r.text(entry, "generator", where, default=str(name))
        if generator not in GENERATOR_CHANNELS:
            known = ", ".join(sorted(GENERATOR_CHANNELS))
            raise r.fail(where, f"unknown generator {generator!r}; known: {known}")
        declared = r.mapping(entry.get("channels"), f"{where}.channels")
        produced = dict(GENERATOR_CHANNELS[generator])
        if set(declared) != set(produced):
            raise r.fail(
                where,
                f"channels {sorted(declared)} differ from what generator {generator!r} "
                f"produces: {sorted(produced)}",
            )
        channels = []
        for channel, _type in GENERATOR_CHANNELS[generator]:
            unit = declared[channel]
            if unit is not None and not isinstance(unit, str):
                problem = f"unit must be a string or null, got {unit!r}"
                raise r.fail(where=f"{where}.channels.{channel}", problem=problem)
            channels.append(ChannelSpec(channel, unit or None, _type))
        encoding = r.text(entry, "encoding", where, default="senml")
        if encoding not in _KIND_ENCODINGS:
            raise r.fail(
                where, f"encoding {encoding!r} must be one of {', '.join(_KIND_ENCODINGS)}"
            )
        qos = int(r.number(entry, "qos", where, default=1, low=0, high=1))
        kinds[str(name)] = KindSpec(
            name=str(name),
            domain=domain,
            generator=generator,
            prefix=r.ident(entry, "prefix", where),
            channels=tuple(channels),
            period_s=r.number(entry, "period_s", where, low=0.1, high=86_400.0),
            jitter=r.number(entry, "jitter", where, default=0.1, low=0.0, high=0.5),
            encoding=encoding,
            senml_share=r.number(entry, "senml_share", where, default=0.5, low=0.0, high=1.0),
            qos=qos,
            battery_backup=bool(entry.get("battery_backup", False)),
        )
    if not kinds:
        problem = "at least one device kind is required"
        raise r.fail(where="kinds", problem=problem)
    return kinds


def _unique(r: _Reader, seen: dict[str, str], ident: str, where: str) -> None:
    if ident in seen:
        raise r.fail(where, f"id {ident!r} is already used by {seen[ident]}")
    seen[ident] = where


def device_encoding(kind: KindSpec, device_id: str) -> Encoding:
    """The encoding of a device that does not set one: its kind's, or by id hash."""
    if kind.encoding == "mixed":
        share = (stable_hash("enc:" + device_id) >> 11) * 2.0**-53
        return "senml" if share < kind.senml_share else "json"
    return cast("Encoding", kind.encoding)


def city_from_mapping(data: Mapping[str, Any], *, source: str = "<mapping>") -> CityModel:
    """Validate a parsed city file and build the model.

    Raises:
        CityModelError: the first inconsistency found, naming the entry.
    """
    r = _Reader(source)
    name = r.text(data, "name", "city", default=Path(source).stem)
    kinds = _parse_kinds(r, data.get("kinds"))
    ids: dict[str, str] = {}

    districts: list[District] = []
    for i, raw in enumerate(r.seq(data.get("districts"), "districts")):
        where = f"districts[{i}]"
        entry = r.mapping(raw, where)
        dname = r.ident(entry, "name", where)
        polygon_raw = r.seq(entry.get("polygon"), f"{where}.polygon")
        if len(polygon_raw) < 3:
            raise r.fail(where, f"district {dname!r}: polygon needs at least 3 points")
        polygon: list[LatLon] = []
        for j, point in enumerate(polygon_raw):
            if not isinstance(point, list) or len(point) != 2:
                problem = f"expected [lat, lon], got {point!r}"
                raise r.fail(where=f"{where}.polygon[{j}]", problem=problem)
            polygon.append(r.lat_lon({"lat": point[0], "lon": point[1]}, f"{where}.polygon[{j}]"))
        _unique(r, ids, "district:" + dname, where)
        districts.append(
            District(
                dname,
                r.text(entry, "label", where, dname),
                r.text(entry, "use", where, "mixed"),
                tuple(polygon),
            )
        )
    if not districts:
        problem = "at least one district is required"
        raise r.fail(where="districts", problem=problem)
    district_names = {d.name for d in districts}

    def district_of(entry: Mapping[str, Any], where: str) -> str:
        value = r.ident(entry, "district", where)
        if value not in district_names:
            raise r.fail(where, f"unknown district {value!r}")
        return value

    intersections: list[Intersection] = []
    for i, raw in enumerate(r.seq(data.get("intersections"), "intersections")):
        where = f"intersections[{i}]"
        entry = r.mapping(raw, where)
        ident = r.ident(entry, "id", where)
        _unique(r, ids, ident, where)
        lat, lon = r.lat_lon(entry, where)
        intersections.append(
            Intersection(
                ident,
                district_of(entry, where),
                lat,
                lon,
                int(r.number(entry, "lanes", where, default=2, low=1, high=12)),
                r.text(entry, "name", where),
            )
        )
    inter_ids = {x.id for x in intersections}

    roads: list[Road] = []
    for i, raw in enumerate(r.seq(data.get("roads"), "roads")):
        where = f"roads[{i}]"
        entry = r.mapping(raw, where)
        ident = r.ident(entry, "id", where)
        _unique(r, ids, "road:" + ident, where)
        chain = tuple(str(x) for x in r.seq(entry.get("intersections"), f"{where}.intersections"))
        for x in chain:
            if x not in inter_ids:
                raise r.fail(where, f"road {ident!r} passes unknown intersection {x!r}")
        roads.append(
            Road(
                ident,
                r.text(entry, "name", where, ident),
                r.number(entry, "speed_limit_kmh", where, default=40, low=5, high=130),
                chain,
            )
        )

    sites: list[Site] = []
    for i, raw in enumerate(r.seq(data.get("sites"), "sites")):
        where = f"sites[{i}]"
        entry = r.mapping(raw, where)
        ident = r.ident(entry, "id", where)
        _unique(r, ids, ident, where)
        stype = r.text(entry, "type", where)
        if stype not in SITE_TYPES:
            raise r.fail(where, f"site type {stype!r} must be one of {', '.join(SITE_TYPES)}")
        lat, lon = r.lat_lon(entry, where)
        sites.append(
            Site(
                id=ident,
                type=stype,
                use=r.text(entry, "use", where, stype),
                district=district_of(entry, where),
                lat=lat,
                lon=lon,
                name=r.text(entry, "name", where),
                floors=int(r.number(entry, "floors", where, default=0, low=0, high=200)),
                capacity=int(r.number(entry, "capacity", where, default=0, low=0, high=100_000)),
                base_level_m=r.number(entry, "base_level_m", where, default=0.0, low=0, high=100),
                warning_level_m=r.number(
                    entry, "warning_level_m", where, default=0.0, low=0, high=100
                ),
                danger_level_m=r.number(
                    entry, "danger_level_m", where, default=0.0, low=0, high=100
                ),
            )
        )
    site_by_id = {s.id: s for s in sites}
    inter_by_id = {x.id: x for x in intersections}

    devices: list[DeviceSpec] = []
    for i, raw in enumerate(r.seq(data.get("devices"), "devices")):
        where = f"devices[{i}]"
        entry = r.mapping(raw, where)
        ident = r.ident(entry, "id", where)
        where = f"devices[{i}] ({ident!r})"
        _unique(r, ids, ident, where)
        kind_name = r.text(entry, "kind", where)
        if kind_name not in kinds:
            raise r.fail(where, f"unknown kind {kind_name!r}; known: {', '.join(sorted(kinds))}")
        kind = kinds[kind_name]
        site_id = entry.get("site")
        anchor: Site | Intersection | None = None
        if site_id is not None:
            anchor = site_by_id.get(str(site_id)) or inter_by_id.get(str(site_id))
            if anchor is None:
                raise r.fail(where, f"unknown site {site_id!r}")
        if "lat" in entry or anchor is None:
            lat, lon = r.lat_lon(entry, where)
        else:
            lat, lon = anchor.lat, anchor.lon
        district = (
            district_of(entry, where) if "district" in entry or anchor is None else anchor.district
        )
        if anchor is not None and district != anchor.district:
            raise r.fail(
                where, f"district {district!r} differs from its site's {anchor.district!r}"
            )
        encoding = entry.get("encoding") or device_encoding(kind, ident)
        if encoding not in ENCODINGS:
            raise r.fail(where, f"encoding {encoding!r} must be senml or json")
        lane = int(r.number(entry, "lane", where, default=0, low=0, high=12))
        devices.append(
            DeviceSpec(
                id=ident,
                kind=kind_name,
                domain=kind.domain,
                district=district,
                site=None if anchor is None else anchor.id,
                lat=lat,
                lon=lon,
                period_s=r.number(
                    entry, "period_s", where, default=kind.period_s, low=0.1, high=86_400
                ),
                jitter=r.number(entry, "jitter", where, default=kind.jitter, low=0.0, high=0.5),
                encoding=encoding,
                qos=int(r.number(entry, "qos", where, default=kind.qos, low=0, high=1)),
                lane=lane,
                key=stable_hash(ident),
            )
        )

    equipment: dict[str, tuple[EquipmentItem, ...]] = {}
    for key, items_raw in r.mapping(data.get("equipment") or {}, "equipment").items():
        items = []
        for j, item_raw in enumerate(r.seq(items_raw, f"equipment.{key}")):
            where = f"equipment.{key}[{j}]"
            item = r.mapping(item_raw, where)
            kind_name = r.text(item, "kind", where)
            if kind_name not in kinds:
                raise r.fail(where, f"unknown kind {kind_name!r}")
            items.append(
                EquipmentItem(
                    kind_name,
                    int(r.number(item, "count", where, default=1, low=0, high=1000)),
                    bool(item.get("per_lane", False)),
                )
            )
        equipment[str(key)] = tuple(items)

    return CityModel(
        name=name,
        label=r.text(data, "label", "city", name),
        utc_offset_h=r.number(data, "utc_offset_h", "city", default=9.0, low=-12, high=14),
        kinds=kinds,
        districts=tuple(districts),
        intersections=tuple(intersections),
        roads=tuple(roads),
        sites=tuple(sites),
        devices=tuple(devices),
        equipment=equipment,
        source=source,
    )
