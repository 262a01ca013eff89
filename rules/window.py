"""Per-series time windows: a sorted numpy buffer of (device time, value).

Each series keeps only what the longest window of any rule on it needs
(``horizon_s``) and never more than ``max_points`` points. Readings usually
arrive in order and are appended in O(1); a late reading (older than the
newest) is inserted at its place so later aggregates see it, at O(n) cost.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["AGGREGATES", "SeriesWindow"]

AGGREGATES = frozenset({"avg", "min", "max", "p95", "count", "sum", "rate", "delta"})

Placement = Literal["append", "late", "duplicate"]
_FloatArray = npt.NDArray[np.float64]
_add, _minimum, _maximum = np.add, np.minimum, np.maximum


class SeriesWindow:
    """The recent points of one series, sorted by device time.

    Args:
        horizon_s: How far back from the newest point to keep.
        max_points: Hard cap on the number of points kept (oldest dropped first).
    """

    __slots__ = (
        "_appends",
        "_end",
        "_interval",
        "_interval_at",
        "_memo",
        "_start",
        "_ts",
        "_vals",
        "horizon_s",
        "last_state",
        "max_points",
    )

    def __init__(self, horizon_s: float, max_points: int = 4096) -> None:
        self.horizon_s = horizon_s
        self.max_points = max(2, max_points)
        cap = min(16, self.max_points)
        self._ts: _FloatArray = np.empty(cap, dtype=np.float64)
        self._vals: _FloatArray = np.empty(cap, dtype=np.float64)
        self._start = 0
        self._end = 0
        self.last_state: str | None = None
        # aggregates are shared by every rule evaluated on the same reading
        self._memo: dict[tuple[str, float, float], float | None] = {}
        self._appends = 0
        self._interval: float | None = None
        self._interval_at = -1

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def last_ts(self) -> float | None:
        """Device time of the newest point."""
        return float(self._ts[self._end - 1]) if self._end > self._start else None

    @property
    def last_value(self) -> float | None:
        """Value of the newest point (``None`` for a state reading)."""
        if self._end == self._start:
            return None
        v = float(self._vals[self._end - 1])
        return None if math.isnan(v) else v

    def add(self, ts: float, value: float | None, state: str | None = None) -> Placement:
        """Insert one point; a state-only reading stores NaN as its value.

        Returns:
            ``"append"`` for a new newest point, ``"late"`` for one inserted
            before the newest, ``"duplicate"`` when that instant is already
            held (the value is replaced: redelivered messages are idempotent).
        """
        v = np.nan if value is None else value
        if self._memo:
            self._memo.clear()
        last = self.last_ts
        if last is None or ts > last:
            self._make_room()
            self._ts[self._end] = ts
            self._vals[self._end] = v
            self._end += 1
            self._appends += 1
            if state is not None or value is None:
                self.last_state = state
            self._evict(ts)
            return "append"
        ts_view = self._ts[self._start : self._end]
        i = int(np.searchsorted(ts_view, ts))
        if i < len(ts_view) and ts_view[i] == ts:
            self._vals[self._start + i] = v
            if i == len(ts_view) - 1 and (state is not None or value is None):
                self.last_state = state
            return "duplicate"
        if ts < last - self.horizon_s:
            return "late"  # older than anything a window can see: nothing to keep
        self._make_room()
        at = self._start + i
        self._ts[at + 1 : self._end + 1] = self._ts[at : self._end]
        self._vals[at + 1 : self._end + 1] = self._vals[at : self._end]
        self._ts[at] = ts
        self._vals[at] = v
        self._end += 1
        return "late"

    def _make_room(self) -> None:
        if self._end < len(self._ts):
            return
        n = self._end - self._start
        if n >= self.max_points:
            drop = max(1, self.max_points // 8)
            self._start += drop
            n -= drop
        if n < len(self._ts) // 2 or len(self._ts) >= self.max_points:
            self._ts[:n] = self._ts[self._start : self._end]
            self._vals[:n] = self._vals[self._start : self._end]
        else:
            cap = min(self.max_points, 2 * len(self._ts))
            ts = np.empty(cap, dtype=np.float64)
            vals = np.empty(cap, dtype=np.float64)
            ts[:n] = self._ts[self._start : self._end]
            vals[:n] = self._vals[self._start : self._end]
            self._ts, self._vals = ts, vals
        self._start, self._end = 0, n

    def _evict(self, newest: float) -> None:
        cutoff = newest - self.horizon_s
        if self._ts[self._start] >= cutoff:
            return
        ts_view = self._ts[self._start : self._end - 1]
        self._start += int(np.searchsorted(ts_view, cutoff, side="left"))

    def span(self, now: float, window_s: float) -> tuple[_FloatArray, _FloatArray]:
        """Times and values of the points in ``[now - window_s, now]``."""
        ts = self._ts[self._start : self._end]
        lo = int(ts.searchsorted(now - window_s, side="left"))
        n = len(ts)
        hi = n if n == 0 or now >= ts[n - 1] else int(ts.searchsorted(now, side="right"))
        return ts[lo:hi], self._vals[self._start + lo : self._start + hi]

    def aggregate(self, name: str, now: float, window_s: float) -> float | None:
        """One aggregate over ``[now - window_s, now]``; ``None`` when undefined.

        ``rate`` is the least-squares slope in value per second (robust to a
        noisy last point); ``delta`` is newest minus oldest value in the window;
        ``p95`` interpolates linearly between ranks (numpy's default method).
        Results are memoised until the next point arrives.
        """
        key = (name, window_s, now)
        memo = self._memo
        if key in memo:
            return memo[key]
        result = self._aggregate(name, now, window_s)
        if result is not None and math.isnan(result):
            result = None
        memo[key] = result
        return result

    def _aggregate(self, name: str, now: float, window_s: float) -> float | None:
        # ufunc reductions directly: ndarray.mean() & co. cost several µs of overhead
        ts, vals = self.span(now, window_s)
        n = len(vals)
        if name == "count":
            return float(n)
        if n == 0:
            return None
        if name == "avg":
            return float(_add.reduce(vals)) / n
        if name == "min":
            return float(_minimum.reduce(vals))
        if name == "max":
            return float(_maximum.reduce(vals))
        if name == "sum":
            return float(_add.reduce(vals))
        if name == "p95":
            rank = 0.95 * (n - 1)
            lo = int(rank)
            if lo + 1 >= n:
                return float(_maximum.reduce(vals))
            part = np.partition(vals, (lo, lo + 1))
            a, b = float(part[lo]), float(part[lo + 1])
            return a + (b - a) * (rank - lo)
        if name == "delta":
            return float(vals[-1] - vals[0]) if n >= 2 else 0.0
        if name == "rate":
            if n < 2:
                return None
            t = ts - ts[0]
            t -= _add.reduce(t) / n
            denom = float(np.dot(t, t))
            if denom == 0.0:
                return None
            return float(np.dot(t, vals)) / denom
        msg = f"unknown aggregate {name!r}"
        raise ValueError(msg)

    def typical_interval(self) -> float | None:
        """Median spacing of the last 16 points: the series' observed period."""
        if self._appends - self._interval_at < 16 and self._interval is not None:
            return self._interval  # re-estimated every 16 appends: the median is costly
        n = self._end - self._start
        if n < 3:
            return None
        ts = self._ts[max(self._start, self._end - 16) : self._end]
        self._interval = float(np.median(np.diff(ts)))
        self._interval_at = self._appends
        return self._interval
