"""Pieces of the console's browser-test stack: the server in a thread, a stalling proxy."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI

from control_api.auth import Principal
from control_api.deps import requires
from control_api.roles import Permission
from tests.polling import until_sync

STARTUP_TIMEOUT_S = 60.0
View = Annotated[Principal, Depends(requires(Permission.VIEW))]

# -- serving ----------------------------------------------------------------------------------


class ServedApi:
    """A uvicorn server in a thread (its own event loop, as a deployed API)."""

    def __init__(self, app: FastAPI) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                log_config=None,
                lifespan="on",
                ws="websockets-sansio",
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="console-api", daemon=True)

    def start(self) -> str:
        self.thread.start()
        until_sync(
            lambda: self.server.started or not self.thread.is_alive(),
            STARTUP_TIMEOUT_S,
            "console API start",
        )
        if not self.server.started:
            msg = "the API did not start (see the log above)"
            raise RuntimeError(msg)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


# -- a TCP proxy that can stall and drop connections ------------------------------------------


class StallingProxy:
    """Forwards TCP to ``target_port``; :meth:`stall` freezes every byte, :meth:`drop` cuts.

    A stalled connection stays open and silent both ways: what a half-open
    connection, a hung proxy or a frozen server looks like to a browser.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def drop(self) -> None:
        """Abort every forwarded connection (the browser sees them close)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(dst)
            dst.transport.abort()
