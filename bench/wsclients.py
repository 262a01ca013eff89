"""Websocket consoles for benchmarks: ``/api/v1/live`` clients in child processes.

A :class:`ConsoleGroup` starts ``procs`` child processes (spawn) that open
the consoles of a :class:`ConsoleSpec` with the ``websockets`` library, a
few handshakes at a time, each reading its snapshot before it counts as
connected. Subscriptions cycle in groups of four, as the mixed load of
``bench/live.py``: everything, one district, one district, 50 devices. One
group of four in ``probe_every`` parses every frame and records delivery
latencies (receive time minus the item's device ``ts``; one machine, one
clock), so probes cover the three kinds in the same 1:2:1 mix; the others
count frames and bytes. With ``window`` set, every client confirms each
``readings`` frame as the console does (flow control).

Counting is bound to a wall-clock window given by :meth:`ConsoleGroup.count`:
frames received inside it, latencies of items whose ``ts`` falls inside it
(a reading published in the window and delivered after it still counts).
For the devices in ``traced`` the probes also keep (device, ts, receive
time), for the caller to match with commit times: the fan-out's own latency.
Every console notes the alert events it receives (alert id, version), in the
window or not. A long run takes what was counted so far with
:meth:`ConsoleGroup.take` (which resets it, so memory stays bounded) before
the final :meth:`ConsoleGroup.stop`.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import multiprocessing as mp
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

Kind = Literal["everything", "district", "50 devices"]
KINDS: tuple[Kind, ...] = ("everything", "district", "50 devices")

_READINGS_HEAD = '{"type":"readings","seq":'
_ALERT_HEAD = '{"type":"alert",'
_DEVICES_IN_VIEW = 50


@dataclass(frozen=True, slots=True)
class ConsoleSpec:
    """What every console of a group connects to and follows."""

    url: str
    """``ws://host:port/api/v1/live``."""
    headers: tuple[tuple[str, str], ...]
    """Handshake headers, e.g. ``Authorization: Bearer …``."""
    clients: int
    districts: tuple[str, ...]
    devices: tuple[str, ...]
    window: int = 4
    """Flow control (``readings`` frames unconfirmed; the console uses 4); 0: off."""
    probe_every: int = 10
    """One group of four consoles in this many measures latency."""
    traced: frozenset[str] = frozenset()
    """Devices whose readings the probes note (device, ts, receive time) for matching."""
    concurrent_handshakes: int = 10
    open_timeout_s: float = 120.0


def kind_of(index: int) -> Kind:
    """A quarter everything, half one district, a quarter 50 devices."""
    return ("everything", "district", "district", "50 devices")[index % 4]


