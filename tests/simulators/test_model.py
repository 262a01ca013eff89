from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulators import CityModelError, available_cities, load_city, scale_city
from simulators.model import CityModel, city_from_mapping

ID = re.compile(r"[a-z0-9-]+")


def test_shipped_cities_load(minamikawa: CityModel, testville: CityModel) -> None:
    assert {"minamikawa", "testville"} <= set(available_cities())
    assert len(minamikawa.districts) == 12
    assert len(minamikawa.devices) > 1000
    assert len(testville.devices) == 50
    kinds = {d.kind for d in minamikawa.devices}
    assert {"loop-detector", "fire-panel", "river-gauge", "streetlight", "seismometer"} <= kinds
    assert {d.encoding for d in minamikawa.devices} == {"senml", "json"}
    for district in minamikawa.districts:
        for lat, lon in district.polygon:
            assert 36.1 < lat < 36.4
            assert 137.8 < lon < 138.1


def test_device_ids_are_unique_topic_segments(minamikawa: CityModel) -> None:
    ids = [d.id for d in minamikawa.devices]
    assert len(ids) == len(set(ids))
    for device in minamikawa.devices:
        assert ID.fullmatch(device.id)
        assert ID.fullmatch(device.district)
        assert device.topic == f"city/{device.domain}/{device.district}/{device.id}"


@pytest.mark.parametrize("n", [1, 37, 1177, 5_000, 50_000])
def test_scaling_gives_exactly_n_devices(minamikawa: CityModel, n: int) -> None:
    scaled = scale_city(minamikawa, n)
    assert len(scaled.devices) == n
    ids = [d.id for d in scaled.devices]
    assert len(set(ids)) == n
    assert all(ID.fullmatch(i) for i in ids[-50:])
    district_names = {d.name for d in scaled.districts}
    assert {d.district for d in scaled.devices} <= district_names
    assert len(district_names) == len(scaled.districts)


def test_scaling_is_deterministic_and_monotone(minamikawa: CityModel) -> None:
    a = scale_city(minamikawa, 12_000)
    b = scale_city(minamikawa, 12_000)
    assert a.devices == b.devices
    bigger = scale_city(minamikawa, 20_000)
    assert bigger.devices[: len(a.devices) - 100] == a.devices[: len(a.devices) - 100]
    assert len({d.kind for d in bigger.devices[1177:]}) >= 12


def test_scaling_rejects_nonsense(minamikawa: CityModel) -> None:
    with pytest.raises(CityModelError, match="between 1 and"):
        scale_city(minamikawa, 0)


def _raw(name: str = "testville") -> dict[str, Any]:
    text = (Path(__file__).parents[2] / "simulators" / "cities" / f"{name}.yaml").read_text()
    data: dict[str, Any] = yaml.safe_load(text)
    return data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["devices"][0].update(kind="loop-detectr"),
            r"devices\[0\].*unknown kind 'loop-detectr'",
        ),
        (lambda d: d["devices"][0].update(id="Loop_1"), r"id 'Loop_1' must match"),
        (lambda d: d["devices"][1].update(id=d["devices"][0]["id"]), "already used"),
        (lambda d: d["devices"][0].update(site="x-nowhere"), "unknown site 'x-nowhere'"),
        (lambda d: d["kinds"]["pump"]["channels"].pop("flow"), "differ from what generator 'pump'"),
        (lambda d: d["kinds"]["pump"].update(period_s=0), r"period_s 0.0 is outside"),
        (lambda d: d["districts"][0].update(polygon=[[35.0, 139.0]]), "at least 3 points"),
        (lambda d: d["intersections"][0].update(lat=123.0), r"lat 123.0 is outside"),
        (
            lambda d: d["roads"][0]["intersections"].append("x-gone"),
            "unknown intersection 'x-gone'",
        ),
        (lambda d: d["kinds"]["pump"].update(domain="water"), "domain 'water' must be one of"),
    ],
)
def test_validation_names_the_entry(mutate: Any, message: str) -> None:
    data = _raw()
    mutate(data)
    with pytest.raises(CityModelError, match=message) as info:
        city_from_mapping(data, source="broken.yaml")
    assert str(info.value).startswith("broken.yaml: ")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CityModelError, match="no city 'atlantis'"):
        load_city("atlantis")
    bad = tmp_path / "bad.yaml"
    bad.write_text("districts: [unclosed")
    with pytest.raises(CityModelError, match=r"bad\.yaml: not valid YAML"):
        load_city(bad)
    with pytest.raises(CityModelError, match="cannot read city file"):
        load_city(tmp_path / "missing.yaml")
