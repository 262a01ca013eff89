"""Roles, the permissions they carry, and the dependency every route declares.

Every route of the API names exactly one :class:`Permission` through
:func:`requires` (or is listed in :data:`PUBLIC_PATHS`); a test walks all
routes and proves that each rejects anonymous and under-privileged callers.
What a role may do to one particular alert (an emergency alert needs a
responder) is decided per alert by :class:`rules.AlertLifecycle`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from rules import ROLES, Role

__all__ = [
    "PUBLIC_PATHS",
    "ROLE_PERMISSIONS",
    "Permission",
    "has_permission",
]


class Permission(StrEnum):
    """What a route needs."""

    VIEW = "view"
    """Read everything: devices, history, alerts, incidents, KPIs, the live feed."""
    ALERTS = "alerts"
    """Act on alerts (acknowledge, comment, assign, shelve, resolve); the rule's
    acknowledging role is checked per alert."""
    ENGINEERING = "engineering"
    """Replays, simulations, rules and backtests."""
    ADMIN = "admin"
    """Users, tokens, devices, the audit log."""


ROLE_PERMISSIONS: Final[dict[Role, frozenset[Permission]]] = {
    "operator": frozenset({Permission.VIEW, Permission.ALERTS}),
    "responder": frozenset({Permission.VIEW, Permission.ALERTS}),
    "engineer": frozenset({Permission.VIEW, Permission.ALERTS, Permission.ENGINEERING}),
    "admin": frozenset(Permission),
}
assert set(ROLE_PERMISSIONS) == set(ROLES)

PUBLIC_PATHS: Final[frozenset[str]] = frozenset(
    {"/healthz", "/readyz", "/api/v1/auth/login", "/", "/openapi.json", "/docs"}
)
"""Routes anyone may call: probes, the login itself, the console's page, the API document."""


def has_permission(role: Role, permission: Permission) -> bool:
    """Whether ``role`` carries ``permission``."""
    return permission in ROLE_PERMISSIONS[role]
