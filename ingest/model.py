"""Typed values that flow through the ingest pipeline.

A received MQTT message is decoded once into one of these; every sink (the
storage writer, the rules engine, the live hub) consumes the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Domain = Literal["traffic", "facility", "emergency"]
DOMAINS: tuple[Domain, ...] = ("traffic", "facility", "emergency")


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """A device as named by its topic ``city/{domain}/{district}/{device_id}``."""

    domain: Domain
    district: str
    device_id: str


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one series at one instant (device time).

    Exactly one of ``value`` (numbers and booleans, booleans as 1.0/0.0) and
    ``state`` (short state strings such as ``"alarm"``) is set.
    """

    device: DeviceRef
    channel: str
    ts: float
    """Device time, seconds since the Unix epoch."""
    value: float | None
    state: str | None
    unit: str | None
    update_period_s: float | None = None
    """SenML ``ut``: the longest time before the next reading is due."""


@dataclass(frozen=True, slots=True)
class Presence:
    """A retained ``…/status`` message: online or offline within a session."""

    device: DeviceRef
    state: Literal["online", "offline"]
    session: int
    ts: float
    """Receive time of the status message."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that cannot be stored, kept with the reason."""

    topic: str
    payload: bytes
    reason: str
    received_at: float
