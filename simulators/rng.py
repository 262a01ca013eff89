"""Counter-based random draws: deterministic, order-free and O(1) memory per device.

Every reading of every device draws its noise from a stream keyed by
``(seed, device index, sequence number, salt)``. A seeded ``random.Random``
per device would cost about 2.5 KB of state each (125 MB at 50,000 devices)
and would make the values depend on the order in which devices are stepped;
keyed streams give the same bytes whether the city runs in one process or is
split over several workers, and whether or not a fault skips a report.

The mixer is SplitMix64 (Steele, Lea, Flood 2014), the seeding function of
``xoshiro``; it passes BigCrush as a counter-based generator.
"""

from __future__ import annotations

import math
import zlib
from typing import Final

__all__ = ["Draws", "hash_unit", "mix64", "stable_hash"]

_MASK: Final = (1 << 64) - 1
_GOLDEN: Final = 0x9E3779B97F4A7C15
_TO_UNIT: Final = 2.0**-53
_TWO_PI: Final = 2.0 * math.pi


def mix64(value: int) -> int:
    """SplitMix64 finaliser: a bijective avalanche of a 64-bit integer."""
    z = (value + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is stable across processes (unlike ``hash``)."""
    data = text.encode()
    return mix64((zlib.crc32(data) << 32) | zlib.adler32(data))


def hash_unit(*keys: int) -> float:
    """A uniform number in [0, 1) fully determined by ``keys``."""
    z = 0x2545F4914F6CDD1D
    for key in keys:
        z = mix64(z ^ (key & _MASK))
    return (z >> 11) * _TO_UNIT


class Draws:
    """A short stream of uniform and normal draws keyed by integers.

    Args:
        keys: Integers that identify the stream, e.g. seed, device index and
            sequence number. The same keys always give the same draws.
    """

    __slots__ = ("_state",)

    def __init__(self, *keys: int) -> None:
        z = 0x6A09E667F3BCC909
        for key in keys:
            z = mix64(z ^ (key & _MASK))
        self._state = z

    def uniform(self) -> float:
        """The next uniform draw in [0, 1)."""
        self._state = (self._state + _GOLDEN) & _MASK
        return (mix64(self._state) >> 11) * _TO_UNIT

    def gauss(self) -> float:
        """The next standard normal draw (Box-Muller, one value per call)."""
        u1 = 1.0 - self.uniform()  # (0, 1]: log is finite
        u2 = self.uniform()
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(_TWO_PI * u2)

    def below(self, n: int) -> int:
        """A uniform integer in ``range(n)``."""
        return int(self.uniform() * n)
