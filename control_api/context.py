"""What one API process holds: its configuration and its long-lived collaborators."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cityops.settings import MqttEndpoint
from control_api.audit import AuditLog
from control_api.auth import AuthStore, LoginPolicy, Pool
from rules import AlertCommands, AlertLifecycle, AlertStore, Rule, RuleSet

__all__ = ["ApiConfig", "ApiContext"]


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """How to run the API; built from settings at the edge (``cityops api`` / ``cityops up``)."""

    database_url: str
    mqtt: MqttEndpoint
    rules_path: Path
    city: str | None = "minamikawa"
    """The city model (name or YAML path) for district areas in CAP, the map and device
    registration; None for none."""
    allowed_origins: tuple[str, ...] = ()
    """Extra browser origins allowed on the websocket besides the API's own."""
    login: LoginPolicy = field(default_factory=LoginPolicy)
    cap_sender: str = "cityops@city.example"
    timezone: str = "Asia/Tokyo"
    pool_min_size: int = 2
    pool_max_size: int = 16
    db_timeout_s: float = 5.0
    client_id: str = "cityops-api"
    live_from_broker: bool = True
    """Feed the live hub from the broker; ``cityops up`` feeds it in-process instead."""
    recordings_dir: Path | None = None
    """Where engineers' recordings are kept (``<CITYOPS_DATA_DIR>/recordings``)."""
    console_dir: Path | None = None
    """Built console assets to serve at ``/`` (none: API only)."""


@dataclass(slots=True)
class ApiContext:
    """The collaborators every request uses; built once by the lifespan."""

    config: ApiConfig
    pool: Pool
    auth: AuthStore
    audit: AuditLog
    alert_store: AlertStore
    lifecycle: AlertLifecycle
    commands: AlertCommands
    rule_set: RuleSet
    hub: Any
    """The :class:`control_api.live.LiveHub`."""
    jobs: Any = None
    """The :class:`control_api.jobs.JobManager` of replays and simulations."""
    city: Any = None
    """The :class:`simulators.CityModel` (district areas for CAP and the map), if it loaded."""
    snapshots: dict[str, Any] = field(default_factory=dict)
    """Snapshot readers per source (``live``, ``replay``, ``drill``), shared by clients."""
    started_at: float = field(default_factory=time.time)
    broker_connected: bool = False

    def rule(self, rule_id: str) -> Rule | None:
        """A loaded rule by id."""
        return self.lifecycle.rules.get(rule_id)
