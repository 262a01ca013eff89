"""Live hub fan-out benchmark: 200 websocket consoles, 10,000 readings/s.

Run: ``.venv/bin/python -m bench.live`` (about two minutes). No broker and no
database: the hub is fed synthetic committed batches.

* A server child process runs uvicorn with two websocket endpoints and a
  feeder: ``/live`` is :func:`control_api.live_ws.serve_live` over a
  :class:`control_api.live.LiveHub` (snapshots from the hub's memory, shared
  with :class:`control_api.live_ws.SharedSnapshots`); ``/naive`` is the
  baseline, a broadcaster that sends every reading to every client as its own
  JSON message, through an unbounded queue per client, without coalescing or
  filtering.
* The feeder hands the hub a batch every ``--batch-interval`` seconds so that
  ``--rate`` readings/s arrive (``--devices`` devices in ``--districts``
  districts and 3 domains, ``--channels`` channels each, series picked at
  random). A reading's ``ts`` is the instant its batch was due at the hub, so
  a probe client's receive time minus ``ts`` is the delivery latency hub
  receive → client receive (one machine, one clock), including any time the
  server fell behind schedule.
* ``--client-procs`` child processes run the ``--clients`` consoles with the
  ``websockets`` library. Subscriptions (``--mix mixed``): a quarter follow
  everything, half one district, a quarter 50 devices in view; ``--mix
  all``: everything. One client in ``--probe-every`` parses every frame and
  records latencies; the others count frames and bytes (and confirm
  ``readings`` frames when flow control is on, as the console does).
* Phases (``--phases``), in one run: the hub with flow control (window 2)
  without compression and with permessage-deflate (what a browser negotiates
  with uvicorn's default), the hub without flow control, then the naive
  broadcaster for the same duration plus ``--grace`` seconds, to show how far
  behind it is.

Printed per phase: readings offered and achieved by the feeder (and how far
behind schedule it ended), the hub's ``on_batch`` cost (wall time of the
call, which is pure CPU; the naive broadcaster's fan-out for the baseline),
the server process's CPU per batch (everything: feeder, hub, encoding,
websocket sends), frames and bytes received, latency p50/p90/p99/max, and
the client processes' CPU. The machine is shared: figures move with its load.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect

from control_api.live import LiveHub
from control_api.live_ws import ServeOptions, SharedSnapshots, serve_live
from control_api.snapshot import Snapshot
from ingest import DOMAINS, CommittedBatch, DeviceRef, Reading

Mode = Literal["live", "naive"]


@dataclass(frozen=True, slots=True)
class Load:
    rate: int
    devices: int
    channels: int
    districts: int
    batch_interval_s: float

    def refs(self) -> list[DeviceRef]:
        return [
            DeviceRef(DOMAINS[i % 3], f"district-{i % self.districts}", f"dev-{i:05d}")
            for i in range(self.devices)
        ]

    @property
    def channel_names(self) -> list[str]:
        return [f"ch{c}" for c in range(self.channels)]


# -- server process -------------------------------------------------------------------


class NaiveBroadcaster:
    """The baseline: every reading to every client, one message each, unbounded queues."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[str]] = set()

    def on_batch(self, batch: CommittedBatch) -> None:
        for r in batch.readings:
            message = orjson.dumps(
                {
                    "type": "reading",
                    "device": r.device.device_id,
                    "channel": r.channel,
                    "ts": r.ts,
                    "value": r.value,
                }
            ).decode()
            for queue in self.queues:
                queue.put_nowait(message)

    def backlog(self) -> int:
        return sum(q.qsize() for q in self.queues)

    async def serve(self, websocket: WebSocket) -> None:
        await websocket.accept()
        queue: asyncio.Queue[str] = asyncio.Queue()
        self.queues.add(queue)

        async def send() -> None:
            while True:
                await websocket.send_text(await queue.get())

        async def receive() -> None:
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass
            raise WebSocketDisconnect

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(send())
                tg.create_task(receive())
        except* WebSocketDisconnect:
            pass
        finally:
            self.queues.discard(queue)


@dataclass
class FeedStats:
    batches: int = 0
    readings: int = 0
    seconds: float = 0.0
    on_batch_s: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    backlog_at_end: int = 0
    behind_s: float = 0.0
    """How far behind schedule the feeder was when the feed stopped."""


def unbatch(message: str) -> list[str]:
    """The frames of one websocket message: a ``batch`` message holds several."""
    if not message.startswith('{"type":"batch"'):
        return [message]
    return [orjson.dumps(f).decode() for f in orjson.loads(message)["frames"]]


