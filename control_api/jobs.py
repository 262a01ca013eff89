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

Backtests are request/response, not jobs, but the manager bounds them too,
through the :class:`control_api.backtests.BacktestRunner` it owns. The
recordings a replay may use are those of its
:class:`control_api.recordings.RecordingFolder`. The requests and snapshots
it takes and returns are in :mod:`control_api.job_types`.

Jobs live in memory: a restart forgets them (the audit log keeps who started
and stopped what). Ended jobs are kept for listing, the newest
``history_size`` of them.

Errors: the :class:`control_api.errors.JobError` leaves (listed, with the
status the routes map them to, in :mod:`control_api.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from control_api.backtests import BacktestOutcome, BacktestRunner
from control_api.context import ApiContext
from control_api.errors import (
    InvalidJobRequest,
    JobNotFound,
    JobStartFailed,
    JobStateConflict,
    TooManyJobs,
)
from control_api.job_types import (
    MAX_SIMULATION_S,
    MAX_SPEED,
    JobKind,
    JobProgress,
    JobSnapshot,
    JobState,
    Mode,
    ReplayRequest,
    SimulationRequest,
)
from control_api.recordings import RecordingFolder, RecordingInfo
from rules import Rule
from simulators import (
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
    load_city,
    load_scenario,
    resolve_start,
    scale_city,
)

__all__ = ["DEFAULT_MAX_JOBS", "JobManager", "jobs_lifespan"]

log = logging.getLogger(__name__)

DEFAULT_MAX_JOBS: Final = 4
AS_FAST_AS_POSSIBLE_DEFAULT_S: Final = 3_600.0
"""Simulated length of an unbounded simulation at speed 0 (as ``cityops simulate`` does)."""
_NOUNS: Final[dict[JobKind, str]] = {"replay": "replay", "simulation": "simulation"}
_ID_PREFIX: Final[dict[JobKind, str]] = {"replay": "rp", "simulation": "sim"}
_PARTICIPLES: Final = {"pause": "paused", "resume": "resumed", "stop": "stopped"}


# -- job state -----------------------------------------------------------------------


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
        self._recordings = RecordingFolder(recordings_dir)
        self._client_id = client_id
        self.max_jobs = max_jobs
        self._history_size = history_size
        self._connect_timeout_s = connect_timeout_s
        self._pause_confirm_s = pause_confirm_s
        self._stop_wait_s = stop_wait_s
        self._clock = clock
        self._jobs: dict[str, _Job] = {}
        self._reserved = 0
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # One thread per job slot: a job never waits for, or starves, the default pool.
        self._workers = ThreadPoolExecutor(max_jobs, thread_name_prefix="cityops-job")
        self._backtests = BacktestRunner(
            max_backtests=max_backtests,
            max_range_s=max_backtest_range_s,
            timeout_s=backtest_timeout_s,
            db_connect_timeout_s=db_connect_timeout_s,
        )

    # -- lifetime ----------------------------------------------------------------------

    async def __aenter__(self) -> JobManager:
        self._loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            # Unwound in reverse: stop every job, wait for the TaskGroup (each supervisor
            # returns once its worker thread has ended), then release the thread pools.
            stack.callback(self._workers.shutdown, wait=False, cancel_futures=True)
            stack.callback(self._backtests.shutdown)
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
        self._backtests.close()  # running backtests give up at their next progress check
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
        return self._recordings.path(name)

    async def recordings(self) -> list[RecordingInfo]:
        """The recordings in the folder, by name (files that are not recordings are left out)."""
        return await asyncio.to_thread(self._recordings.scan)

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
                info = await asyncio.to_thread(self._recordings.info, path)
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
        return await self._backtests.run(
            rules, label=label, database_url=database_url, start=start, end=end, tick_s=tick_s
        )


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
