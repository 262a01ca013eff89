"""Errors of the control_api package.

``ControlApiError`` is the root; catch it to handle anything this package
raises on purpose. Leaves, named for what the caller can do:

* authentication: ``AuthenticationFailed`` (wrong name or password, or a
  disabled user: one message for all three), ``LoginRateLimited`` (too many
  recent failures; carries the seconds to wait), ``UserExists`` and
  ``UserNotFound`` (name the user).
* ``CapError``: an alert, area or feed that cannot be written as OASIS CAP
  1.2 (a sender with a comma, a polygon with fewer than 3 distinct points, a
  rule that is not the alert's). It is also a ``ValueError``: it is always bad
  input, never a failure of the machine.
* history: ``InvalidRange`` (a time range or resolution that cannot be
  served; names the numbers), ``InvalidQuery`` (a parameter combination
  that cannot be served, such as raw readings for a group), ``SeriesNotFound``
  and its ``RunNotFound`` (a replay run nobody recorded), and
  ``HistoryUnavailable`` (the database failed or exceeded the configured
  statement timeout, which the message names; retry later).
* live: ``LiveProtocolError`` (a client message or query parameter the live
  protocol does not accept; also a ``ValueError``) and ``SnapshotUnavailable``
  (the console snapshot could not be read: the database failed).
* engineer jobs and backtests, under ``JobError`` (the routes map them):
  ``JobNotFound`` and ``RecordingNotFound`` (404), ``InvalidJobRequest``
  (422; also a ``ValueError``), ``JobStateConflict`` (409), ``TooManyJobs``
  and ``BacktestBusy`` (429), ``JobStartFailed`` and ``BacktestUnavailable``
  (503).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from control_api.job_types import JobKind

__all__ = [
    "AuthenticationFailed",
    "BacktestBusy",
    "BacktestUnavailable",
    "CapError",
    "ControlApiError",
    "HistoryUnavailable",
    "InvalidJobRequest",
    "InvalidQuery",
    "InvalidRange",
    "JobError",
    "JobNotFound",
    "JobStartFailed",
    "JobStateConflict",
    "LiveProtocolError",
    "LoginRateLimited",
    "RecordingNotFound",
    "RunNotFound",
    "SeriesNotFound",
    "SnapshotUnavailable",
    "TooManyJobs",
    "UserExists",
    "UserNotFound",
]


class ControlApiError(Exception):
    """Root of the control_api errors."""


class AuthenticationFailed(ControlApiError):
    """Wrong name or password, or a disabled user (deliberately not told apart)."""

    def __init__(self) -> None:
        super().__init__("wrong user name or password")


class LoginRateLimited(ControlApiError):
    """Too many recent failed logins for a name or an address.

    Attributes:
        name: The user name of the attempt.
        retry_after_s: Seconds until the oldest counted failure expires.
    """

    def __init__(self, name: str, retry_after_s: int) -> None:
        super().__init__(f"too many failed logins for {name!r}: retry in {retry_after_s} s")
        self.name = name
        self.retry_after_s = retry_after_s


class UserExists(ControlApiError):
    """A user of that name exists already."""

    def __init__(self, name: str) -> None:
        super().__init__(f"user {name!r} exists already")
        self.name = name


class UserNotFound(ControlApiError):
    """No user of that name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no user {name!r}")
        self.name = name


class CapError(ControlApiError, ValueError):
    """Input that cannot be expressed in a valid CAP 1.2 document or CAP feed."""


class InvalidRange(ControlApiError):
    """A history request whose time range or resolution cannot be served."""


class SeriesNotFound(ControlApiError):
    """No series matches the request."""


class InvalidQuery(ControlApiError, ValueError):
    """A history request whose parameters cannot be served together.

    For example raw readings for a group aggregate, or a device-kind filter on
    the replay sandbox, which records no kinds. Always bad input.
    """


class RunNotFound(SeriesNotFound):
    """The replay sandbox holds no run of that id: nothing of it can be found."""


class HistoryUnavailable(ControlApiError):
    """The database could not answer a history request.

    It failed, or the query ran past the configured statement timeout (the
    message names it). Nothing is wrong with the request: retry later.
    """


class LiveProtocolError(ControlApiError, ValueError):
    """A client message or query parameter the live protocol does not accept."""


class SnapshotUnavailable(ControlApiError):
    """The snapshot could not be read (database unreachable or a query failed)."""


class JobError(ControlApiError):
    """Root of the errors of engineer jobs and backtests."""


class JobNotFound(JobError):
    """No job of that kind and id (ended jobs are forgotten past the history size)."""

    def __init__(self, kind: JobKind, job_id: str) -> None:
        super().__init__(f"no {kind} {job_id!r}")  # each kind is its own noun (jobs._NOUNS)
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