async def _feed(
    load: Load, sink: LiveHub | NaiveBroadcaster, duration_s: float, rng: random.Random
) -> FeedStats:
    refs = load.refs()
    channels = load.channel_names
    per_batch = max(1, round(load.rate * load.batch_interval_s))
    stats = FeedStats()
    cpu0 = time.process_time()
    wall0 = time.time()
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < duration_s:
        due = start + stats.batches * load.batch_interval_s
        if due > now:
            await asyncio.sleep(due - now)
        # The batch's readings carry the instant the batch was due at the hub:
        # a server that falls behind schedule shows it as latency, as readings
        # from the field would wait for it upstream.
        ts = wall0 + stats.batches * load.batch_interval_s
        readings = tuple(
            Reading(rng.choice(refs), rng.choice(channels), ts, rng.random() * 100, None, None)
            for _ in range(per_batch)
        )
        batch = CommittedBatch(
            readings=readings, presences=(), dead_letters=(), committed_at=ts, source="live"
        )
        t0 = time.perf_counter()
        sink.on_batch(batch)
        stats.on_batch_s.append(time.perf_counter() - t0)
        stats.batches += 1
        stats.readings += per_batch
        await asyncio.sleep(0)  # let the senders run even when behind schedule
    stats.seconds = time.perf_counter() - start
    stats.cpu_s = time.process_time() - cpu0
    stats.behind_s = max(0.0, stats.seconds - stats.batches * load.batch_interval_s)
    if isinstance(sink, NaiveBroadcaster):
        stats.backlog_at_end = sink.backlog()
    return stats


async def _serve(conn: Connection, sock: socket.socket, load: Load) -> None:
    hub = LiveHub()
    naive = NaiveBroadcaster()
    rng = random.Random(1)

    async def memory_snapshot() -> Snapshot:
        return hub.memory_snapshot()

    snapshot = SharedSnapshots(memory_snapshot)

    async def on_command(message: dict[str, Any]) -> dict[str, Any]:
        return {"ok": False, "error": "read-only benchmark"}

    async def live(websocket: WebSocket) -> None:
        await serve_live(
            websocket,
            hub,
            user="bench",
            snapshot_source=snapshot,
            on_command=on_command,
            options=ServeOptions(send_timeout_s=30.0),
        )

    app = Starlette(routes=[WebSocketRoute("/live", live), WebSocketRoute("/naive", naive.serve)])
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws_max_queue=64)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no started event)
        await asyncio.sleep(0.05)
    # Every series once, so that snapshots carry a realistic city.
    ts = time.time()
    hub.on_batch(
        CommittedBatch(
            readings=tuple(
                Reading(ref, ch, ts, 0.0, None, None)
                for ref in load.refs()
                for ch in load.channel_names
            ),
            presences=(),
            dead_letters=(),
            committed_at=ts,
        )
    )
    loop = asyncio.get_running_loop()
    conn.send(("ready",))
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command[0] == "feed":
            _, mode, duration_s = command
            sink: LiveHub | NaiveBroadcaster = hub if mode == "live" else naive
            conn.send(("fed", await _feed(load, sink, duration_s, rng)))
        elif command[0] == "backlog":
            conn.send(("backlog", naive.backlog()))
        elif command[0] == "stop":
            break
    server.should_exit = True
    await task


def server_main(conn: Connection, sock: socket.socket, load: Load) -> None:
    asyncio.run(_serve(conn, sock, load))


# -- client processes ---------------------------------------------------------------

_READINGS_HEAD = '{"type":"readings","seq":'


@dataclass(frozen=True, slots=True)
class ClientSpec:
    base: str
    mode: Mode
    compress: bool
    window: int
    mix: str
    indices: tuple[int, ...]
    probe_every: int
    load: Load


@dataclass
class ClientStats:
    latencies: array.array[float] = field(default_factory=lambda: array.array("d"))
    probe_items: int = 0
    probes: int = 0
    frames: int = 0
    bytes: int = 0
    cpu_s: float = 0.0
    counting: bool = False


def _subscription(index: int, mix: str, load: Load) -> str:
    """A quarter everything, half one district, a quarter 50 devices in view."""
    if mix == "all" or index % 4 == 0:
        return ""
    if index % 4 in (1, 2):
        return f"districts=district-{index % load.districts}"
    start = (index * 7919) % max(1, load.devices - 50)
    return "devices=" + ",".join(f"dev-{i:05d}" for i in range(start, start + 50))


