"""The websocket ``/api/v1/live``: the protocol, and the shell around the live hub.

:func:`serve_live` serves one connection from a :class:`control_api.live.LiveHub`
(which holds no I/O: sequence numbers, coalescing, the event ring and resume
are described at the top of :mod:`control_api.live`). Around it:
:func:`check_origin` (the cross-site guard of the handshake),
:class:`SharedSnapshots` (one snapshot read for every client waiting at once)
and :func:`run_kpi_feed` (periodic KPI figures for the hub).

Frames (server → client, JSON text; ``seq`` on every frame but ``result``/``error``)::

    {"type": "snapshot", "seq", "hub", "source", "run", "at", "devices", "alerts", "kpis"}
    {"type": "resumed", "seq", "hub"}
    {"type": "readings", "seq", "items": [[device, channel, ts, value_or_state], ...]}
    {"type": "alert", "seq", "alert": {...}, "event": {...}}
    {"type": "presence", "seq", "device", "domain", "district",
        "presence", "session", "at"}                      (a status change)
    {"type": "presence", "seq", "device", "domain", "district",
        "stale", "stale_since", "at"}                     (a staleness change)
    {"type": "kpis", "seq", "kpis": {...}}
    {"type": "heartbeat", "seq", "hub", "ts"}
    {"type": "result", "id", ...}   {"type": "error", "id", "error"}
    {"type": "batch", "frames": [<frame>, ...]}

A delivery of :data:`BATCH_FROM` frames or more goes out as one ``batch``
message holding them in order (a client applies each as if it came alone).
When a network outage ends, thousands of devices change presence at once:
one websocket message per event and client made hundreds of thousands of
sends and stalled the event loop (found by ``bench/api.py``); batched, it is
one send per client and delivery.

Client → server: ``{"type": "subscribe", "districts", "domains", "devices"}``,
``{"type": "resume", "hub", "seq"}`` (also as query parameters on connect),
``{"type": "received", "seq"}`` (flow control, below), and commands such as
``{"type": "ack", "id", "alert_id", "version", "note"}``, passed to the
caller's ``on_command``.

Flow control (opt-in, ``?window=N``)
    A browser reads its socket whatever its script is doing, so a busy tab
    never pushes back through TCP: frames pile up in the tab and the kernel
    buffers (megabytes: seconds of data), and the screen lags. A console that
    connects with ``window=N`` confirms each applied ``readings`` frame with
    ``{"type": "received", "seq": <its seq>}``; with N frames unconfirmed the
    server holds readings back (they coalesce in the hub, the next frame
    carries the latest values) while alerts and presence still go out.

Snapshot consistency
    The serving loop attaches the client (its cursors start at the hub's
    current ``seq``) *before* it reads the snapshot from the database, and
    sends the snapshot with that ``seq``. Events that arrive during the read
    wait in the ring and go out after the snapshot, even when the snapshot
    already shows them: every update is idempotent (alert events carry the
    alert's ``version``, presence its ``session``, readings their ``ts``), so
    sending a few twice is simpler and safer than trying to drop exactly those
    the snapshot covered. Nothing between the snapshot and the stream is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn
from urllib.parse import urlsplit

import orjson
from starlette.websockets import (
    WebSocket,
    WebSocketDisconnect,
    WebSocketDisconnected,
    WebSocketState,
)

from control_api.errors import ControlApiError, LiveProtocolError, SnapshotUnavailable
from control_api.live import LiveClient, LiveHub, Subscription
from control_api.snapshot import Snapshot
from ingest import BatchSource

__all__ = [
    "ServeOptions",
    "SharedSnapshots",
    "check_origin",
    "run_kpi_feed",
    "serve_live",
]

log = logging.getLogger(__name__)

BATCH_FROM: Final = 8
"""Deliveries of this many frames or more are sent as one ``batch`` message."""


def _normalize_origin(value: str) -> str | None:
    value = value.strip()
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == (443 if scheme == "https" else 80):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def check_origin(
    origin_header: str | None, allowed_origins: Iterable[str], *, allow_missing: bool = False
) -> bool:
    """Whether a websocket handshake's ``Origin`` is allowed (cross-site hijacking guard).

    A browser always sends ``Origin`` on a websocket handshake, and sends the
    session cookie whatever page opened the socket: without this check any
    web page could read the live feed with an operator's cookie. Origins are
    compared as scheme, host and port (default ports dropped, case ignored).

    Args:
        origin_header: The ``Origin`` request header, or ``None``.
        allowed_origins: Origins such as ``https://ops.example.org``; ``*`` allows any.
        allow_missing: Accept a handshake without ``Origin`` (a non-browser
            client, e.g. with an API token).

    Returns:
        True when the origin (or its absence) is allowed. ``null`` and
        malformed origins are never allowed.
    """
    if not origin_header:
        return allow_missing
    origin = _normalize_origin(origin_header)
    if origin is None:
        return False
    for allowed in allowed_origins:
        if allowed.strip() == "*" or _normalize_origin(allowed) == origin:
            return True
    return False


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Timing and limits of one websocket connection.

    Attributes:
        heartbeat_s: A heartbeat goes out after this long without a frame.
        send_timeout_s: A frame not taken by the client within this time
            drops the connection (a client that stopped reading).
        snapshot_timeout_s: Deadline of one snapshot read.
        command_timeout_s: Deadline of one ``on_command`` call.
        max_message_bytes: Larger client messages are refused.
        max_pending_results: Command results waiting to be sent; the client's
            further messages wait for room.
    """

    heartbeat_s: float = 5.0
    send_timeout_s: float = 10.0
    snapshot_timeout_s: float = 30.0
    command_timeout_s: float = 10.0
    max_message_bytes: int = 64 * 1024
    max_pending_results: int = 16


