"""``cityops simulate``: pace a simulation onto the broker, in one or several processes.

Three pacings:

* real time or ``--speed N``: a message simulated at ``t`` is published at
  ``wall_start + (t - sim_start) / N``;
* as fast as possible: no waiting, simulated time runs as fast as the
  broker acknowledges;
* load generator, ``--rate R``: ``R`` messages per second in total, whatever
  the simulated time; ``--duration`` is then wall-clock seconds and the run
  publishes ``R * duration`` messages.

With ``--workers W`` the city is split into ``W`` partitions (device ``i``
goes to ``i % W``), each simulated and published by its own process and
connection; since noise is keyed per device, the bytes do not depend on
``W``. Workers start together once all have built their part of the city.

Presence: a city of at most ``device_connections_limit`` devices gives every
device its own MQTT connection with its offline status as Last Will
(:mod:`simulators.presence`), so a killed simulator leaves its devices
offline. Larger cities publish presence over the shared connections, without
a will: if the simulator dies, their devices stay "online".
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import queue
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from simulators.engine import Simulation
from simulators.errors import SimulatorError
from simulators.layout import scale_city
from simulators.model import CityModel, load_city
from simulators.mqtt import Endpoint, MqttPublisher, PublishCounts, publish_properties
from simulators.presence import (
    DEFAULT_DEVICE_CONNECTIONS_LIMIT,
    DeviceConnections,
    PresenceOptions,
    ensure_fd_limit,
)
from simulators.scenario import ScenarioPlan, compile_plan, load_scenario

__all__ = [
    "SimulateOptions",
    "SimulateResult",
    "build_simulation",
    "parse_start",
    "resolve_start",
    "run_simulate",
]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, float], None]
"""Called with (messages published so far, simulated seconds elapsed)."""


@dataclass(frozen=True, slots=True)
class SimulateOptions:
    """Everything a simulate run needs; picklable, so workers get a copy.

    Attributes:
        city: Shipped city name or a YAML path.
        devices: Scale the city to this many devices (``None``: as in the file).
        scenarios: Scenario names or paths.
        seed: Seed of every random stream.
        start: Simulated start, epoch seconds.
        duration_s: Simulated seconds to run (wall seconds with ``rate``);
            ``None`` runs until interrupted.
        speed: Simulated seconds per wall second (paced modes).
        as_fast_as_possible: Publish without pacing.
        rate: Load generator: total messages per second.
        workers: Publisher processes.
        qos: Override the QoS of readings.
        mqtt_url: Broker URL (for messages and client ids only; ``endpoint`` connects).
        client_prefix: Prefix of the MQTT client ids.
        max_unacked: Outstanding QoS 1 bound per connection.
        device_connections_limit: Cities of at most this many devices get one
            MQTT connection per device, with a Last Will (0: never).
        device_keepalive_s: MQTT keepalive of the device connections.
    """

    city: str
    devices: int | None
    scenarios: tuple[str, ...]
    seed: int
    start: float
    duration_s: float | None
    speed: float = 1.0
    as_fast_as_possible: bool = False
    rate: float | None = None
    workers: int = 1
    qos: int | None = None
    mqtt_url: str = ""
    client_prefix: str = "cityops-sim"
    max_unacked: int = 10_000
    device_connections_limit: int = DEFAULT_DEVICE_CONNECTIONS_LIMIT
    device_keepalive_s: int = 30

    def device_connections_for(self, city_devices: int) -> bool:
        """Whether a city of ``city_devices`` devices gets a connection per device."""
        return 0 < city_devices <= self.device_connections_limit


@dataclass(slots=True)
class SimulateResult:
    """Totals of a run, printed as the final JSON line."""

    counts: PublishCounts = field(default_factory=PublishCounts)
    statuses: int = 0
    wills: int = 0
    device_connections: int = 0
    sim_seconds: float = 0.0
    elapsed_s: float = 0.0
    rss_peak_mb: list[float] = field(default_factory=list)
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every QoS 1 publish acknowledged, and no worker failed."""
        c = self.counts
        return not self.errors and c.failed == 0 and c.published[1] == c.acked[1]

    def as_json(self, options: SimulateOptions, device_count: int) -> dict[str, Any]:
        """The final JSON line's content."""
        total = sum(self.counts.published.values())
        return {
            "command": "simulate",
            "ok": self.ok,
            "devices": device_count,
            "workers": options.workers,
            "seed": options.seed,
            **self.counts.as_json(),
            "statuses": self.statuses,
            "wills": self.wills,
            "readings": total - self.statuses,
            "presence": "device-connections" if self.device_connections else "shared",
            "device_connections": self.device_connections,
            "elapsed_s": round(self.elapsed_s, 3),
            "rate_msg_s": round(total / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0,
            "sim_seconds": round(self.sim_seconds, 3),
            "rss_peak_mb": round(max(self.rss_peak_mb, default=0.0), 1),
            "rss_peak_mb_total": round(sum(self.rss_peak_mb), 1),
            "interrupted": self.interrupted,
            "errors": self.errors,
        }


def load_model(options: SimulateOptions) -> CityModel:
    """The city of a run, scaled as asked."""
    model = load_city(options.city)
    return model if options.devices is None else scale_city(model, options.devices)


def build_simulation(
    options: SimulateOptions, *, part: int = 0, parts: int = 1, model: CityModel | None = None
) -> Simulation:
    """The engine for one partition of a run (pure: no I/O besides reading files)."""
    model = model or load_model(options)
    plan = ScenarioPlan()
    if options.scenarios:
        scenarios = [load_scenario(s) for s in options.scenarios]
        plan = compile_plan(scenarios, model, start=options.start, seed=options.seed)
        for entry in plan.timeline:
            log.info("scenario +%ds %s: %s", entry.t - options.start, entry.event, entry.detail)
    return Simulation(
        model,
        seed=options.seed,
        start=options.start,
        plan=plan,
        part=part,
        parts=parts,
        qos=options.qos,
    )


def _peak_rss_mb() -> float:
    """Peak resident set of this process in MiB.

    ``/proc/self/status`` VmHWM belongs to the current address space;
    ``getrusage``'s ``ru_maxrss`` survives ``execve``, so a worker started
    from a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _pace(publisher: MqttPublisher, due: float, stop: threading.Event) -> bool:
    """Wait until wall time ``due``, in slices so a stop is seen at once; ``False`` if stopped."""
    while (delay := due - time.time()) > 0.002:
        if stop.is_set():
            return False
        publisher.wait(min(delay, 0.2))
    return not stop.is_set()


def _device_connections(
    options: SimulateOptions, sim: Simulation, endpoint: Endpoint
) -> DeviceConnections | None:
    """The per-device connections of this partition, if the city is small enough."""
    if not options.device_connections_for(len(sim.model.devices)):
        return None
    if not ensure_fd_limit(len(sim.devices)):
        log.warning(
            "%d device connections need more open files than the hard limit allows "
            "(ulimit -Hn); presence goes over the shared connection, without a Last Will",
            len(sim.devices),
        )
        return None
    return DeviceConnections(
        endpoint, options=PresenceOptions(keepalive_s=options.device_keepalive_s)
    )


def _publish_partition(
    options: SimulateOptions,
    sim: Simulation,
    endpoint: Endpoint,
    *,
    part: int,
    parts: int,
    wall_start: float,
    stop: threading.Event,
    progress: ProgressFn | None,
) -> SimulateResult:
    """Publish one partition with the requested pacing; the hot loop.

    Readings always go over the shared, fast publisher connection; presence
    goes over each device's own connection when there are any.
    """
    result = SimulateResult()
    props_cache: dict[str | None, Any] = {}
    until = math.inf
    limit = math.inf
    rate = None
    if options.rate:
        rate = options.rate / parts
        total = round(options.rate * (options.duration_s or 60.0))
        limit = total // parts + (1 if part < total % parts else 0)
    elif options.duration_s is not None:
        until = options.start + options.duration_s
    speed = None if options.as_fast_as_possible or rate else options.speed
    sent = 0
    next_progress = time.monotonic() + 0.5
    statuses = 0
    client_id = f"{options.client_prefix}-{part}of{parts}-{int(wall_start * 1000) % 10**9}"
    with contextlib.ExitStack() as stack:
        publisher = stack.enter_context(
            MqttPublisher(
                endpoint,
                client_id=client_id,
                max_unacked=options.max_unacked,
            )
        )
        devices = _device_connections(options, sim, endpoint)
        if devices is not None:
            stack.enter_context(devices)  # on an error: closed, the broker publishes the wills
            result.device_connections = len(sim.devices)
        publish = publisher.publish
        for message in sim.run(until):
            if sent >= limit or stop.is_set():
                result.interrupted = stop.is_set()
                break
            if speed is not None:
                if not _pace(publisher, wall_start + (message.t - options.start) / speed, stop):
                    result.interrupted = True
                    break
            elif rate is not None and not _pace(publisher, wall_start + sent / rate, stop):
                result.interrupted = True
                break
            if message.kind == "status":
                if devices is not None:
                    if message.presence == "online":
                        devices.online(message.device, message.topic, message.session)
                        sent += 1
                    else:  # outage, flapping: the broker publishes the will
                        devices.offline(message.device, message.topic, message.session, will=True)
                    continue
                statuses += 1
            props = props_cache.get(message.content_type)
            if props is None:
                props = props_cache[message.content_type] = publish_properties(message.content_type)
            publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                properties=props,
            )
            sent += 1
            if progress is not None and sent & 255 == 0 and time.monotonic() >= next_progress:
                next_progress = time.monotonic() + 0.5
                progress(sent, sim.now - options.start)
        for message in sim.finish():
            if message.kind == "status" and devices is not None:
                # A clean stop: the offline status published, then a normal DISCONNECT.
                devices.offline(message.device, message.topic, message.session, will=False)
                continue
            props = props_cache.get(message.content_type) or publish_properties(
                message.content_type
            )
            publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                properties=props,
            )
            statuses += message.kind == "status"
        counts = PublishCounts()
        if devices is not None:
            if not devices.close():
                result.errors.append(f"worker {part}: device connections did not all close cleanly")
            counts.add(devices.counts)
            statuses += devices.statuses
            result.wills = devices.wills
        if not publisher.drain():
            result.errors.append(
                f"worker {part}: {publisher.counts.unacked} QoS 1 messages unacknowledged "
                "at the deadline"
            )
        counts.add(publisher.counts)
        result.counts = counts
        result.statuses = statuses
    if progress is not None:
        progress(sent, sim.now - options.start)
    result.sim_seconds = sim.now - options.start
    result.rss_peak_mb = [_peak_rss_mb()]
    return result


def _worker_main(  # noqa: PLR0917 - multiprocessing passes arguments positionally
    options: SimulateOptions,
    endpoint: Endpoint,
    part: int,
    parts: int,
    results: mp.Queue[tuple[str, int, Any]],
    go: Any,
    wall_start: Any,
    shared_sent: Any,
    shared_sim: Any,
) -> None:
    """Entry point of a worker process."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        sim = build_simulation(options, part=part, parts=parts)
        results.put(("ready", part, len(sim.devices)))
        if not go.wait(timeout=300.0):
            results.put(("error", part, "never told to start"))
            return

        def progress(sent: int, sim_s: float) -> None:
            shared_sent[part] = sent
            shared_sim[part] = sim_s

        result = _publish_partition(
            options,
            sim,
            endpoint,
            part=part,
            parts=parts,
            wall_start=wall_start.value,
            stop=stop,
            progress=progress,
        )
        results.put(("done", part, result))
    except SimulatorError as exc:
        results.put(("error", part, str(exc)))
    except Exception as exc:  # report, never hang the parent
        logging.getLogger(__name__).exception("worker %d failed", part)
        results.put(("error", part, f"{type(exc).__name__}: {exc}"))


def run_simulate(
    options: SimulateOptions,
    endpoint: Endpoint,
    *,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
) -> tuple[SimulateResult, int]:
    """Run a simulation against the broker; returns the totals and the device count.

    With one worker everything runs in this process; otherwise in spawned
    worker processes that are joined before returning.

    Raises:
        SimulatorError: the city, a scenario or the broker failed (one worker).
    """
    stop = stop or threading.Event()
    if options.workers <= 1:
        sim = build_simulation(options)
        t0 = time.time()
        result = _publish_partition(
            options, sim, endpoint, part=0, parts=1, wall_start=t0, stop=stop, progress=progress
        )
        result.elapsed_s = time.time() - t0
        return result, len(sim.devices)
    return _run_workers(options, endpoint, progress=progress, stop=stop)


def _run_workers(
    options: SimulateOptions,
    endpoint: Endpoint,
    *,
    progress: ProgressFn | None,
    stop: threading.Event,
) -> tuple[SimulateResult, int]:
    ctx = mp.get_context("spawn")
    parts = options.workers
    results: mp.Queue[tuple[str, int, Any]] = ctx.Queue()
    go = ctx.Event()
    wall_start = ctx.Value("d", 0.0)
    shared_sent = ctx.Array("q", parts)
    shared_sim = ctx.Array("d", parts)
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(options, endpoint, part, parts, results, go, wall_start, shared_sent, shared_sim),
            name=f"simulate-worker-{part}",
            daemon=True,
        )
        for part in range(parts)
    ]
    for proc in procs:
        proc.start()
    total = SimulateResult()
    devices = 0
    pending = set(range(parts))
    ready: set[int] = set()
    t0 = 0.0
    try:
        while pending:
            try:
                kind, part, payload = results.get(timeout=0.5)
            except queue.Empty:
                if stop.is_set():
                    go.set()  # workers that are still building see the stop at once
                    for proc in procs:
                        if proc.is_alive() and proc.pid is not None:
                            os.kill(proc.pid, signal.SIGINT)  # workers finish cleanly
                dead = [p for p in range(parts) if p in pending and not procs[p].is_alive()]
                if dead and results.empty():
                    for p in dead:
                        total.errors.append(f"worker {p} exited with code {procs[p].exitcode}")
                        pending.discard(p)
                if progress is not None and go.is_set():
                    progress(sum(shared_sent[:]), min(shared_sim[:]))
                continue
            if kind == "ready":
                ready.add(part)
                devices += int(payload)
                if len(ready) == parts:
                    t0 = time.time()
                    wall_start.value = t0 + 0.05
                    go.set()
            elif kind == "done":
                pending.discard(part)
                total.counts.add(payload.counts)
                total.statuses += payload.statuses
                total.wills += payload.wills
                total.device_connections += payload.device_connections
                total.sim_seconds = max(total.sim_seconds, payload.sim_seconds)
                total.rss_peak_mb.extend(payload.rss_peak_mb)
                total.interrupted |= payload.interrupted
                total.errors.extend(payload.errors)
            else:
                pending.discard(part)
                total.errors.append(f"worker {part}: {payload}")
                go.set()  # let the others run, or fail, rather than wait for ever
    finally:
        for proc in procs:
            proc.join(timeout=30.0)
            if proc.is_alive():
                proc.kill()
    total.elapsed_s = time.time() - t0 if t0 else 0.0
    total.rss_peak_mb.append(_peak_rss_mb())
    if progress is not None:
        progress(sum(shared_sent[:]), total.sim_seconds)
    return total, devices