async def _client(
    index: int, spec: ClientSpec, stats: ClientStats, ready: asyncio.Event, gate: asyncio.Semaphore
) -> None:
    query = [f"window={spec.window}"] if spec.window and spec.mode == "live" else []
    if spec.mode == "live" and (sub := _subscription(index, spec.mix, spec.load)):
        query.append(sub)
    url = f"{spec.base}/{spec.mode}" + ("?" + "&".join(query) if query else "")
    probe = index % spec.probe_every == 0
    async with contextlib.AsyncExitStack() as stack:
        async with gate:  # a few handshakes and snapshots at a time
            ws = await stack.enter_async_context(
                connect(
                    url,
                    max_size=None,
                    compression="deflate" if spec.compress else None,
                    open_timeout=120,
                )
            )
            if spec.mode == "live":
                first = orjson.loads(await ws.recv())
                assert first["type"] == "snapshot", first["type"]
        stats.probes += probe
        ready.set()
        with contextlib.suppress(Exception):
            await _receive(ws, spec, stats, probe=probe)


async def _receive(
    ws: ClientConnection, spec: ClientSpec, stats: ClientStats, *, probe: bool
) -> None:
    latencies = stats.latencies
    head = len(_READINGS_HEAD)
    async for received in ws:
        now = time.time()
        assert isinstance(received, str)
        for message in unbatch(received):
            if stats.counting:
                stats.frames += 1
                stats.bytes += len(message)
            readings = message.startswith(_READINGS_HEAD)
            if probe and stats.counting:
                frame = orjson.loads(message)
                if spec.mode == "naive":
                    latencies.append(now - frame["ts"])
                    stats.probe_items += 1
                elif readings:
                    items = frame["items"]
                    stats.probe_items += len(items)
                    latencies.extend([now - item[2] for item in items])
            if readings and spec.window:
                # As the console does once it has applied the frame.
                seq = message[head : message.index(",", head)]
                await ws.send('{"type":"received","seq":' + seq + "}")


async def _clients(conn: Connection, spec: ClientSpec) -> None:
    loop = asyncio.get_running_loop()
    stats = ClientStats()
    gate = asyncio.Semaphore(10)
    readies = {i: asyncio.Event() for i in spec.indices}
    tasks = [asyncio.create_task(_client(i, spec, stats, readies[i], gate)) for i in spec.indices]
    for ready in readies.values():
        await ready.wait()
    conn.send(("ready",))
    await loop.run_in_executor(None, conn.recv)  # count
    stats.counting = True
    cpu0 = time.process_time()
    await loop.run_in_executor(None, conn.recv)  # stop
    stats.counting = False
    stats.cpu_s = time.process_time() - cpu0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    conn.send(("stats", stats))


def clients_main(conn: Connection, spec: ClientSpec) -> None:
    asyncio.run(_clients(conn, spec))


# -- orchestration --------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _recv(conn: Connection) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    mode: Mode
    compress: bool
    window: int


