"""Waiting for a condition with a deadline (never a bare sleep), and quick queries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg


async def until(cond: Callable[[], object], timeout_s: float = 20.0) -> None:
    """Poll ``cond`` every 50 ms until it is true; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            msg = f"condition not met within {timeout_s} s"
            raise AssertionError(msg)
        await asyncio.sleep(0.05)


async def until_async(cond: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    """:func:`until` for a condition that must be awaited (an HTTP probe, a query)."""
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            msg = f"condition not met within {timeout_s} s"
            raise AssertionError(msg)
        await asyncio.sleep(0.05)


def until_sync(
    cond: Callable[[], object], timeout_s: float = 20.0, what: str = "condition"
) -> None:
    """:func:`until` for synchronous fixtures: poll every 20 ms, AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            msg = f"{what} not met within {timeout_s} s"
            raise AssertionError(msg)
        time.sleep(0.02)


def rows(url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    """All rows of one query, on a connection of its own."""
    with psycopg.connect(url) as conn:
        return conn.execute(query.encode(), params).fetchall()
