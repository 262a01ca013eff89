"""Admin: users, API tokens, and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, Field

from control_api.auth import Principal, new_password
from control_api.deps import Context, client_address, requires
from control_api.errors import UserExists, UserNotFound
from control_api.roles import Permission
from control_api.schemas import RoleName, error_responses

router = APIRouter(prefix="/api/v1", tags=["admin"])

Admin = Annotated[Principal, Depends(requires(Permission.ADMIN))]
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class UserOut(BaseModel):
    """A user, without secrets."""

    name: str
    role: RoleName
    display_name: str
    disabled: bool
    created_at: datetime
    password_changed_at: datetime


class UserIn(BaseModel):
    """A new user; without a password, a one-time password is generated and returned."""

    name: str = Field(pattern=NAME_PATTERN)
    role: RoleName
    display_name: str = Field(default="", max_length=200)
    password: str | None = Field(default=None, min_length=12, max_length=1024)


class UserCreated(UserOut):
    """A created user; ``password`` is set only when it was generated, and shown once."""

    password: str | None = None


class UserPatch(BaseModel):
    """Changes to a user; changing role or password, or disabling, ends their sessions."""

    role: RoleName | None = None
    disabled: bool | None = None
    display_name: str | None = Field(default=None, max_length=200)
    reset_password: bool = Field(default=False, description="Generate a one-time password.")


class TokenIn(BaseModel):
    """A token for a user (a service account or a person's script)."""

    user: str = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=200)
    ttl_days: float | None = Field(default=None, gt=0, le=3650)


class TokenOut(BaseModel):
    """A token without its secret."""

    id: str
    user_name: str
    description: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class TokenIssued(BaseModel):
    """A new token: ``token`` is shown once and never stored."""

    id: str
    user_name: str
    token: str
    expires_at: datetime | None


class AuditEntry(BaseModel):
    """One audit log row."""

    id: int
    at: datetime
    actor: str
    action: str
    target: str
    outcome: str
    remote_addr: str | None
    detail: dict[str, Any]


@router.get("/users", responses=error_responses(401, 403))
async def list_users(ctx: Context, _: Admin) -> list[UserOut]:
    """Every user."""
    return [UserOut.model_validate(u) for u in await ctx.auth.users()]


@router.post("/users", status_code=201, responses=error_responses(401, 403, 409, 422))
async def add_user(body: UserIn, request: Request, ctx: Context, caller: Admin) -> UserCreated:
    """Create a user."""
    generated = new_password() if body.password is None else None
    try:
        await ctx.auth.add_user(
            body.name, body.role, body.password or generated or "", display_name=body.display_name
        )
    except UserExists as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    await ctx.audit.record(
        actor=caller.name, action="user.add", target=body.name,
        remote_addr=client_address(request), detail={"role": body.role},
    )  # fmt: skip
    return UserCreated(**(await ctx.auth.user(body.name)), password=generated)


@router.patch("/users/{name}", responses=error_responses(401, 403, 404, 422))
async def change_user(
    name: str, body: UserPatch, request: Request, ctx: Context, caller: Admin
) -> UserCreated:
    """Change role, display name, disable, or reset the password."""
    generated = new_password() if body.reset_password else None
    try:
        row = await ctx.auth.update_user(
            name, role=body.role, disabled=body.disabled, display_name=body.display_name,
            password=generated,
        )  # fmt: skip
    except UserNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    await ctx.audit.record(
        actor=caller.name, action="user.change", target=name, remote_addr=client_address(request),
        detail=body.model_dump(exclude_none=True),
    )  # fmt: skip
    return UserCreated(**row, password=generated)


@router.get("/tokens", responses=error_responses(401, 403))
async def list_tokens(ctx: Context, _: Admin) -> list[TokenOut]:
    """Every token, without secrets."""
    return [TokenOut.model_validate(t) for t in await ctx.auth.tokens()]


@router.post("/tokens", status_code=201, responses=error_responses(401, 403, 404, 422))
async def issue_token(body: TokenIn, request: Request, ctx: Context, caller: Admin) -> TokenIssued:
    """Issue a bearer token for a user; the token is in this response only."""
    try:
        issued = await ctx.auth.issue_token(
            body.user, created_by=caller.name, description=body.description,
            ttl_s=body.ttl_days * 86400 if body.ttl_days else None,
        )  # fmt: skip
    except UserNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    await ctx.audit.record(
        actor=caller.name, action="token.issue", target=issued.id,
        remote_addr=client_address(request), detail={"user": body.user},
    )  # fmt: skip
    return TokenIssued(
        id=issued.id, user_name=issued.user_name, token=issued.token, expires_at=issued.expires_at
    )


@router.delete("/tokens/{token_id}", status_code=204, responses=error_responses(401, 403, 404))
async def revoke_token(token_id: str, request: Request, ctx: Context, caller: Admin) -> None:
    """Revoke a token at once."""
    if not await ctx.auth.revoke_token(token_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no live token {token_id!r}")
    await ctx.audit.record(
        actor=caller.name, action="token.revoke", target=token_id,
        remote_addr=client_address(request),
    )  # fmt: skip


@router.get("/audit", responses=error_responses(401, 403, 422))
async def audit_log(
    ctx: Context,
    _: Admin,
    actor: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=100)] = None,
    before: Annotated[int | None, Query(ge=1, description="Entries with a smaller id.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEntry]:
    """The audit log, newest first."""
    rows = await ctx.audit.entries(actor=actor, action=action, before_id=before, limit=limit)
    return [AuditEntry.model_validate(r) for r in rows]