def is_probe(index: int, probe_every: int) -> bool:
    """Whether console ``index`` parses frames and records latencies."""
    return (index // 4) % probe_every == 0


def _query(index: int, spec: ConsoleSpec) -> str:
    params = [f"window={spec.window}"] if spec.window else []
    kind = kind_of(index)
    if kind == "district":
        params.append(f"districts={spec.districts[(index // 2) % len(spec.districts)]}")
    elif kind == "50 devices":
        first = (index * 7919) % max(1, len(spec.devices) - _DEVICES_IN_VIEW)
        params.append("devices=" + ",".join(spec.devices[first : first + _DEVICES_IN_VIEW]))
    return "&".join(params)


@dataclass
class ConsoleStats:
    """What the consoles of one or more processes saw in the counting window."""

    latencies: dict[str, array.array[float]] = field(
        default_factory=lambda: {k: array.array("d") for k in KINDS}
    )
    connected: int = 0
    probes: int = 0
    connect_s: float = 0.0
    snapshot_bytes: int = 0
    frames: int = 0
    frame_types: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    probe_items: int = 0
    traced: list[tuple[str, float, float]] = field(default_factory=list)
    """(device, ts, receive time) of the readings of traced devices the probes received."""
    closed_early: int = 0
    """Consoles whose connection ended before the stop (dropped by the server, or errors)."""
    cpu_s: float = 0.0
    counted_s: float = 0.0
    alert_events: list[tuple[int, str, int]] = field(default_factory=list)
    """(console index, alert id, event version) of every alert frame received."""

    def merge(self, other: ConsoleStats) -> None:
        """Add ``other``'s counts (from another process) to these."""
        for kind in KINDS:
            self.latencies[kind].extend(other.latencies[kind])
        self.connected += other.connected
        self.probes += other.probes
        self.connect_s = max(self.connect_s, other.connect_s)
        self.snapshot_bytes = max(self.snapshot_bytes, other.snapshot_bytes)
        self.frames += other.frames
        for name, count in other.frame_types.items():
            self.frame_types[name] = self.frame_types.get(name, 0) + count
        self.bytes += other.bytes
        self.probe_items += other.probe_items
        self.traced.extend(other.traced)
        self.closed_early += other.closed_early
        self.cpu_s += other.cpu_s
        self.counted_s = max(self.counted_s, other.counted_s)
        self.alert_events.extend(other.alert_events)

    def take(self) -> ConsoleStats:
        """A copy of these counts; the per-window ones (all but connections) start again at 0.

        Resets in place: the consoles' receive loops hold the latency arrays.
        """
        taken = ConsoleStats(
            latencies={k: array.array("d", v) for k, v in self.latencies.items()},
            connected=self.connected, probes=self.probes, connect_s=self.connect_s,
            snapshot_bytes=self.snapshot_bytes, frames=self.frames,
            frame_types=dict(self.frame_types), bytes=self.bytes, probe_items=self.probe_items,
            traced=list(self.traced), closed_early=self.closed_early,
            alert_events=list(self.alert_events),
        )  # fmt: skip
        for values in self.latencies.values():
            del values[:]
        self.frames = self.bytes = self.probe_items = 0
        self.frame_types.clear()
        self.traced.clear()
        self.alert_events.clear()
        return taken

    def all_latencies(self) -> list[float]:
        """Every latency sample, whatever the subscription."""
        return [x for kind in KINDS for x in self.latencies[kind]]


@dataclass
class _Window:
    start: float = float("inf")
    end: float = float("-inf")


def unbatch(message: str) -> list[str]:
    """The frames of one websocket message: a ``batch`` message holds several."""
    if not message.startswith('{"type":"batch"'):
        return [message]
    return [orjson.dumps(f).decode() for f in orjson.loads(message)["frames"]]


async def _console(
    index: int,
    spec: ConsoleSpec,
    *,
    stats: ConsoleStats,
    window: _Window,
    connected: asyncio.Event,
    gate: asyncio.Semaphore,
) -> None:
    query = _query(index, spec)
    url = spec.url + (f"?{query}" if query else "")
    probe = is_probe(index, spec.probe_every)
    async with contextlib.AsyncExitStack() as stack:
        async with gate:  # a few handshakes and snapshots at a time, as after a restart
            ws = await stack.enter_async_context(
                connect(
                    url,
                    additional_headers=list(spec.headers),
                    max_size=None,
                    compression=None,
                    open_timeout=spec.open_timeout_s,
                )
            )
            snapshot = await asyncio.wait_for(ws.recv(), spec.open_timeout_s)
            if not isinstance(snapshot, str) or not snapshot.startswith('{"type":"snapshot"'):
                msg = f"console {index}: the first frame is not a snapshot: {snapshot[:80]!r}"
                raise RuntimeError(msg)
        stats.snapshot_bytes = max(stats.snapshot_bytes, len(snapshot))
        stats.connected += 1
        stats.probes += probe
        connected.set()
        with contextlib.suppress(ConnectionClosed):
            await _receive(ws, spec, stats, window, kind_of(index) if probe else None, index)
        # Not reached when cancelled at the stop: the connection ended on its own.
        stats.closed_early += 1


async def _receive(  # noqa: PLR0917
    ws: ClientConnection,
    spec: ConsoleSpec,
    stats: ConsoleStats,
    window: _Window,
    probe: str | None,
    index: int,
) -> None:
    head = len(_READINGS_HEAD)
    types = stats.frame_types
    traced = spec.traced
    latencies = stats.latencies[probe] if probe is not None else None
    async for received in ws:
        now = time.time()
        if not isinstance(received, str):
            continue
        for message in unbatch(received):
            readings = message.startswith(_READINGS_HEAD)
            if window.start <= now < window.end:
                stats.frames += 1
                name = "readings" if readings else message[9 : message.find('"', 9)]  # {"type":"…
                types[name] = types.get(name, 0) + 1
                stats.bytes += len(message)
            if readings and latencies is not None:
                start, end = window.start, window.end
                for device, _, ts, _ in orjson.loads(message)["items"]:
                    if start <= ts < end:
                        stats.probe_items += 1
                        latencies.append(now - ts)
                        if device in traced:
                            stats.traced.append((device, ts, now))
            elif message.startswith(_ALERT_HEAD):
                frame = orjson.loads(message)
                stats.alert_events.append((index, frame["alert"]["id"], frame["event"]["version"]))
            if readings and spec.window:
                # As the console does once it has applied the frame.
                seq = message[head : message.index(",", head)]
                await ws.send('{"type":"received","seq":' + seq + "}")


async def _consoles(conn: Connection, spec: ConsoleSpec, indices: tuple[int, ...]) -> None:
    loop = asyncio.get_running_loop()
    stats = ConsoleStats()
    window = _Window()
    gate = asyncio.Semaphore(spec.concurrent_handshakes)
    events = [asyncio.Event() for _ in indices]
    started = time.perf_counter()
    # A console that fails to connect fails the group (and the benchmark): the
    # task group cancels the others and the error goes back to the parent.
    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(
                _console(i, spec, stats=stats, window=window, connected=event, gate=gate)
            )
            for i, event in zip(indices, events, strict=True)
        ]
        for event in events:
            await event.wait()
        stats.connect_s = time.perf_counter() - started
        conn.send(("ready", stats.connected, stats.connect_s))
        command = await loop.run_in_executor(None, conn.recv)
        if command[0] == "count":
            _, window.start, window.end = command
            cpu0, wall0 = time.process_time(), time.perf_counter()
            command = await loop.run_in_executor(None, conn.recv)
            while command[0] == "take":
                conn.send(("stats", stats.take()))
                command = await loop.run_in_executor(None, conn.recv)
            stats.cpu_s = time.process_time() - cpu0
            stats.counted_s = time.perf_counter() - wall0
        for task in tasks:
            task.cancel()
    conn.send(("stats", stats))


