"""Every route declares its permission, and every route refuses who it must.

The test walks the application's routes (no list kept by hand): a route
added without a permission fails here, and so does one that lets an
anonymous or under-privileged caller through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute, iter_route_contexts

from control_api.deps import Requires
from control_api.roles import PUBLIC_PATHS, ROLE_PERMISSIONS
from rules import ROLES
from tests.control_api.conftest import ApiClient, RunningApi

# FastAPI's own documentation routes.
_DOC_PATHS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


@dataclass(frozen=True, slots=True)
class Route:
    """A route as mounted (full path), with the permissions its dependencies declare."""

    path: str
    methods: frozenset[str]
    websocket: bool
    permissions: frozenset[Any]


def _permissions(dependant: Any) -> set[Any]:
    found = set()
    for dep in dependant.dependencies:
        if isinstance(dep.call, Requires):
            found.add(dep.call.permission)
        found |= _permissions(dep)
    return found


def _routes(api: RunningApi) -> list[Route]:
    """Every mounted route, through included routers (FastAPI's own route walk)."""
    out = []
    for rc in iter_route_contexts(api.app.routes):
        original = rc.original_route
        if not isinstance(original, APIRoute | APIWebSocketRoute) or rc.path in _DOC_PATHS:
            continue
        out.append(
            Route(
                path=str(rc.path),
                methods=frozenset(rc.methods or ()),
                websocket=isinstance(original, APIWebSocketRoute),
                permissions=frozenset(_permissions(original.dependant)),
            )
        )
    return out


def _api_routes(api: RunningApi) -> list[Route]:
    return [r for r in _routes(api) if not r.websocket]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_is_public_or_declares_one_permission(api: RunningApi) -> None:
    routes = _routes(api)
    assert len(routes) > 20
    for route in routes:
        declared = route.permissions
        if route.path in PUBLIC_PATHS:
            assert not declared, f"{route.path} is public but declares {declared}"
        elif route.websocket:
            # the websocket authenticates inside its handler (no HTTP 401 exists there)
            continue
        else:
            assert len(declared) == 1, f"{route.path} declares {declared or 'no permission'}"


async def test_anonymous_callers_get_401_everywhere_but_public_routes(
    api: RunningApi, anonymous: ApiClient
) -> None:
    checked = 0
    for route in _api_routes(api):
        if route.path in PUBLIC_PATHS:
            continue
        for method in route.methods:
            response = await anonymous.request(method, _concrete(route.path), json={})
            assert response.status_code == 401, f"{method} {route.path}: {response.status_code}"
            assert response.json()["error"]["code"] == "unauthenticated"
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("role", ROLES)
async def test_each_role_gets_403_where_it_lacks_the_permission(
    api: RunningApi, clients: dict[str, ApiClient], role: str
) -> None:
    client = clients[role]
    allowed = ROLE_PERMISSIONS[role]  # type: ignore[index]  # parametrized over ROLES
    for route in _api_routes(api):
        if route.path in PUBLIC_PATHS or route.path == "/api/v1/auth/logout":
            continue
        (needed,) = route.permissions
        for method in route.methods:
            response = await client.request(method, _concrete(route.path), json={})
            if needed in allowed:
                assert response.status_code not in (401, 403), (
                    f"{role} refused on {method} {route.path}: {response.text}"
                )
            else:
                assert response.status_code == 403, (
                    f"{role} got {response.status_code} on {method} {route.path}"
                )
                assert response.json()["error"]["code"] == "forbidden"
