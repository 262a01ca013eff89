"""``cityops up``'s composition in a child process, driven over a pipe, for benchmarks.

:func:`server_main` runs what ``cityops up`` runs in one process
(``cityops/commands.py``): the ingest service with the default rules feeding
the live hub in process, and the control API on uvicorn (serving the console
when :attr:`ServerSpec.console_dir` is set), alert events fanned out to the
hub. A :class:`LagSink` after the hub counts committed readings and takes
publish → commit lags. :class:`Children` starts such processes (spawn) on
pipes; :func:`call` sends a command and awaits the reply. Shared by
:mod:`bench.api` and :mod:`bench.soak`.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from bench.wsclients import percentile
from cityops.maintenance import maintenance_task
from cityops.runtime import rules_path
from cityops.settings import MqttEndpoint, Settings
from control_api import LiveHub, api_config, create_app, embedded_server, ensure_first_admin
from ingest import CommittedBatch, IngestConfig, IngestService, MqttOptions
from rules import FanOutPublisher
from tests.mqtt_helpers import drop_session


async def sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


class Children:
    """Child processes (spawn) on pipes; ``with`` joins or terminates them."""

    def __init__(self) -> None:
        self._procs: list[BaseProcess] = []
        self.pipes: list[Connection] = []

    def spawn(self, target: Callable[..., None], *args: object) -> tuple[Connection, int]:
        """Start ``target(pipe, *args)`` in a process; (our end of the pipe, its pid)."""
        parent, child = mp.get_context("spawn").Pipe()
        proc = mp.get_context("spawn").Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        child.close()  # the child's end lives in the child: its exit is our EOFError
        self._procs.append(proc)
        self.pipes.append(parent)
        return parent, proc.pid or 0

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for proc in self._procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


async def recv(pipe: Connection) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, pipe.recv)


async def call(pipe: Connection, *command: object) -> Any:
    pipe.send(command)
    return await recv(pipe)


# ------------------------------------------------------------------ the server process


def proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True, slots=True)
class ServerSample:
    wall: float
    received: float
    committed: int
    rss_kib: int
    peak_kib: int
    """``VmHWM`` since the last reset."""


@dataclass(frozen=True, slots=True)
class LagFigures:
    count: int
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    commits: dict[tuple[str, float], float]
    """Commit times of the traced devices' readings."""


