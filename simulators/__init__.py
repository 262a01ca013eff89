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
from simulators.mqtt import Endpoint, MqttPublisher, PublishCounts
from simulators.recording import (
    BLOCK_MAGIC,
    FILE_HEADER,
    RecordedMessage,
    RecordingReader,
    RecordingWriter,
    decode_block,
)
from simulators.replay import (
    DRILL_PROPERTY,
    REPLAY_PREFIX,
    REPLAY_PROPERTY,
    PauseControl,
    Replayer,
    ReplayOptions,
    rewrite_topic,
)
from simulators.runner import resolve_start
from simulators.scenario import (
    FAULT_KINDS,
    ScenarioPlan,
    available_scenarios,
    compile_plan,
    load_scenario,
)

__all__ = [
    "BLOCK_MAGIC",
    "DRILL_PROPERTY",
    "FAULT_KINDS",
    "FILE_HEADER",
    "REPLAY_PREFIX",
    "REPLAY_PROPERTY",
    "CityModel",
    "CityModelError",
    "DeviceSpec",
    "Endpoint",
    "MqttError",
    "MqttPublisher",
    "PauseControl",
    "PublishCounts",
    "RecordedMessage",
    "RecordingError",
    "RecordingReader",
    "RecordingWriter",
    "ReplayOptions",
    "Replayer",
    "ScenarioError",
    "ScenarioPlan",
    "SimMessage",
    "Simulation",
    "SimulatorError",
    "available_cities",
    "available_scenarios",
    "compile_plan",
    "decode_block",
    "load_city",
    "load_scenario",
    "resolve_start",
    "rewrite_topic",
    "scale_city",
]
