"""Engineering: recordings, replays, simulations, rules, validation and backtests.

Every route needs :attr:`Permission.ENGINEERING` (engineers and admins);
every state change is audited. Replays and simulations are jobs of
:class:`control_api.jobs.JobManager` and share one set of routes per kind:
``POST /{kind}s`` starts one, ``GET /{kind}s`` and ``GET /{kind}s/{id}`` show
them, ``POST /{kind}s/{id}/pause|resume|stop`` steer them. A job publishes
into the sandbox ``cityops/replay/{id}/…`` unless started with mode
``drill`` (the live topics, every message marked as a drill).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from control_api.auth import Principal
from control_api.backtests import BacktestOutcome
from control_api.context import ApiContext
from control_api.deps import Context, client_address, requires
from control_api.errors import (
    BacktestBusy,
    BacktestUnavailable,
    InvalidJobRequest,
    JobError,
    JobNotFound,
    JobStartFailed,
    JobStateConflict,
    RecordingNotFound,
    TooManyJobs,
)
from control_api.job_types import (
    MAX_SIMULATION_S,
    MAX_SPEED,
    JobKind,
    JobSnapshot,
    ReplayRequest,
    SimulationRequest,
)
from control_api.jobs import JobManager
from control_api.roles import Permission
from control_api.schemas import as_datetime, error_responses
from rules import Rule, RuleFileError, load_rules_text
from simulators import ScenarioError, available_scenarios, load_scenario

router = APIRouter(prefix="/api/v1", tags=["engineering"])

View = Annotated[Principal, Depends(requires(Permission.VIEW))]
Engineer = Annotated[Principal, Depends(requires(Permission.ENGINEERING))]

Severity = Literal["critical", "major", "minor", "warning"]
ModeName = Literal["sandbox", "drill"]
TimeModeName = Literal["shift", "scale", "keep"]
MAX_RULES_TEXT = 1_000_000
_MODE_HELP = (
    "`sandbox` publishes under `cityops/replay/{id}/…` and pages nobody; `drill` publishes "
    "on the live topics, every message marked `cityops-drill: {id}`."
)
_TIME_HELP = (
    "Payload timestamps: `shift` moves the first to now and keeps the intervals, `scale` also "
    "divides the intervals by the speed, `keep` leaves them as they are."
)

# -- bodies ------------------------------------------------------------------------------


class RecordingOut(BaseModel):
    """A recording in the recordings folder, summarised from its block heads."""

    name: str
    size_bytes: int
    modified_at: datetime
    messages: int = Field(description="Messages in the well-framed blocks.")
    first_at: datetime | None
    last_at: datetime | None
    duration_s: float | None
    complete: bool = Field(description="False when the file ends in a torn or damaged block.")


class ScenarioOut(BaseModel):
    """A shipped scenario a simulation can run."""

    name: str
    description: str
    duration_s: float | None = Field(description="Its suggested length, simulated seconds.")
    clock: str | None = Field(description="Local time of day it starts at, `HH:MM`.")


class ReplayIn(BaseModel):
    """A recording to replay."""

    model_config = ConfigDict(extra="forbid")

    recording: str = Field(
        min_length=1, max_length=200, description="File name, from `GET /recordings`."
    )
    speed: float = Field(
        default=1.0,
        ge=0,
        le=MAX_SPEED,
        allow_inf_nan=False,
        description="Pacing factor; 0 publishes as fast as possible.",
    )
    from_s: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Window start, seconds after the first message.",
    )
    to_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Window end (excluded), seconds after the first one.",
    )
    mode: ModeName = Field(default="sandbox", description=_MODE_HELP)
    time_mode: TimeModeName = Field(default="shift", description=_TIME_HELP)


class SimulationIn(BaseModel):
    """A simulation of the city to run."""

    model_config = ConfigDict(extra="forbid")

    scenario: str | None = Field(
        default=None, max_length=64, description="From `GET /scenarios`; none: an ordinary day."
    )
    speed: float = Field(
        default=1.0,
        ge=0,
        le=MAX_SPEED,
        allow_inf_nan=False,
        description="Simulated seconds per second; 0: as fast as possible.",
    )
    seed: int = Field(default=1, ge=0, le=2**63 - 1)
    duration_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_SIMULATION_S,
        allow_inf_nan=False,
        description="Simulated seconds (default: the scenario's length; without one, until "
        "stopped, or one hour at speed 0).",
    )
    devices: int | None = Field(
        default=None, ge=1, le=100_000, description="Scale the city to this many devices."
    )
    mode: ModeName = Field(default="sandbox", description=_MODE_HELP)
    time_mode: TimeModeName = Field(default="shift", description=_TIME_HELP)


class JobProgressOut(BaseModel):
    """How far a job got."""

    published: int = Field(description="Messages handed to the broker.")
    acked: int = Field(description="Of those, acknowledged by the broker.")
    position_s: float = Field(description="Recording or simulated seconds done.")
    total_s: float | None = Field(description="Length of the window or simulation, when known.")
    fraction: float | None = Field(description="0 to 1, when the length is known.")
    total_messages: int | None = Field(description="Messages to publish, when known.")


class JobOut(BaseModel):
    """A replay or a simulation."""

    id: str = Field(description="Also the run id: its sandbox is `cityops/replay/{id}/…`.")
    kind: Literal["replay", "simulation"]
    state: Literal["running", "paused", "stopped", "finished", "failed"]
    mode: ModeName
    topic_prefix: str
    parameters: dict[str, Any]
    started_by: str
    started_at: datetime
    ended_at: datetime | None
    error: str | None
    progress: JobProgressOut


class SubjectOut(BaseModel):
    """Which series a rule applies to (empty lists match anything)."""

    domains: list[str]
    districts: list[str]
    kinds: list[str]
    devices: list[str]
    channels: list[str]


class RuleOut(BaseModel):
    """A loaded rule."""

    id: str
    name: str
    description: str
    kind: Literal["series", "device", "correlation"]
    severity: Severity
    subject: SubjectOut
    when: str
    clear_when: str
    for_s: float
    ack_role: str
    ack_timeout_s: float | None
    resolve_manually: bool
    category: str
    file: str = Field(description="The rule file, relative to the rules folder.")
    line: int


class RulesTextIn(BaseModel):
    """A candidate rule file."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=MAX_RULES_TEXT, description="The YAML of one rule file.")
    name: str = Field(
        default="candidate.yaml",
        pattern=r"^[\w.-]{1,100}$",
        description="The file name errors point at.",
    )


