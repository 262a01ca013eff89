"""Soak: the whole stack for an hour at 5,000 msg/s, the console open, 50 websocket clients.

Run: ``.venv/bin/python -m bench.soak [--minutes 60]`` (CI: ``--minutes 5``,
``make soak-ci``). It starts its own embedded Mosquitto and PostgreSQL (same
tuning as ``cityops up``) in a temporary directory, unless ``--mqtt-url`` /
``--database-url`` name a broker and a fresh, empty database. Needs the built
console (``console/dist``) and Debian's Chromium (``/usr/bin/chromium``).

* **The stack**: what ``cityops up`` runs in one process, in a child process
  (:mod:`bench.stack`, as :mod:`bench.api` runs it): the ingest service with
  the default rules feeding the live hub, alert events fanned out to the hub,
  the control API and the console on uvicorn.
* **The load**, ``--rate`` msg/s in all: the simulated city (``cityops
  simulate``, the default city, real time, in a subprocess: about 20 msg/s)
  and, for the rest, a paced publisher (:mod:`bench.mqttload`, JSON single
  readings of ``--devices`` devices ``bench-NNNNN``, each carrying its send
  time, QoS 1, every message acknowledged and counted).
* **The watchers**: ``--clients`` websocket consoles with a bearer token
  (:mod:`bench.wsclients`: a quarter follow everything, half one district, a
  quarter 50 devices; probes record delivery latency, the reading's ``ts`` to
  the receive time), and the console itself in headless Chromium, signed in
  as an operator, on the overview for the whole run.

Every ``--sample-s`` seconds (a line every minute): memory of every process
(the server, the broker, PostgreSQL, the simulator, the publisher, the
websocket client processes, Chromium, the Playwright driver, this
orchestrator), the ingest rate, publish → commit lag, delivery latency, the
alert events the clients received and the console's JS heap.

At the end the load stops, the stack drains, and a table gives: msg/s
published and stored, **readings lost** (the paced publisher's acknowledged
messages minus its readings in the database: exact), duplicates (rows minus
distinct (series, ts)), the simulator's messages against the distinct
(device, ts) it has in the database, alerts raised against alert events
delivered to the clients that follow everything, latency percentiles, memory
per process (start, after the first minute, end, peak, growth after the first
minute), the console's state and JS heap, page errors. The exit code is 1 when
a reading was lost or stored twice, or a part crashed; timings never decide
it (the machine is shared).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import math
import os
import re
import secrets
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
import psycopg

from bench.mqttload import Load, PublishStats, publisher_main
from bench.procs import cmdline, process_table
from bench.services import bench_services
from bench.stack import Children, ServerSample, ServerSpec, call, recv, server_main
from bench.wsclients import ConsoleGroup, ConsoleSpec, ConsoleStats, kind_of
from control_api.auth import hash_password

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "console" / "dist"
CHROMIUM = Path(os.environ.get("CITYOPS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SIMULATOR_MSG_S = 20
"""What ``cityops simulate`` publishes of the default city in real time (1,177 devices)."""
OPERATOR = "soak-operator"


def _log(text: str) -> None:
    print(f"[bench.soak] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ latency histogram


class Histogram:
    """Latencies in 2 % buckets: percentiles of an hour of samples in constant memory."""

    _BASE = math.log(1.02)
    _FLOOR_S = 1e-4

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.count = 0
        self.max_s = float("-inf")

    def add(self, values: Iterable[float]) -> None:
        """Count ``values`` (seconds; below 0.1 ms counts as 0.1 ms)."""
        log, base, floor = math.log, self._BASE, self._FLOOR_S
        buckets = self.buckets
        for v in values:
            buckets[int(log(max(v, floor) / floor) / base)] += 1
            self.count += 1
            self.max_s = max(self.max_s, v)

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s counts."""
        self.buckets.update(other.buckets)
        self.count += other.count
        self.max_s = max(self.max_s, other.max_s)

    def percentile(self, q: float) -> float:
        """The upper edge of the bucket holding the ``q`` quantile; NaN when empty."""
        if not self.count:
            return float("nan")
        rank = min(self.count - 1, int(q * self.count))
        seen = 0
        for key in sorted(self.buckets):
            seen += self.buckets[key]
            if seen > rank:
                return min(self.max_s, self._FLOOR_S * math.exp((key + 1) * self._BASE))
        return self.max_s


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) or math.isinf(seconds) else f"{seconds * 1e3:,.0f}"


