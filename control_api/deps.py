"""Request dependencies: the process context, the caller, and the permission check.

A route declares what it needs with ``Depends(requires(Permission.X))``,
which authenticates the caller (bearer token or session cookie), checks the
CSRF token of a cookie-authenticated state-changing request, and checks the
role. Anonymous callers get 401, under-privileged ones 403.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from control_api.auth import CSRF_HEADER, SESSION_COOKIE, Principal
from control_api.context import ApiContext
from control_api.roles import Permission, has_permission

__all__ = ["Caller", "Context", "Requires", "client_address", "get_context", "requires"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="An API token issued by an admin: `Authorization: Bearer cot_…`",
)
cookie_scheme = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,
    scheme_name="session",
    description=(
        "The browser session from `POST /api/v1/auth/login`. State-changing requests "
        f"must also send the session's CSRF token in `{CSRF_HEADER}`."
    ),
)


def get_context(request: Request) -> ApiContext:
    """The process context built by the lifespan."""
    ctx: ApiContext = request.app.state.ctx
    return ctx


Context = Annotated[ApiContext, Depends(get_context)]


def client_address(request: Request) -> str:
    """The caller's address (uvicorn applies trusted proxy headers before this)."""
    return request.client.host if request.client else "unknown"


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    session_secret: Annotated[str | None, Depends(cookie_scheme)],
) -> Principal:
    """The caller, from a bearer token or the session cookie.

    Raises:
        HTTPException: 401 without valid credentials; 403 when a cookie-authenticated
            state-changing request lacks the session's CSRF token.
    """
    ctx = get_context(request)
    principal: Principal | None = None
    if credentials is not None:
        principal = await ctx.auth.token_principal(credentials.credentials)
    elif session_secret:
        principal = await ctx.auth.session_principal(session_secret)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "sign in, or send a valid API token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if principal.via == "session" and request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not principal.csrf_token or not hmac.compare_digest(sent, principal.csrf_token):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"missing or wrong {CSRF_HEADER} header for this session",
            )
    return principal


class Requires:
    """The dependency that admits callers whose role carries ``permission``."""

    def __init__(self, permission: Permission) -> None:
        self.permission = permission

    async def __call__(
        self, request: Request, caller: Annotated[Principal, Depends(authenticate)]
    ) -> Principal:
        """Admit or refuse (403, audited for state-changing requests)."""
        if not has_permission(caller.role, self.permission):
            if request.method not in SAFE_METHODS:
                await get_context(request).audit.record(
                    actor=caller.name,
                    action=f"{request.method} {request.url.path}",
                    outcome="denied",
                    remote_addr=client_address(request),
                    detail={"needs": self.permission.value, "role": caller.role},
                )
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"{caller.name} is {caller.role}; this needs the {self.permission.value!r} "
                "permission",
            )
        return caller


_REQUIRES = {p: Requires(p) for p in Permission}


def requires(permission: Permission) -> Requires:
    """The shared dependency instance for ``permission``."""
    return _REQUIRES[permission]


Caller = Principal