class RuleErrorOut(BaseModel):
    """Where a rule file is wrong."""

    file: str
    line: int = Field(description="1-based; 0 when unknown.")
    column: int = Field(description="1-based; 0 when unknown.")
    reason: str


class ValidationOut(BaseModel):
    """Whether a candidate rule file loads; the first error found, if not."""

    valid: bool
    errors: list[RuleErrorOut]
    rules: int = Field(description="Rules in the file (0 when invalid).")
    rule_ids: list[str]


class BacktestIn(BaseModel):
    """Rules to run over a stored range of readings."""

    model_config = ConfigDict(extra="forbid")

    rules: str | None = Field(
        default=None,
        max_length=MAX_RULES_TEXT,
        description="Candidate YAML; none: the loaded rules.",
    )
    start: datetime = Field(description="Range start, with a time zone offset.")
    end: datetime = Field(description="Range end (excluded), with a time zone offset.")
    tick_s: float = Field(
        default=1.0,
        ge=1,
        le=60,
        allow_inf_nan=False,
        description="Simulated seconds between two timer evaluations.",
    )
    max_alerts: int = Field(default=1000, ge=0, le=10_000, description="Alerts listed at most.")


class BacktestAlertOut(BaseModel):
    """An alert that would have fired."""

    rule_id: str
    subject: str
    severity: Severity
    district: str
    raised_at: datetime
    cleared_at: datetime | None
    occurrences: int
    chattering: bool
    suppressed: bool = Field(description="Opened while its device was offline: pages nobody.")
    message: str


