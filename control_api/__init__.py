"""The control API: REST, the live websocket, authentication and roles, CAP export.

The names below load on first use: every ``cityops`` command imports this
package to build its parser, and only the commands that serve HTTP should pay
for building the FastAPI routes (about a second here).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from control_api.app import create_app
    from control_api.cli import api_config, ensure_first_admin
    from control_api.context import ApiConfig, ApiContext
    from control_api.errors import ControlApiError
    from control_api.live import LiveHub
    from control_api.server import embedded_server

__all__ = [
    "ApiConfig",
    "ApiContext",
    "ControlApiError",
    "LiveHub",
    "api_config",
    "create_app",
    "embedded_server",
    "ensure_first_admin",
]

_WHERE = {
    "ApiConfig": "control_api.context",
    "ApiContext": "control_api.context",
    "ControlApiError": "control_api.errors",
    "LiveHub": "control_api.live",
    "api_config": "control_api.cli",
    "create_app": "control_api.app",
    "embedded_server": "control_api.server",
    "ensure_first_admin": "control_api.cli",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    msg = f"module 'control_api' has no attribute {name!r}"
    raise AttributeError(msg)
