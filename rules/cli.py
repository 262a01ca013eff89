"""``cityops backtest``: run rules over a recording or a stored range; report the alerts.

``cityops.cli`` calls :func:`register`; the handler takes the parsed namespace
and returns the exit code: 0 when the report was produced (whatever it
holds), 2 when the command cannot run (a bad rule file, a missing or corrupt
recording, no database for ``--from``/``--to``, a bad option).

The report goes to stdout (rich tables, or one JSON document with
``--json``); logs and progress go to stderr: a rich bar on a terminal, a
plain line every 5 s otherwise (DESIGN.md).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TextIO

import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cityops.errors import ConfigError
from cityops.runtime import embedded_postgres, rules_path
from cityops.settings import Settings
from rules import serve
from rules.backtest import (
    BacktestOptions,
    BacktestRun,
    InputCounts,
    RecordingSource,
    StoredRange,
    run_backtest,
)
from rules.durations import parse_duration
from rules.errors import RulesError
from rules.loader import RuleSet
from rules.report import (
    SpeedFigures,
    build_report,
    compare_reports,
    comparison_json,
    render_comparison,
    render_report,
    report_json,
)

__all__ = ["register"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2
_PROG = "cityops backtest"


def _time(text: str) -> float:
    """``--from``/``--to``: epoch seconds, or ISO 8601 (a time without offset is UTC)."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            msg = f"{text!r} is not a time"
            raise argparse.ArgumentTypeError(msg)
        return value
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        msg = f"{text!r} is neither epoch seconds nor an ISO 8601 time (e.g. 2026-06-03T09:00Z)"
        raise argparse.ArgumentTypeError(msg) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if seconds <= 0:
        msg = f"{text!r} must be longer than 0s"
        raise argparse.ArgumentTypeError(msg)
    return seconds


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cityops rules`` and ``cityops backtest`` to the ``cityops`` parser."""
    rules = subparsers.add_parser(
        "rules",
        help="the rules engine as a service of its own; `rules validate` checks rule files",
        description=(
            "Without an action: run the rules engine alone, for scaled-out deployments where "
            "`cityops ingest --shared-group` members store readings (one instance evaluates; "
            "others wait as hot standbys). `cityops ingest` without a shared group evaluates "
            "the rules itself."
        ),
    )
    serve.add_arguments(rules)
    rules.set_defaults(handler=serve.run)
    rules_sub = rules.add_subparsers(dest="rules_command", metavar="ACTION", required=False)
    validate = rules_sub.add_parser(
        "validate", help="load and check a rules file or folder; print errors with file:line"
    )
    validate.add_argument("path", type=Path, help="rules file or folder")
    validate.set_defaults(handler=_validate)
    p = subparsers.add_parser(
        "backtest",
        help="run rules over a recording or a stored time range; report the alerts",
        description=(
            "Run the live rule evaluator over a recording or a range of stored readings, as "
            "fast as possible, with a clock that follows the data. Reports every alert that "
            "would have fired and ISA-18.2's alert-quality figures; --compare shows how "
            "another rule file differs."
        ),
    )
    p.add_argument(
        "--rules",
        metavar="FILE_OR_DIR",
        help="rule file or folder (default: $CITYOPS_RULES, else the shipped rules)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--recording", metavar="FILE", type=Path, help="a `cityops record` file")
    source.add_argument(
        "--from",
        dest="start",
        metavar="T",
        type=_time,
        help="start of a stored range: epoch seconds or ISO 8601 (no offset means UTC)",
    )
    p.add_argument("--to", dest="end", metavar="T", type=_time, help="end of the range (excluded)")
    p.add_argument(
        "--database-url",
        help="postgresql://… for --from/--to (default: $CITYOPS_DATABASE_URL, else the "
        "running embedded database)",
    )
    p.add_argument(
        "--compare", metavar="OTHER_RULES", help="also run this rule file or folder; show the diff"
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")
    p.add_argument(
        "--speed-report", action="store_true", help="also report how fast the backtest ran"
    )
    p.add_argument(
        "--tick",
        type=_duration,
        default=1.0,
        metavar="DURATION",
        help="simulated time between two evaluations of no_data/offline timers (default 1s)",
    )
    p.add_argument(
        "--max-rows",
        type=int,
        default=200,
        metavar="N",
        help="alert rows shown per table in the text report (0: all; --json has all)",
    )
    p.set_defaults(handler=_run)


class _Progress:
    """A rich bar on a terminal, a plain line every ``every_s`` otherwise."""

    def __init__(self, total_s: float, *, stream: TextIO, every_s: float = 5.0) -> None:
        self._stream = stream
        self._total_s = max(total_s, 1e-9)
        self._every_s = every_s
        self._next_line = 0.0
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._last = ""
        if stream.isatty():
            self._bar = Progress(
                TextColumn("[bold]backtest"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
                console=Console(file=stream),
                transient=True,
            )

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task("backtest", total=self._total_s, note="")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif exc is None and self._last:
            print(f"backtest: done, {self._last}", file=self._stream, flush=True)

    def update(self, done_s: float, counts: InputCounts) -> None:
        note = f"{counts.readings:,} readings"
        self._last = note
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done_s, note=note)
            return
        now = time.monotonic()
        if now < self._next_line:
            return
        self._next_line = now + self._every_s
        share = min(100.0, 100.0 * done_s / self._total_s)
        print(f"backtest: {share:5.1f}% of simulated time, {note}", file=self._stream, flush=True)


def _fail(message: str) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _database_url(args: argparse.Namespace, settings: Settings) -> str:
    if args.database_url:
        return str(args.database_url)
    if settings.database_url:
        return settings.database_url
    pg = embedded_postgres(settings)
    if pg.is_running():
        return pg.url()
    msg = (
        "--from/--to read stored readings, but no database is configured: set"
        " CITYOPS_DATABASE_URL (or pass --database-url), or start `cityops up`"
    )
    raise ConfigError(msg)


def _run(args: argparse.Namespace) -> int:
    try:
        return _backtest(args)
    except (RulesError, ConfigError) as exc:
        # RuleFileError already reads "file:line:col: reason".
        return _fail(str(exc))


def _backtest(args: argparse.Namespace) -> int:
    if args.end is not None and args.start is None:
        return _fail("--to needs --from (or use --recording)")
    if args.start is not None and args.end is None:
        return _fail("--from needs --to")
    settings = Settings.from_env()
    rules_arg = Path(args.rules) if args.rules else rules_path(settings)
    rule_sets = [RuleSet.load(rules_arg)]
    labels = [str(rules_arg)]
    if args.compare:
        rule_sets.append(RuleSet.load(args.compare))
        labels.append(str(args.compare))
    options = BacktestOptions(tick_s=args.tick)
    counts = InputCounts()
    if args.recording is not None:
        recording = RecordingSource(args.recording)
        recording.scan()
        start, end = recording.span
        description = recording.description
        with _Progress(end - start, stream=sys.stderr) as progress:
            run = run_backtest(
                rule_sets,
                recording.observations(counts),
                counts=counts,
                start=start,
                end=end,
                options=options,
                progress=progress.update,
            )
    else:
        start, end = float(args.start), float(args.end)
        stored = StoredRange(_database_url(args, settings), start=start, end=end)
        description = stored.description
        with stored, _Progress(end - start, stream=sys.stderr) as progress:
            run = run_backtest(
                rule_sets,
                stored.observations(counts),
                counts=counts,
                start=start,
                end=end,
                options=options,
                kind_of=stored.kind_of,
                progress=progress.update,
                warm_up=stored.warm_up_readings(),
            )
    if counts.malformed:
        log.warning(
            "%d messages did not decode (the live ingester dead-letters them), e.g. %s",
            counts.malformed,
            "; ".join(counts.malformed_examples[:3]),
        )
    _print(args, run, labels, counts, description)
    return EXIT_OK


def _print(
    args: argparse.Namespace,
    run: BacktestRun,
    labels: list[str],
    counts: InputCounts,
    description: str,
) -> None:
    speed = (
        SpeedFigures(run.elapsed_s, counts.readings, run.end - run.start, run.ticks)
        if args.speed_report
        else None
    )
    inputs = counts.summary(description)
    reports = [
        build_report(signals, rules=label, start=run.start, end=run.end, inputs=inputs, speed=speed)
        for signals, label in zip(run.signals, labels, strict=True)
    ]
    if args.json:
        doc = (
            comparison_json(compare_reports(*reports))
            if len(reports) == 2
            else report_json(reports[0])
        )
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    renderables = (
        render_comparison(compare_reports(*reports), max_rows=args.max_rows)
        if len(reports) == 2
        else render_report(reports[0], max_rows=args.max_rows)
    )
    for renderable in renderables:
        console.print(renderable)


def _validate(args: argparse.Namespace) -> int:
    try:
        loaded = RuleSet.load(args.path)
    except RulesError as exc:
        print(f"cityops rules validate: {exc}", file=sys.stderr)
        return 2
    by_severity: dict[str, int] = {}
    for rule in loaded.rules:
        by_severity[rule.severity] = by_severity.get(rule.severity, 0) + 1
    mix = ", ".join(f"{n} {sev}" for sev, n in sorted(by_severity.items()))
    print(f"{args.path}: {len(loaded.rules)} rules OK ({mix})")
    return 0