def _figures(h: Histogram) -> str:
    return " / ".join(_ms(x) for x in (h.percentile(0.5), h.percentile(0.99), h.max_s))


# ------------------------------------------------------------------ memory of every process

SERVER, BROKER, POSTGRES, SIMULATOR = "server", "mosquitto", "postgres", "simulator"
PUBLISHER, WS_CLIENTS, CHROME, DRIVER = "publisher", "ws clients", "chromium", "playwright driver"
ORCHESTRATOR, OTHER = "orchestrator", "other"
GROUPS = (SERVER, BROKER, POSTGRES, SIMULATOR, PUBLISHER, WS_CLIENTS, CHROME, DRIVER, ORCHESTRATOR)


def _parents() -> dict[int, tuple[str, int]]:
    """pid → (command name, parent pid) of every process."""
    return {pid: (comm, ppid) for pid, (comm, ppid, _) in process_table().items()}


def _rss_pss_kib(pid: int) -> tuple[int, int]:
    """Resident and proportional set size (shared pages split among their users)."""
    rss = pss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


@dataclass(frozen=True, slots=True)
class Memory:
    """One group's memory: processes, RSS sum and PSS sum (KiB)."""

    procs: int
    rss_kib: int
    pss_kib: int

    @property
    def shown_mib(self) -> float:
        """RSS for one process; for several, PSS (RSS would count shared memory N times)."""
        return (self.rss_kib if self.procs <= 1 else self.pss_kib) / 1024


@dataclass(frozen=True, slots=True)
class Roots:
    """The processes this benchmark started, by group; the rest is told apart by name."""

    own: dict[str, tuple[int, ...]]
    scratch: str

    def classify(self) -> dict[str, list[int]]:
        table = _parents()
        me = os.getpid()
        children: dict[int, list[int]] = {}
        for pid, (_, ppid) in table.items():
            children.setdefault(ppid, []).append(pid)
        groups: dict[str, list[int]] = {ORCHESTRATOR: [me]}
        assigned = {me}

        def subtree(pid: int) -> list[int]:
            out, todo = [], [pid]
            while todo:
                p = todo.pop()
                if p in table and p not in assigned:
                    assigned.add(p)
                    out.append(p)
                    todo.extend(children.get(p, ()))
            return out

        for name, pids in self.own.items():
            groups[name] = [p for pid in pids for p in subtree(pid)]
        # Broker and database: ours by their data directory (also when not our children).
        for pid, (comm, _) in table.items():
            if comm in (BROKER, POSTGRES) and pid not in assigned and self.scratch in cmdline(pid):
                groups.setdefault(comm, []).extend(subtree(pid))
        for pid in self._rest(me, children, assigned):  # Chromium, Playwright's driver
            comm = table[pid][0]
            name = (
                DRIVER
                if comm.startswith("node")
                else CHROME
                if comm.startswith(("chrom", "headless"))
                else f"{OTHER}: {comm}"
            )
            groups.setdefault(name, []).append(pid)
        return groups

    @staticmethod
    def _rest(me: int, children: dict[int, list[int]], assigned: set[int]) -> list[int]:
        """Our descendants that no group has taken yet."""
        out, todo = [], list(children.get(me, ()))
        while todo:
            p = todo.pop()
            todo.extend(children.get(p, ()))
            if p not in assigned:
                assigned.add(p)
                out.append(p)
        return out

    def sample(self) -> dict[str, Memory]:
        """Memory of every group now."""
        out = {}
        for name, pids in self.classify().items():
            sizes = [_rss_pss_kib(p) for p in pids]
            sizes = [s for s in sizes if s[0]]
            out[name] = Memory(len(sizes), sum(s[0] for s in sizes), sum(s[1] for s in sizes))
        return out


# ------------------------------------------------------------------ the console in Chromium


@dataclass
class Browser:
    """The console, signed in, on the overview: its state, JS heap and errors."""

    page: Any
    cdp: Any
    errors: list[str] = field(default_factory=list)

    async def heap_mib(self) -> float:
        metrics = (await self.cdp.send("Performance.getMetrics"))["metrics"]
        return (
            float(next((m["value"] for m in metrics if m["name"] == "JSHeapUsedSize"), 0)) / 2**20
        )

    async def connection(self) -> str:
        """The connection indicator: ``data-state`` and its text (``live: Live``)."""
        conn = self.page.locator(".conn")
        state = await conn.get_attribute("data-state")
        text = " ".join((await conn.inner_text()).split())
        return f"{state}: {text}"


