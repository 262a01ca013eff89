"""Engineer jobs inside the API: replays of recordings, simulations of scenarios, backtests.

:class:`JobManager` owns them. It is an async context manager: entering it
starts its :class:`asyncio.TaskGroup`, leaving it stops every job and waits
for each to end. :func:`jobs_lifespan` puts one on ``ApiContext.jobs``.

Why threads supervised by a TaskGroup, not subprocesses of ``cityops replay``:

* **Pause that holds, and says so.** A job drives the same
  :class:`simulators.replay.Replayer` as ``cityops replay``, through a
  :class:`~simulators.replay.PauseControl` that the replayer reads before
  every publish. The worker reports the moment it has stopped publishing, so
  ``POST …/pause`` answers with the exact number of messages sent. A
  ``cityops replay`` subprocess pauses on SIGUSR1 but can only report by
  printing lines to be parsed, and ``cityops simulate`` cannot pause at all
  (SIGSTOP would also freeze its MQTT keepalives and its pacing).
* **Exact progress** comes from the publisher's own counters, not from a log.
* **One pacing code path.** A simulation job feeds the messages of a
  :class:`simulators.Simulation` to the same replayer, so simulations get
  pause, the sandbox rewrite and the drill marking for free.

The cost: the publishing loops are Python in the API process and share its
GIL. They are bounded (``max_jobs``, default 4), they spend most of their time
waiting for a message's due time or for PUBACKs, and each runs on a thread of
the manager's own pool, so a job never takes a thread from the event loop's
default executor. A job at speed 0 (as fast as possible) does compete with
request handling for the GIL; that is the price of pausing in process.

Isolation (DESIGN.md: a replay must never page responders or pollute live
data): every job publishes into the sandbox ``cityops/replay/{job_id}/…`` with
the ``cityops-replay`` user property, unless it was started with mode
``drill``: then it publishes on the live topics, every message marked
``cityops-drill: {job_id}``. Retained flags are dropped either way, so a job
leaves no state on the broker. The job id is the run id.

Backtests are request/response, not jobs, but the manager bounds them too:
at most ``max_backtests`` at once on a pool of their own, each over at most
``max_backtest_range_s`` of stored history and abandoned after
``backtest_timeout_s``, so the event loop is never blocked by one.

Jobs live in memory: a restart forgets them (the audit log keeps who started
and stopped what). Ended jobs are kept for listing, the newest
``history_size`` of them.

Errors (all :class:`control_api.errors.ControlApiError`; the routes map them):
:class:`JobNotFound` and :class:`RecordingNotFound` (404),
:class:`InvalidJobRequest` (422), :class:`JobStateConflict` (409),
:class:`TooManyJobs` and :class:`BacktestBusy` (429), :class:`JobStartFailed`
and :class:`BacktestUnavailable` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Literal

import zstandard

from control_api.context import ApiContext
from control_api.errors import ControlApiError
from rules import (
    AlertSignal,
    BacktestError,
    BacktestOptions,
    BacktestReport,
    InputCounts,
    Rule,
    StoredRange,
    build_report,
    run_backtest,
)
from simulators import (
    BLOCK_MAGIC,
    FILE_HEADER,
    REPLAY_PREFIX,
    Endpoint,
    MqttPublisher,
    PauseControl,
    PublishCounts,
    RecordedMessage,
    RecordingError,
    RecordingReader,
    Replayer,
    ReplayOptions,
    Simulation,
    SimulatorError,
    available_scenarios,
    compile_plan,
    decode_block,
    load_city,
    load_scenario,
    resolve_start,
    scale_city,
)

__all__ = [
    "DEFAULT_MAX_JOBS",
    "BacktestBusy",
    "BacktestOutcome",
    "BacktestUnavailable",
    "InvalidJobRequest",
    "JobError",
    "JobKind",
    "JobManager",
    "JobNotFound",
    "JobProgress",
    "JobSnapshot",
    "JobStartFailed",
    "JobState",
    "JobStateConflict",
    "Mode",
    "RecordingInfo",
    "RecordingNotFound",
    "ReplayRequest",
    "SimulationRequest",
    "TimeMode",
    "TooManyJobs",
    "jobs_lifespan",
    "read_recording_info",
]

log = logging.getLogger(__name__)

JobKind = Literal["replay", "simulation"]
JobState = Literal["running", "paused", "stopped", "finished", "failed"]
Mode = Literal["sandbox", "drill"]
"""``sandbox``: ``cityops/replay/{job_id}/…``; ``drill``: the live topics, marked as a drill."""
TimeMode = Literal["shift", "scale", "keep"]
"""Payload timestamps: shifted to now, shifted and scaled by the speed, or kept."""

DEFAULT_MAX_JOBS: Final = 4
MAX_SPEED: Final = 10_000.0
MAX_SIMULATION_S: Final = 7 * 86_400.0
AS_FAST_AS_POSSIBLE_DEFAULT_S: Final = 3_600.0
"""Simulated length of an unbounded simulation at speed 0 (as ``cityops simulate`` does)."""
_RECORDING_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BLOCK_HEAD: Final = struct.Struct("<4sIII")
"""A recording block's head: magic, compressed size, CRC, message count (simulators.recording)."""
_NOUNS: Final[dict[JobKind, str]] = {"replay": "replay", "simulation": "simulation"}
_ID_PREFIX: Final[dict[JobKind, str]] = {"replay": "rp", "simulation": "sim"}
_PARTICIPLES: Final = {"pause": "paused", "resume": "resumed", "stop": "stopped"}


