"""Subcommands ``simulate``, ``record`` and ``replay`` of the ``cityops`` command line.

``cityops.cli`` calls :func:`register`; each handler takes the parsed
namespace and returns the exit code. Every command ends by printing one JSON
line on stdout with its counts, so scripts and benchmarks can read it.

Exit codes: 0 success; 1 the run failed or (simulate) some QoS 1 publish was
not acknowledged; 2 bad usage (no broker URL, bad option, unknown city or
scenario).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from simulators.errors import CityModelError, ScenarioError, SimulatorError
from simulators.model import available_cities, load_city
from simulators.mqtt import Endpoint, MqttPublisher
from simulators.presence import DEFAULT_DEVICE_CONNECTIONS_LIMIT
from simulators.progress import ProgressReporter
from simulators.recorder import Recorder
from simulators.recording import RecordingReader, RecordingWriter
from simulators.replay import (
    PauseControl,
    Replayer,
    ReplayOptions,
    new_run_id,
    parse_bound,
    validate_run_id,
)
from simulators.runner import SimulateOptions, resolve_start, run_simulate
from simulators.scenario import available_scenarios, load_scenario, parse_duration

__all__ = ["main", "register"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ScenarioError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_mqtt(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mqtt-url",
        default=None,
        help="broker URL mqtt://user:pass@host:port (default: $CITYOPS_MQTT_URL)",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``simulate``, ``record`` and ``replay`` to the ``cityops`` parser."""
    sim = subparsers.add_parser(
        "simulate",
        help="publish a simulated city",
        description="Publish a simulated city: real time, --speed N, as fast as possible, "
        "or a steady --rate for benchmarks. Prints a JSON line with the counts per QoS.",
    )
    _add_mqtt(sim)
    sim.add_argument(
        "--city",
        default="minamikawa",
        help=f"city name or YAML path ({', '.join(available_cities())})",
    )
    sim.add_argument("--devices", type=int, default=None, help="scale the city to N devices")
    sim.add_argument(
        "--scenario",
        action="append",
        default=[],
        help=f"scenario name or YAML path, repeatable ({', '.join(available_scenarios())})",
    )
    sim.add_argument(
        "--seed", type=int, default=1, help="seed: the same seed gives the same bytes (default 1)"
    )
    sim.add_argument(
        "--start",
        default=None,
        help="simulated start: epoch seconds or ISO 8601 (default: now, to the minute)",
    )
    sim.add_argument(
        "--duration",
        type=_duration,
        default=None,
        help="simulated time to run, e.g. 30m (with --rate: wall time)",
    )
    sim.add_argument(
        "--speed", type=float, default=1.0, help="simulated seconds per second (default 1)"
    )
    sim.add_argument("--as-fast-as-possible", action="store_true", help="publish without pacing")
    sim.add_argument(
        "--rate", type=float, default=None, help="load generator: messages per second in total"
    )
    sim.add_argument("--workers", type=int, default=1, help="publisher processes (default 1)")
    sim.add_argument(
        "--qos", type=int, choices=(0, 1), default=None, help="override the QoS of readings"
    )
    sim.add_argument(
        "--max-unacked", type=int, default=10_000, help="outstanding QoS 1 messages per connection"
    )
    sim.add_argument(
        "--device-connections-limit",
        type=int,
        default=DEFAULT_DEVICE_CONNECTIONS_LIMIT,
        help="cities of at most N devices get one MQTT connection per device, with its "
        "offline status as Last Will; larger ones publish presence over the shared "
        f"connections, without a will (default {DEFAULT_DEVICE_CONNECTIONS_LIMIT:,}; 0: never)",
    )
    sim.add_argument(
        "--device-keepalive",
        type=int,
        default=30,
        help="MQTT keepalive of the device connections, seconds: the broker publishes the "
        "wills of a hung simulator after 1.5 times this (default 30)",
    )
    sim.set_defaults(handler=simulate_command)

    rec = subparsers.add_parser(
        "record",
        help="capture MQTT traffic to a file",
        description="Capture everything under city/ (or --topic filters) to a compressed, "
        "append-only, crash-safe recording.",
    )
    _add_mqtt(rec)
    rec.add_argument(
        "--out", required=True, type=Path, help="recording file (appended to if it exists)"
    )
    rec.add_argument(
        "--topic", action="append", default=None, help="topic filter, repeatable (default city/#)"
    )
    rec.add_argument("--duration", type=_duration, default=None, help="stop after this long")
    rec.add_argument("--max-messages", type=int, default=None, help="stop after this many messages")
    rec.set_defaults(handler=record_command)

    rep = subparsers.add_parser(
        "replay",
        help="publish a recording at any speed",
        description="Republish a recording with its pacing scaled by --speed, timestamps shifted "
        "to now, into the sandbox cityops/replay/{run_id}/… (or live as a drill). "
        "Pause/resume: SIGUSR1/SIGUSR2, or space on a terminal; q stops.",
    )
    _add_mqtt(rep)
    rep.add_argument("file", type=Path, help="recording file")
    rep.add_argument(
        "--speed", type=float, default=1.0, help="pacing factor; 0 = as fast as possible"
    )
    time_group = rep.add_mutually_exclusive_group()
    time_group.add_argument("--keep-time", action="store_true", help="keep the recorded timestamps")
    time_group.add_argument(
        "--scale-time", action="store_true", help="shift to now and divide intervals by --speed"
    )
    rep.add_argument(
        "--from",
        dest="window_from",
        default=None,
        help="window start: offset (90s, 15m) or ISO time",
    )
    rep.add_argument("--to", dest="window_to", default=None, help="window end: offset or ISO time")
    rep.add_argument(
        "--live",
        action="store_true",
        help="replay onto the live topics, marked as a drill (engineers only)",
    )
    rep.add_argument("--run-id", default=None, help="run id [a-z0-9-] (default: generated)")
    rep.add_argument("--retain", action="store_true", help="keep the recorded retain flags")
    rep.set_defaults(handler=replay_command)