@contextlib.asynccontextmanager
async def _browser(base_url: str, password: str) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright  # noqa: PLC0415

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = await chromium.new_context(
                viewport={"width": 1440, "height": 900}, locale="en-US"
            )
            context.set_default_timeout(60_000)
            page = await context.new_page()
            browser = Browser(page, await context.new_cdp_session(page))
            page.on("pageerror", lambda exc: browser.errors.append(f"pageerror: {exc}"))
            page.on(
                "console",
                lambda m: (
                    browser.errors.append(f"console.error: {m.text}") if m.type == "error" else None
                ),
            )
            await browser.cdp.send("Performance.enable")
            await page.goto(f"{base_url}/")
            await page.get_by_label(re.compile("User name")).fill(OPERATOR)
            await page.get_by_label(re.compile("^Password$")).fill(password)
            await page.get_by_role("button", name=re.compile("Sign in")).click()
            await page.locator(".conn[data-state='live']").wait_for()
            await page.locator(".map-panel[data-complete='1']").wait_for()
            yield browser
        finally:
            await chromium.close()


# ------------------------------------------------------------------ samples


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    """Seconds since the load started."""
    server: ServerSample
    memory: dict[str, Memory]
    heap_mib: float


@dataclass
class Run:
    """What the run saw, accumulated."""

    commit: Histogram = field(default_factory=Histogram)
    delivery: Histogram = field(default_factory=Histogram)
    samples: list[Sample] = field(default_factory=list)
    alert_events: dict[int, set[tuple[str, int]]] = field(default_factory=dict)
    """Console index → the alert events it received (alert id, version)."""
    frames: int = 0
    bytes: int = 0
    probe_items: int = 0
    consoles_closed: int = 0

    def take_consoles(self, stats: ConsoleStats, minute: Histogram) -> None:
        latencies = stats.all_latencies()
        self.delivery.add(latencies)
        minute.add(latencies)
        for index, alert_id, version in stats.alert_events:
            self.alert_events.setdefault(index, set()).add((alert_id, version))
        self.frames += stats.frames
        self.bytes += stats.bytes
        self.probe_items += stats.probe_items
        self.consoles_closed = max(self.consoles_closed, stats.closed_early)

    def everything_consoles(self, clients: int) -> list[set[tuple[str, int]]]:
        """The alert events of each console that follows everything (all alerts reach it)."""
        return [
            self.alert_events.get(i, set()) for i in range(clients) if kind_of(i) == "everything"
        ]


async def _db_alert_events(database_url: str, since: float) -> set[tuple[str, int]]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        rows = await conn.execute(
            "SELECT e.alert_id, e.version FROM alert_events e JOIN alerts a ON a.id = e.alert_id"
            " WHERE a.source = 'live' AND e.at >= to_timestamp(%s)",
            (since,),
        )
        return {(str(a), int(v)) for a, v in await rows.fetchall()}


async def _sample(
    t0: float,
    run: Run,
    minute: tuple[Histogram, Histogram],
    *,
    server: Connection,
    roots: Roots,
    browser: Browser,
    consoles: ConsoleGroup,
) -> Sample:
    lags: array.array[float] = await call(server, "lag_values")
    run.commit.add(lags)
    minute[0].add(lags)
    run.take_consoles(await consoles.take(), minute[1])
    sample = Sample(
        at=time.time() - t0,
        server=await call(server, "sample", False),
        memory=await asyncio.to_thread(roots.sample),
        heap_mib=await browser.heap_mib(),
    )
    run.samples.append(sample)
    return sample


