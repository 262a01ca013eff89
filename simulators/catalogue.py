"""The channels each device generator produces, shared by the model validator.

A city file declares for each device kind the channels and units it
publishes; the loader checks the declaration against this catalogue so a
typo in the YAML is reported at load time, not as a missing series later.
Names follow the FIWARE Smart Data Models where one exists; units are SenML
(RFC 8428) or its secondary units (RFC 8798).
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["GENERATOR_CHANNELS", "SITE_TYPES", "ChannelType"]

ChannelType = Literal["number", "bool", "state"]

GENERATOR_CHANNELS: Final[dict[str, tuple[tuple[str, ChannelType], ...]]] = {
    # traffic
    "loop-detector": (
        ("intensity", "number"),
        ("occupancy", "number"),
        ("averageVehicleSpeed", "number"),
    ),
    "signal-controller": (("phase", "state"), ("fault", "bool")),
    "parking": (("occupancy", "number"), ("availableSpotNumber", "number")),
    # facility
    "power-meter": (("activePower", "number"),),
    "indoor-climate": (("temperature", "number"), ("relativeHumidity", "number")),
    "water-tank": (("fillingLevel", "number"),),
    "pump": (("state", "state"), ("flow", "number")),
    "elevator": (("state", "state"), ("floor", "number")),
    "streetlight": (("powerState", "state"), ("illuminanceLevel", "number")),
    "air-quality": (("pm25", "number"), ("no2", "number"), ("temperature", "number")),
    # emergency
    "fire-panel": (("state", "state"),),
    "smoke-detector": (("smokeObscuration", "number"), ("alarm", "bool")),
    "gas-detector": (("lel", "number"), ("alarm", "bool")),
    "river-gauge": (("currentLevel", "number"), ("floodLevelStatus", "state")),
    "underpass-gauge": (("currentLevel", "number"), ("floodLevelStatus", "state")),
    "call-button": (("pressed", "bool"),),
    "seismometer": (("seismicIntensity", "number"), ("pga", "number")),
}
"""Generator name → its channels in publishing order, with their value type."""

SITE_TYPES: Final = ("building", "river-gauge", "underpass", "parking")
"""Kinds of point sites a city file may declare besides intersections."""
