"""The live websocket ``/api/v1/live``: authenticated, origin-checked, resumable.

Authentication is the session cookie (browsers) or a bearer token in the
``Authorization`` header (other programs). Browsers always send ``Origin``
and, with it, the cookie of whatever page opened the socket: the origin must
be the API's own or one configured with ``--allow-origin``. A handshake
without ``Origin`` is accepted only with a bearer token. A refused handshake
closes with 1008 (policy violation) before it is accepted, which a browser
sees as a failed connection; the reason is in the server log and the audit.

Commands over the socket (``ack``, ``comment``, ``shelve``…) are checked
like REST: the caller is re-read for every command (a disabled user or a
revoked token stops at once), the role must carry ``alerts``, and the rule's
acknowledging role and the alert version are checked by the lifecycle.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, WebSocket

from control_api.auth import SESSION_COOKIE, Principal
from control_api.context import ApiContext
from control_api.live_ws import check_origin, serve_live
from control_api.roles import Permission, has_permission
from control_api.routes.alerts import ActionInput, ActionName, ConflictError, run_action

router = APIRouter(tags=["live"])
log = logging.getLogger(__name__)

SOURCES = ("live", "replay", "drill")


def _own_origins(websocket: WebSocket) -> list[str]:
    host = websocket.headers.get("host", "")
    scheme = "https" if websocket.url.scheme == "wss" else "http"
    return [f"{scheme}://{host}"] if host else []


async def _principal(ctx: ApiContext, websocket: WebSocket) -> Principal | None:
    authorization = websocket.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token:
        return await ctx.auth.token_principal(token.strip())
    secret = websocket.cookies.get(SESSION_COOKIE)
    return await ctx.auth.session_principal(secret) if secret else None


def _address(websocket: WebSocket) -> str:
    return websocket.client.host if websocket.client else "unknown"


_ACTIONS: dict[str, ActionName] = {
    "ack": "acknowledge",
    "acknowledge": "acknowledge",
    "comment": "comment",
    "shelve": "shelve",
    "unshelve": "unshelve",
    "resolve": "resolve",
    "assign": "assign",
}


async def _command(
    ctx: ApiContext, websocket: WebSocket, first: Principal, message: dict[str, Any]
) -> dict[str, Any]:
    """Run one alert command from the socket with the REST checks; a result dict, never raises."""
    action = _ACTIONS.get(str(message.get("type")))
    if action is None:
        return {"ok": False, "status": 422, "error": f"unknown command {message.get('type')!r}"}
    caller = await _principal(ctx, websocket)
    if caller is None or caller.name != first.name:
        return {"ok": False, "status": 401, "error": "the session or token has ended"}
    if not has_permission(caller.role, Permission.ALERTS):
        return {"ok": False, "status": 403, "error": f"{caller.name} is {caller.role}"}
    alert_id, version = message.get("alert_id"), message.get("version")
    if not isinstance(alert_id, str) or not isinstance(version, int) or isinstance(version, bool):
        return {"ok": False, "status": 422, "error": "alert_id (string) and version (int) needed"}
    note = str(message.get("note", ""))[:2000]
    change = ActionInput(version, note)
    if action == "assign":
        change = ActionInput(version, note, assignee=str(message.get("assignee", ""))[:64])
    elif action == "shelve":
        until = message.get("until")
        if not isinstance(until, int | float):
            return {"ok": False, "status": 422, "error": "shelve needs until (epoch seconds)"}
        change = ActionInput(version, note or "shelved", until=float(until))
    try:
        alert = await run_action(
            ctx, caller, alert_id, action, change, request_addr=_address(websocket)
        )
    except ConflictError as exc:
        current = exc.current.model_dump(mode="json") if exc.current else None
        return {"ok": False, "status": 409, "error": str(exc.detail), "current": current}
    except HTTPException as exc:
        return {"ok": False, "status": exc.status_code, "error": str(exc.detail)}
    return {"ok": True, "alert": alert.model_dump(mode="json")}


@router.websocket("/api/v1/live")
async def live(websocket: WebSocket) -> None:
    """Snapshot, then deltas; query ``source`` (live, replay, drill), ``hub``+``seq`` to resume."""
    ctx: ApiContext = websocket.app.state.ctx
    principal = await _principal(ctx, websocket)
    origin = websocket.headers.get("origin")
    allowed = [*_own_origins(websocket), *ctx.config.allowed_origins]
    via_token = principal is not None and principal.via == "token"
    refusal = None
    if principal is None:
        refusal = "not signed in"
    elif not has_permission(principal.role, Permission.VIEW):
        refusal = f"{principal.name} may not view"
    elif not check_origin(origin, allowed, allow_missing=via_token):
        refusal = f"origin {origin!r} is not allowed"
    if refusal is not None:
        log.warning("live websocket from %s refused: %s", _address(websocket), refusal)
        await ctx.audit.record(
            actor=principal.name if principal else "anonymous", action="live.connect",
            outcome="denied", remote_addr=_address(websocket), detail={"reason": refusal},
        )  # fmt: skip
        await websocket.close(code=1008, reason=refusal[:120])
        return
    assert principal is not None
    source = websocket.query_params.get("source", "live")
    if source not in SOURCES:
        await websocket.close(code=1008, reason=f"source must be one of {', '.join(SOURCES)}")
        return
    # serve_live closes the socket itself, whichever side ends it.
    await serve_live(
        websocket,
        ctx.hub,
        user=principal,
        snapshot_source=ctx.snapshots[source],
        on_command=lambda message: _command(ctx, websocket, principal, message),
        source=source,  # type: ignore[arg-type]
    )
