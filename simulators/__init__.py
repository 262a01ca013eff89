"""cityops simulators: city model, generators, scenarios, faults, recorder, replayer, load.

Public surface (siblings import only these names)::

    load_city, scale_city, CityModel, DeviceSpec     the city
    Simulation, SimMessage                           the deterministic engine
    load_scenario, compile_plan, ScenarioPlan        scenarios and faults
    RecordingWriter, RecordingReader, RecordedMessage recording files
    rewrite_topic, REPLAY_PREFIX, DRILL_PROPERTY     replay isolation
"""

from simulators.engine import SimMessage, Simulation
from simulators.errors import (
    CityModelError,
    MqttError,
    RecordingError,
    ScenarioError,
    SimulatorError,
)
from simulators.layout import scale_city
from simulators.model import CityModel, DeviceSpec, available_cities, load_city
from simulators.recording import RecordedMessage, RecordingReader, RecordingWriter
from simulators.replay import DRILL_PROPERTY, REPLAY_PREFIX, REPLAY_PROPERTY, rewrite_topic
from simulators.scenario import (
    FAULT_KINDS,
    ScenarioPlan,
    available_scenarios,
    compile_plan,
    load_scenario,
)

__all__ = [
    "DRILL_PROPERTY",
    "FAULT_KINDS",
    "REPLAY_PREFIX",
    "REPLAY_PROPERTY",
    "CityModel",
    "CityModelError",
    "DeviceSpec",
    "MqttError",
    "RecordedMessage",
    "RecordingError",
    "RecordingReader",
    "RecordingWriter",
    "ScenarioError",
    "ScenarioPlan",
    "SimMessage",
    "Simulation",
    "SimulatorError",
    "available_cities",
    "available_scenarios",
    "compile_plan",
    "load_city",
    "load_scenario",
    "rewrite_topic",
    "scale_city",
]