# -- errors --------------------------------------------------------------------------


class JobError(ControlApiError):
    """Root of the errors of engineer jobs and backtests."""


class JobNotFound(JobError):
    """No job of that kind and id (ended jobs are forgotten past the history size)."""

    def __init__(self, kind: JobKind, job_id: str) -> None:
        super().__init__(f"no {_NOUNS[kind]} {job_id!r}")
        self.kind = kind
        self.job_id = job_id


class RecordingNotFound(JobError):
    """No recording of that name in the recordings folder."""


class InvalidJobRequest(JobError, ValueError):
    """A request that cannot be served as given: bad name, window, speed, scenario or range."""


class JobStateConflict(JobError):
    """The job's state does not allow the action (it has ended)."""


class TooManyJobs(JobError):
    """``max_jobs`` jobs are running or paused already."""


class JobStartFailed(JobError):
    """The job could not start publishing (the broker is unreachable)."""


class BacktestBusy(JobError):
    """``max_backtests`` backtests are running already."""


class BacktestUnavailable(JobError):
    """The backtest could not run: the database failed, or it ran past its time limit."""


# -- recordings ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordingInfo:
    """What the block heads of a recording say, plus its first and last message time.

    Attributes:
        name: File name inside the recordings folder.
        size_bytes: File size.
        modified_at: Last modification, epoch seconds.
        messages: Messages in the readable blocks (from the block heads).
        first_t: Receive time of the first message, if any.
        last_t: Receive time of the last message, if any.
        complete: Every byte belongs to a well-framed block (no torn tail, no
            damage); an incomplete recording still replays its good blocks.
    """

    name: str
    size_bytes: int
    modified_at: float
    messages: int
    first_t: float | None
    last_t: float | None
    complete: bool

    @property
    def duration_s(self) -> float | None:
        """Seconds from the first to the last message."""
        if self.first_t is None or self.last_t is None:
            return None
        return self.last_t - self.first_t


def _block_times(handle: BinaryIO, offset: int) -> list[RecordedMessage]:
    handle.seek(offset)
    head = handle.read(_BLOCK_HEAD.size)
    size = _BLOCK_HEAD.unpack(head)[1]
    return decode_block(head, handle.read(size), zstandard.ZstdDecompressor())


def read_recording_info(path: Path) -> RecordingInfo:
    """Summarise a recording from its block heads; only the first and last block are decoded.

    Blocking (file I/O): call it from a thread.

    Raises:
        RecordingError: the file cannot be read or is not a cityops recording.
    """
    try:
        stat = path.stat()
        with path.open("rb") as handle:
            header = handle.read(len(FILE_HEADER))
            if header[:8] != FILE_HEADER[:8]:
                msg = f"{path.name!r} is not a cityops recording (bad header)"
                raise RecordingError(msg)
            pos, messages, complete = len(FILE_HEADER), 0, True
            first_block: int | None = None
            last_block: int | None = None
            while pos < stat.st_size:
                handle.seek(pos)
                head = handle.read(_BLOCK_HEAD.size)
                if len(head) < _BLOCK_HEAD.size:
                    complete = False
                    break
                magic, size, _crc, count = _BLOCK_HEAD.unpack(head)
                if magic != BLOCK_MAGIC or pos + _BLOCK_HEAD.size + size > stat.st_size:
                    complete = False  # damaged or torn: the reader scans past it, we stop here
                    break
                if count:
                    first_block = pos if first_block is None else first_block
                    last_block = pos
                messages += count
                pos += _BLOCK_HEAD.size + size
            first_t = last_t = None
            try:
                if first_block is not None and last_block is not None:
                    first_t = _block_times(handle, first_block)[0].t
                    last_t = _block_times(handle, last_block)[-1].t
            except (RecordingError, IndexError):
                complete = False
    except OSError as exc:
        msg = f"cannot read recording {path.name!r}: {exc.strerror}"
        raise RecordingError(msg) from exc
    return RecordingInfo(
        name=path.name,
        size_bytes=stat.st_size,
        modified_at=stat.st_mtime,
        messages=messages,
        first_t=first_t,
        last_t=last_t,
        complete=complete,
    )


