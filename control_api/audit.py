"""The audit log: who changed what, when, from where, and whether it was allowed.

Every state-changing request writes one row, including refused ones
(``denied``) and failed logins (``failed``). Rows are never dropped by
retention; the maintenance task (``cityops.maintenance``) blanks the
personal parts (user name, address) of rows older than a configured period.
"""

from __future__ import annotations

from typing import Any, Literal

from psycopg.types.json import Jsonb

from control_api.auth import Pool

__all__ = ["AuditLog", "Outcome"]

Outcome = Literal["ok", "denied", "failed"]


class AuditLog:
    """Writes and reads ``audit_log``."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def record(
        self,
        *,
        actor: str,
        action: str,
        target: str = "",
        outcome: Outcome = "ok",
        remote_addr: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append one entry."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO audit_log (actor, action, target, outcome, remote_addr, detail)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (actor, action, target, outcome, remote_addr, Jsonb(detail or {})),
            )

    async def entries(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Newest first, optionally filtered; ``before_id`` pages backwards."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, at, actor, action, target, outcome, remote_addr, detail"
                " FROM audit_log WHERE (%(actor)s::text IS NULL OR actor = %(actor)s)"
                " AND (%(action)s::text IS NULL OR action = %(action)s)"
                " AND (%(before)s::bigint IS NULL OR id < %(before)s)"
                " ORDER BY id DESC LIMIT %(limit)s",
                {"actor": actor, "action": action, "before": before_id, "limit": limit},
            )
            return await cur.fetchall()
