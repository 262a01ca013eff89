"""``cityops api``, ``cityops users`` and ``cityops tokens``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import socket
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from cityops.broker_security import ServiceUser
from cityops.db import migrate
from cityops.errors import CityopsError
from cityops.maintenance import MaintenanceOptions, maintenance_options, maintenance_task
from cityops.runtime import CONSOLE_DIST, rules_path, service_urls
from cityops.settings import Settings
from control_api.auth import AuthStore, new_password
from control_api.context import ApiConfig
from control_api.errors import ControlApiError
from rules import ROLES, Role, RulesError

__all__ = ["api_config", "ensure_first_admin", "register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``api``, ``users`` and ``tokens``."""
    p = subparsers.add_parser(
        "api",
        help="serve the control API (REST, live websocket, CAP) on CITYOPS_HTTP",
        description="The control API alone, for scaled-out deployments behind a load balancer.",
    )
    p.add_argument("--client-id", help="MQTT client id (default: cityops-api-HOSTNAME-PORT)")
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="another browser origin allowed on the websocket (repeatable)",
    )
    p.add_argument(
        "--proxy",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="trust X-Forwarded-For/-Proto from this proxy address (repeatable)",
    )
    p.add_argument("--city", default="minamikawa", help="city model for areas and the map")
    p.set_defaults(handler=_api)

    users = subparsers.add_parser("users", help="manage the people and machines that sign in")
    users_sub = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = users_sub.add_parser("add", help="create a user with a role")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--display-name", default="")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (default: generate a one-time password)",
    )
    add.set_defaults(handler=_users_add)
    lst = users_sub.add_parser("list", help="list users")
    lst.set_defaults(handler=_users_list)

    tokens = subparsers.add_parser("tokens", help="issue and revoke API tokens")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    issue = tokens_sub.add_parser("issue", help="issue a bearer token for a user (shown once)")
    issue.add_argument("user")
    issue.add_argument("--description", default="")
    issue.add_argument("--ttl-days", type=float, default=None)
    issue.set_defaults(handler=_tokens_issue)
    revoke = tokens_sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id")
    revoke.set_defaults(handler=_tokens_revoke)


def api_config(
    settings: Settings,
    mqtt_url: str,
    database_url: str,
    *,
    client_id: str | None = None,
    allowed_origins: tuple[str, ...] = (),
    city: str = "minamikawa",
    live_from_broker: bool = True,
) -> ApiConfig:
    """The API's configuration from settings and resolved service URLs."""
    return ApiConfig(
        database_url=database_url,
        mqtt=settings.mqtt_endpoint(mqtt_url),
        rules_path=rules_path(settings),
        city=city,
        allowed_origins=allowed_origins,
        client_id=client_id or f"cityops-api-{socket.gethostname()}-{settings.http_port}",
        live_from_broker=live_from_broker,
        recordings_dir=Path(settings.data_dir) / "recordings",
        console_dir=CONSOLE_DIST if (CONSOLE_DIST / "index.html").is_file() else None,
    )


def _api(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415 (only this command serves HTTP)

    from control_api.app import create_app  # noqa: PLC0415

    settings = Settings.from_env()
    try:
        mqtt_url, database_url = service_urls(settings, user=ServiceUser.API)
        migrate(database_url)
        config = api_config(
            settings, mqtt_url, database_url, client_id=args.client_id,
            allowed_origins=tuple(args.allow_origin), city=args.city,
        )  # fmt: skip
        options = maintenance_options(settings.lifecycle)
        # Roll-ups, retention and audit pseudonymisation: every API instance
        # runs them, an advisory lock makes one of them do each round.
        app = create_app(config, extra_lifespan=lambda _ctx: _maintenance(database_url, options))
    except (CityopsError, RulesError) as exc:
        print(f"cityops api: {exc}", file=sys.stderr)
        return 1
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        proxy_headers=bool(args.proxy),
        forwarded_allow_ips=",".join(args.proxy) or None,
        ws="websockets-sansio",
        # Compression costs 3-8x the CPU per frame and client (bench/live.py):
        # with 200 consoles it would starve the event loop.
        ws_per_message_deflate=False,
    )
    return 0


@contextlib.asynccontextmanager
async def _maintenance(database_url: str, options: MaintenanceOptions) -> AsyncIterator[None]:
    async with maintenance_task(database_url, options):
        yield


@contextlib.asynccontextmanager
async def _auth_store() -> AsyncIterator[AuthStore]:
    from control_api.app import open_pool  # noqa: PLC0415

    settings = Settings.from_env()
    mqtt_url, database_url = service_urls(settings, user=ServiceUser.API)
    migrate(database_url)
    config = api_config(settings, mqtt_url, database_url, client_id="cityops-cli")
    async with open_pool(config) as pool:
        yield AuthStore(pool)


def _run(coro: Coroutine[Any, Any, int], label: str) -> int:
    try:
        return asyncio.run(coro)
    except (CityopsError, ControlApiError, ValueError) as exc:
        print(f"cityops {label}: {exc}", file=sys.stderr)
        return 1


def _users_add(args: argparse.Namespace) -> int:
    async def run() -> int:
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else new_password()
        if args.password_stdin and len(password) < 12:
            print("cityops users add: the password needs 12 characters or more", file=sys.stderr)
            return 2
        async with _auth_store() as store:
            await store.add_user(args.name, args.role, password, display_name=args.display_name)
        print(f"user {args.name} ({args.role}) created")
        if not args.password_stdin:
            print(f"one-time password: {password}")
        return 0

    return _run(run(), "users add")


def _users_list(_: argparse.Namespace) -> int:
    async def run() -> int:
        async with _auth_store() as store:
            for u in await store.users():
                flag = " (disabled)" if u["disabled"] else ""
                print(f"{u['name']:<24} {u['role']:<10}{flag}")
        return 0

    return _run(run(), "users list")


def _tokens_issue(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _auth_store() as store:
            issued = await store.issue_token(
                args.user, created_by=f"cli:{getpass.getuser()}", description=args.description,
                ttl_s=args.ttl_days * 86400 if args.ttl_days else None,
            )  # fmt: skip
        print(f"token {issued.id} for {issued.user_name} (shown once):\n{issued.token}")
        return 0

    return _run(run(), "tokens issue")


def _tokens_revoke(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _auth_store() as store:
            if not await store.revoke_token(args.token_id):
                print(f"cityops tokens revoke: no live token {args.token_id!r}", file=sys.stderr)
                return 1
        print(f"token {args.token_id} revoked")
        return 0

    return _run(run(), "tokens revoke")


async def ensure_first_admin(store: AuthStore, name: str = "admin") -> str | None:
    """Create the first admin with a one-time password when there are no users.

    Returns:
        The generated password (to print once), or None when users exist.
    """
    if await store.has_users():
        return None
    password = new_password()
    role: Role = "admin"
    await store.add_user(name, role, password, display_name="First administrator")
    return password
