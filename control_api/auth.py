"""Users, passwords, browser sessions, bearer tokens and the login rate limit.

* Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's
  second recommended profile); a hash made with older parameters is upgraded
  on the next successful login.
* A browser session is a random 256-bit secret in a ``Secure; HttpOnly;
  SameSite=Strict`` cookie; the database keeps only its SHA-256. Each session
  has its own CSRF token, which state-changing requests must echo in the
  ``X-CSRF-Token`` header (the cookie alone never authorises a change).
* A bearer token (``cot_<id>_<secret>``) belongs to a user, is issued and
  revoked by an admin, shown once, and stored as a SHA-256.
* Failed logins are rows, so the limit holds across API instances: more than
  :attr:`LoginPolicy.max_failures_per_user` failures for one user name, or
  :attr:`LoginPolicy.max_failures_per_address` from one address, within
  :attr:`LoginPolicy.window_s` refuse further attempts until the window passes.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import argon2
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from control_api.errors import (
    AuthenticationFailed,
    LoginRateLimited,
    UserExists,
    UserNotFound,
)
from rules import ROLES, Role

__all__ = [
    "SESSION_COOKIE",
    "AuthStore",
    "LoginPolicy",
    "Principal",
    "Session",
    "hash_password",
    "new_password",
    "verify_password",
]

SESSION_COOKIE = "cityops_session"
CSRF_HEADER = "X-CSRF-Token"
TOKEN_PREFIX = "cot_"

Pool = AsyncConnectionPool[AsyncConnection[dict[str, Any]]]

_hasher = argon2.PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """A hash to verify against for unknown users (made on first use: it takes ~0.3 s).

    Verifying against it keeps a login for an unknown user as slow as one for
    a known user, so response time does not tell which names exist.
    """
    return _hasher.hash(secrets.token_hex(16))


def hash_password(password: str) -> str:
    """Argon2id hash in PHC format."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches; never raises for a wrong password."""
    try:
        return _hasher.verify(password_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def new_password() -> str:
    """A random one-time password: 20 URL-safe characters (about 120 bits)."""
    return secrets.token_urlsafe(15)


def _sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user, how they authenticated, and the CSRF token of a session."""

    name: str
    role: Role
    via: Literal["session", "token"]
    csrf_token: str | None = None
    token_id: str | None = None


@dataclass(frozen=True, slots=True)
class Session:
    """A new browser session: the cookie's secret (shown once) and its CSRF token."""

    secret: str
    csrf_token: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class LoginPolicy:
    """Session lifetime and the failed-login limit."""

    session_ttl_s: float = 12 * 3600.0
    """One shift."""
    window_s: float = 900.0
    max_failures_per_user: int = 5
    max_failures_per_address: int = 20


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A bearer token as issued: ``token`` is shown once and never stored."""

    id: str
    token: str
    user_name: str
    expires_at: datetime | None


class AuthStore:
    """Users, sessions, tokens and failed logins in the database."""

    def __init__(self, pool: Pool, *, policy: LoginPolicy | None = None) -> None:
        self._pool = pool
        self.policy = policy or LoginPolicy()

    async def _fetch(
        self, query: str, params: tuple[object, ...] | dict[str, object]
    ) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(query.encode(), params)
            return await cur.fetchall() if cur.description else []

    # -- users -----------------------------------------------------------------

    async def add_user(
        self, name: str, role: Role, password: str, *, display_name: str = ""
    ) -> None:
        """Create a user.

        Raises:
            UserExists: the name is taken.
            ValueError: the role is unknown or the name is not ``[a-z0-9][a-z0-9._-]*``.
        """
        if role not in ROLES:
            msg = f"unknown role {role!r}; one of {', '.join(ROLES)}"
            raise ValueError(msg)
        try:
            await self._fetch(
                "INSERT INTO users (name, role, password_hash, display_name)"
                " VALUES (%s, %s, %s, %s)",
                (name, role, hash_password(password), display_name),
            )
        except psycopg.errors.UniqueViolation as exc:
            raise UserExists(name) from exc
        except psycopg.errors.CheckViolation as exc:
            msg = f"user name {name!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit"
            raise ValueError(msg) from exc

    async def users(self) -> list[dict[str, Any]]:
        """Every user, without password hashes."""
        return await self._fetch(
            "SELECT name, role, display_name, disabled, created_at, password_changed_at"
            " FROM users ORDER BY name",
            (),
        )

    async def user(self, name: str) -> dict[str, Any]:
        """One user, without the password hash.

        Raises:
            UserNotFound: no such user.
        """
        rows = await self._fetch(
            "SELECT name, role, display_name, disabled, created_at, password_changed_at"
            " FROM users WHERE name = %s",
            (name,),
        )
        if not rows:
            raise UserNotFound(name)
        return rows[0]

    async def update_user(
        self,
        name: str,
        *,
        role: Role | None = None,
        disabled: bool | None = None,
        password: str | None = None,
        display_name: str | None = None,
    ) -> dict[str, Any]:
        """Change a user; disabling one or changing a password ends their sessions.

        Raises:
            UserNotFound: no such user.
        """
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE users SET role = coalesce(%s, role),"
                " disabled = coalesce(%s, disabled),"
                " display_name = coalesce(%s, display_name),"
                " password_hash = coalesce(%s, password_hash),"
                " password_changed_at = CASE WHEN %s THEN now() ELSE password_changed_at END"
                " WHERE name = %s"
                " RETURNING name, role, display_name, disabled, created_at, password_changed_at",
                (
                    role,
                    disabled,
                    display_name,
                    hash_password(password) if password is not None else None,
                    password is not None,
                    name,
                ),
            )
            row = await cur.fetchone()
            if row is None:
                raise UserNotFound(name)
            if disabled or password is not None or role is not None:
                await conn.execute("DELETE FROM sessions WHERE user_name = %s", (name,))
            return row

    async def has_users(self) -> bool:
        """Whether any user exists (``cityops up`` creates the first admin otherwise)."""
        rows = await self._fetch("SELECT EXISTS (SELECT 1 FROM users) AS any", ())
        return bool(rows[0]["any"])

    # -- login -----------------------------------------------------------------

    async def check_rate(self, name: str, remote_addr: str) -> None:
        """Refuse a login attempt while too many recent attempts failed.

        Raises:
            LoginRateLimited: with the seconds until the oldest counted failure expires.
        """
        p = self.policy
        rows = await self._fetch(
            "SELECT"
            " count(*) FILTER (WHERE user_name = %(n)s) AS by_user,"
            " count(*) FILTER (WHERE remote_addr = %(a)s) AS by_addr,"
            " min(at) FILTER (WHERE user_name = %(n)s) AS first_user,"
            " min(at) FILTER (WHERE remote_addr = %(a)s) AS first_addr"
            " FROM login_failures WHERE at > now() - make_interval(secs => %(w)s)"
            " AND (user_name = %(n)s OR remote_addr = %(a)s)",
            {"n": name, "a": remote_addr, "w": p.window_s},
        )
        row = rows[0]
        first: datetime | None = None
        if row["by_user"] >= p.max_failures_per_user:
            first = row["first_user"]
        elif row["by_addr"] >= p.max_failures_per_address:
            first = row["first_addr"]
        if first is not None:
            retry = (first + timedelta(seconds=p.window_s) - datetime.now(UTC)).total_seconds()
            raise LoginRateLimited(name, max(1, int(retry) + 1))

    async def login(
        self, name: str, password: str, *, remote_addr: str
    ) -> tuple[Principal, Session]:
        """Check a password and open a session.

        Raises:
            LoginRateLimited: too many recent failures for this name or address.
            AuthenticationFailed: wrong name or password, or a disabled user
                (one message for all three, so it does not tell which names exist).
        """
        await self.check_rate(name, remote_addr)
        rows = await self._fetch(
            "SELECT name, role, password_hash, disabled FROM users WHERE name = %s", (name,)
        )
        row = rows[0] if rows else None
        ok = verify_password(row["password_hash"] if row else _dummy_hash(), password)
        if row is None or not ok or row["disabled"]:
            await self._fetch(
                "INSERT INTO login_failures (user_name, remote_addr) VALUES (%s, %s)",
                (name, remote_addr),
            )
            raise AuthenticationFailed
        if _hasher.check_needs_rehash(row["password_hash"]):
            await self._fetch(
                "UPDATE users SET password_hash = %s WHERE name = %s",
                (hash_password(password), name),
            )
        session = Session(
            secret=secrets.token_urlsafe(32),
            csrf_token=secrets.token_urlsafe(32),
            expires_at=datetime.now(UTC) + timedelta(seconds=self.policy.session_ttl_s),
        )
        await self._fetch(
            "INSERT INTO sessions (secret_sha256, user_name, csrf_token, expires_at, remote_addr)"
            " VALUES (%s, %s, %s, %s, %s)",
            (_sha256(session.secret), name, session.csrf_token, session.expires_at, remote_addr),
        )
        principal = Principal(name, row["role"], "session", csrf_token=session.csrf_token)
        return principal, session

    async def check_password(self, name: str, password: str) -> bool:
        """Whether ``password`` is the user's current one."""
        rows = await self._fetch("SELECT password_hash FROM users WHERE name = %s", (name,))
        return verify_password(rows[0]["password_hash"] if rows else _dummy_hash(), password) and (
            bool(rows)
        )

    async def session_principal(self, secret: str) -> Principal | None:
        """The user of a live session cookie, or None."""
        rows = await self._fetch(
            "SELECT u.name, u.role, s.csrf_token"
            " FROM sessions s JOIN users u ON u.name = s.user_name"
            " WHERE s.secret_sha256 = %s AND s.expires_at > now() AND NOT u.disabled",
            (_sha256(secret),),
        )
        if not rows:
            return None
        r = rows[0]
        return Principal(r["name"], r["role"], "session", csrf_token=r["csrf_token"])

    async def logout(self, secret: str) -> None:
        """End one session."""
        await self._fetch("DELETE FROM sessions WHERE secret_sha256 = %s", (_sha256(secret),))

    async def purge_expired(self) -> int:
        """Delete expired sessions and failures older than the window; returns sessions removed."""
        async with self._pool.connection() as conn:
            cur = await conn.execute("DELETE FROM sessions WHERE expires_at <= now()")
            await conn.execute(
                "DELETE FROM login_failures WHERE at < now() - make_interval(secs => %s)",
                (self.policy.window_s,),
            )
            return cur.rowcount

    # -- tokens ----------------------------------------------------------------

    async def issue_token(
        self,
        user_name: str,
        *,
        created_by: str,
        description: str = "",
        ttl_s: float | None = None,
    ) -> IssuedToken:
        """Issue a bearer token for ``user_name``.

        Raises:
            UserNotFound: no such user.
        """
        await self.user(user_name)
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        expires = datetime.now(UTC) + timedelta(seconds=ttl_s) if ttl_s else None
        await self._fetch(
            "INSERT INTO api_tokens (id, secret_sha256, user_name, description, created_by,"
            " expires_at) VALUES (%s, %s, %s, %s, %s, %s)",
            (token_id, _sha256(secret), user_name, description, created_by, expires),
        )
        return IssuedToken(token_id, f"{TOKEN_PREFIX}{token_id}_{secret}", user_name, expires)

    async def tokens(self) -> list[dict[str, Any]]:
        """Every token, without secrets."""
        return await self._fetch(
            "SELECT id, user_name, description, created_by, created_at, expires_at, revoked_at,"
            " last_used_at FROM api_tokens ORDER BY created_at",
            (),
        )

    async def revoke_token(self, token_id: str) -> bool:
        """Revoke a token; False when there is no such live token."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE api_tokens SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL",
                (token_id,),
            )
            return cur.rowcount == 1

    async def token_principal(self, token: str) -> Principal | None:
        """The user of a live bearer token, or None."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        token_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
        if not sep:
            return None
        rows = await self._fetch(
            "UPDATE api_tokens t SET last_used_at = now() FROM users u"
            " WHERE t.id = %s AND u.name = t.user_name AND t.revoked_at IS NULL"
            " AND (t.expires_at IS NULL OR t.expires_at > now()) AND NOT u.disabled"
            " RETURNING u.name, u.role, t.secret_sha256",
            (token_id,),
        )
        if not rows or not hmac.compare_digest(bytes(rows[0]["secret_sha256"]), _sha256(secret)):
            return None
        return Principal(rows[0]["name"], rows[0]["role"], "token", token_id=token_id)
