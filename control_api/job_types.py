"""What engineer jobs look like to their callers: requests, states, progress, snapshots.

The data types of :class:`control_api.jobs.JobManager`'s API, with the bounds
a request must keep (the routes declare them in their schemas too). Frozen
dataclasses and ``Literal`` aliases only: no behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "MAX_SIMULATION_S",
    "MAX_SPEED",
    "JobKind",
    "JobProgress",
    "JobSnapshot",
    "JobState",
    "Mode",
    "ReplayRequest",
    "SimulationRequest",
    "TimeMode",
]

JobKind = Literal["replay", "simulation"]
JobState = Literal["running", "paused", "stopped", "finished", "failed"]
Mode = Literal["sandbox", "drill"]
"""``sandbox``: ``cityops/replay/{job_id}/…``; ``drill``: the live topics, marked as a drill."""
TimeMode = Literal["shift", "scale", "keep"]
"""Payload timestamps: shifted to now, shifted and scaled by the speed, or kept."""

MAX_SPEED: Final = 10_000.0
"""Fastest pacing factor (0, as fast as possible, is allowed too)."""
MAX_SIMULATION_S: Final = 7 * 86_400.0
"""Longest simulated duration of a simulation."""


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """A replay to start.

    Attributes:
        recording: File name in the recordings folder.
        speed: Pacing factor; 0 publishes as fast as possible.
        from_s: Window start, seconds after the first message.
        to_s: Window end (excluded), seconds after the first message.
        mode: ``sandbox`` (default) or ``drill`` (live topics, marked).
        time_mode: How payload timestamps move (``shift`` to now by default).
    """

    recording: str
    speed: float = 1.0
    from_s: float | None = None
    to_s: float | None = None
    mode: Mode = "sandbox"
    time_mode: TimeMode = "shift"


@dataclass(frozen=True, slots=True)
class SimulationRequest:
    """A simulation of the API's city to start.

    Attributes:
        scenario: A shipped scenario name, or ``None`` for an ordinary day.
        speed: Simulated seconds per second; 0 publishes as fast as possible.
        seed: The seed (the same seed gives the same messages).
        duration_s: Simulated seconds to run (default: the scenario's length;
            unbounded without a scenario, except at speed 0: one hour).
        devices: Scale the city to this many devices.
        mode: ``sandbox`` (default) or ``drill``.
        time_mode: How payload timestamps move (``shift``: the first reading at now).
    """

    scenario: str | None = None
    speed: float = 1.0
    seed: int = 1
    duration_s: float | None = None
    devices: int | None = None
    mode: Mode = "sandbox"
    time_mode: TimeMode = "shift"


@dataclass(frozen=True, slots=True)
class JobProgress:
    """How far a job got.

    Attributes:
        published: Messages handed to the broker.
        acked: Of those, acknowledged (QoS 1) or written (QoS 0).
        position_s: Recording (or simulated) seconds from the window start to
            the message being published.
        total_s: Length of the window or simulation, when known.
        fraction: ``position_s / total_s`` (1.0 once finished), when known.
        total_messages: Messages to publish, when known (a whole recording).
    """

    published: int
    acked: int
    position_s: float
    total_s: float | None
    fraction: float | None
    total_messages: int | None


@dataclass(frozen=True, slots=True)
class JobSnapshot:
    """A job as it is now (times in epoch seconds)."""

    id: str
    kind: JobKind
    state: JobState
    mode: Mode
    topic_prefix: str
    parameters: Mapping[str, Any]
    started_by: str
    started_at: float
    ended_at: float | None
    error: str | None
    progress: JobProgress