def _endpoint(args: argparse.Namespace) -> Endpoint | None:
    """The broker from --mqtt-url or the settings; ``None`` (after a message) if neither."""
    from cityops.errors import ConfigError  # noqa: PLC0415 - the edge only
    from cityops.runtime import broker_url  # noqa: PLC0415
    from cityops.settings import Settings  # noqa: PLC0415

    try:
        settings = Settings.from_env()
        return settings.mqtt_endpoint(args.mqtt_url or broker_url(settings))
    except ConfigError as exc:
        print(
            f"cityops {args.command}: no broker: pass --mqtt-url mqtt://host:port, "
            f"set CITYOPS_MQTT_URL or start `cityops up` ({exc})",
            file=sys.stderr,
        )
        return None


@contextlib.contextmanager
def _signals(handlers: Mapping[signal.Signals, Any]) -> Iterator[None]:
    """Install signal handlers for the duration of a command (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _emit(summary: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    sys.stdout.flush()


def simulate_command(args: argparse.Namespace) -> int:
    """Handle ``cityops simulate``."""
    endpoint = _endpoint(args)
    if endpoint is None:
        return EXIT_USAGE
    if args.workers < 1 or (args.rate is not None and args.rate <= 0) or args.speed <= 0:
        print("cityops simulate: --workers, --rate and --speed must be positive", file=sys.stderr)
        return EXIT_USAGE
    if args.device_keepalive < 1 or args.device_connections_limit < 0:
        print(
            "cityops simulate: --device-keepalive must be positive and "
            "--device-connections-limit not negative",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        model = load_city(args.city)
        scenarios = [load_scenario(s) for s in args.scenario]
        clock = next((s.clock for s in scenarios if s.clock), None)
        start = resolve_start(
            args.start, clock=clock, utc_offset_h=model.utc_offset_h, now=time.time()
        )
    except SimulatorError as exc:
        print(f"cityops simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    duration = args.duration
    if duration is None:
        duration = next((s.duration_s for s in scenarios if s.duration_s), None)
    if duration is None and args.as_fast_as_possible and not args.rate:
        duration = 3600.0
    options = SimulateOptions(
        city=args.city,
        devices=args.devices,
        scenarios=tuple(args.scenario),
        seed=args.seed,
        start=start,
        duration_s=duration,
        speed=args.speed,
        as_fast_as_possible=args.as_fast_as_possible,
        rate=args.rate,
        workers=args.workers,
        qos=args.qos,
        max_unacked=args.max_unacked,
        device_connections_limit=args.device_connections_limit,
        device_keepalive_s=args.device_keepalive,
    )
    city_devices = len(model.devices) if args.devices is None else args.devices
    if not options.device_connections_for(city_devices):
        print(
            f"cityops simulate: warning: {city_devices:,} devices exceed "
            f"--device-connections-limit {args.device_connections_limit:,}: presence goes over "
            "the shared connections without a Last Will, so if this process dies its devices "
            "stay 'online'",
            file=sys.stderr,
            flush=True,
        )
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    if args.rate:
        total, unit = float(round(args.rate * (duration or 60.0))), "messages"
    else:
        total, unit = duration, "simulated s"
    with (
        _signals({signal.SIGINT: on_signal, signal.SIGTERM: on_signal}),
        ProgressReporter("simulate", total=total, unit=unit) as bar,
    ):

        def progress(sent: int, sim_s: float) -> None:
            bar.update(sent if args.rate else sim_s, f"{sent} messages")

        try:
            result, device_count = run_simulate(options, endpoint, progress=progress, stop=stop)
        except SimulatorError as exc:
            bar.close()
            print(f"cityops simulate: {exc}", file=sys.stderr)
            code = EXIT_USAGE if isinstance(exc, CityModelError | ScenarioError) else EXIT_FAILED
            _emit({"command": "simulate", "ok": False, "errors": [str(exc)]})
            return code
    summary = result.as_json(options, device_count)
    for error in result.errors:
        log.error("%s", error)
    _emit(summary)
    return EXIT_OK if result.ok else EXIT_FAILED


def record_command(args: argparse.Namespace) -> int:
    """Handle ``cityops record``."""
    endpoint = _endpoint(args)
    if endpoint is None:
        return EXIT_USAGE
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    started = time.monotonic()
    deadline = math.inf if args.duration is None else started + args.duration
    try:
        with (
            _signals({signal.SIGINT: on_signal, signal.SIGTERM: on_signal}),
            RecordingWriter(args.out) as writer,
            Recorder(
                endpoint,
                writer,
                topics=args.topic or ("city/#",),
                client_id=f"cityops-record-{os.getpid()}",
            ) as recorder,
        ):
            print(f"recording to {args.out}", file=sys.stderr, flush=True)
            while not stop.is_set():
                # The flush tick: blocks reach the disk at least every second.
                stop.wait(min(0.25, max(0.0, deadline - time.monotonic())))
                writer.maybe_flush()
                if time.monotonic() >= deadline:
                    break
                if args.max_messages is not None and recorder.received >= args.max_messages:
                    break
            received = recorder.received
    except SimulatorError as exc:
        print(f"cityops record: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _emit(
        {
            "command": "record",
            "ok": True,
            "file": str(args.out),
            "messages": received,
            "written": writer.written,
            "blocks": writer.blocks,
            "elapsed_s": round(time.monotonic() - started, 3),
        }
    )
    return EXIT_OK


@contextlib.contextmanager
def _key_listener(control: PauseControl) -> Iterator[None]:
    """Space or p toggles pause, q stops; only when stdin is a terminal."""
    if not sys.stdin.isatty():
        yield
        return
    import termios  # noqa: PLC0415 - POSIX terminals only
    import tty  # noqa: PLC0415

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            key = os.read(fd, 1)
            if key in (b" ", b"p"):
                control.toggle()
            elif key in (b"q", b"\x03"):
                control.stop()

    tty.setcbreak(fd)
    thread = threading.Thread(target=listen, name="replay-keys", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1.0)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def replay_command(args: argparse.Namespace) -> int:
    """Handle ``cityops replay``."""
    endpoint = _endpoint(args)
    if endpoint is None:
        return EXIT_USAGE
    try:
        run_id = validate_run_id(args.run_id or new_run_id(time.time()))
        reader = RecordingReader(args.file)
        total, first_t, last_t = reader.block_counts()
        if first_t is None or last_t is None:
            print(f"cityops replay: {args.file} holds no messages", file=sys.stderr)
            _emit({"command": "replay", "ok": True, "run_id": run_id, "published": 0})
            return EXIT_OK
        start = parse_bound(args.window_from, first_t=first_t) if args.window_from else -math.inf
        end = parse_bound(args.window_to, first_t=first_t) if args.window_to else math.inf
    except SimulatorError as exc:
        print(f"cityops replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.speed < 0:
        print(
            "cityops replay: --speed must be 0 (as fast as possible) or positive", file=sys.stderr
        )
        return EXIT_USAGE
    options = ReplayOptions(
        run_id=run_id,
        speed=args.speed,
        time_mode="keep" if args.keep_time else "scale" if args.scale_time else "shift",
        live=args.live,
        keep_retain=args.retain,
        start=start,
        end=end,
    )
    span_from = max(first_t, start)
    span = max(0.0, min(last_t, end) - span_from)
    control = PauseControl()

    def on_stop(_sig: int, _frame: FrameType | None) -> None:
        control.stop()

    def on_pause(_sig: int, _frame: FrameType | None) -> None:
        control.pause()
        log.info("replay %s paused", run_id)

    def on_resume(_sig: int, _frame: FrameType | None) -> None:
        control.resume()
        log.info("replay %s resumed", run_id)

    where = "live topics (drill)" if args.live else f"cityops/replay/{run_id}/"
    print(
        f"replaying {total} messages ({span:.0f} s) from {args.file} onto {where}",
        file=sys.stderr,
        flush=True,
    )
    handlers = {
        signal.SIGINT: on_stop,
        signal.SIGTERM: on_stop,
        signal.SIGUSR1: on_pause,
        signal.SIGUSR2: on_resume,
    }
    try:
        with (
            _signals(handlers),
            _key_listener(control),
            ProgressReporter(f"replay {run_id}", total=span or None, unit="s of recording") as bar,
            MqttPublisher(endpoint, client_id=f"cityops-replay-{run_id}") as publisher,
        ):

            def progress(done_s: float, published: int) -> None:
                state = " (paused)" if control.paused else ""
                bar.update(
                    span if math.isinf(done_s) else done_s,
                    f"{published} messages{state}",
                    force=math.isinf(done_s),
                )

            replayer = Replayer(options, publisher, control=control, progress=progress)
            result = replayer.run(reader)
            counts = publisher.counts
    except SimulatorError as exc:
        print(f"cityops replay: {exc}", file=sys.stderr)
        return EXIT_FAILED
    ok = counts.published[1] == counts.acked[1] and counts.failed == 0
    _emit(
        {
            "command": "replay",
            "ok": ok,
            "run_id": run_id,
            "live": args.live,
            "published": result.published,
            "shifted": result.shifted,
            "unshifted": result.unshifted,
            "skipped": result.skipped,
            "paused_s": round(result.paused_s, 3),
            "elapsed_s": round(result.elapsed_s, 3),
            "stopped": result.stopped,
            "corrupt_blocks": reader.stats.corrupt_blocks,
            "truncated_tail": reader.stats.truncated_tail,
            "mqtt": counts.as_json(),
        }
    )
    return EXIT_OK if ok else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run only these subcommands (for tests and ``python -m simulators``)."""
    parser = argparse.ArgumentParser(prog="cityops")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handler = args.handler
    code: int = handler(args)
    return code