class BacktestInputOut(BaseModel):
    """What the backtest read."""

    source: str
    messages: int
    readings: int
    presences: int
    malformed: int


class BacktestCounts(BaseModel):
    """Alerts that would have fired, counted three ways."""

    by_rule: dict[str, int]
    by_severity: dict[str, int]
    by_district: dict[str, int]


class QualityOut(BaseModel):
    """ISA-18.2 alert-quality figures (annunciated raises: the ones that page)."""

    alerts: int
    alerts_per_hour: float
    max_per_hour: int
    peak_10min: int
    floods: int
    chattering: int
    standing: int
    suppressed: int
    priority_mix: dict[str, float] = Field(description="Percent of the alerts per severity.")


class BacktestOut(BaseModel):
    """The alerts a rule set would have raised over the range."""

    rules: Literal["loaded", "candidate"]
    start: datetime
    end: datetime
    input: BacktestInputOut
    alerts: list[BacktestAlertOut]
    alerts_truncated: bool = Field(description="More alerts fired than `max_alerts`.")
    counts: BacktestCounts
    quality: QualityOut
    elapsed_s: float


# -- helpers -----------------------------------------------------------------------------


def _at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _manager(ctx: ApiContext) -> JobManager:
    jobs = ctx.jobs
    if not isinstance(jobs, JobManager):
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "replays, simulations and backtests are not enabled in this API process",
        )
    return jobs