# -- requests and views --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """A replay to start.

    Attributes:
        recording: File name in the recordings folder.
        speed: Pacing factor; 0 publishes as fast as possible.
        from_s: Window start, seconds after the first message.
        to_s: Window end (excluded), seconds after the first message.
        mode: ``sandbox`` (default) or ``drill`` (live topics, marked).
        time_mode: How payload timestamps move (``shift`` to now by default).
    """

    recording: str
    speed: float = 1.0
    from_s: float | None = None
    to_s: float | None = None
    mode: Mode = "sandbox"
    time_mode: TimeMode = "shift"


@dataclass(frozen=True, slots=True)
class SimulationRequest:
    """A simulation of the API's city to start.

    Attributes:
        scenario: A shipped scenario name, or ``None`` for an ordinary day.
        speed: Simulated seconds per second; 0 publishes as fast as possible.
        seed: The seed (the same seed gives the same messages).
        duration_s: Simulated seconds to run (default: the scenario's length;
            unbounded without a scenario, except at speed 0: one hour).
        devices: Scale the city to this many devices.
        mode: ``sandbox`` (default) or ``drill``.
        time_mode: How payload timestamps move (``shift``: the first reading at now).
    """

    scenario: str | None = None
    speed: float = 1.0
    seed: int = 1
    duration_s: float | None = None
    devices: int | None = None
    mode: Mode = "sandbox"
    time_mode: TimeMode = "shift"


@dataclass(frozen=True, slots=True)
class JobProgress:
    """How far a job got.

    Attributes:
        published: Messages handed to the broker.
        acked: Of those, acknowledged (QoS 1) or written (QoS 0).
        position_s: Recording (or simulated) seconds from the window start to
            the message being published.
        total_s: Length of the window or simulation, when known.
        fraction: ``position_s / total_s`` (1.0 once finished), when known.
        total_messages: Messages to publish, when known (a whole recording).
    """

    published: int
    acked: int
    position_s: float
    total_s: float | None
    fraction: float | None
    total_messages: int | None


@dataclass(frozen=True, slots=True)
class JobSnapshot:
    """A job as it is now (times in epoch seconds)."""

    id: str
    kind: JobKind
    state: JobState
    mode: Mode
    topic_prefix: str
    parameters: Mapping[str, Any]
    started_by: str
    started_at: float
    ended_at: float | None
    error: str | None
    progress: JobProgress


class _WorkerControl(PauseControl):
    """A pause control that tells the manager when the worker has really paused.

    The replayer reads :attr:`paused` on its own thread before every publish
    and while it waits paused; the first ``True`` it reads after a
    :meth:`pause` means it will publish nothing more until resumed, and is
    reported once per pause through ``on_paused(generation)``.
    """

    def __init__(self, on_paused: Callable[[int], None]) -> None:
        super().__init__()
        self._on_paused = on_paused
        self.generation = 0
        self._reported = 0

    def pause(self) -> None:
        """Pause publishing (a new generation: its confirmation is reported once)."""
        self.generation += 1
        super().pause()

    @property
    def paused(self) -> bool:
        """Whether paused; read by the worker, which reports the first ``True`` it sees."""
        paused = super().paused
        generation = self.generation
        if paused and self._reported != generation:
            self._reported = generation
            self._on_paused(generation)
        return paused


@dataclass(eq=False, slots=True)
class _Job:
    """A job's mutable state: the loop thread owns it; the worker writes the marked fields."""

    id: str
    kind: JobKind
    mode: Mode
    parameters: dict[str, Any]
    started_by: str
    started_at: float
    origin_t: float
    total_s: float | None
    total_messages: int | None
    control: _WorkerControl
    state: JobState = "running"
    ended_at: float | None = None
    error: str | None = None
    counts: PublishCounts | None = None
    """The publisher's counters (written by the worker)."""
    last_t: float | None = None
    """Time of the message being published (written by the worker)."""
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    pause_reached: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def snapshot(self) -> JobSnapshot:
        """The job as it is now."""
        counts = self.counts
        published = sum(counts.published.values()) if counts is not None else 0
        acked = sum(counts.acked.values()) if counts is not None else 0
        last_t = self.last_t
        position = max(0.0, last_t - self.origin_t) if last_t is not None else 0.0
        fraction: float | None = None
        if self.state == "finished":
            fraction = 1.0
        elif self.total_s:
            fraction = min(1.0, position / self.total_s)
        prefix = "city/" if self.mode == "drill" else f"{REPLAY_PREFIX}/{self.id}/"
        return JobSnapshot(
            id=self.id,
            kind=self.kind,
            state=self.state,
            mode=self.mode,
            topic_prefix=prefix,
            parameters=dict(self.parameters),
            started_by=self.started_by,
            started_at=self.started_at,
            ended_at=self.ended_at,
            error=self.error,
            progress=JobProgress(
                published=published,
                acked=acked,
                position_s=round(position, 3),
                total_s=self.total_s,
                fraction=None if fraction is None else round(fraction, 4),
                total_messages=self.total_messages,
            ),
        )


@dataclass(frozen=True, slots=True)
class _Outcome:
    stopped: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BacktestOutcome:
    """A backtest over stored readings.

    Attributes:
        report: The alerts that would have fired and their quality figures.
        districts: The district of each alert subject.
        elapsed_s: Wall time the run took.
    """

    report: BacktestReport
    districts: Mapping[str, str]
    elapsed_s: float


