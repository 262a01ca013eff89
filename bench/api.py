"""Control API benchmark: history reads through HTTP, live fan-out under a 10,000 msg/s load.

Run: ``.venv/bin/python -m bench.api`` (about 4 minutes; phase lengths and
repetitions are flags). It starts its own embedded Mosquitto and PostgreSQL
(same tuning as ``cityops up``) in a temporary directory, unless
``--mqtt-url`` / ``--database-url`` name a broker and a fresh, empty database.

1. **History, database level**: :mod:`bench.history` as it is (its table:
   7 days of 1 Hz data, cityops queries against naive SQL), with
   ``--history-scale`` times its repetitions; ``--no-history-bench`` only
   fills its data.
2. **History, HTTP level**: the stack below serves the same data. The 1 Hz
   series over 7 days in 1-minute buckets
   (``GET /api/v1/devices/fast/series/intensity/history``) and the district
   aggregate (``GET /api/v1/history/group``), each against the same call on
   a database connection (the baseline), taking turns, the stack idle.
3. **Ingest and live fan-out**: a child process runs what ``cityops up``
   runs in one process (``cityops/commands.py``): the ingest service with the
   default rules feeding the live hub in process, and the control API on
   uvicorn, alert events fanned out to the hub. ``--publishers`` processes
   publish ``--rate`` JSON single readings per second in all
   (``{"ts": <send time>, "occupancy": x}`` on
   ``city/traffic/{district}/{device}``, ``--devices`` devices, QoS 1, in
   5 ms bursts). The publishers write MQTT packets by hand
   (:class:`bench.mqttload.RawPublisher`: 10 µs of CPU a message against 86 µs for paho
   here; ``--publisher paho``). After one message per device (devices and
   series get created), two phases of ``--warmup`` + ``--duration`` seconds:

   * no websocket clients: the baseline;
   * ``--clients`` consoles on ``/api/v1/live`` with a bearer token, in
     ``--client-procs`` processes (:mod:`bench.wsclients`: a quarter follow
     everything, half one district, a quarter 50 devices; flow control as
     the console, ``window=4``); one group of four in ``--probe-every``
     records delivery latency, the reading's ``ts`` to the console's
     receive time (one machine, one clock).

   ``--rounds N`` repeats the pair, taking turns, so that a change in the
   machine's load hits both alike. Between phases every device keeps
   reporting every ``--keepalive`` seconds, so that none turns stale.

   Per phase, over the measured window: the publishers' achieved rate;
   messages received and readings committed per second by the ingester;
   publish → commit lag (a sink after the hub takes commit time minus
   ``ts``); how long after the last publish the last commit came (the
   backlog); the server's peak RSS (``VmHWM``, reset per phase); where the
   machine's CPU went (the server, the broker, the database, the publishers,
   the consoles, other processes, from ``/proc``); with consoles, frames/s,
   MB/s, delivery latency, and commit → console latency of one device in 19
   (the hub and the websocket alone, whatever the ingest backlog).
   ``--timeline`` makes the server log its figures and its worst event-loop
   stall every second.

The hub coalesces readings per series (one change per 250 ms epoch): a
console receives the latest value of each series, so delivery latency is
measured on the readings delivered and includes up to one epoch of waiting
by design. The machine is shared: the figures move with its load, printed
with each phase, with the CPU taken by other work.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import cast

import httpx
import psycopg

from bench import history as history_bench
from bench.mqttload import Load, PublishStats, publisher_main
from bench.procs import cmdline, process_table
from bench.services import bench_services
from bench.stack import (
    Children,
    LagFigures,
    ServerSample,
    ServerSpec,
    call,
    recv,
    server_main,
    sleep_until,
)
from bench.wsclients import ConsoleGroup, ConsoleSpec, ConsoleStats, iter_kinds, percentile
from control_api.history import Bucket, group_history, series_history


def _log(text: str) -> None:
    print(f"[bench.api] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ history through HTTP


async def _http_history(
    base_url: str, token: str, database_url: str, reps: int
) -> list[history_bench.Timing]:
    """The two 7-day queries through the API against the same calls on a connection."""
    t0, end = history_bench.T0, history_bench.END
    span = {"start": t0.isoformat(), "end": end.isoformat()}
    series_path = "/api/v1/devices/fast/series/intensity/history"
    series_params = {**span, "bucket": "1m"}
    group_params = {**span, "channel": "intensity", "district": "minato"}
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as http,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn,
    ):

        async def get(path: str, params: dict[str, str]) -> int:
            response = await http.get(path, params=params)
            response.raise_for_status()
            return len(response.content)

        for path, params, points in (
            (series_path, series_params, history_bench.DAYS * 1440),
            ("/api/v1/history/group", group_params, history_bench.DAYS * 96),
        ):
            response = await http.get(path, params=params)
            response.raise_for_status()
            got = len(response.json()["points"])
            if got != points:
                msg = f"GET {path}: {got} points, expected {points}"
                raise RuntimeError(msg)
            _log(f"GET {path}: {len(response.content) / 1e6:.2f} MB, {got} points")

        series = ("fast", "intensity")

        def direct_series() -> Awaitable[object]:
            return series_history(conn, series, t0, end, Bucket.MINUTE)

        def direct_group() -> Awaitable[object]:
            return group_history(conn, channel="intensity", district="minato", start=t0, end=end)

        # bench.history's runner: one warm-up each, then turns, so load drifts hit both alike.
        return [
            *await history_bench._compare(
                "series 7 d, 1-min buckets (10,080)",
                [
                    ("direct series_history", reps, direct_series),
                    ("HTTP GET …/series/…/history", reps, lambda: get(series_path, series_params)),
                ],
            ),
            *await history_bench._compare(
                "district 7 d, auto 15-min (672), 20 dev.",
                [
                    ("direct group_history", reps, direct_group),
                    (
                        "HTTP GET /history/group",
                        reps,
                        lambda: get("/api/v1/history/group", group_params),
                    ),
                ],
            ),
        ]


# ------------------------------------------------------------------ where the CPU went

SERVER = "server (ingest, hub, API)"
PUBLISHERS = "publishers"
CONSOLES = "consoles"
ORCHESTRATOR = "bench orchestrator"
OTHERS = "other processes"
UNATTRIBUTED = "no process (kernel, short-lived)"
BUSY = "machine, all busy"
_CPU_ROWS = (
    BUSY,
    SERVER,
    "mosquitto",
    "postgres",
    PUBLISHERS,
    CONSOLES,
    ORCHESTRATOR,
    OTHERS,
    UNATTRIBUTED,
    "softirq and irq",
    "steal (hypervisor)",
)

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuGroups:
    """Which processes are whose: the bench's own, its broker and database, the rest."""

    own: dict[str, tuple[int, ...]]
    scratch: Path

    def classify(self, table: dict[int, tuple[str, int, int]]) -> dict[int, str]:
        groups = {pid: name for name, pids in self.own.items() for pid in pids}
        scratch = str(self.scratch)
        for pid, (comm, _, _) in table.items():
            if comm in ("mosquitto", "postgres") and scratch in cmdline(pid):
                groups[pid] = comm
        postmasters = {pid for pid, name in groups.items() if name == "postgres"}
        for pid, (_, ppid, _) in table.items():
            if ppid in postmasters:
                groups[pid] = "postgres"  # the backends and workers of our server
        return groups