def _consoles_main(conn: Connection, spec: ConsoleSpec, indices: tuple[int, ...]) -> None:
    try:
        asyncio.run(_consoles(conn, spec, indices))
    except BaseException as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise


class ConsoleGroup:
    """``spec.clients`` consoles in ``procs`` processes; ``with`` ends them all."""

    def __init__(self, spec: ConsoleSpec, *, procs: int = 2) -> None:
        self.spec = spec
        self.procs = procs
        self._pipes: list[Connection] = []
        self._procs: list[BaseProcess] = []

    def __enter__(self) -> ConsoleGroup:
        spec, procs = self.spec, self.procs
        ctx = mp.get_context("spawn")
        for k in range(procs):
            # Groups of four alternate between processes: each gets the same mix.
            indices = tuple(i for i in range(spec.clients) if (i // 4) % procs == k)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_consoles_main, args=(child, spec, indices), daemon=True)
            proc.start()
            child.close()  # the child's end lives in the child: its exit is our EOFError
            self._pipes.append(parent)
            self._procs.append(proc)
        return self

    @property
    def pids(self) -> tuple[int, ...]:
        """The console processes."""
        return tuple(proc.pid or 0 for proc in self._procs)

    async def _recv(self, pipe: Connection) -> Any:
        reply = await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
        if reply[0] == "failed":
            msg = f"a console process failed: {reply[1]}"
            raise RuntimeError(msg)
        return reply

    async def wait_connected(self) -> tuple[int, float]:
        """Wait until every console has its snapshot; (consoles connected, seconds)."""
        connected, seconds = 0, 0.0
        for pipe in self._pipes:
            _, n, s = await self._recv(pipe)
            connected += n
            seconds = max(seconds, s)
        return connected, seconds

    def count(self, start: float, end: float) -> None:
        """Count frames received in ``[start, end)`` (wall clock) and items with ``ts`` in it."""
        for pipe in self._pipes:
            pipe.send(("count", start, end))

    async def take(self) -> ConsoleStats:
        """What the consoles counted since :meth:`count` or the last take; they count on."""
        for pipe in self._pipes:
            pipe.send(("take",))
        total = ConsoleStats()
        for pipe in self._pipes:
            _, stats = await self._recv(pipe)
            total.merge(stats)
        return total

    async def stop(self) -> ConsoleStats:
        """Close the consoles and return what they saw."""
        for pipe in self._pipes:
            pipe.send(("stop",))
        total = ConsoleStats()
        for pipe in self._pipes:
            _, stats = await self._recv(pipe)
            total.merge(stats)
        return total

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def percentile(values: list[float] | array.array[float], q: float) -> float:
    """Nearest-rank percentile; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def iter_kinds(stats: ConsoleStats) -> Iterator[tuple[str, array.array[float]]]:
    """(subscription kind, its latencies) for the kinds that have probes."""
    for kind in KINDS:
        if stats.latencies[kind]:
            yield kind, stats.latencies[kind]
