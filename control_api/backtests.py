"""Backtests inside the API: rules evaluated over stored readings, bounded.

Backtests are request/response, not jobs, but they are bounded like jobs: at
most ``max_backtests`` at once on a thread pool of their own, each over at
most ``max_range_s`` of stored history and abandoned after ``timeout_s``, so
the event loop is never blocked by one. :class:`BacktestRunner` holds those
bounds; :class:`control_api.jobs.JobManager` owns one and shuts it down with
its jobs.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from control_api.errors import BacktestBusy, BacktestUnavailable, InvalidJobRequest
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

__all__ = ["BacktestOutcome", "BacktestRunner"]


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
            warm_up=stored.warm_up_readings(),
        )
    signals: tuple[AlertSignal, ...] = run.signals[0]
    districts: dict[str, str] = {}
    for signal in signals:
        districts.setdefault(signal.subject, signal.district)
    report = build_report(
        signals, rules=label, start=run.start, end=run.end, inputs=counts.summary(source)
    )
    return BacktestOutcome(report, districts, time.monotonic() - began)


class BacktestRunner:
    """Runs backtests on threads of its own, bounded in number, range and time.

    Args:
        max_backtests: Backtests running at once.
        max_range_s: Longest stored range a backtest may read.
        timeout_s: A backtest running longer is abandoned.
        db_connect_timeout_s: Deadline for a backtest's database connection.
    """

    def __init__(
        self,
        *,
        max_backtests: int,
        max_range_s: float,
        timeout_s: float,
        db_connect_timeout_s: float,
    ) -> None:
        self.max_backtests = max_backtests
        self.max_range_s = max_range_s
        self.timeout_s = timeout_s
        self._db_connect_timeout_s = db_connect_timeout_s
        self._running = 0
        self._closing = threading.Event()
        self._pool = ThreadPoolExecutor(max_backtests, thread_name_prefix="cityops-bt")

    def close(self) -> None:
        """Make running backtests give up at their next progress check (the API is stopping)."""
        self._closing.set()

    def shutdown(self) -> None:
        """Release the thread pool without waiting (backtests still running give up)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(
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
            BacktestUnavailable: the database failed, or the run passed ``timeout_s``.
        """
        if not (math.isfinite(start) and math.isfinite(end) and end > start):
            msg = f"the backtest range must end after it starts: start {start}, end {end}"
            raise InvalidJobRequest(msg)
        if end - start > self.max_range_s:
            msg = (
                f"the backtest range of {(end - start) / 86_400:.2f} days is longer than the "
                f"maximum of {self.max_range_s / 86_400:g} days"
            )
            raise InvalidJobRequest(msg)
        if not (math.isfinite(tick_s) and (end - start) / tick_s <= self.max_range_s):
            # Ticks between inputs are not interruptible: bound them by those of the
            # longest range at one tick per second.
            msg = (
                f"tick_s {tick_s:g} is too fine for a range of {end - start:.0f} s: at most "
                f"{self.max_range_s:.0f} ticks, so at least "
                f"{(end - start) / self.max_range_s:.3g} s"
            )
            raise InvalidJobRequest(msg)
        if self._running >= self.max_backtests:
            msg = (
                f"{self._running} backtests are running, the limit is {self.max_backtests}: "
                "try again when it has finished"
            )
            raise BacktestBusy(msg)
        deadline = time.monotonic() + self.timeout_s
        abandoned = threading.Event()
        limit = self.timeout_s

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
        future = asyncio.get_running_loop().run_in_executor(self._pool, work)
        self._running += 1

        def release(_: object) -> None:
            self._running -= 1  # when the thread is done, not when the request gave up

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