def _simulation_messages(sim: Simulation, until: float) -> Iterator[RecordedMessage]:
    """A simulation's messages as a recording would hold them, ending with the clean offlines."""
    for m in sim.run(until):
        yield RecordedMessage(m.t, m.topic, m.payload, m.qos, m.retain, m.content_type)
    for m in sim.finish():
        yield RecordedMessage(m.t, m.topic, m.payload, m.qos, m.retain, m.content_type)


def _check_speed(speed: float) -> None:
    if not (math.isfinite(speed) and 0 <= speed <= MAX_SPEED):
        msg = f"speed {speed} must be 0 (as fast as possible) or up to {MAX_SPEED:.0f}"
        raise InvalidJobRequest(msg)


def _stored_backtest(
    rules: Sequence[Rule],
    *,
    label: str,
    database_url: str,
    start: float,
    end: float,
    tick_s: float,
    connect_timeout_s: float,
    give_up: Callable[[], str | None],
) -> BacktestOutcome:
    """Run one rule set over ``[start, end)`` of stored readings (blocking: a worker thread)."""
    began = time.monotonic()
    counts = InputCounts()

    def progress(_done_s: float, _counts: InputCounts) -> None:
        reason = give_up()
        if reason is not None:
            raise BacktestUnavailable(reason)

    stored = StoredRange(database_url, start=start, end=end, connect_timeout_s=connect_timeout_s)
    source = stored.description
    with stored:
        run = run_backtest(
            [rules],
            stored.observations(counts),
            counts=counts,
            start=start,
            end=end,
            options=BacktestOptions(tick_s=tick_s),
            kind_of=stored.kind_of,
            progress=progress,
        )
    signals: tuple[AlertSignal, ...] = run.signals[0]
    districts: dict[str, str] = {}
    for signal in signals:
        districts.setdefault(signal.subject, signal.district)
    report = build_report(
        signals, rules=label, start=run.start, end=run.end, inputs=counts.summary(source)
    )
    return BacktestOutcome(report, districts, time.monotonic() - began)


# -- the manager ---------------------------------------------------------------------


