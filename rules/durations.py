"""Durations written like ``30s``, ``5m``, ``1h30m``, ``2d`` or ``250ms``."""

from __future__ import annotations

import re

__all__ = ["UNIT_SECONDS", "format_duration", "parse_duration"]

UNIT_SECONDS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """The number of seconds in ``text``.

    Args:
        text: One or more ``<number><unit>`` parts, units ``ms s m h d``.

    Returns:
        The duration in seconds.

    Raises:
        ValueError: When ``text`` is not a duration.
    """
    s = text.strip()
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            msg = f"{text!r} is not a duration (write e.g. 30s, 5m, 1h30m)"
            raise ValueError(msg)
        total += float(m.group(1)) * UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos == 0:
        msg = f"{text!r} is not a duration (write e.g. 30s, 5m, 1h30m)"
        raise ValueError(msg)
    return total


def format_duration(seconds: float) -> str:
    """A short human form of ``seconds`` (``90`` → ``1m30s``)."""
    if seconds < 1.0 and seconds != 0.0:
        return f"{seconds * 1000:g}ms"
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or "0s"
