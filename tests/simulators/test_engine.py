from __future__ import annotations

import hashlib
from collections import defaultdict

import orjson

from simulators import SimMessage, Simulation
from simulators.model import CityModel

from .conftest import WEDNESDAY

HOUR = 3600.0


def _digest(messages: list[SimMessage]) -> str:
    h = hashlib.sha256()
    for m in messages:
        h.update(f"{m.t!r}|{m.topic}|{m.qos}|{m.retain}|".encode())
        h.update(m.payload)
    return h.hexdigest()


def _run(model: CityModel, seed: int, seconds: float = 600.0, **kw: int) -> list[SimMessage]:
    sim = Simulation(model, seed=seed, start=WEDNESDAY + 8 * HOUR, **kw)  # type: ignore[arg-type]
    return [*sim.run(WEDNESDAY + 8 * HOUR + seconds), *sim.finish()]


def test_same_seed_same_bytes(testville: CityModel) -> None:
    assert _digest(_run(testville, 7)) == _digest(_run(testville, 7))


def test_different_seed_different_bytes(testville: CityModel) -> None:
    a, b = _run(testville, 7), _run(testville, 8)
    assert _digest(a) != _digest(b)
    assert [m.topic for m in a if m.kind == "status"] == [m.topic for m in b if m.kind == "status"]


def test_partitions_give_the_same_bytes_per_device(testville: CityModel) -> None:
    whole = defaultdict(list)
    for m in _run(testville, 3):
        whole[m.device].append((m.t, m.payload))
    split = defaultdict(list)
    for part in range(3):
        for m in _run(testville, 3, part=part, parts=3):
            split[m.device].append((m.t, m.payload))
    assert whole == split


def test_presence_then_periodic_reports_with_jitter(testville: CityModel) -> None:
    messages = _run(testville, 1, seconds=300.0)
    first: dict[str, SimMessage] = {}
    for m in messages:
        first.setdefault(m.device, m)
    assert all(m.kind == "status" and m.retain for m in first.values())
    assert orjson.loads(next(iter(first.values())).payload) == {
        "state": "online",
        "session": int(WEDNESDAY + 8 * HOUR),
    }
    times = defaultdict(list)
    for m in messages:
        if m.kind == "reading":
            times[m.device].append(m.t)
    for device in testville.devices:
        gaps = [b - a for a, b in zip(times[device.id], times[device.id][1:], strict=False)]
        assert gaps, device.id
        assert min(gaps) >= device.period_s * (1 - device.jitter) - 1e-6
        assert max(gaps) <= device.period_s * (1 + device.jitter) + 1e-6
        assert len(set(gaps)) > 1, "every period has its own jitter"
    last = [m for m in messages if m.kind == "status"][-len(testville.devices) :]
    assert {orjson.loads(m.payload)["state"] for m in last} == {"offline"}


def test_both_encodings_are_well_formed(testville: CityModel) -> None:
    seen = set()
    for m in _run(testville, 1, seconds=60.0):
        if m.kind != "reading":
            continue
        data = orjson.loads(m.payload)
        device = testville.device(m.device)
        channels = [c.name for c in testville.kinds[device.kind].channels]
        if device.encoding == "senml":
            assert m.content_type == "application/senml+json"
            assert isinstance(data, list)
            assert data[0]["bt"] == round(m.t, 3)
            assert [r["n"] for r in data] == channels
            for record in data:
                assert sum(k in record for k in ("v", "vs", "vb")) == 1
            seen.add("senml")
        else:
            assert isinstance(data, dict)
            assert data["ts"] == round(m.t, 3)
            assert list(data)[1:] == channels
            seen.add("json")
    assert seen == {"senml", "json"}


def test_qos_follows_the_kind_or_the_override(testville: CityModel) -> None:
    messages = _run(testville, 1, seconds=60.0)
    readings = [m for m in messages if m.kind == "reading"]
    assert {m.qos for m in readings if "/light-" in m.topic} == {0}
    assert {m.qos for m in readings if "/loop-" in m.topic} == {1}
    forced = _run(testville, 1, seconds=60.0, qos=1)
    assert {m.qos for m in forced} == {1}
