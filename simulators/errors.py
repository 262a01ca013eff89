"""Errors raised by the simulators package.

The tree::

    SimulatorError              root of every error this package raises on purpose
    ├── CityModelError          a city YAML file is missing, malformed or inconsistent
    ├── ScenarioError           a scenario file is malformed or names what the city lacks
    ├── RecordingError          a recording file cannot be opened, written or read
    └── MqttError               the broker could not be reached or did not answer in time

Third-party errors (``OSError``, ``yaml.YAMLError``, paho return codes) are
translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "CityModelError",
    "MqttError",
    "RecordingError",
    "ScenarioError",
    "SimulatorError",
]


class SimulatorError(Exception):
    """Root of the errors raised by :mod:`simulators`."""


class CityModelError(SimulatorError):
    """A city model file is missing, malformed or inconsistent."""


class ScenarioError(SimulatorError):
    """A scenario file is malformed or refers to something the city does not have."""


class RecordingError(SimulatorError):
    """A recording file cannot be opened, written or read."""


class MqttError(SimulatorError):
    """The broker could not be reached, or did not acknowledge within the deadline."""