def _minute_line(
    sample: Sample, before: Sample, minute: tuple[Histogram, Histogram], alerts: tuple[int, int]
) -> str:
    span = max(1e-9, sample.server.wall - before.server.wall)
    received = (sample.server.received - before.server.received) / span
    committed = (sample.server.committed - before.server.committed) / span
    mem = sample.memory

    def mib(name: str) -> str:
        return f"{mem[name].shown_mib:,.0f}" if name in mem else "-"

    return (
        f"+{sample.at / 60:4.1f} min  received {received:6,.0f}/s  committed {committed:6,.0f}/s"
        f"  commit p99 {_ms(minute[0].percentile(0.99))} ms"
        f"  delivery p99 {_ms(minute[1].percentile(0.99))} ms"
        f"  alert events db {alerts[0]} / clients (min) {alerts[1]}"
        f"  MiB: server {mib(SERVER)} pg {mib(POSTGRES)} broker {mib(BROKER)}"
        f" chromium {mib(CHROME)} heap {sample.heap_mib:.0f}"
    )


# ------------------------------------------------------------------ the simulator


@contextlib.asynccontextmanager
async def _simulator(
    mqtt_url: str, database_url: str, log: Path, scenarios: list[str], minutes: float
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``cityops simulate``: the default city, real time; killed if still running on exit."""
    env = {**os.environ, "CITYOPS_MQTT_URL": mqtt_url, "CITYOPS_DATABASE_URL": database_url}
    extra = [arg for name in scenarios for arg in ("--scenario", name)]
    if scenarios:  # a scenario would end the simulator after its own duration
        extra += ["--duration", f"{math.ceil(minutes) + 10}m"]
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cityops.cli", "simulate", "--mqtt-url", mqtt_url, *extra,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=err,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _stop_simulator(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    """SIGTERM (a clean stop: its final JSON line with the counts); {} if it had died."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(60):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {}
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    return dict(orjson.loads(lines[-1])) if lines else {}


# ------------------------------------------------------------------ the run


async def _add_operator(database_url: str) -> str:
    password = secrets.token_urlsafe(16)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO users (name, role, password_hash) VALUES (%s, 'operator', %s)"
            " ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash",
            (OPERATOR, hash_password(password)),
        )
    return password


async def _drain(server: Connection, quiet_s: float, timeout_s: float) -> tuple[bool, float]:
    """Until nothing was committed for ``quiet_s``; (drained, seconds it took)."""
    started = time.monotonic()
    last: ServerSample = await call(server, "sample", False)
    still_since = time.monotonic()
    while time.monotonic() - started < timeout_s:
        await asyncio.sleep(0.5)
        now: ServerSample = await call(server, "sample", False)
        if now.committed != last.committed:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet_s:
            return True, still_since - started
    return False, time.monotonic() - started


@dataclass(frozen=True, slots=True)
class Stored:
    bench_rows: int
    bench_distinct: int
    sim_rows: int
    sim_distinct: int
    sim_messages: int
    """Distinct (device, ts) of the simulator's devices: one per reading message."""
    dead_letters: int
    alerts_raised: int


async def _stored(database_url: str, since: float) -> Stored:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:

        async def one(query: str, *params: object) -> tuple[int, ...]:
            row = await (await conn.execute(query.encode(), params)).fetchone()
            return tuple(int(x or 0) for x in row or ())

        bench = await one(
            "SELECT count(*), count(DISTINCT (r.series_id, r.ts)) FROM readings r"
            " JOIN series s ON s.id = r.series_id WHERE s.device_id LIKE 'bench-%%'"
        )
        sim = await one(
            "SELECT count(*), count(DISTINCT (r.series_id, r.ts)),"
            " count(DISTINCT (s.device_id, r.ts))"
            " FROM readings r JOIN series s ON s.id = r.series_id"
            " WHERE s.device_id NOT LIKE 'bench-%%'"
        )
        dead = await one("SELECT count(*) FROM dead_letters")
        raised = await one(
            "SELECT count(*) FROM alerts WHERE source = 'live' AND raised_at >= to_timestamp(%s)",
            since,
        )
    return Stored(bench[0], bench[1], sim[0], sim[1], sim[2], dead[0], raised[0])


