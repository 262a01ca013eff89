"""Serving the app inside a process that already owns the event loop and the signals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Generator

import uvicorn
from fastapi import FastAPI

from control_api.errors import ControlApiError

__all__ = ["embedded_server"]

STARTUP_TIMEOUT_S = 60.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the host process stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def embedded_server(app: FastAPI, *, host: str, port: int) -> AsyncIterator[int]:
    """Serve ``app`` on ``host:port`` (0: any free port) for the block; yields the bound port.

    Raises:
        ControlApiError: the server did not start (port taken, lifespan failed).
    """
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            lifespan="on",
            ws="websockets-sansio",
            # Compression costs 3-8x the CPU per frame and client (bench/live.py).
            ws_per_message_deflate=False,
        )
    )
    task = asyncio.create_task(server.serve(), name="api-server")
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while not server.started:
                if task.done():
                    break
                await asyncio.sleep(0.05)  # uvicorn exposes readiness only as a flag
    except TimeoutError:
        pass
    if not server.started:
        server.should_exit = True
        with contextlib.suppress(BaseException):
            await task
        msg = f"the API did not start on {host}:{port} (is the port taken? see the log)"
        raise ControlApiError(msg)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield int(bound)
    finally:
        server.should_exit = True
        await task