def _machine_ticks() -> dict[str, int]:
    """The machine's CPU ticks so far, all cores, by kind (``/proc/stat``)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return {
        BUSY: user + nice + system + irq + softirq + steal,
        "softirq and irq": irq + softirq,
        "steal (hypervisor)": steal,
    }


async def _cpu_window(groups: CpuGroups, window: tuple[float, float]) -> dict[str, float]:
    """CPU used in ``window`` (wall clock) per process group and kind, in cores (1.0: one core)."""
    await sleep_until(window[0])
    first, first_machine = process_table(), _machine_ticks()
    await sleep_until(window[1])
    last, last_machine = process_table(), _machine_ticks()
    names = groups.classify(last)
    ticks: dict[str, int] = {}
    others: dict[str, int] = {}
    for pid, (comm, _, used) in last.items():
        if pid in first:
            name = names.get(pid, OTHERS)
            ticks[name] = ticks.get(name, 0) + used - first[pid][2]
            if name == OTHERS:
                others[comm] = others.get(comm, 0) + used - first[pid][2]
    for kind, value in last_machine.items():
        ticks[kind] = value - first_machine[kind]
    # Kernel work outside any process, and processes that started or ended in the window.
    attributed = sum(v for k, v in ticks.items() if k not in last_machine)
    ticks[UNATTRIBUTED] = ticks[BUSY] - attributed
    span = window[1] - window[0]
    top = sorted(others.items(), key=lambda kv: -kv[1])[:4]
    _log("other processes: " + ", ".join(f"{c} {t / _TICKS_PER_S / span:.2f}" for c, t in top))
    return {name: value / _TICKS_PER_S / span for name, value in ticks.items()}


# ------------------------------------------------------------------ ingest phases


@dataclass(frozen=True, slots=True)
class PhaseResult:
    name: str
    load_average: float
    duration_s: float
    published: list[PublishStats]
    first: ServerSample
    last: ServerSample
    peak_kib: int
    drained_after_s: float | None
    """Last commit after the last publish; None: not all committed within the timeout."""
    committed_total: int
    published_total: int
    lags: LagFigures
    cpu: dict[str, float]
    """Cores used in the window, by process group."""
    consoles: ConsoleStats | None = None
    connected: tuple[int, float] | None = None

    def per_s(self, attr: str) -> float:
        delta = float(getattr(self.last, attr)) - float(getattr(self.first, attr))
        return delta / (self.last.wall - self.first.wall)


class _Publishers:
    """The publisher processes, and how many messages they published in all."""

    def __init__(self, pipes: list[Connection]) -> None:
        self.pipes = pipes
        self.published = 0

    async def prime(self) -> int:
        """One message per device (devices and series get created); the trickle starts."""
        primed = sum([int((await call(pipe, "prime"))[1]) for pipe in self.pipes])
        self.published += primed
        return primed

    async def quiet(self) -> None:
        """Stop the keep-alive trickle and count what it published."""
        self.published += sum([int((await call(pipe, "quiet"))[1]) for pipe in self.pipes])

    def trickle(self) -> None:
        for pipe in self.pipes:
            pipe.send(("trickle",))

    async def run(
        self, start_at: float, run_s: float, window: tuple[float, float]
    ) -> list[PublishStats]:
        for pipe in self.pipes:
            pipe.send(("go", start_at, run_s, window))
        done = await asyncio.gather(*(recv(pipe) for pipe in self.pipes))
        stats = [s for _, s in done]
        self.published += sum(s.published for s in stats)
        return stats


async def _drain(server: Connection, publishers: _Publishers, timeout_s: float) -> float | None:
    """Wait until all that was published is committed; when (wall), or None at the timeout."""
    reached, _ = await call(server, "drain", publishers.published, timeout_s)
    return cast("float | None", reached)


async def _ingest_phase(  # noqa: PLR0917
    name: str,
    server: Connection,
    publishers: _Publishers,
    groups: CpuGroups,
    args: argparse.Namespace,
    consoles: ConsoleGroup | None = None,
    *,
    reset_peak: bool = True,
) -> PhaseResult:
    await publishers.quiet()
    if await _drain(server, publishers, args.drain_timeout) is None:
        _log(f"{name}: the keep-alive trickle was not all committed in {args.drain_timeout} s")
    load_average = os.getloadavg()[0]
    _log(f"{name}: {args.warmup:.0f} s warm-up + {args.duration:.0f} s (load {load_average:.2f})")
    before: ServerSample = await call(server, "sample", reset_peak)
    start_at = time.time() + 0.5
    window = (start_at + args.warmup, start_at + args.warmup + args.duration)
    if consoles is not None:
        consoles.count(*window)
    (first, last), published, cpu = await asyncio.gather(
        call(server, "measure", *window),
        publishers.run(start_at, args.warmup + args.duration + 1.0, window),
        _cpu_window(groups, window),
    )
    reached = await _drain(server, publishers, args.drain_timeout)
    lags = await call(server, "lags")
    end = await call(server, "sample", False)
    publishers.trickle()
    stats = None
    if consoles is not None:
        await asyncio.sleep(1.0)  # frames already on their way
        stats = await consoles.stop()
    return PhaseResult(
        name=name,
        load_average=load_average,
        duration_s=args.duration,
        published=published,
        first=first,
        last=last,
        peak_kib=end.peak_kib,
        drained_after_s=reached - max(p.ended_at for p in published) if reached else None,
        committed_total=end.committed - before.committed,
        published_total=sum(p.published for p in published),
        lags=lags,
        cpu=cpu,
        consoles=stats,
    )


# ------------------------------------------------------------------ report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}"


def _rows(result: PhaseResult) -> dict[str, str]:
    window_s = result.duration_s
    published = sum(p.in_window for p in result.published) / window_s
    behind = max(p.behind_s for p in result.published)
    last = result.last
    lag = result.lags
    rows = {
        "load average at start": f"{result.load_average:.2f}",
        "published msg/s (in window)": f"{published:,.0f}",
        "publisher worst behind schedule": f"{behind:.2f} s",
        "ingest received msg/s": f"{result.per_s('received'):,.0f}",
        "ingest committed readings/s": f"{result.per_s('committed'):,.0f}",
        "kept up with the load": (
            "yes"
            if result.per_s("committed") >= 0.97 * published
            else f"no, {published - result.per_s('committed'):,.0f} msg/s short"
        ),
        "publish → commit p50 / p99 ms": f"{_ms(lag.p50_s)} / {_ms(lag.p99_s)}",
        "publish → commit max ms": _ms(lag.max_s),
        "last commit after last publish": (
            f"{result.drained_after_s:.2f} s" if result.drained_after_s is not None else "timeout"
        ),
        "committed / published (phase)": f"{result.committed_total:,} / {result.published_total:,}",
        f"CPU, cores of {os.cpu_count()}:": "",
        **{
            f"  {name}": f"{max(0.0, result.cpu[name]):.2f}" if name in result.cpu else "-"
            for name in _CPU_ROWS
        },
        "server RSS at end / peak MiB": f"{last.rss_kib / 1024:.0f} / {result.peak_kib / 1024:.0f}",
    }
    stats = result.consoles
    if stats is None:
        return rows
    latencies = stats.all_latencies()
    commits = lag.commits
    fan_out = [
        received - commits[device, ts]
        for device, ts, received in stats.traced
        if (device, ts) in commits
    ]
    rows |= {
        "consoles connected (snapshots in)": (
            f"{result.connected[0]} in {result.connected[1]:.1f} s" if result.connected else "?"
        ),
        "snapshot frame size": f"{stats.snapshot_bytes / 1e3:,.0f} kB",
        "frames/s to all consoles": f"{stats.frames / window_s:,.0f}",
        **{
            f"  {name} frames/s": f"{count / window_s:,.0f}"
            for name, count in sorted(stats.frame_types.items())
        },
        "MB/s to all consoles": f"{stats.bytes / window_s / 1e6:,.1f}",
        "probe consoles, items/s": f"{stats.probes}, {stats.probe_items / window_s:,.0f}",
        "delivery p50 / p90 / p99 ms": " / ".join(
            _ms(percentile(latencies, q)) for q in (0.5, 0.9, 0.99)
        ),
        **{
            f"  p99 ms, {kind}": _ms(percentile(values, 0.99)) for kind, values in iter_kinds(stats)
        },
        "delivery max ms": _ms(max(latencies, default=float("nan"))),
        "commit → console p50 / p90 / p99 ms": " / ".join(
            _ms(percentile(fan_out, q)) for q in (0.5, 0.9, 0.99)
        ),
        "  traced readings matched": f"{len(fan_out):,}",
        "consoles dropped during the phase": str(stats.closed_early),
    }
    return rows


def _print_http(timings: list[history_bench.Timing]) -> None:
    print("\n== history through the HTTP API (same data and run, the stack idle)")
    print(f"{'query':<42} {'path':<30} {'n':>4} {'p50 ms':>9} {'p99 ms':>9}")
    last = ""
    for t in timings:
        label = t.query if t.query != last else ""
        last = t.query
        print(f"{label:<42} {t.impl:<30} {len(t.seconds):>4} {t.p50_ms:>9.1f} {t.p99_ms:>9.1f}")
    for direct, http in zip(timings[::2], timings[1::2], strict=True):
        print(
            f"  HTTP overhead, {direct.query}: p50 +{http.p50_ms - direct.p50_ms:,.0f} ms"
            f" (x{http.p50_ms / direct.p50_ms:.2f})"
        )


def _print_phases(load: Load, args: argparse.Namespace, phases: list[PhaseResult]) -> None:
    print(
        f"\n== ingest and live fan-out: {load.rate:,} msg/s offered, {load.devices:,} devices"
        f" in {load.districts} districts, JSON single readings, QoS {load.qos},"
        f" {load.publishers} {args.publisher} publisher processes; {args.duration:.0f} s"
        f" windows after {args.warmup:.0f} s warm-up"
    )
    table = [_rows(p) for p in phases]
    labels = list(dict.fromkeys(k for rows in table for k in rows))
    print(f"{'':<36}" + "".join(f"{p.name:>26}" for p in phases))
    for label in labels:
        print(f"{label:<36}" + "".join(f"{rows.get(label, ''):>26}" for rows in table))
    print(
        "publish → commit: the reading's ts (send time) to its batch's commit; delivery:"
        " ts to a probe console's receive time;\ncommit → console: the hub (readings wait"
        " up to one 250 ms epoch), encoding and the websocket, for one device in 19."
    )


# ------------------------------------------------------------------ orchestration


async def _run(args: argparse.Namespace, mqtt_url: str, database_url: str, scratch: Path) -> None:
    if args.history_bench:
        await history_bench._run(database_url, args.history_scale)
    else:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            _log(f"filled {await history_bench._fill(conn):,} readings of history")
    load = Load(args.rate, args.devices, args.districts, args.publishers, args.qos)
    # One device in 19 (all districts) is traced: commit → console, the fan-out alone.
    traced = frozenset(load.device(i) for i in range(0, load.devices, 19))
    spec = ServerSpec(
        mqtt_url, database_url, scratch, f"bench-api-{uuid.uuid4().hex[:6]}", traced,
        args.timeline,
    )  # fmt: skip
    with Children() as children:
        server, server_pid = children.spawn(server_main, spec)
        spawned = [
            children.spawn(publisher_main, mqtt_url, load, k, args.keepalive, args.publisher)
            for k in range(args.publishers)
        ]
        publishers = _Publishers([pipe for pipe, _ in spawned])
        groups = CpuGroups(
            {
                SERVER: (server_pid,),
                PUBLISHERS: tuple(pid for _, pid in spawned),
                ORCHESTRATOR: (os.getpid(),),
            },
            scratch,
        )
        _, port, token = await recv(server)
        for pipe in publishers.pipes:
            await recv(pipe)
        base = f"http://127.0.0.1:{port}"
        _log(f"stack up on {base}")
        timings = await _http_history(base, token, database_url, args.http_reps)
        _print_http(timings)

        primed = await publishers.prime()
        await _drain(server, publishers, args.drain_timeout)
        _log(f"{primed} devices primed")

        console_spec = ConsoleSpec(
            url=f"ws://127.0.0.1:{port}/api/v1/live",
            headers=(("Authorization", f"Bearer {token}"),),
            clients=args.clients,
            districts=tuple(load.district(i) for i in range(load.districts)),
            devices=tuple(load.device(i) for i in range(load.devices)),
            window=args.window,
            probe_every=args.probe_every,
            traced=traced,
        )
        phases: list[PhaseResult] = []
        for round_ in range(1, args.rounds + 1):
            # Rounds take turns, so that a change of the machine's load hits both alike.
            suffix = f" #{round_}" if args.rounds > 1 else ""
            phases.append(
                await _ingest_phase(f"no clients{suffix}", server, publishers, groups, args)
            )
            await call(server, "sample", True)  # the peak includes the consoles' snapshots
            with ConsoleGroup(console_spec, procs=args.client_procs) as consoles:
                connected = await consoles.wait_connected()
                _log(f"{connected[0]} consoles connected in {connected[1]:.1f} s")
                with_consoles = CpuGroups({**groups.own, CONSOLES: consoles.pids}, scratch)
                result = await _ingest_phase(
                    f"{args.clients} clients{suffix}", server, publishers, with_consoles, args,
                    consoles, reset_peak=False,
                )  # fmt: skip
                phases.append(dataclasses.replace(result, connected=connected))
        peak = await call(server, "peak")
    _print_phases(load, args, phases)
    print(f"server process peak RSS over the whole run (VmHWM): {peak / 1024:,.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mqtt-url")
    parser.add_argument("--database-url", help="a fresh database (default: embedded server)")
    parser.add_argument("--rate", type=int, default=10_000, help="messages/s, all publishers")
    parser.add_argument("--devices", type=int, default=2_000)
    parser.add_argument("--districts", type=int, default=10)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument(
        "--publisher",
        choices=("raw", "paho"),
        default="raw",
        help="raw: MQTT 3.1.1 packets written by hand (light); paho: paho-mqtt (MQTT 5)",
    )
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the window")
    parser.add_argument(
        "--keepalive",
        type=float,
        default=2.0,
        help="between phases every device reports every this many seconds",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="take turns: no clients, clients, N times"
    )
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--probe-every", type=int, default=10, help="1 in N groups of 4 measure")
    parser.add_argument("--window", type=int, default=4, help="console flow control; 0: off")
    parser.add_argument(
        "--timeline", action="store_true", help="the server logs its figures every second"
    )
    parser.add_argument("--http-reps", type=int, default=10)
    parser.add_argument(
        "--history-scale", type=float, default=0.5, help="bench.history's repetitions x this"
    )
    parser.add_argument(
        "--no-history-bench",
        dest="history_bench",
        action="store_false",
        help="only fill bench.history's data, do not run its comparisons",
    )
    args = parser.parse_args()
    with bench_services(args.mqtt_url, args.database_url) as (mqtt_url, database_url, scratch):
        asyncio.run(_run(args, mqtt_url, database_url, scratch))


if __name__ == "__main__":
    main()
