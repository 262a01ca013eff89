"""Alert flood grouping: many raises in one district become one incident.

ISA-18.2 calls more than 10 alarms in 10 minutes (per operator position) a
flood. Here the position is a district: when a district sees more than
``threshold`` raises within ``window_s``, an :class:`Incident` opens and every
raise in that window, and each later one in the district, is assigned to it,
so the console shows one row that opens into many. The incident stays open
until the district has been quiet for ``window_s``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["FloodGrouper", "Incident"]


@dataclass(frozen=True, slots=True)
class Incident:
    """A group of alerts from one flood."""

    id: str
    district: str
    opened_at: float
    alert_ids: tuple[str, ...]
    last_raise_at: float


@dataclass(slots=True)
class _District:
    recent: deque[tuple[float, str]] = field(default_factory=deque)
    incident: Incident | None = None


class FloodGrouper:
    """Assigns incident ids to the raises of a flood.

    Args:
        threshold: More raises than this within ``window_s`` is a flood.
        window_s: The flood window, and the quiet time that ends an incident.
    """

    def __init__(self, *, threshold: int = 10, window_s: float = 600.0) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self._districts: dict[str, _District] = {}

    def observe(self, alert_id: str, district: str, at: float) -> list[tuple[str, str]]:
        """Record one raise.

        Returns:
            ``(alert_id, incident_id)`` for every alert that joins an incident
            now: all alerts of the window when a flood starts, then one at a time.
        """
        d = self._districts.setdefault(district, _District())
        inc = d.incident
        if inc is not None and at - inc.last_raise_at > self.window_s:
            d.incident = inc = None
        d.recent.append((at, alert_id))
        while d.recent and d.recent[0][0] < at - self.window_s:
            d.recent.popleft()
        if inc is not None:
            d.incident = Incident(inc.id, district, inc.opened_at, (*inc.alert_ids, alert_id), at)
            return [(alert_id, inc.id)]
        if len(d.recent) <= self.threshold:
            return []
        first_at = d.recent[0][0]
        incident_id = f"inc-{district}-{int(first_at)}"
        ids = tuple(a for _, a in d.recent)
        d.incident = Incident(incident_id, district, first_at, ids, at)
        return [(a, incident_id) for a in ids]

    def incident(self, district: str) -> Incident | None:
        """The district's open incident, if any."""
        d = self._districts.get(district)
        return None if d is None else d.incident

    def incidents(self) -> list[Incident]:
        """Every incident still held (open or recently closed)."""
        return [d.incident for d in self._districts.values() if d.incident is not None]
