from __future__ import annotations

from rules import FloodGrouper

from .helpers import T0


def test_more_than_ten_in_ten_minutes_opens_an_incident() -> None:
    g = FloodGrouper()
    for i in range(10):
        assert g.observe(f"a{i}", "chuo", T0 + 30 * i) == []
    assigned = g.observe("a10", "chuo", T0 + 300)
    incident_id = f"inc-chuo-{int(T0)}"
    assert assigned == [(f"a{i}", incident_id) for i in range(11)]
    assert g.observe("a11", "chuo", T0 + 320) == [("a11", incident_id)]
    inc = g.incident("chuo")
    assert inc is not None
    assert len(inc.alert_ids) == 12
    assert inc.last_raise_at == T0 + 320


def test_districts_are_separate_and_slow_raises_never_flood() -> None:
    g = FloodGrouper()
    for i in range(10):
        g.observe(f"a{i}", "chuo", T0 + i)
        g.observe(f"b{i}", "aoba", T0 + i)
    assert g.incidents() == []
    for i in range(30):  # one every 61 s: never more than 10 in 10 minutes
        assert g.observe(f"s{i}", "kawabata", T0 + 1000 + 61 * i) == []


def test_incident_ends_after_a_quiet_window() -> None:
    g = FloodGrouper(threshold=2, window_s=60)
    g.observe("a", "chuo", T0)
    g.observe("b", "chuo", T0 + 1)
    first = g.observe("c", "chuo", T0 + 2)
    assert {i for _, i in first} == {f"inc-chuo-{int(T0)}"}
    assert g.observe("d", "chuo", T0 + 100) == []  # quiet for 98 s: a new count starts
    assert g.incident("chuo") is None
    assert g.incident("nowhere") is None
