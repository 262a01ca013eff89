"""Sign in and out, who am I, change my password."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, Field

from control_api.auth import CSRF_HEADER, SESSION_COOKIE, Principal
from control_api.deps import Context, client_address, cookie_scheme, requires
from control_api.errors import AuthenticationFailed, LoginRateLimited
from control_api.roles import ROLE_PERMISSIONS, Permission
from control_api.schemas import RoleName, error_responses

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


class LoginIn(BaseModel):
    """User name and password."""

    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class Me(BaseModel):
    """The signed-in caller and what the console may offer them."""

    name: str
    role: RoleName
    via: Literal["session", "token"]
    permissions: list[str]
    csrf_token: str | None = Field(
        default=None, description=f"Send it in `{CSRF_HEADER}` on state-changing requests."
    )


class PasswordIn(BaseModel):
    """Change the caller's own password."""

    current: str = Field(min_length=1, max_length=1024)
    new: str = Field(min_length=12, max_length=1024)


def _me(p: Principal) -> Me:
    perms = sorted(x.value for x in ROLE_PERMISSIONS[p.role])
    return Me(name=p.name, role=p.role, via=p.via, permissions=perms, csrf_token=p.csrf_token)


@router.post("/login", responses=error_responses(401, 422, 429))
async def login(body: LoginIn, request: Request, response: Response, ctx: Context) -> Me:
    """Open a browser session: sets the session cookie and returns the CSRF token."""
    addr = client_address(request)
    try:
        principal, session = await ctx.auth.login(body.name, body.password, remote_addr=addr)
    except LoginRateLimited as exc:
        await ctx.audit.record(
            actor=body.name, action="login", outcome="denied", remote_addr=addr,
            detail={"reason": "rate limited"},
        )  # fmt: skip
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            str(exc),
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from exc
    except AuthenticationFailed as exc:
        await ctx.audit.record(actor=body.name, action="login", outcome="failed", remote_addr=addr)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc)) from exc
    response.set_cookie(
        SESSION_COOKIE,
        session.secret,
        max_age=int(ctx.config.login.session_ttl_s),
        httponly=True,
        secure=True,
        samesite="strict",
        path="/",
    )
    await ctx.audit.record(actor=principal.name, action="login", remote_addr=addr)
    return _me(principal)


@router.post("/logout", status_code=204, responses=error_responses(401, 403))
async def logout(
    request: Request,
    response: Response,
    ctx: Context,
    caller: Annotated[Principal, Depends(requires(Permission.VIEW))],
    session_secret: Annotated[str | None, Depends(cookie_scheme)],
) -> None:
    """End the current browser session."""
    if caller.via == "session" and session_secret:
        await ctx.auth.logout(session_secret)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    await ctx.audit.record(actor=caller.name, action="logout", remote_addr=client_address(request))


@router.get("/me", responses=error_responses(401, 403))
async def me(caller: Annotated[Principal, Depends(requires(Permission.VIEW))]) -> Me:
    """Who is signed in, their role and permissions."""
    return _me(caller)


@router.post("/password", status_code=204, responses=error_responses(401, 403, 422))
async def change_password(
    body: PasswordIn,
    request: Request,
    ctx: Context,
    caller: Annotated[Principal, Depends(requires(Permission.VIEW))],
) -> None:
    """Change the caller's own password (ends their sessions: sign in again)."""
    if not await ctx.auth.check_password(caller.name, body.current):
        await ctx.audit.record(
            actor=caller.name, action="password", outcome="failed",
            remote_addr=client_address(request),
        )  # fmt: skip
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "the current password is wrong")
    await ctx.auth.update_user(caller.name, password=body.new)
    await ctx.audit.record(
        actor=caller.name, action="password", target=caller.name,
        remote_addr=client_address(request),
    )  # fmt: skip