def parse_start(text: str, *, utc_offset_h: float) -> float:
    """Epoch seconds from ``--start``: a number, or ISO 8601 (naive = the city's local time).

    Raises:
        SimulatorError: the text is neither.
    """
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        msg = f"--start {text!r}: expected epoch seconds or ISO 8601 like 2025-06-02T07:40:00+09:00"
        raise SimulatorError(msg) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone(timedelta(hours=utc_offset_h)))
    return moment.timestamp()


def resolve_start(
    start: str | None, *, clock: str | None, utc_offset_h: float, now: float
) -> float:
    """The simulated start of a run.

    ``--start`` wins; else a scenario's ``clock`` (``HH:MM`` local) on its
    most recent occurrence, so no reading is stamped in the future; else
    ``now`` rounded down to the minute.
    """
    if start is not None:
        return parse_start(start, utc_offset_h=utc_offset_h)
    if clock is not None:
        hours, minutes = (int(x) for x in clock.split(":"))
        offset = utc_offset_h * 3600.0
        local_midnight = math.floor((now + offset) / 86_400.0) * 86_400.0 - offset
        candidate = local_midnight + hours * 3600.0 + minutes * 60.0
        return candidate if candidate <= now else candidate - 86_400.0
    return math.floor(now / 60.0) * 60.0