_STATUS: list[tuple[type[JobError], int]] = [
    (JobNotFound, status.HTTP_404_NOT_FOUND),
    (RecordingNotFound, status.HTTP_404_NOT_FOUND),
    (InvalidJobRequest, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (JobStateConflict, status.HTTP_409_CONFLICT),
    (TooManyJobs, status.HTTP_429_TOO_MANY_REQUESTS),
    (BacktestBusy, status.HTTP_429_TOO_MANY_REQUESTS),
    (JobStartFailed, status.HTTP_503_SERVICE_UNAVAILABLE),
    (BacktestUnavailable, status.HTTP_503_SERVICE_UNAVAILABLE),
]


def _http(exc: JobError) -> HTTPException:
    code = next((c for kind, c in _STATUS if isinstance(exc, kind)), 422)
    return HTTPException(code, str(exc))


def _job_out(job: JobSnapshot) -> JobOut:
    p = job.progress
    return JobOut(
        id=job.id,
        kind=job.kind,
        state=job.state,
        mode=job.mode,
        topic_prefix=job.topic_prefix,
        parameters=dict(job.parameters),
        started_by=job.started_by,
        started_at=_at(job.started_at),
        ended_at=as_datetime(job.ended_at),
        error=job.error,
        progress=JobProgressOut(
            published=p.published,
            acked=p.acked,
            position_s=p.position_s,
            total_s=p.total_s,
            fraction=p.fraction,
            total_messages=p.total_messages,
        ),
    )


async def _audit(
    ctx: ApiContext, caller: Principal, request: Request, action: str, job: JobSnapshot
) -> None:
    await ctx.audit.record(
        actor=caller.name,
        action=action,
        target=job.id,
        remote_addr=client_address(request),
        detail={
            "mode": job.mode,
            "state": job.state,
            "parameters": dict(job.parameters),
            "published": job.progress.published,
        },
    )


# -- recordings and scenarios ------------------------------------------------------------


@router.get("/recordings", responses=error_responses(401, 403, 503))
async def list_recordings(ctx: Context, _: Engineer) -> list[RecordingOut]:
    """The recordings that can be replayed, by name (message counts from the block heads)."""
    infos = await _manager(ctx).recordings()
    return [
        RecordingOut(
            name=i.name,
            size_bytes=i.size_bytes,
            modified_at=_at(i.modified_at),
            messages=i.messages,
            first_at=as_datetime(i.first_t),
            last_at=as_datetime(i.last_t),
            duration_s=i.duration_s,
            complete=i.complete,
        )
        for i in infos
    ]


def _scenarios() -> list[ScenarioOut]:
    out = []
    for name in available_scenarios():
        try:
            s = load_scenario(name)
        except ScenarioError:  # a broken shipped file: leave it out rather than fail the list
            continue
        out.append(
            ScenarioOut(
                name=name, description=s.description, duration_s=s.duration_s, clock=s.clock
            )
        )
    return out


@router.get("/scenarios", responses=error_responses(401, 403))
async def list_scenarios(_: Engineer) -> list[ScenarioOut]:
    """The scenarios a simulation can run."""
    return await asyncio.to_thread(_scenarios)


# -- replays and simulations -------------------------------------------------------------

JobId = Annotated[str, PathParam(max_length=64, description="The job (and run) id.")]
_START_RESPONSES = error_responses(401, 403, 404, 422, 429, 503)
_STEER_RESPONSES = error_responses(401, 403, 404, 409)


@router.post("/replays", status_code=201, responses=_START_RESPONSES)
async def start_replay(body: ReplayIn, request: Request, ctx: Context, caller: Engineer) -> JobOut:
    """Replay a recording into the sandbox (or, with mode `drill`, onto the live topics).

    404 for an unknown recording, 422 for a bad name or window, 429 when the
    limit of running jobs is reached.
    """
    try:
        job = await _manager(ctx).start_replay(
            ReplayRequest(
                recording=body.recording,
                speed=body.speed,
                from_s=body.from_s,
                to_s=body.to_s,
                mode=body.mode,
                time_mode=body.time_mode,
            ),
            started_by=caller.name,
        )
    except JobError as exc:
        raise _http(exc) from exc
    await _audit(ctx, caller, request, "replay.start", job)
    return _job_out(job)


@router.post("/simulations", status_code=201, responses=error_responses(401, 403, 422, 429, 503))
async def start_simulation(
    body: SimulationIn, request: Request, ctx: Context, caller: Engineer
) -> JobOut:
    """Simulate the city, with a scenario or an ordinary day, into the sandbox (or as a drill).

    422 for an unknown scenario or a bad parameter, 429 when the limit of
    running jobs is reached.
    """
    try:
        job = await _manager(ctx).start_simulation(
            SimulationRequest(
                scenario=body.scenario,
                speed=body.speed,
                seed=body.seed,
                duration_s=body.duration_s,
                devices=body.devices,
                mode=body.mode,
                time_mode=body.time_mode,
            ),
            started_by=caller.name,
        )
    except JobError as exc:
        raise _http(exc) from exc
    await _audit(ctx, caller, request, "simulation.start", job)
    return _job_out(job)


Action = Literal["pause", "resume", "stop"]
_ACTIONS: tuple[tuple[Action, str], ...] = (
    ("pause", "Stop publishing until resumed; answers once the publishing has stopped."),
    ("resume", "Carry on from where the pause held it."),
    ("stop", "End it for good; answers once it has ended."),
)
_KINDS: tuple[tuple[JobKind, str], ...] = (("replay", "replays"), ("simulation", "simulations"))


def _steer(kind: JobKind, action: Action) -> Callable[..., Awaitable[JobOut]]:
    """The route that pauses, resumes or stops a job of ``kind``."""

    async def steer(job_id: JobId, request: Request, ctx: Context, caller: Engineer) -> JobOut:
        manager = _manager(ctx)
        call = {"pause": manager.pause, "resume": manager.resume, "stop": manager.stop}[action]
        try:
            job = await call(kind, job_id)
        except JobError as exc:
            raise _http(exc) from exc
        await _audit(ctx, caller, request, f"{kind}.{action}", job)
        return _job_out(job)

    return steer


def _add_job_routes(kind: JobKind, plural: str) -> None:
    """List, detail, pause, resume and stop for one kind of job (same code for both kinds)."""

    async def list_jobs(ctx: Context, _: Engineer) -> list[JobOut]:
        return [_job_out(j) for j in _manager(ctx).list_jobs(kind)]

    async def get_job(job_id: JobId, ctx: Context, _: Engineer) -> JobOut:
        try:
            return _job_out(_manager(ctx).get(kind, job_id))
        except JobError as exc:
            raise _http(exc) from exc

    router.add_api_route(
        f"/{plural}",
        list_jobs,
        methods=["GET"],
        name=f"list_{plural}",
        summary=f"List {plural}",
        description=f"Running, paused and recently ended {plural}, newest first.",
        responses=error_responses(401, 403, 503),
    )
    router.add_api_route(
        f"/{plural}/{{job_id}}",
        get_job,
        methods=["GET"],
        name=f"get_{kind}",
        summary=f"Get a {kind}",
        description=f"One {kind} with its progress.",
        responses=error_responses(401, 403, 404),
    )
    for action, what in _ACTIONS:
        router.add_api_route(
            f"/{plural}/{{job_id}}/{action}",
            _steer(kind, action),
            methods=["POST"],
            name=f"{action}_{kind}",
            summary=f"{action.capitalize()} a {kind}",
            description=f"{what} 409 when the {kind} has ended.",
            responses=_STEER_RESPONSES,
        )


for _kind, _plural in _KINDS:
    _add_job_routes(_kind, _plural)


# -- rules ---------------------------------------------------------------------------------


def _rule_location(rule: Rule, rules_path: Path) -> tuple[str, int]:
    file, _, line = rule.source.rpartition(":")
    root = rules_path if rules_path.is_dir() else rules_path.parent
    try:
        shown = str(Path(file).resolve().relative_to(root.resolve()))
    except ValueError:
        shown = Path(file).name
    return shown, int(line) if line.isdigit() else 0


def _rule_out(rule: Rule, rules_path: Path) -> RuleOut:
    file, line = _rule_location(rule, rules_path)
    s = rule.subject
    return RuleOut(
        id=rule.id,
        name=rule.name,
        description=rule.description,
        kind=rule.kind,
        severity=rule.severity,
        subject=SubjectOut(
            domains=list(s.domains),
            districts=list(s.districts),
            kinds=list(s.kinds),
            devices=list(s.devices),
            channels=list(s.channels),
        ),
        when=rule.when_text,
        clear_when=rule.clear_when_text,
        for_s=rule.for_s,
        ack_role=rule.ack_role,
        ack_timeout_s=rule.ack_timeout_s,
        resolve_manually=rule.resolve_manually,
        category=rule.category,
        file=file,
        line=line,
    )


@router.get("/rules", responses=error_responses(401, 403))
async def list_rules(ctx: Context, _: View) -> list[RuleOut]:
    """The rules this API acts on, in file order, with where each is defined."""
    return [_rule_out(r, ctx.config.rules_path) for r in ctx.lifecycle.rules.values()]


def _rule_error(exc: RuleFileError) -> RuleErrorOut:
    return RuleErrorOut(file=exc.path, line=exc.line, column=exc.column, reason=exc.reason)


@router.post("/rules/validate", responses=error_responses(401, 403, 422))
async def validate_rules(body: RulesTextIn, _: Engineer) -> ValidationOut:
    """Check a candidate rule file as the rules service would load it.

    An invalid file is a 200 with ``valid: false`` and the first error, with
    its line and column.
    """
    try:
        rules = await asyncio.to_thread(load_rules_text, body.text, body.name)
    except RuleFileError as exc:
        return ValidationOut(valid=False, errors=[_rule_error(exc)], rules=0, rule_ids=[])
    return ValidationOut(valid=True, errors=[], rules=len(rules), rule_ids=[r.id for r in rules])


def _backtest_out(outcome: BacktestOutcome, *, candidate: bool, max_alerts: int) -> BacktestOut:
    report = outcome.report
    by_rule: dict[str, int] = {}
    by_severity: dict[str, int] = {}
    by_district: dict[str, int] = {}
    alerts: list[BacktestAlertOut] = []
    for row in report.alerts:
        district = outcome.districts.get(row.subject, "")
        by_rule[row.rule_id] = by_rule.get(row.rule_id, 0) + 1
        by_severity[row.severity] = by_severity.get(row.severity, 0) + 1
        by_district[district] = by_district.get(district, 0) + 1
        if len(alerts) < max_alerts:
            alerts.append(
                BacktestAlertOut(
                    rule_id=row.rule_id,
                    subject=row.subject,
                    severity=row.severity,
                    district=district,
                    raised_at=_at(row.raised_at),
                    cleared_at=as_datetime(row.cleared_at),
                    occurrences=row.occurrences,
                    chattering=row.chattering,
                    suppressed=row.suppressed,
                    message=row.message,
                )
            )
    f, i = report.figures, report.inputs
    return BacktestOut(
        rules="candidate" if candidate else "loaded",
        start=_at(report.start),
        end=_at(report.end),
        input=BacktestInputOut(
            source=i.source,
            messages=i.messages,
            readings=i.readings,
            presences=i.presences,
            malformed=i.malformed,
        ),
        alerts=alerts,
        alerts_truncated=len(report.alerts) > max_alerts,
        counts=BacktestCounts(by_rule=by_rule, by_severity=by_severity, by_district=by_district),
        quality=QualityOut(
            alerts=f.alerts,
            alerts_per_hour=round(f.alerts_per_hour, 3),
            max_per_hour=f.max_per_hour,
            peak_10min=f.peak_10min,
            floods=f.floods,
            chattering=f.chattering,
            standing=f.standing,
            suppressed=f.suppressed,
            priority_mix={k: round(v, 2) for k, v in f.priority_mix.items()},
        ),
        elapsed_s=round(outcome.elapsed_s, 3),
    )


@router.post("/rules/backtest", responses=error_responses(401, 403, 422, 429, 503))
async def backtest_rules(body: BacktestIn, ctx: Context, _: Engineer) -> BacktestOut:
    """Run the loaded rules, or a candidate file, over stored readings; report what would fire.

    The range is at most the API's limit (7 days by default) and must end
    after it starts (422). A candidate that does not load is a 422 naming
    its line. The run happens on a worker thread; one backtest at a time
    (429 while one runs), abandoned past the API's time limit (503).
    """
    for label, moment in (("start", body.start), ("end", body.end)):
        if moment.tzinfo is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"{label} {moment.isoformat()} needs a time zone offset, e.g. +09:00 or Z",
            )
    manager = _manager(ctx)
    rules: tuple[Rule, ...]
    if body.rules is None:
        rules, label = tuple(ctx.lifecycle.rules.values()), "loaded rules"
    else:
        try:
            rules = await asyncio.to_thread(load_rules_text, body.rules, "candidate.yaml")
        except RuleFileError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"the candidate rules do not load: {exc}"
            ) from exc
        label = "candidate rules"
    try:
        outcome = await manager.backtest(
            rules,
            label=label,
            database_url=ctx.config.database_url,
            start=body.start.timestamp(),
            end=body.end.timestamp(),
            tick_s=body.tick_s,
        )
    except JobError as exc:
        raise _http(exc) from exc
    return _backtest_out(outcome, candidate=body.rules is not None, max_alerts=body.max_alerts)