class LagSink:
    """A batch sink after the hub: publish → commit lag, commit times to trace, a count."""

    def __init__(self, traced: frozenset[str]) -> None:
        self.window = (float("inf"), float("-inf"))
        self.lags: array.array[float] = array.array("d")
        self.traced = traced
        self.commits: dict[tuple[str, float], float] = {}
        """(device, ts) → commit time of the traced devices' readings in the window."""
        self.committed = 0
        self._target: int | None = None
        self._reached = asyncio.Event()

    def on_batch(self, batch: CommittedBatch) -> None:
        self.committed += len(batch.readings)
        lo, hi = self.window
        at = batch.committed_at
        lags, traced, commits = self.lags, self.traced, self.commits
        for r in batch.readings:
            if lo <= r.ts < hi:
                lags.append(at - r.ts)
                if r.device.device_id in traced:
                    commits[r.device.device_id, r.ts] = at
        if self._target is not None and self.committed >= self._target:
            self._reached.set()

    async def wait_committed(self, target: int) -> None:
        self._target = target
        self._reached.clear()
        if self.committed < target:
            await self._reached.wait()

    def take_lags(self) -> LagFigures:
        lags, commits = self.lags, self.commits
        self.lags, self.commits = array.array("d"), {}
        return LagFigures(
            len(lags), percentile(lags, 0.5), percentile(lags, 0.9), percentile(lags, 0.99),
            max(lags, default=float("nan")), commits,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ServerSpec:
    mqtt_url: str
    database_url: str
    scratch: Path
    client_id: str
    traced: frozenset[str]
    """Devices whose commit times are kept, to time the fan-out alone."""
    timeline: bool = False
    """Log ingest figures and event-loop stalls every second (stderr)."""
    console_dir: Path | None = None
    """The built console (``console/dist``) to serve, as ``cityops up`` does; None: API only."""


def server_main(conn: Connection, spec: ServerSpec) -> None:
    asyncio.run(_serve(conn, spec))


async def _serve(conn: Connection, spec: ServerSpec) -> None:
    """``cityops up``'s composition (``cityops/commands.py`` ``_serve``), driven over a pipe."""
    settings = Settings.from_env()
    config = IngestConfig(
        mqtt=MqttEndpoint.parse(spec.mqtt_url),
        database_url=spec.database_url,
        client_id=spec.client_id,
        mqtt_options=MqttOptions(client_id=spec.client_id, session_expiry_s=600),
        rules_path=rules_path(settings),
    )
    hub = LiveHub()
    lag = LagSink(spec.traced)
    api = dataclasses.replace(
        api_config(settings, spec.mqtt_url, spec.database_url, client_id=f"{spec.client_id}-api"),
        live_from_broker=False,
        recordings_dir=spec.scratch / "recordings",
        console_dir=spec.console_dir,
    )
    app = create_app(api, hub=hub)
    async with (
        IngestService(config, sinks=(hub, lag)) as ingest,
        embedded_server(app, host="127.0.0.1", port=0) as port,
        maintenance_task(spec.database_url),  # roll-ups and retention, as in `cityops up`
    ):
        if ingest.alerts is not None:
            ingest.alerts.publisher = FanOutPublisher(ingest.alerts.publisher, hub)
        await ingest.wait_connected(30.0)
        auth = app.state.ctx.auth
        await ensure_first_admin(auth)
        issued = await auth.issue_token("admin", created_by="bench.api")
        conn.send(("ready", port, issued.token))
        async with asyncio.TaskGroup() as tg:
            timeline = tg.create_task(_timeline(ingest, lag)) if spec.timeline else None
            await _server_commands(conn, ingest, lag)
            if timeline is not None:
                timeline.cancel()
    drop_session(spec.mqtt_url, spec.client_id)


async def _timeline(ingest: IngestService, lag: LagSink) -> None:
    """Every second: received and committed rates, the ingest queue, CPU, the worst loop stall."""
    registry = ingest.metrics.registry
    t0 = last = time.perf_counter()
    received = registry.get_sample_value("cityops_ingest_messages_received_total") or 0.0
    committed, cpu = lag.committed, time.process_time()
    stall = 0.0
    while True:
        before = time.perf_counter()
        await asyncio.sleep(0.02)
        now = time.perf_counter()
        stall = max(stall, now - before - 0.02)
        if now - last < 1.0:
            continue
        got = registry.get_sample_value("cityops_ingest_messages_received_total") or 0.0
        print(
            f"[bench.api server] +{now - t0:5.0f} s"
            f"  received {(got - received) / (now - last):7,.0f}/s"
            f"  committed {(lag.committed - committed) / (now - last):7,.0f}/s"
            f"  queue {registry.get_sample_value('cityops_ingest_queue_depth') or 0:6,.0f}"
            f"  paused {registry.get_sample_value('cityops_ingest_paused') or 0:.0f}"
            f"  CPU {(time.process_time() - cpu) / (now - last) * 100:3.0f}%"
            f"  worst loop stall {stall * 1e3:5,.0f} ms",
            file=sys.stderr,
            flush=True,
        )
        last, received, committed, cpu, stall = now, got, lag.committed, time.process_time(), 0.0


async def _server_commands(conn: Connection, ingest: IngestService, lag: LagSink) -> None:
    registry = ingest.metrics.registry
    overall_peak_kib = 0

    def sample(*, reset_peak: bool = False) -> ServerSample:
        nonlocal overall_peak_kib
        peak = proc_kib("VmHWM")
        overall_peak_kib = max(overall_peak_kib, peak)
        if reset_peak:
            with contextlib.suppress(OSError):  # "5" resets VmHWM (Linux 4.0+)
                Path("/proc/self/clear_refs").write_text("5")
        return ServerSample(
            wall=time.time(),
            received=registry.get_sample_value("cityops_ingest_messages_received_total") or 0.0,
            committed=lag.committed,
            rss_kib=proc_kib("VmRSS"),
            peak_kib=peak,
        )

    while True:
        command = await recv(conn)
        name = command[0]
        if name == "sample":
            conn.send(sample(reset_peak=command[1]))
        elif name == "measure":
            _, lo, hi = command
            lag.window = (lo, hi)
            await sleep_until(lo)
            first = sample()
            await sleep_until(hi)
            conn.send((first, sample()))
        elif name == "drain":
            _, target, timeout_s = command
            reached: float | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await lag.wait_committed(target)
                    reached = time.time()
            conn.send((reached, lag.committed))
        elif name == "lags":
            conn.send(lag.take_lags())
        elif name == "window":  # lags of readings with ts in [lo, hi) from now on
            _, lo, hi = command
            lag.window = (lo, hi)
            conn.send(sample())
        elif name == "lag_values":  # the lags taken since the last call, raw
            lags, lag.lags = lag.lags, array.array("d")
            lag.commits = {}
            conn.send(lags)
        elif name == "peak":
            sample()
            conn.send(max(overall_peak_kib, proc_kib("VmHWM")))
        else:
            return
