"""Progress of long work: a rich bar on a terminal, plain lines otherwise (DESIGN.md)."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

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

__all__ = ["ProgressReporter"]


class ProgressReporter:
    """Shows how far a run is.

    Args:
        description: What is running, e.g. ``replay r1``.
        total: The amount of work (seconds of recording or of simulated
            time, or messages), or ``None`` when unbounded.
        unit: What ``total`` counts, for the plain lines.
        stream: Where to write (default stderr).
        tty: Force the rich bar on or off (default: whether ``stream`` is a TTY).
        every_s: Interval between plain lines.
    """

    def __init__(
        self,
        description: str,
        *,
        total: float | None,
        unit: str = "s",
        stream: TextIO | None = None,
        tty: bool | None = None,
        every_s: float = 5.0,
    ) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty() if tty is None else tty
        self._description = description
        self._total = total
        self._unit = unit
        self._every_s = every_s
        self._next_line = 0.0
        self._note = ""
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressReporter:
        if self._tty:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
                console=Console(file=self._stream),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._description, total=self._total, note="")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def update(self, completed: float, note: str = "", *, force: bool = False) -> None:
        """Report ``completed`` units of work, with a short note (counts, state)."""
        self._note = note
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed, note=note)
            return
        now = time.monotonic()
        if not force and now < self._next_line:
            return
        self._next_line = now + self._every_s
        if self._total:
            share = f"{min(100.0, 100.0 * completed / self._total):5.1f}%"
            done = f"({completed:.0f}/{self._total:.0f} {self._unit})"
            line = f"{self._description}: {share} {done} {note}"
        else:
            line = f"{self._description}: {completed:.0f} {self._unit} {note}"
        print(line.rstrip(), file=self._stream, flush=True)

    def close(self) -> None:
        """Stop the bar (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
