from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules import BaselineBank, SeriesWindow, hour_of_week

from .helpers import T0


def filled(n: int, horizon: float = 1e9, step: float = 10.0, cap: int = 4096) -> SeriesWindow:
    w = SeriesWindow(horizon, cap)
    for i in range(n):
        assert w.add(T0 + step * i, float(i)) == "append"
    return w


def test_aggregates_match_numpy() -> None:
    w = filled(100)
    now = T0 + 990.0
    ts, vals = w.span(now, 300.0)
    assert len(vals) == 31  # [690, 990] inclusive
    assert w.aggregate("avg", now, 300.0) == pytest.approx(vals.mean())
    assert w.aggregate("min", now, 300.0) == 69.0
    assert w.aggregate("max", now, 300.0) == 99.0
    assert w.aggregate("sum", now, 300.0) == pytest.approx(vals.sum())
    assert w.aggregate("p95", now, 300.0) == pytest.approx(np.percentile(vals, 95))
    assert w.aggregate("count", now, 300.0) == 31.0
    assert w.aggregate("delta", now, 300.0) == 30.0
    assert w.aggregate("rate", now, 300.0) == pytest.approx(0.1)
    assert ts[0] == T0 + 690.0


def test_empty_window_and_single_point() -> None:
    w = SeriesWindow(600.0)
    assert w.aggregate("avg", T0, 60.0) is None
    assert w.aggregate("count", T0, 60.0) == 0.0
    assert w.last_ts is None
    assert w.last_value is None
    w.add(T0, 5.0)
    assert w.aggregate("rate", T0, 60.0) is None
    assert w.aggregate("delta", T0, 60.0) == 0.0
    with pytest.raises(ValueError, match="unknown aggregate"):
        w.aggregate("median", T0, 60.0)


def test_late_reading_is_inserted_in_order() -> None:
    w = filled(5)  # T0 .. T0+40
    assert w.add(T0 + 25.0, 100.0) == "late"
    ts, vals = w.span(T0 + 40.0, 1e6)
    assert list(ts - T0) == [0, 10, 20, 25, 30, 40]
    assert list(vals) == [0, 1, 2, 100, 3, 4]
    assert w.last_value == 4.0


def test_duplicate_instant_replaces_value() -> None:
    w = filled(3)
    assert w.add(T0 + 10.0, 7.0) == "duplicate"
    assert len(w) == 3
    assert w.span(T0 + 20.0, 1e6)[1][1] == 7.0


def test_horizon_evicts_old_points_and_ignores_too_late_ones() -> None:
    w = filled(100, horizon=60.0)
    assert len(w) == 7  # 930..990
    assert w.add(T0, -1.0) == "late"
    assert len(w) == 7


def test_hard_cap_drops_oldest() -> None:
    w = filled(1000, cap=64)
    assert len(w) <= 64
    assert w.last_value == 999.0
    ts, _ = w.span(T0 + 9990.0, 1e9)
    assert np.all(np.diff(ts) > 0)


def test_state_readings() -> None:
    w = SeriesWindow(600.0)
    w.add(T0, None, "alarm")
    assert w.last_state == "alarm"
    assert w.last_value is None
    w.add(T0 + 1, None, "normal")
    assert w.last_state == "normal"
    assert w.aggregate("count", T0 + 1, 60.0) == 2.0


def test_typical_interval() -> None:
    assert filled(2).typical_interval() is None
    assert filled(20, step=30.0).typical_interval() == 30.0


def test_hour_of_week() -> None:
    # 2026-01-01 00:00 UTC is a Thursday: 3 days after Monday 00:00
    assert hour_of_week(T0) == 72
    assert hour_of_week(T0, 9 * 3600.0) == 81
    assert hour_of_week(T0 + 4 * 86400.0) == 0  # Monday
    assert hour_of_week(T0 + 4 * 86400.0 - 1.0) == 167


def test_baseline_welford_matches_numpy_and_needs_samples() -> None:
    bank = BaselineBank(min_samples=5)
    rng = np.random.default_rng(1)
    values = rng.normal(10.0, 2.0, 50)
    for i, v in enumerate(values[:4]):
        bank.update("s", T0 + i, float(v))
    assert bank.zscore("s", T0, 10.0) is None
    for i, v in enumerate(values[4:]):
        bank.update("s", T0 + 4 + i, float(v))
    n, mean, std = bank.stats("s", T0)
    assert n == 50
    assert mean == pytest.approx(values.mean())
    assert std == pytest.approx(values.std(ddof=1))
    z = bank.zscore("s", T0 + 10, mean + 3 * std)
    assert z == pytest.approx(3.0)
    # another hour of the week has its own (empty) bucket
    assert bank.zscore("s", T0 + 3600.0, 10.0) is None
    assert bank.zscore("other", T0, 10.0) is None


def test_baseline_export_import_round_trip() -> None:
    bank = BaselineBank(min_samples=2)
    for i in range(40):
        bank.update(f"s{i % 20}", T0 + 3600.0 * (i % 3), float(i))
    arrays = bank.export()
    assert arrays["count"].shape == (20, 168)
    other = BaselineBank(min_samples=2)
    other.import_(arrays)
    assert len(other) == 20
    for key in ("s0", "s7"):
        assert other.stats(key, T0) == bank.stats(key, T0)
    bad = dict(arrays)
    bad["mean"] = bad["mean"][:, :10]
    with pytest.raises(ValueError, match="must all be"):
        other.import_(bad)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 400), st.floats(-1e3, 1e3, allow_nan=False)),
        min_size=1,
        max_size=80,
    ),
    st.integers(30, 300),
)
def test_window_matches_a_sorted_reference(points: list[tuple[int, float]], horizon: int) -> None:
    """Any arrival order: the window holds what a sorted list would, within the horizon."""
    w = SeriesWindow(float(horizon), 4096)
    ref: dict[float, float] = {}
    newest = -1.0
    for t, v in points:
        ts = T0 + t
        placement = w.add(ts, v)
        if ts > newest:
            assert placement == "append"
            newest = ts
            ref[ts] = v
        elif ts in ref:
            assert placement == "duplicate"
            ref[ts] = v
        else:
            assert placement == "late"
            if ts >= newest - horizon:
                ref[ts] = v
        ref = {k: x for k, x in ref.items() if k >= newest - horizon or k == newest}
    now = newest
    ts_arr, vals = w.span(now, float(horizon))
    expected = sorted((k, x) for k, x in ref.items() if k >= now - horizon)
    assert list(ts_arr) == [k for k, _ in expected]
    assert list(vals) == [x for _, x in expected]
    avg = w.aggregate("avg", now, float(horizon))
    assert avg == pytest.approx(sum(x for _, x in expected) / len(expected))
