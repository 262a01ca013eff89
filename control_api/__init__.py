"""The control API: REST, the live websocket, authentication and roles, CAP export."""

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