class SharedSnapshots:
    """A snapshot source that serves every client waiting at once with one read.

    After an API restart every console reconnects at the same moment. A
    client may only use a read that *started* after it attached (an earlier
    read can miss an event), so callers that arrive while a read runs wait for
    the next read, which starts when the running one ends and serves them all.

    Args:
        read: Reads one snapshot (e.g. :func:`control_api.snapshot.build_snapshot`
            on a pooled connection).
    """

    def __init__(self, read: Callable[[], Awaitable[Snapshot]]) -> None:
        self._read = read
        self._next: asyncio.Future[Snapshot] | None = None
        self._runner: asyncio.Task[None] | None = None
        self.reads = 0
        """Reads done so far."""

    async def __call__(self) -> Snapshot:
        """A snapshot read that started after this call."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        future = self._next
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="live-shared-snapshots")
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while self._next is not None:
            future, self._next = self._next, None
            try:
                snapshot = await self._read()
            except Exception as exc:  # every waiter of this read gets it
                future.set_exception(exc)
                future.add_done_callback(_retrieve_exception)
            else:
                future.set_result(snapshot)
            finally:
                self.reads += 1


def _retrieve_exception(future: asyncio.Future[Snapshot]) -> None:
    # Waiters may all have gone (cancelled): mark the exception as seen.
    future.exception()


class _Closed(Exception):
    """The connection is over (closed by either side, or dropped)."""


def _resume_point(message: Mapping[str, object]) -> tuple[str | None, int] | None:
    """``(hub, seq)`` from a resume message or query parameters; None when absent."""
    seq = message.get("seq")
    if seq is None or seq == "":
        return None
    try:
        number = int(seq) if isinstance(seq, str | int) and not isinstance(seq, bool) else None
    except ValueError:
        number = None
    if number is None or number < 0:
        msg = f"resume seq {seq!r} is not a non-negative integer"
        raise LiveProtocolError(msg)
    hub = message.get("hub")
    if hub is not None and not isinstance(hub, str):
        msg = f"resume hub {hub!r} is not a string"
        raise LiveProtocolError(msg)
    return (hub, number)


def _window(message: Mapping[str, object]) -> int | None:
    """The flow-control window (``readings`` frames unconfirmed); None: no flow control."""
    raw = message.get("window")
    if raw is None or raw == "":
        return None
    try:
        window = int(raw) if isinstance(raw, str | int) and not isinstance(raw, bool) else 0
    except ValueError:
        window = 0
    if not 1 <= window <= _MAX_WINDOW:
        msg = f"window {raw!r} must be an integer from 1 to {_MAX_WINDOW}"
        raise LiveProtocolError(msg)
    return window


def _seq_of(message: Mapping[str, object]) -> int:
    seq = message.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        msg = f"seq {seq!r} is not an integer"
        raise LiveProtocolError(msg)
    return seq


_MAX_WINDOW: Final = 64


class _LiveSession:
    """One connection: a sender (the only writer) and a receiver, in a task group."""

    def __init__(
        self,
        websocket: WebSocket,
        hub: LiveHub,
        client: LiveClient,
        *,
        snapshot_source: Callable[[], Awaitable[Snapshot]],
        on_command: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        options: ServeOptions,
        window: int | None,
    ) -> None:
        self.window = window
        self.in_flight: collections.deque[int] = collections.deque()
        """``seq`` of the ``readings`` frames sent and not yet confirmed."""
        self.ws = websocket
        self.hub = hub
        self.client = client
        self.snapshot_source = snapshot_source
        self.on_command = on_command
        self.options = options
        self.wake = asyncio.Event()
        client.wake = self.wake.set
        self.results: asyncio.Queue[bytes] = asyncio.Queue(options.max_pending_results)
        self.pending_resume: tuple[str | None, int] | Literal[False] | None = False
        self.last_sent = asyncio.get_running_loop().time()

    async def run(self, resume: tuple[str | None, int] | None) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._send_loop(resume), name=f"live-send-{self.client.name}")
                tg.create_task(self._receive_loop(), name=f"live-receive-{self.client.name}")
        except* _Closed:
            pass

    async def _send(self, frame: bytes) -> None:
        try:
            async with asyncio.timeout(self.options.send_timeout_s):
                await self.ws.send_text(frame.decode())
        except TimeoutError:
            log.warning(
                "live client %s took no frame for %.1f s: dropped",
                self.client.name,
                self.options.send_timeout_s,
            )
            raise _Closed from None
        except (WebSocketDisconnect, WebSocketDisconnected) as exc:
            raise _Closed from exc
        self.last_sent = asyncio.get_running_loop().time()

    async def _close(self, code: int, reason: str) -> NoReturn:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.options.send_timeout_s):
                await self.ws.close(code=code, reason=reason)
        raise _Closed

    async def _start(self, resume: tuple[str | None, int] | None) -> None:
        """Attach, then resume or send a snapshot read after attaching."""
        hub_id, last_seq = resume if resume is not None else (None, None)
        if resume is not None and hub_id is None:
            last_seq = None  # a resume point without its hub cannot be trusted
        attach = self.hub.attach(self.client, last_seq, hub_id=hub_id)
        self.in_flight.clear()
        if attach.resumed:
            await self._send(self.hub.resumed_frame(attach))
            self.wake.set()
            return
        try:
            async with asyncio.timeout(self.options.snapshot_timeout_s):
                snapshot = await self.snapshot_source()
        except (SnapshotUnavailable, TimeoutError) as exc:
            log.warning(
                "live client %s: no snapshot: %s",
                self.client.name,
                exc or f"timed out after {self.options.snapshot_timeout_s} s",
            )
            await self._snapshot_failed()
        except Exception:
            # The caller's snapshot source failed in an unforeseen way (e.g. a
            # connection error before build_snapshot): this client only.
            log.exception("live client %s: snapshot source failed", self.client.name)
            await self._snapshot_failed()
        await self._send(self.hub.snapshot_frame(snapshot, seq=attach.seq))
        self.wake.set()

    async def _snapshot_failed(self) -> NoReturn:
        await self._send(
            orjson.dumps({"type": "error", "id": None, "error": "snapshot unavailable"})
        )
        await self._close(1013, "snapshot unavailable, retry later")

    async def _wait(self) -> None:
        if self.wake.is_set():
            return
        loop = asyncio.get_running_loop()
        timeout = self.last_sent + self.options.heartbeat_s - loop.time()
        due = self.hub.seconds_until_due()
        if due is not None:
            timeout = min(timeout, due)
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.wake.wait()

    async def _send_loop(self, resume: tuple[str | None, int] | None) -> None:
        await self._start(resume)
        loop = asyncio.get_running_loop()
        while True:
            await self._wait()
            self.wake.clear()
            while not self.results.empty():
                await self._send(self.results.get_nowait())
            if self.pending_resume is not False:
                resume, self.pending_resume = self.pending_resume, False
                await self._start(resume)
                continue
            self.hub.tick()
            # With flow control, readings wait (and coalesce in the hub) while
            # the client has `window` readings frames unconfirmed; alerts go on.
            delivery = self.hub.collect(
                self.client, readings=self.window is None or len(self.in_flight) < self.window
            )
            if delivery.reset:
                log.info("live client %s fell too far behind: fresh snapshot", self.client.name)
                await self._start(None)
                continue
            if len(delivery.frames) >= BATCH_FROM:
                await self._send(b'{"type":"batch","frames":[%b]}' % b",".join(delivery.frames))
            else:
                for frame in delivery.frames:
                    await self._send(frame)
            if delivery.readings and self.window is not None:
                self.in_flight.append(delivery.seq)
            if delivery.more:
                self.wake.set()
            elif loop.time() - self.last_sent >= self.options.heartbeat_s:
                await self._send(self.hub.heartbeat_frame(self.client))

    async def _reply(self, frame: dict[str, Any]) -> None:
        await self.results.put(orjson.dumps(frame))
        self.wake.set()

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise _Closed
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
            if data is None:
                continue
            if len(data) > self.options.max_message_bytes:
                await self._reply(
                    {
                        "type": "error",
                        "id": None,
                        "error": f"message of {len(data)} bytes; at most"
                        f" {self.options.max_message_bytes}",
                    }
                )
                continue
            try:
                request = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                await self._reply({"type": "error", "id": None, "error": f"not JSON: {exc}"})
                continue
            if not isinstance(request, dict) or not isinstance(request.get("type"), str):
                await self._reply(
                    {"type": "error", "id": None, "error": "a message is an object with a 'type'"}
                )
                continue
            await self._handle(request)

    async def _handle(self, request: dict[str, Any]) -> None:
        kind = request["type"]
        request_id = request.get("id")
        try:
            if kind == "subscribe":
                self.hub.subscribe(self.client, Subscription.from_message(request))
                return
            if kind == "resume":
                self.pending_resume = _resume_point(request)  # None: a fresh snapshot
                self.wake.set()
                return
            if kind == "received":
                seq = _seq_of(request)
                while self.in_flight and self.in_flight[0] <= seq:
                    self.in_flight.popleft()
                self.wake.set()
                return
        except LiveProtocolError as exc:
            await self._reply({"type": "error", "id": request_id, "error": str(exc)})
            return
        await self._reply({**(await self._command(request)), "type": "result", "id": request_id})

    async def _command(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.options.command_timeout_s):
                result = await self.on_command(request)
            orjson.dumps(result)  # fail here, not in the sender
        except TimeoutError:
            log.warning("live command %r timed out", request.get("type"))
            return {"ok": False, "error": f"timed out after {self.options.command_timeout_s} s"}
        except Exception:
            log.exception("live command %r failed", request.get("type"))
            return {"ok": False, "error": "internal error"}
        return result


async def serve_live(
    websocket: WebSocket,
    hub: LiveHub,
    *,
    user: object,
    snapshot_source: Callable[[], Awaitable[Snapshot]],
    on_command: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    source: BatchSource = "live",
    options: ServeOptions | None = None,
) -> None:
    """Serve one ``/api/v1/live`` websocket until it closes.

    The caller authenticates the user and checks the origin
    (:func:`check_origin`) first; this function accepts the socket if the
    caller did not. Query parameters: ``hub`` and ``seq`` (resume; both are
    needed), ``districts``, ``domains``, ``devices`` (comma-separated: the
    initial subscription; resume with the subscription you had), ``window``
    (flow control: ``readings`` frames in flight before ``received``).

    A sender and a receiver run in a task group. The sender is the only
    writer: the snapshot (or ``resumed``), then deltas as the hub wakes it,
    command results, and a heartbeat after ``heartbeat_s`` of silence. A
    client that falls too far behind gets a fresh snapshot; one that takes no
    frame for ``send_timeout_s`` is dropped. Neither ever blocks the hub or
    another client.

    Args:
        websocket: The connection.
        hub: The live hub.
        user: The authenticated caller (for logs).
        snapshot_source: Reads a fresh snapshot of ``source`` (called after the
            client is attached; again after a reset).
        on_command: Runs a client command (``ack`` and the like: any message
            but ``subscribe`` and ``resume``) with the same checks as REST; its
            result goes back as ``{"type": "result", "id": <the message's id>, …}``.
        source: The source the client follows.
        options: Timing and limits.
    """
    opts = options or ServeOptions()
    if websocket.application_state is WebSocketState.CONNECTING:
        await websocket.accept()
    name = f"{getattr(user, 'name', user)}@{websocket.client.host if websocket.client else '?'}"
    try:
        params = websocket.query_params
        subscription = Subscription.from_message(params)
        resume = _resume_point(params)
        window = _window(params)
        client = LiveClient(source=source, subscription=subscription, name=name)
    except LiveProtocolError as exc:
        with contextlib.suppress(Exception):
            await websocket.close(code=1008, reason=str(exc)[:120])
        return
    session = _LiveSession(
        websocket,
        hub,
        client,
        snapshot_source=snapshot_source,
        on_command=on_command,
        options=opts,
        window=window,
    )
    log.info("live client %s connected (source %s)", name, source)
    try:
        await session.run(resume)
    finally:
        hub.detach(client)
        log.info("live client %s disconnected", name)


async def run_kpi_feed(
    hub: LiveHub,
    query: Callable[[], Awaitable[Mapping[str, Any]]],
    *,
    source: BatchSource = "live",
    interval_s: float = 5.0,
) -> None:
    """Feed the hub KPI figures from ``query`` every ``interval_s`` until cancelled.

    A failed query (:class:`control_api.errors.ControlApiError`) is logged;
    the next interval tries again.
    """
    while True:
        try:
            kpis = await query()
        except ControlApiError as exc:
            log.warning("KPI query failed: %s", exc)
        else:
            hub.on_kpis(kpis, source=source)
        await asyncio.sleep(interval_s)