async def _run(args: argparse.Namespace, mqtt_url: str, database_url: str, scratch: Path) -> int:
    run_s = args.minutes * 60.0
    sim_rate = 0 if args.no_simulator else SIMULATOR_MSG_S
    load = Load(max(1, args.rate - sim_rate), args.devices, args.districts, 1, 1)
    spec = ServerSpec(
        mqtt_url, database_url, scratch, f"bench-soak-{uuid.uuid4().hex[:6]}", frozenset(),
        console_dir=DIST,
    )  # fmt: skip
    crashed: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        children = stack.enter_context(Children())
        server, server_pid = children.spawn(server_main, spec)
        publisher, publisher_pid = children.spawn(
            publisher_main, mqtt_url, load, 0, args.keepalive, "raw"
        )
        _, port, token = await recv(server)
        await recv(publisher)
        base_url = f"http://localhost:{port}"  # localhost: the session cookie is Secure
        _log(f"stack up on {base_url}")
        simulator = None
        if not args.no_simulator:
            simulator = await stack.enter_async_context(
                _simulator(
                    mqtt_url, database_url, scratch / "simulate.log", args.scenario, args.minutes
                )
            )
        primed = int((await call(publisher, "prime"))[1])
        password = await _add_operator(database_url)
        console_spec = ConsoleSpec(
            url=f"ws://127.0.0.1:{port}/api/v1/live",
            headers=(("Authorization", f"Bearer {token}"),),
            clients=args.clients,
            districts=tuple(load.district(i) for i in range(load.districts)),
            devices=tuple(load.device(i) for i in range(load.devices)),
            probe_every=args.probe_every,
        )
        with ConsoleGroup(console_spec, procs=args.client_procs) as consoles:
            connected = await consoles.wait_connected()
            _log(f"{connected[0]} websocket clients connected in {connected[1]:.1f} s")
            clients_from = time.time()
            consoles.count(clients_from, float("inf"))
            async with _browser(base_url, password) as browser:
                _log(f"console signed in: {await browser.connection()}")
                trickled = int((await call(publisher, "quiet"))[1])
                roots = Roots(
                    {
                        SERVER: (server_pid,),
                        PUBLISHER: (publisher_pid,),
                        WS_CLIENTS: consoles.pids,
                        **({SIMULATOR: (simulator.pid,)} if simulator else {}),
                    },
                    str(scratch),
                )
                watch: dict[str, Any] = {
                    "server": server,
                    "roots": roots,
                    "browser": browser,
                    "consoles": consoles,
                }
                t0 = time.time() + 0.5
                await call(server, "window", t0, float("inf"))
                await call(server, "lag_values")  # nothing before t0
                publisher.send(("go", t0, run_s, (t0, t0 + run_s)))
                published_task = asyncio.ensure_future(recv(publisher))
                _log(
                    f"load: {load.rate:,} msg/s paced + the simulator, {args.minutes:g} min"
                    f" (load average {os.getloadavg()[0]:.2f})"
                )
                minute = (Histogram(), Histogram())
                await asyncio.sleep(max(0.0, t0 - time.time()))
                start_sample = await _sample(t0, Run(), minute, **watch)
                run = Run(samples=[start_sample])
                minute = (Histogram(), Histogram())
                last_minute = start_sample
                tick = 0
                while not published_task.done():
                    tick += 1
                    due = t0 + tick * args.sample_s
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            asyncio.shield(published_task), max(0.0, due - time.time())
                        )
                    if published_task.done():
                        break
                    sample = await _sample(t0, run, minute, **watch)
                    if simulator is not None and simulator.returncode is not None:
                        crashed.append(f"the simulator exited with {simulator.returncode}")
                    if sample.at - last_minute.at >= 59.0:
                        db_events = await _db_alert_events(database_url, clients_from)
                        seen = run.everything_consoles(args.clients)
                        low = min((len(s & db_events) for s in seen), default=0)
                        print(_minute_line(sample, last_minute, minute, (len(db_events), low)),
                              flush=True)  # fmt: skip
                        last_minute, minute = sample, (Histogram(), Histogram())
                end_sample = await _sample(t0, run, minute, **watch)
                stats: PublishStats = (await published_task)[1]
                sim_counts = await _stop_simulator(simulator) if simulator else {}
                drained, drain_s = await _drain(server, args.quiet_s, args.drain_timeout)
                await asyncio.sleep(1.0)  # alert events and frames on their way
                run.commit.add(await call(server, "lag_values"))
                run.take_consoles(await consoles.take(), Histogram())
                console_state = await browser.connection()
                heap_end = await browser.heap_mib()
                page_errors = list(browser.errors)
            final = await consoles.stop()
            run.consoles_closed = max(run.consoles_closed, final.closed_early)
        server_end: ServerSample = await call(server, "sample", False)
    stored = await _stored(database_url, clients_from)
    db_events = await _db_alert_events(database_url, clients_from)
    published = primed + trickled + stats.published
    return _report(
        args, load, run, Outcome(
            published=published, run_published=stats.published, behind_s=stats.behind_s,
            stored=stored, sim=sim_counts, drained=drained, drain_s=drain_s,
            db_events=db_events, console_state=console_state, heap=(start_sample.heap_mib, heap_end),  # noqa: E501
            page_errors=page_errors, crashed=crashed, start=start_sample, end=end_sample,
            server_end=server_end, connected=connected,
        ),
    )  # fmt: skip