async def _phase(
    phase: Phase, server: Connection, base: str, args: argparse.Namespace, load: Load
) -> None:
    ctx = mp.get_context("spawn")
    pipes: list[Connection] = []
    procs = []
    for k in range(args.client_procs):
        parent, child = ctx.Pipe()
        spec = ClientSpec(
            base=base,
            mode=phase.mode,
            compress=phase.compress,
            window=phase.window,
            mix=args.mix,
            indices=tuple(range(k, args.clients, args.client_procs)),
            probe_every=args.probe_every,
            load=load,
        )
        proc = ctx.Process(target=clients_main, args=(child, spec), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    connect_start = time.perf_counter()
    for pipe in pipes:
        await _recv(pipe)
    connected_s = time.perf_counter() - connect_start
    for pipe in pipes:
        pipe.send(("count",))
    server.send(("feed", phase.mode, args.duration))
    _, fed = await _recv(server)
    grace = 1.0 if phase.mode == "live" else args.grace
    await asyncio.sleep(grace)
    backlog_after_grace = 0
    if phase.mode == "naive":
        server.send(("backlog",))
        _, backlog_after_grace = await _recv(server)
    total = ClientStats()
    for pipe in pipes:
        pipe.send(("stop",))
        _, stats = await _recv(pipe)
        total.latencies.extend(stats.latencies)
        total.probe_items += stats.probe_items
        total.probes += stats.probes
        total.frames += stats.frames
        total.bytes += stats.bytes
        total.cpu_s += stats.cpu_s
    for proc in procs:
        proc.join(30)

    counted_s = fed.seconds + grace
    on_batch = fed.on_batch_s
    per_batch = max(1, fed.readings // max(1, fed.batches))
    lat = total.latencies
    print(f"\n== {phase.name}")
    print(
        f"  {args.clients} clients ({args.mix if phase.mode == 'live' else 'everything'}"
        f"{f', window {phase.window}' if phase.window and phase.mode == 'live' else ''}),"
        f" connected{' with their snapshot' if phase.mode == 'live' else ''}"
        f" in {connected_s:.1f} s"
    )
    print(
        f"  feed: {fed.readings / fed.seconds:,.0f} readings/s achieved of {load.rate:,}"
        f" offered ({fed.batches} batches of {per_batch} in {fed.seconds:.1f} s;"
        f" {fed.behind_s:.1f} s behind schedule at the end)"
    )
    print(
        f"  on_batch: mean {statistics.fmean(on_batch) * 1e6:,.0f} µs,"
        f" p50 {_percentile(on_batch, 0.5) * 1e6:,.0f} µs,"
        f" p99 {_percentile(on_batch, 0.99) * 1e6:,.0f} µs per batch"
        f" (mean {statistics.fmean(on_batch) / per_batch * 1e9:,.0f} ns per reading)"
    )
    print(
        f"  server process CPU (feeder, hub, encoding, websocket sends):"
        f" {fed.cpu_s / fed.batches * 1e3:.1f} ms per batch,"
        f" {fed.cpu_s / fed.seconds * 100:.0f}% of a core"
    )
    print(
        f"  clients received {total.frames / counted_s:,.0f} frames/s,"
        f" {total.bytes / counted_s / 1e6:,.1f} MB/s;"
        f" {total.probes} probe clients {total.probe_items / counted_s:,.0f} items/s;"
        f" client processes CPU {total.cpu_s / counted_s * 100:.0f}% of a core"
    )
    print(
        f"  latency hub → probe client: p50 {_percentile(lat, 0.5) * 1e3:,.0f} ms,"
        f" p90 {_percentile(lat, 0.9) * 1e3:,.0f} ms,"
        f" p99 {_percentile(lat, 0.99) * 1e3:,.0f} ms,"
        f" max {max(lat, default=0) * 1e3:,.0f} ms ({len(lat):,} items)"
    )
    if phase.mode == "naive":
        offered = fed.readings * args.clients
        print(
            f"  behind: {fed.backlog_at_end:,} messages queued when the feed stopped"
            f" ({fed.backlog_at_end / max(1, offered):.0%} of the {offered:,} produced),"
            f" {backlog_after_grace:,} still queued {grace:.0f} s later"
        )


PHASES = {
    "hub": Phase("hub, flow control, no compression", "live", compress=False, window=2),
    "hub-deflate": Phase("hub, flow control, permessage-deflate", "live", compress=True, window=2),
    "hub-nowindow": Phase("hub, no flow control, no compression", "live", compress=False, window=0),
    "naive": Phase("naive broadcaster (baseline)", "naive", compress=False, window=0),
}


async def _run(args: argparse.Namespace) -> None:
    load = Load(
        rate=args.rate,
        devices=args.devices,
        channels=args.channels,
        districts=args.districts,
        batch_interval_s=args.batch_interval,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    server, child = ctx.Pipe()
    proc = ctx.Process(target=server_main, args=(child, sock, load), daemon=True)
    proc.start()
    try:
        assert await _recv(server) == ("ready",)
        print(
            f"live bench: {args.clients} clients in {args.client_procs} processes,"
            f" {args.rate:,} readings/s over {args.devices * args.channels:,} series,"
            f" {args.duration:.0f} s per phase; {os.cpu_count()} cores,"
            f" load average {os.getloadavg()[0]:.2f} before the run"
        )
        for name in args.phases.split(","):
            await _phase(PHASES[name], server, f"ws://127.0.0.1:{port}", args, load)
        server.send(("stop",))
        await asyncio.get_running_loop().run_in_executor(None, proc.join, 30)
    finally:
        if proc.is_alive():
            proc.terminate()
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--probe-every", type=int, default=10, help="1 in N clients measures")
    parser.add_argument("--rate", type=int, default=10_000, help="readings per second")
    parser.add_argument("--devices", type=int, default=2_000)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--districts", type=int, default=10)
    parser.add_argument("--batch-interval", type=float, default=0.05, help="seconds")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--grace", type=float, default=5.0, help="naive: wait after the feed")
    parser.add_argument("--mix", choices=("mixed", "all"), default="mixed")
    parser.add_argument("--phases", default=",".join(PHASES))
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
