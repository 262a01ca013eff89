"""Jittered exponential backoff, as a small object that tests can drive."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays for successive retries: full jitter over an exponential cap.

    ``next_delay()`` returns a delay in ``[initial_s/2, cap]`` where the cap
    doubles per failure up to ``max_s``; ``reset()`` after a success.
    """

    initial_s: float = 0.2
    max_s: float = 10.0
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0

    def next_delay(self) -> float:
        """Delay before the next attempt; grows with each call."""
        cap = min(self.max_s, self.initial_s * (2**self._attempt))
        self._attempt += 1
        return self.rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        """Start again from ``initial_s`` (after a success)."""
        self._attempt = 0

    @property
    def attempts(self) -> int:
        """Failures since the last reset."""
        return self._attempt