# ------------------------------------------------------------------ report


@dataclass(frozen=True, slots=True)
class Outcome:
    published: int
    """Every message of the paced publisher (priming, keep-alive, the run), all acknowledged."""
    run_published: int
    behind_s: float
    stored: Stored
    sim: dict[str, Any]
    drained: bool
    drain_s: float
    db_events: set[tuple[str, int]]
    console_state: str
    heap: tuple[float, float]
    page_errors: list[str]
    crashed: list[str]
    start: Sample
    end: Sample
    server_end: ServerSample
    connected: tuple[int, float]


def _memory_rows(samples: Sequence[Sample]) -> list[str]:
    start, end = samples[0], samples[-1]
    after_1min = next((s for s in samples if s.at >= 60.0), end)
    others = sorted({n for s in samples for n in s.memory if n not in GROUPS})
    names = [n for n in (*GROUPS, *others) if any(n in s.memory for s in samples)]
    rows = [
        f"  {'process (MiB; RSS, PSS for groups)':<36} {'procs':>5} {'start':>8} {'+1 min':>8}"
        f" {'end':>8} {'peak':>8} {'growth after 1 min':>20}"
    ]
    for name in names:

        def mib(sample: Sample, key: str = name) -> float:
            m = sample.memory.get(key)
            return m.shown_mib if m else 0.0

        peak = max(mib(s) for s in samples)
        growth = mib(end) - mib(after_1min)
        procs = end.memory[name].procs if name in end.memory else 0
        rows.append(
            f"  {name:<36} {procs:>5} {mib(start):>8,.0f} {mib(after_1min):>8,.0f}"
            f" {mib(end):>8,.0f} {peak:>8,.0f} {growth:>+19,.0f}"
        )
    return rows


