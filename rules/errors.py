"""Errors of the rules package.

``RulesError`` is the root. Two families hang under it:

* loading: ``RuleFileError`` (a rule file is unreadable or invalid; it names the
  file, line, column and reason) and ``ExpressionError`` (an expression does not
  parse or type-check; it names the column). A failed load or reload raises and
  leaves whatever rule set the caller holds untouched.
* the alert lifecycle: ``ForbiddenTransition`` (the action is not allowed in the
  alert's state), ``NotPermitted`` (the actor's role may not do it, or the rule
  forbids it) and ``VersionConflict`` (someone changed the alert first; it
  carries who acknowledged it and when).
"""

from __future__ import annotations


class RulesError(Exception):
    """Root of the rules errors."""


class ExpressionError(RulesError):
    """An expression that does not parse or type-check.

    Attributes:
        reason: What is wrong, without the position.
        column: 1-based column in the expression text.
        text: The expression text.
    """

    def __init__(self, reason: str, column: int, text: str) -> None:
        super().__init__(f"column {column}: {reason}")
        self.reason = reason
        self.column = column
        self.text = text


class RuleFileError(RulesError):
    """A rule file that cannot be loaded.

    Attributes:
        path: The file.
        line: 1-based line of the offending node (0 when unknown).
        column: 1-based column (0 when unknown).
        reason: What is wrong.
    """

    def __init__(self, path: str, line: int, column: int, reason: str) -> None:
        where = f"{path}:{line}:{column}" if line else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.column = column
        self.reason = reason


class LifecycleError(RulesError):
    """Root of the alert lifecycle errors."""


class ForbiddenTransition(LifecycleError):
    """An action that the alert's current state does not allow."""

    def __init__(self, alert_id: str, state: str, action: str, why: str = "") -> None:
        tail = f": {why}" if why else ""
        super().__init__(f"alert {alert_id!r} is {state}; cannot {action}{tail}")
        self.alert_id = alert_id
        self.state = state
        self.action = action


class NotPermitted(LifecycleError):
    """An actor whose role may not perform the action, or a rule that forbids it."""

    def __init__(self, alert_id: str, action: str, why: str) -> None:
        super().__init__(f"cannot {action} alert {alert_id!r}: {why}")
        self.alert_id = alert_id
        self.action = action


class VersionConflict(LifecycleError):
    """The alert changed since the caller read it (optimistic concurrency).

    Attributes:
        alert_id: The alert.
        expected_version: The version the caller based its action on.
        actual_version: The current version.
        acked_by: Who acknowledged the alert, if anyone.
        acked_at: When, in seconds since the epoch.
    """

    def __init__(
        self,
        alert_id: str,
        expected_version: int,
        actual_version: int,
        acked_by: str | None,
        acked_at: float | None,
    ) -> None:
        who = f"; acknowledged by {acked_by} at {acked_at:.0f}" if acked_by else ""
        super().__init__(
            f"alert {alert_id!r} is at version {actual_version}, not {expected_version}{who}"
        )
        self.alert_id = alert_id
        self.expected_version = expected_version
        self.actual_version = actual_version
        self.acked_by = acked_by
        self.acked_at = acked_at
