"""Adaptive baselines: each series' mean and variance by hour of week.

168 buckets per series (Monday 00:00 local time is bucket 0), updated online
with Welford's algorithm, so the profile needs no tuning and no history
query. A z-score is only defined once its bucket has ``min_samples`` points:
a new sensor cannot page anyone in its first week. The whole bank exports to
and imports from plain numpy arrays, for persistence between restarts.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["HOURS_PER_WEEK", "BaselineBank", "hour_of_week"]

HOURS_PER_WEEK = 168
_EPOCH_WEEKDAY_HOURS = 3 * 24  # 1970-01-01 was a Thursday: three days after a Monday


def hour_of_week(ts: float, utc_offset_s: float = 0.0) -> int:
    """Bucket of ``ts`` (seconds since the epoch) in the week, local time, Monday 00h = 0."""
    return int(((ts + utc_offset_s) // 3600.0 + _EPOCH_WEEKDAY_HOURS) % HOURS_PER_WEEK)


class BaselineBank:
    """Hour-of-week baselines of many series, in three ``(series, 168)`` arrays.

    Args:
        utc_offset_s: Local time offset used to place readings in buckets.
        min_samples: Samples a bucket needs before its z-score is defined.
        min_std: Floor on the standard deviation (a flat profile would make
            every wiggle infinite).
    """

    def __init__(
        self, *, utc_offset_s: float = 0.0, min_samples: int = 20, min_std: float = 1e-6
    ) -> None:
        self.utc_offset_s = utc_offset_s
        self.min_samples = min_samples
        self.min_std = min_std
        self._rows: dict[str, int] = {}
        self._count: npt.NDArray[np.int64] = np.zeros((0, HOURS_PER_WEEK), dtype=np.int64)
        self._mean: npt.NDArray[np.float64] = np.zeros((0, HOURS_PER_WEEK))
        self._m2: npt.NDArray[np.float64] = np.zeros((0, HOURS_PER_WEEK))

    def __len__(self) -> int:
        return len(self._rows)

    def _row(self, key: str) -> int:
        row = self._rows.get(key)
        if row is None:
            row = len(self._rows)
            if row >= len(self._count):
                grow = max(16, len(self._count))
                self._count = np.vstack([self._count, np.zeros((grow, HOURS_PER_WEEK), np.int64)])
                self._mean = np.vstack([self._mean, np.zeros((grow, HOURS_PER_WEEK))])
                self._m2 = np.vstack([self._m2, np.zeros((grow, HOURS_PER_WEEK))])
            self._rows[key] = row
        return row

    def update(self, key: str, ts: float, value: float) -> None:
        """Learn one value of series ``key`` at device time ``ts``."""
        row = self._row(key)
        b = hour_of_week(ts, self.utc_offset_s)
        n = int(self._count[row, b]) + 1
        mean = float(self._mean[row, b])
        d = value - mean
        mean += d / n
        self._count[row, b] = n
        self._mean[row, b] = mean
        self._m2[row, b] += d * (value - mean)

    def stats(self, key: str, ts: float) -> tuple[int, float, float]:
        """``(samples, mean, std)`` of the bucket of ``ts`` for series ``key``."""
        row = self._rows.get(key)
        if row is None:
            return 0, 0.0, 0.0
        b = hour_of_week(ts, self.utc_offset_s)
        n = int(self._count[row, b])
        if n < 2:
            return n, float(self._mean[row, b]), 0.0
        return n, float(self._mean[row, b]), math.sqrt(float(self._m2[row, b]) / (n - 1))

    def zscore(self, key: str, ts: float, value: float) -> float | None:
        """How many standard deviations ``value`` is from its bucket's mean.

        ``None`` until the bucket holds ``min_samples`` samples.
        """
        n, mean, std = self.stats(key, ts)
        if n < self.min_samples:
            return None
        return (value - mean) / max(std, self.min_std)

    def export(self) -> dict[str, npt.NDArray[np.generic]]:
        """The bank as arrays: ``keys`` (str), ``count``, ``mean``, ``m2`` (rows in key order)."""
        n = len(self._rows)
        keys = sorted(self._rows, key=self._rows.__getitem__)
        return {
            "keys": np.array(keys, dtype=np.str_),
            "count": self._count[:n].copy(),
            "mean": self._mean[:n].copy(),
            "m2": self._m2[:n].copy(),
        }

    def import_(self, arrays: dict[str, npt.NDArray[np.generic]]) -> None:
        """Replace the bank with arrays from :meth:`export`.

        Raises:
            ValueError: When the arrays do not have matching shapes.
        """
        keys = [str(k) for k in arrays["keys"]]
        count = np.asarray(arrays["count"], dtype=np.int64)
        mean = np.asarray(arrays["mean"], dtype=np.float64)
        m2 = np.asarray(arrays["m2"], dtype=np.float64)
        shape = (len(keys), HOURS_PER_WEEK)
        if count.shape != shape or mean.shape != shape or m2.shape != shape:
            msg = (
                f"baseline arrays must all be {shape}, got {count.shape}, {mean.shape}, {m2.shape}"
            )
            raise ValueError(msg)
        self._rows = {k: i for i, k in enumerate(keys)}
        self._count, self._mean, self._m2 = count.copy(), mean.copy(), m2.copy()