def _report(args: argparse.Namespace, load: Load, run: Run, out: Outcome) -> int:
    duration = out.end.at - out.start.at
    st = out.stored
    lost = out.published - st.bench_rows
    duplicates = (st.bench_rows - st.bench_distinct) + (st.sim_rows - st.sim_distinct)
    sim = out.sim
    sim_msgs = int(sim.get("readings", 0))
    sim_qos0 = int(sim.get("published", {}).get("0", 0))
    sim_unacked = int(sim.get("published", {}).get("1", 0)) - int(sim.get("acked", {}).get("1", 0))
    sim_missing = sim_msgs - st.sim_messages
    seen = run.everything_consoles(args.clients)
    delivered = [len(s & out.db_events) for s in seen]
    committed_s = (out.end.server.committed - out.start.server.committed) / max(1e-9, duration)
    received_s = (out.end.server.received - out.start.server.received) / max(1e-9, duration)
    rows = [
        ("duration of the load", f"{duration / 60:.1f} min ({args.rate:,} msg/s asked)"),
        ("load average at the end", f"{os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})"),
        ("paced publisher msg/s (run)", f"{out.run_published / max(1e-9, duration):,.0f}"
         f" (worst behind schedule {out.behind_s:.2f} s)"),
        ("simulator reading msg/s", f"{sim_msgs / max(1e-9, float(sim.get('elapsed_s', 0))):,.1f}"
         f" ({sim.get('devices', '-')} devices, {sim.get('statuses', 0):,} presence msgs)"),
        ("ingest received msg/s", f"{received_s:,.0f}"),
        ("ingest committed readings/s", f"{committed_s:,.0f}"),
        ("drained (last commit after the stop)",
         f"{out.drain_s:.1f} s" if out.drained else "NO (timeout)"),
        ("paced publisher: acked / stored", f"{out.published:,} / {st.bench_rows:,}"),
        ("READINGS LOST (paced, exact)", f"{lost:,}"),
        ("duplicates (rows - distinct)", f"{duplicates:,}"),
        ("simulator: reading msgs / stored msgs", f"{sim_msgs:,} / {st.sim_messages:,}"
         f" ({st.sim_rows:,} rows; QoS 0 msgs {sim_qos0:,}, unacked at stop {sim_unacked:,})"),
        ("simulator messages missing", f"{sim_missing:,}"),
        ("dead letters", f"{st.dead_letters:,}"),
        ("alerts raised (db, live)", f"{st.alerts_raised:,}"),
        ("alert events in db / to clients", f"{len(out.db_events):,} / "
         f"min {min(delivered, default=0):,}, max {max(delivered, default=0):,}"
         f" of {len(seen)} consoles following everything"),
        ("publish → commit p50 / p99 / max ms", _figures(run.commit)),
        ("publish → console p50 / p99 / max ms", _figures(run.delivery)
         + f" ({run.delivery.count:,} probe items)"),
        ("websocket clients", f"{out.connected[0]} (connected in {out.connected[1]:.1f} s),"
         f" dropped {run.consoles_closed}; {run.frames / max(1e-9, duration):,.0f} frames/s,"
         f" {run.bytes / max(1e-9, duration) / 1e6:,.1f} MB/s"),
        ("console at the end", out.console_state),
        ("console JS heap start / end MiB", f"{out.heap[0]:.1f} / {out.heap[1]:.1f}"),
        ("page errors", str(len(out.page_errors))),
        ("server peak RSS (VmHWM) MiB", f"{out.server_end.peak_kib / 1024:,.0f}"),
    ]  # fmt: skip
    print(
        f"\n== soak: {args.minutes:g} min, {args.rate:,} msg/s in all ({load.rate:,} paced,"
        f" {load.devices:,} devices, + the simulated city), {args.clients} websocket clients,"
        " the console in headless Chromium"
    )
    for label, value in rows:
        print(f"  {label:<40} {value}")
    print("\n".join(_memory_rows(run.samples)))
    for error in out.page_errors[:10]:
        print(f"  page error: {error[:300]}")
    failures = list(out.crashed)
    if lost:
        failures.append(f"{lost:,} readings of the paced publisher lost")
    if duplicates:
        failures.append(f"{duplicates:,} readings stored twice")
    if sim_missing > sim_qos0 + max(0, sim_unacked):
        failures.append(f"{sim_missing:,} simulator messages missing (more than QoS 0 + unacked)")
    if not out.drained:
        failures.append("the stack did not drain")
    if not sim and not args.no_simulator:
        failures.append("the simulator gave no counts (it crashed or hung)")
    if not out.console_state.startswith("live"):
        failures.append(f"the console is not live at the end ({out.console_state})")
    print(
        "lost: the paced publisher's messages (every one acknowledged by the broker, QoS 1) minus"
        " its readings in the database after the drain; the simulator's are compared by"
        " distinct (device, ts), its QoS 0 messages may be lost by design."
        " Latencies: the reading's ts (send time) to the commit / to a probe console."
    )
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("OK: nothing lost, nothing stored twice, nothing crashed")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the load")
    parser.add_argument("--mqtt-url")
    parser.add_argument("--database-url", help="a fresh database (default: embedded server)")
    parser.add_argument("--rate", type=int, default=5_000, help="msg/s in all, simulator included")
    parser.add_argument("--devices", type=int, default=2_000, help="devices of the paced publisher")
    parser.add_argument("--districts", type=int, default=10)
    parser.add_argument("--clients", type=int, default=50, help="websocket clients")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--probe-every", type=int, default=10, help="1 in N groups of 4 measure")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--keepalive", type=float, default=2.0, help="trickle before the run")
    parser.add_argument("--quiet-s", type=float, default=5.0, help="drained: no commit this long")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--no-simulator", action="store_true", help="the paced publisher alone")
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        help="a scenario for the simulator (repeatable), so that alerts flow: e.g. fire",
    )
    args = parser.parse_args()
    if not (DIST / "index.html").exists():
        parser.error("console/dist is not built: run `npm ci && npm run build` in console/")
    if not CHROMIUM.exists():
        parser.error(f"{CHROMIUM} is missing: apt-get install chromium")
    with bench_services(args.mqtt_url, args.database_url) as (mqtt_url, database_url, scratch):
        code = asyncio.run(_run(args, mqtt_url, database_url, scratch))
    sys.exit(code)


if __name__ == "__main__":
    main()