class JobManager:
    """Runs, pauses, resumes and stops replays and simulations; bounds backtests.

    Use as ``async with JobManager(...) as jobs``; every job started inside is
    stopped and awaited on the way out.

    Args:
        endpoint: The broker jobs publish to.
        city: The city model simulations run (name or YAML path).
        recordings_dir: Folder of the recordings that may be replayed
            (``None``: no recordings).
        client_id: Prefix of the jobs' MQTT client ids.
        max_jobs: Replays and simulations running or paused at once.
        history_size: Ended jobs kept for listing.
        connect_timeout_s: Deadline for a job's broker connection.
        pause_confirm_s: How long a pause waits for the worker to confirm.
        stop_wait_s: How long a stop waits for the worker to end.
        max_backtests: Backtests running at once.
        max_backtest_range_s: Longest stored range a backtest may read.
        backtest_timeout_s: A backtest running longer is abandoned.
        db_connect_timeout_s: Deadline for a backtest's database connection.
        clock: Wall clock, epoch seconds.
    """

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        city: str,
        recordings_dir: Path | None,
        client_id: str = "cityops-api",
        max_jobs: int = DEFAULT_MAX_JOBS,
        history_size: int = 100,
        connect_timeout_s: float = 10.0,
        pause_confirm_s: float = 5.0,
        stop_wait_s: float = 30.0,
        max_backtests: int = 1,
        max_backtest_range_s: float = 7 * 86_400.0,
        backtest_timeout_s: float = 300.0,
        db_connect_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_jobs < 1 or max_backtests < 1:
            msg = f"max_jobs ({max_jobs}) and max_backtests ({max_backtests}) must be at least 1"
            raise ValueError(msg)
        self._endpoint = endpoint
        self._city = city
        self.recordings_dir = recordings_dir
        self._client_id = client_id
        self.max_jobs = max_jobs
        self._history_size = history_size
        self._connect_timeout_s = connect_timeout_s
        self._pause_confirm_s = pause_confirm_s
        self._stop_wait_s = stop_wait_s
        self.max_backtests = max_backtests
        self.max_backtest_range_s = max_backtest_range_s
        self.backtest_timeout_s = backtest_timeout_s
        self._db_connect_timeout_s = db_connect_timeout_s
        self._clock = clock
        self._jobs: dict[str, _Job] = {}
        self._reserved = 0
        self._backtests = 0
        self._closing = threading.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._info_cache: dict[tuple[str, int, int], RecordingInfo] = {}
        # One thread per job slot: a job never waits for, or starves, the default pool.
        self._workers = ThreadPoolExecutor(max_jobs, thread_name_prefix="cityops-job")
        self._backtest_pool = ThreadPoolExecutor(max_backtests, thread_name_prefix="cityops-bt")

    # -- lifetime ----------------------------------------------------------------------

    async def __aenter__(self) -> JobManager:
        self._loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            # Unwound in reverse: stop every job, wait for the TaskGroup (each supervisor
            # returns once its worker thread has ended), then release the thread pools.
            stack.callback(self._workers.shutdown, wait=False, cancel_futures=True)
            stack.callback(self._backtest_pool.shutdown, wait=False, cancel_futures=True)
            self._tg = await stack.enter_async_context(asyncio.TaskGroup())
            stack.push_async_callback(self._stop_all)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._tg = None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    async def _stop_all(self) -> None:
        self._closing.set()  # running backtests give up at their next progress check
        active = [job for job in self._jobs.values() if not job.done.is_set()]
        for job in active:
            job.control.stop()
        if active:
            log.info("stopping %d engineer jobs", len(active))

    def _task_group(self) -> asyncio.TaskGroup:
        if self._tg is None:
            msg = (
                "the job manager is not running (the API is starting or shutting down; "
                "in code, use it as `async with JobManager(...)`)"
            )
            raise JobStartFailed(msg)
        return self._tg

    # -- recordings --------------------------------------------------------------------

    def recording_path(self, name: str) -> Path:
        """The file of recording ``name``.

        Raises:
            InvalidJobRequest: ``name`` is not a plain file name (no folders, no ``..``).
            RecordingNotFound: there is no such recording.
        """
        if _RECORDING_NAME.fullmatch(name) is None:
            msg = (
                f"recording name {name!r} must be a plain file name: letters, digits, '.', '_' "
                "and '-', starting with a letter or digit, at most 128 characters"
            )
            raise InvalidJobRequest(msg)
        folder = self.recordings_dir
        if folder is None:
            msg = f"no recording {name!r}: this API has no recordings folder configured"
            raise RecordingNotFound(msg)
        path = folder / name
        try:
            inside = path.resolve().parent == folder.resolve()
        except OSError:
            inside = False
        if not inside or not path.is_file():
            msg = f"no recording {name!r} in {str(folder)!r}"
            raise RecordingNotFound(msg)
        return path

    def _info(self, path: Path) -> RecordingInfo:
        """:func:`read_recording_info`, cached until the file changes (blocking)."""
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        info = self._info_cache.get(key)
        if info is None:
            info = read_recording_info(path)
            if len(self._info_cache) > 1000:
                self._info_cache.clear()
            self._info_cache[key] = info
        return info

    def _scan(self) -> list[RecordingInfo]:
        folder = self.recordings_dir
        if folder is None or not folder.is_dir():
            return []
        out: list[RecordingInfo] = []
        for path in sorted(folder.iterdir()):
            if not (_RECORDING_NAME.fullmatch(path.name) and path.is_file()):
                continue
            try:
                out.append(self._info(path))
            except (RecordingError, OSError) as exc:
                log.debug("not listing %s: %s", path, exc)
        return out

    async def recordings(self) -> list[RecordingInfo]:
        """The recordings in the folder, by name (files that are not recordings are left out)."""
        return await asyncio.to_thread(self._scan)

    # -- jobs --------------------------------------------------------------------------

    def _get(self, kind: JobKind, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None or job.kind != kind:
            raise JobNotFound(kind, job_id)
        return job

    def get(self, kind: JobKind, job_id: str) -> JobSnapshot:
        """One job.

        Raises:
            JobNotFound: no job of that kind and id.
        """
        return self._get(kind, job_id).snapshot()

    def list_jobs(self, kind: JobKind) -> list[JobSnapshot]:
        """The jobs of ``kind``, newest first (running, paused and the recent ended ones)."""
        jobs = [j for j in self._jobs.values() if j.kind == kind]
        return [j.snapshot() for j in sorted(jobs, key=lambda j: j.started_at, reverse=True)]

    def _active(self) -> int:
        return sum(1 for j in self._jobs.values() if not j.done.is_set())

    @contextlib.contextmanager
    def _slot(self, kind: JobKind) -> Iterator[None]:
        """Hold a job slot while a start is prepared (checked and taken without awaiting)."""
        busy = self._active() + self._reserved
        if busy >= self.max_jobs:
            msg = (
                f"cannot start a {_NOUNS[kind]}: {busy} replays and simulations are running or "
                f"paused, the limit is {self.max_jobs}; stop one first"
            )
            raise TooManyJobs(msg)
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    def _new_id(self, kind: JobKind) -> str:
        stamp = time.strftime("%Y%m%dt%H%M%S", time.gmtime(self._clock()))
        while True:
            job_id = f"{_ID_PREFIX[kind]}-{stamp}-{secrets.token_hex(3)}"
            if job_id not in self._jobs:
                return job_id

    def _new_job(
        self,
        kind: JobKind,
        mode: Mode,
        parameters: dict[str, Any],
        *,
        started_by: str,
        origin_t: float,
        total_s: float | None,
        total_messages: int | None,
    ) -> _Job:
        job_id = self._new_id(kind)
        loop = self._loop
        assert loop is not None  # set on entry, which _task_group() checked

        def on_paused(generation: int) -> None:  # on the worker thread
            loop.call_soon_threadsafe(self._pause_confirmed, job_id, generation)

        return _Job(
            id=job_id,
            kind=kind,
            mode=mode,
            parameters=parameters,
            started_by=started_by,
            started_at=self._clock(),
            origin_t=origin_t,
            total_s=total_s,
            total_messages=total_messages,
            control=_WorkerControl(on_paused),
        )

    def _pause_confirmed(self, job_id: str, generation: int) -> None:
        job = self._jobs.get(job_id)
        if job is not None and job.state == "paused" and job.control.generation == generation:
            job.pause_reached.set()

    async def start_replay(self, request: ReplayRequest, *, started_by: str) -> JobSnapshot:
        """Start replaying a recording.

        Raises:
            InvalidJobRequest: a bad name, speed or window, or an empty recording.
            RecordingNotFound: no such recording.
            TooManyJobs: ``max_jobs`` jobs are running or paused.
            JobStartFailed: the broker could not be reached.
        """
        self._task_group()
        _check_speed(request.speed)
        path = self.recording_path(request.recording)
        with self._slot("replay"):
            try:
                info = await asyncio.to_thread(self._info, path)
            except (RecordingError, OSError) as exc:
                msg = f"recording {request.recording!r} cannot be replayed: {exc}"
                raise InvalidJobRequest(msg) from exc
            if info.first_t is None or info.last_t is None:
                msg = f"recording {request.recording!r} holds no messages"
                raise InvalidJobRequest(msg)
            start, end = self._window(request, info)
            span_from = max(info.first_t, start)
            windowed = request.from_s is not None or request.to_s is not None
            job = self._new_job(
                "replay",
                request.mode,
                asdict(request),
                started_by=started_by,
                origin_t=span_from,
                total_s=max(0.0, min(info.last_t, end) - span_from),
                total_messages=None if windowed else info.messages,
            )
            options = ReplayOptions(
                run_id=job.id,
                speed=request.speed,
                time_mode=request.time_mode,
                live=request.mode == "drill",
                start=start,
                end=end,
            )
            work = partial(self._publish, job, options, RecordingReader(path))
            self._launch(job, work)
        return await self._started(job)

    @staticmethod
    def _window(request: ReplayRequest, info: RecordingInfo) -> tuple[float, float]:
        assert info.first_t is not None
        assert info.last_t is not None
        name, length = request.recording, info.last_t - info.first_t
        for label, value in (("from_s", request.from_s), ("to_s", request.to_s)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                msg = f"{label} {value} must be a number of seconds, 0 or more"
                raise InvalidJobRequest(msg)
        if request.from_s is not None and request.from_s > length:
            msg = (
                f"window start from_s {request.from_s:g} s is after the end of recording "
                f"{name!r}, which lasts {length:.3f} s"
            )
            raise InvalidJobRequest(msg)
        if (
            request.from_s is not None
            and request.to_s is not None
            and request.to_s <= request.from_s
        ):
            msg = f"window end to_s {request.to_s:g} must be after from_s {request.from_s:g}"
            raise InvalidJobRequest(msg)
        start = -math.inf if request.from_s is None else info.first_t + request.from_s
        end = math.inf if request.to_s is None else info.first_t + request.to_s
        return start, end

    async def start_simulation(self, request: SimulationRequest, *, started_by: str) -> JobSnapshot:
        """Start simulating the city, with a scenario or without.

        Raises:
            InvalidJobRequest: an unknown scenario, or a bad speed, duration or device count.
            TooManyJobs: ``max_jobs`` jobs are running or paused.
            JobStartFailed: the broker could not be reached.
        """
        self._task_group()
        _check_speed(request.speed)
        if request.scenario is not None and request.scenario not in available_scenarios():
            msg = (
                f"unknown scenario {request.scenario!r}: the scenarios are "
                f"{', '.join(available_scenarios())}"
            )
            raise InvalidJobRequest(msg)
        if request.duration_s is not None and not 0 < request.duration_s <= MAX_SIMULATION_S:
            msg = (
                f"duration_s {request.duration_s} must be above 0 "
                f"and at most {MAX_SIMULATION_S:.0f}"
            )
            raise InvalidJobRequest(msg)
        with self._slot("simulation"):
            try:
                sim, until = await asyncio.to_thread(self._build_simulation, request)
            except SimulatorError as exc:  # a bad device count, or a scenario the city lacks
                msg = f"cannot simulate {self._city!r}: {exc}"
                raise InvalidJobRequest(msg) from exc
            job = self._new_job(
                "simulation",
                request.mode,
                asdict(request),
                started_by=started_by,
                origin_t=sim.start,
                total_s=None if math.isinf(until) else until - sim.start,
                total_messages=None,
            )
            options = ReplayOptions(
                run_id=job.id,
                speed=request.speed,
                time_mode=request.time_mode,
                live=request.mode == "drill",
            )
            work = partial(self._publish, job, options, _simulation_messages(sim, until))
            self._launch(job, work)
        return await self._started(job)

    def _build_simulation(self, request: SimulationRequest) -> tuple[Simulation, float]:
        """The engine of a simulation and its simulated end (blocking: reads files)."""
        model = load_city(self._city)
        if request.devices is not None:
            model = scale_city(model, request.devices)
        scenarios = [load_scenario(request.scenario)] if request.scenario else []
        clock = next((s.clock for s in scenarios if s.clock), None)
        start = resolve_start(None, clock=clock, utc_offset_h=model.utc_offset_h, now=self._clock())
        duration = request.duration_s
        if duration is None:
            duration = next((s.duration_s for s in scenarios if s.duration_s), None)
        if duration is None and request.speed == 0:
            duration = AS_FAST_AS_POSSIBLE_DEFAULT_S
        plan = compile_plan(scenarios, model, start=start, seed=request.seed) if scenarios else None
        sim = Simulation(model, seed=request.seed, start=start, plan=plan)
        return sim, math.inf if duration is None else start + duration

    def _launch(self, job: _Job, work: Callable[[], _Outcome]) -> None:
        self._jobs[job.id] = job
        self._task_group().create_task(self._supervise(job, work), name=f"job-{job.id}")
        params = ", ".join(f"{k}={v}" for k, v in job.parameters.items() if v is not None)
        log.info("%s %s started by %s (%s, %s)", job.kind, job.id, job.started_by, job.mode, params)

    async def _started(self, job: _Job) -> JobSnapshot:
        """Wait until the job's broker connection is up, or the job failed.

        Raises:
            JobStartFailed: the job ended before it could publish.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.connected.wait(), self._connect_timeout_s + 5.0)
        if job.state == "failed":
            msg = f"{_NOUNS[job.kind]} {job.id!r} could not start: {job.error}"
            raise JobStartFailed(msg)
        return job.snapshot()

    def _publish(
        self, job: _Job, options: ReplayOptions, messages: Iterable[RecordedMessage]
    ) -> _Outcome:
        """The worker: pace ``messages`` onto the broker (blocking, on a job thread)."""
        loop = self._loop
        assert loop is not None

        def tracked() -> Iterator[RecordedMessage]:
            for message in messages:
                job.last_t = message.t
                yield message

        with MqttPublisher(
            self._endpoint,
            client_id=f"{self._client_id}-{job.id}",
            connect_timeout_s=self._connect_timeout_s,
        ) as publisher:
            job.counts = publisher.counts
            loop.call_soon_threadsafe(job.connected.set)
            result = Replayer(options, publisher, control=job.control).run(tracked())
        unacked = publisher.counts.unacked
        if unacked > 0 or publisher.counts.failed:
            return _Outcome(
                result.stopped,
                f"the broker did not acknowledge {unacked} QoS 1 messages and refused "
                f"{publisher.counts.failed}",
            )
        return _Outcome(result.stopped)

    async def _supervise(self, job: _Job, work: Callable[[], _Outcome]) -> None:
        """Run the worker on a job thread and record how it ended; never raises but cancellation."""
        future = asyncio.get_running_loop().run_in_executor(self._workers, work)
        try:
            outcome = await asyncio.shield(future)
        except asyncio.CancelledError:
            job.control.stop()
            await asyncio.wait([future])  # the worker sees the stop within a pacing slice
            if not future.cancelled() and future.exception() is not None:
                log.warning("%s %s ended with %s", job.kind, job.id, future.exception())
            self._ended(job, _Outcome(stopped=True))
            raise
        except SimulatorError as exc:  # MqttError, RecordingError: said in the job's error
            log.warning("%s %s failed: %s", job.kind, job.id, exc)
            self._ended(job, _Outcome(stopped=False, error=str(exc)))
        except Exception as exc:  # a bug: keep the API serving, show it on the job
            log.exception("%s %s failed", job.kind, job.id)
            self._ended(job, _Outcome(stopped=False, error=f"{type(exc).__name__}: {exc}"))
        else:
            self._ended(job, outcome)

    def _ended(self, job: _Job, outcome: _Outcome) -> None:
        job.ended_at = self._clock()
        job.error = outcome.error
        job.state = "failed" if outcome.error else "stopped" if outcome.stopped else "finished"
        for event in (job.done, job.connected, job.pause_reached):
            event.set()  # wakes whoever waits for a start, a pause or a stop
        snap = job.snapshot()
        log.info("%s %s %s after %d messages", job.kind, job.id, job.state, snap.progress.published)
        ended = sorted(
            (j for j in self._jobs.values() if j.done.is_set()), key=lambda j: j.started_at
        )
        for old in ended[: max(0, len(ended) - self._history_size)]:
            del self._jobs[old.id]

    def _require_active(self, job: _Job, action: str) -> None:
        if job.done.is_set():
            msg = (
                f"{_NOUNS[job.kind]} {job.id!r} is {job.state}: only a running or paused "
                f"{_NOUNS[job.kind]} can be {_PARTICIPLES[action]}"
            )
            raise JobStateConflict(msg)

    async def pause(self, kind: JobKind, job_id: str) -> JobSnapshot:
        """Pause a job; returns once the worker has stopped publishing (or ``pause_confirm_s``).

        Pausing a paused job changes nothing.

        Raises:
            JobNotFound: no such job.
            JobStateConflict: the job has ended.
        """
        job = self._get(kind, job_id)
        self._require_active(job, "pause")
        if job.state != "paused":
            job.pause_reached.clear()
            job.state = "paused"
            job.control.pause()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.pause_reached.wait(), self._pause_confirm_s)
        return job.snapshot()

    async def resume(self, kind: JobKind, job_id: str) -> JobSnapshot:
        """Resume a paused job (a running one is left as it is).

        Raises:
            JobNotFound: no such job.
            JobStateConflict: the job has ended.
        """
        job = self._get(kind, job_id)
        self._require_active(job, "resume")
        if job.state == "paused":
            job.state = "running"
            job.control.resume()
        return job.snapshot()

    async def stop(self, kind: JobKind, job_id: str) -> JobSnapshot:
        """Stop a job; returns once it has ended (or after ``stop_wait_s``).

        Raises:
            JobNotFound: no such job.
            JobStateConflict: the job has ended already.
        """
        job = self._get(kind, job_id)
        self._require_active(job, "stop")
        job.control.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.done.wait(), self._stop_wait_s)
        return job.snapshot()

    # -- backtests ---------------------------------------------------------------------

    async def backtest(
        self,
        rules: Sequence[Rule],
        *,
        label: str,
        database_url: str,
        start: float,
        end: float,
        tick_s: float = 1.0,
    ) -> BacktestOutcome:
        """Evaluate ``rules`` over the stored readings of ``[start, end)`` on a worker thread.

        Raises:
            InvalidJobRequest: ``end`` is not after ``start``, the range is too long, or
                ``tick_s`` too fine for it.
            BacktestBusy: ``max_backtests`` backtests are running.
            BacktestUnavailable: the database failed, or the run passed ``backtest_timeout_s``.
        """
        self._task_group()
        if not (math.isfinite(start) and math.isfinite(end) and end > start):
            msg = f"the backtest range must end after it starts: start {start}, end {end}"
            raise InvalidJobRequest(msg)
        if end - start > self.max_backtest_range_s:
            msg = (
                f"the backtest range of {(end - start) / 86_400:.2f} days is longer than the "
                f"maximum of {self.max_backtest_range_s / 86_400:g} days"
            )
            raise InvalidJobRequest(msg)
        if not (math.isfinite(tick_s) and (end - start) / tick_s <= self.max_backtest_range_s):
            # Ticks between inputs are not interruptible: bound them by those of the
            # longest range at one tick per second.
            msg = (
                f"tick_s {tick_s:g} is too fine for a range of {end - start:.0f} s: at most "
                f"{self.max_backtest_range_s:.0f} ticks, so at least "
                f"{(end - start) / self.max_backtest_range_s:.3g} s"
            )
            raise InvalidJobRequest(msg)
        if self._backtests >= self.max_backtests:
            msg = (
                f"{self._backtests} backtests are running, the limit is {self.max_backtests}: "
                "try again when it has finished"
            )
            raise BacktestBusy(msg)
        deadline = time.monotonic() + self.backtest_timeout_s
        abandoned = threading.Event()
        limit = self.backtest_timeout_s

        def give_up() -> str | None:
            if self._closing.is_set():
                return "the API is shutting down"
            if abandoned.is_set():
                return "the request was abandoned"
            if time.monotonic() > deadline:
                return f"the backtest ran past its limit of {limit:g} s: backtest a shorter range"
            return None

        work = partial(
            _stored_backtest,
            rules,
            label=label,
            database_url=database_url,
            start=start,
            end=end,
            tick_s=tick_s,
            connect_timeout_s=self._db_connect_timeout_s,
            give_up=give_up,
        )
        future = asyncio.get_running_loop().run_in_executor(self._backtest_pool, work)
        self._backtests += 1

        def release(_: object) -> None:
            self._backtests -= 1  # when the thread is done, not when the request gave up

        future.add_done_callback(release)
        try:
            # Shielded: a caller that goes away must not mark the slot free while the
            # thread still runs; it sets ``abandoned`` and the thread gives up instead.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            abandoned.set()
            raise
        except BacktestError as exc:
            raise BacktestUnavailable(str(exc)) from exc


def jobs_lifespan(
    ctx: ApiContext,
    *,
    recordings_dir: Path | None = None,
    max_jobs: int = DEFAULT_MAX_JOBS,
) -> AbstractAsyncContextManager[None]:
    """A :class:`JobManager` on ``ctx.jobs`` for the life of the API.

    Args:
        ctx: The API's context: the broker, the city and the client id come from its config.
        recordings_dir: The recordings folder; ``None`` takes ``ctx.config.recordings_dir``
            when the config has one, else there are no recordings.
        max_jobs: Replays and simulations running or paused at once.
    """

    @contextlib.asynccontextmanager
    async def run() -> AsyncIterator[None]:
        folder = recordings_dir
        if folder is None:
            folder = getattr(ctx.config, "recordings_dir", None)
        manager = JobManager(
            endpoint=ctx.config.mqtt,
            city=ctx.config.city or "minamikawa",
            recordings_dir=None if folder is None else Path(folder),
            client_id=ctx.config.client_id,
            max_jobs=max_jobs,
            db_connect_timeout_s=ctx.config.db_timeout_s,
        )
        async with manager:
            ctx.jobs = manager
            try:
                yield
            finally:
                ctx.jobs = None

    return run()
